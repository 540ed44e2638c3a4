//! The target lifecycle, one piece that every front end reuses: attach (an
//! allocator plan from [`crate::allocator`], applied by [`crate::ebpf`]),
//! keep up with the target (maps refreshed, allocators mapped later hooked,
//! thresholds, OOM kills, exits, execs: see [`exec`]), and snapshot (kernel
//! data → model → symbolized snapshot → files), until detach.
//!
//! An [`Engine`] is driven from outside: `attach` and `run`
//! ([`crate::commands::attach`]) call [`Engine::tick`] on a timer and
//! [`Engine::snapshot_all`] on signals. No clap types and no event loop here.
//! It owns the [`OutputDir`] its front end opened, and counts the snapshots
//! that could not be written (the front end exits 1 for them).
//!
//! With a CPU budget (the agent's `--max-overhead`), [`Engine::tick`] also
//! measures what each target's probes cost it and pauses and resumes its
//! probes as its [`budget::Governor`] says; its snapshots then carry a
//! [`crate::model::Coverage`].
pub mod budget;
mod config;
mod exec;

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

pub use config::Config;

use crate::{
    allocator::{self, AttachPlan},
    ebpf::{self, LoadOptions, Profiler},
    error::{Error, Result},
    lines::{self, say},
    model::{
        Coverage, CoverageWindow, Kubernetes, RawSnapshot, RetiredStacks, Snapshot, TargetMeta,
        Trigger,
    },
    output::{dir::OutputDir, writer::Series},
    procfs::{self, ProcessInfo},
    symbolize::Symbolizer,
    trigger::StepTrigger,
};

/// One profiled process.
struct Target {
    info: ProcessInfo,
    attached_at: String,
    series: Series,
    rss_bytes: u64,
    rss_step: Option<StepTrigger>,
    heap_step: Option<StepTrigger>,
    /// The OOM killer picked it and its `oom` snapshot is written.
    oom_written: bool,
    /// Allocator libraries hooked ([`allocator::Library::identity`]).
    hooked: Vec<String>,
    /// Stacks retired from the kernel, with what they allocated.
    retired: RetiredStacks,
    /// What the `attached` line said: probes, and the libraries they are in.
    probes: (usize, Vec<String>),
    /// [`exec::Image`]: what tells an exec of the target.
    image: exec::Image,
    /// `starttime` at attach: the same pid with another is another process.
    start_ticks: Option<u64>,
    /// The file name of its last snapshot's first file.
    last_snapshot: Option<String>,
    /// Its CPU budget, when one is kept.
    budget: Option<Budget>,
    /// The pod it runs in (the agent's `--kubernetes`), for its snapshots.
    kubernetes: Option<Kubernetes>,
}

/// A target's CPU budget: its controller, and the figures last read.
struct Budget {
    governor: budget::Governor,
    /// When it was attached, by the wall clock (windows are offsets).
    attached: SystemTime,
    cpu_ticks: Option<u64>,
    hits: ebpf::Hits,
}

impl Budget {
    /// What a snapshot taken at `now` covers.
    fn coverage(&self, now: Instant) -> Coverage {
        let g = &self.governor;
        let at =
            |offset: Duration| humantime::format_rfc3339_millis(self.attached + offset).to_string();
        Coverage {
            ratio: g.coverage(now),
            follow_ms: g.follow().as_millis() as u64,
            max_overhead: g.budget(),
            overhead: g.overhead(),
            windowed: g.windowed(),
            windows: g
                .windows(now)
                .into_iter()
                .map(|(start, end)| CoverageWindow {
                    start: at(start),
                    end: at(end),
                })
                .collect(),
        }
    }
}

/// What a probe hit costs here: a trap (calibrated at start) and the
/// program's run time (BPF statistics, when the kernel keeps them).
struct CostModel {
    traps: ebpf::TrapCost,
    /// Nanoseconds per run of heapbpf's programs, lately (0 without
    /// statistics).
    program_ns: f64,
    /// The statistics last read, and when.
    stats: Option<(Instant, ebpf::RunStats)>,
    ticks_per_second: f64,
}

/// How often the programs' run time per run is read again.
const RUN_STATS_EVERY: Duration = Duration::from_secs(1);

/// Less than this a trap cannot cost: a calibration below it is not believed.
const MIN_TRAP_NS: f64 = 200.0;

/// A trap's cost when it cannot be calibrated: about what this VM measured
/// (entry ~1 µs, uretprobe return ~1.5 µs), rounded up.
const FALLBACK_TRAPS: ebpf::TrapCost = ebpf::TrapCost {
    entry_ns: 1500.0,
    return_ns: 2500.0,
};

/// What a front end shows of a target while it is profiled.
#[derive(Clone, Debug)]
pub struct TargetStatus {
    pub pid: u32,
    pub comm: String,
    pub exe: String,
    pub attached_at: String,
    /// The kernel's running totals (zero when it cannot be read).
    pub totals: ebpf::LiveTotals,
    /// CPU time the probes added, as a share of the target's own.
    pub overhead: f64,
    /// Share of the time allocation probes were attached.
    pub coverage: f64,
    /// Profiled in windows (over its CPU budget).
    pub windowed: bool,
    /// When windowed: the budget and the duty cycle, in words.
    pub windows: Option<String>,
    pub last_snapshot: Option<String>,
}

/// Loaded programs, the symbolizer and the targets they serve.
pub struct Engine {
    cfg: Config,
    out: OutputDir,
    /// Snapshots that could not be written.
    failed_snapshots: usize,
    profiler: Profiler,
    symbolizer: Symbolizer,
    targets: Vec<Target>,
    /// With a CPU budget: what a probe hit costs.
    cost: Option<CostModel>,
    /// With [`Config::keep_written`]: the snapshots written since the last
    /// [`Engine::take_written`], at most [`MAX_KEPT_WRITTEN`] (the oldest go).
    written: std::collections::VecDeque<Snapshot>,
}

/// Snapshots kept for [`Engine::take_written`] at most: the agent drains
/// them every loop turn, so more would mean a front end that never does.
const MAX_KEPT_WRITTEN: usize = 64;

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Engine {
    /// Loads the eBPF programs for `cfg`; no target yet. Snapshots go to
    /// `out`, opened by the front end before anything else.
    pub fn new(cfg: Config, out: OutputDir) -> Result<Self> {
        let profiler = Profiler::load(&LoadOptions {
            max_live_blocks: cfg.max_live_blocks,
            max_stacks: cfg.max_stacks,
            floor: cfg.floor,
            sample_bytes: cfg.sample_bytes,
            unwind: cfg.unwind,
            sessions: cfg.sessions,
            exec_tracepoint: cfg.exec_tracepoint,
        })?;
        let mut profiler = profiler;
        let cost = cfg.max_overhead.map(|_| {
            profiler.count_hits();
            // Once per process: the agent loads an engine per busy spell.
            static CALIBRATED: std::sync::OnceLock<ebpf::TrapCost> = std::sync::OnceLock::new();
            let traps = *CALIBRATED.get_or_init(|| {
                let traps = profiler
                    .calibrate_traps()
                    .and_then(|t| {
                        // A trap costs hundreds of ns on any machine: less
                        // means the calibration's probe was never hit.
                        if t.entry_ns >= MIN_TRAP_NS && t.return_ns >= MIN_TRAP_NS {
                            Ok(t)
                        } else {
                            Err(Error::Runtime(format!(
                                "it measured {:.0} ns an entry, {:.0} ns a return",
                                t.entry_ns, t.return_ns
                            )))
                        }
                    })
                    .unwrap_or_else(|e| {
                        tracing::warn!("cannot calibrate the cost of a trap ({e}); assuming {} ns an entry, {} ns a return", FALLBACK_TRAPS.entry_ns, FALLBACK_TRAPS.return_ns);
                        FALLBACK_TRAPS
                    });
                tracing::info!(
                    entry_ns = traps.entry_ns.round(),
                    return_ns = traps.return_ns.round(),
                    "trap cost calibrated (an empty uprobe, and uretprobe, on heapbpf's own code)"
                );
                traps
            });
            let stats = profiler
                .enable_run_stats()
                .then(|| profiler.run_stats())
                .flatten()
                .map(|s| (Instant::now(), s));
            CostModel {
                traps,
                program_ns: 0.0,
                stats,
                ticks_per_second: procfs::clock_ticks_per_second() as f64,
            }
        });
        let symbolizer = Symbolizer::with_debuginfod(
            cfg.debuginfod
                .clone()
                .map(crate::debuginfo::debuginfod::Client::start)
                .transpose()?
                .flatten(),
        );
        Ok(Engine {
            cfg,
            out,
            failed_snapshots: 0,
            profiler,
            symbolizer,
            targets: Vec::new(),
            cost,
            written: std::collections::VecDeque::new(),
        })
    }

    /// The directory snapshots go to.
    pub fn output_dir(&self) -> &OutputDir {
        &self.out
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// How many snapshots could not be written so far.
    pub fn failed_snapshots(&self) -> usize {
        self.failed_snapshots
    }

    /// The snapshots written since the last call, oldest first (with
    /// [`Config::keep_written`]; else none): every trigger's, the `exit`,
    /// `oom`, `exec` and step snapshots [`Engine::tick`] writes included.
    pub fn take_written(&mut self) -> Vec<Snapshot> {
        self.written.drain(..).collect()
    }

    /// Whether no target is left.
    pub fn is_idle(&self) -> bool {
        self.targets.is_empty()
    }

    fn index(&self, pid: u32) -> Option<usize> {
        self.targets.iter().position(|t| t.info.pid == pid)
    }

    /// Attaches to a running process: its allocator found in its memory map.
    pub fn attach(&mut self, info: ProcessInfo) -> Result<()> {
        let pid = info.pid;
        let result = procfs::read_maps(pid)
            .and_then(|maps| allocator::plan(&info, &maps, &self.cfg.allocator))
            .and_then(|plan| self.attach_plan(info, &plan));
        // A process that exits meanwhile leaves an empty map and unreadable
        // files: whatever failed, that is what happened.
        result.map_err(|e| {
            if procfs::is_alive(pid) {
                e
            } else {
                Error::Exited { pid }
            }
        })
    }

    /// Hooks every library of `plan` and registers the target; prints the
    /// contract's `attached` line once every probe is live.
    pub fn attach_plan(&mut self, info: ProcessInfo, plan: &AttachPlan) -> Result<()> {
        let pid = info.pid;
        // Open every mapped module before the first allocation is seen, so
        // that the stacks stay symbolizable after the target exits.
        self.symbolizer.track(pid);
        let probes = match self.profiler.attach(pid, plan) {
            Ok(p) => p,
            Err(e) => {
                self.symbolizer.forget(pid);
                return Err(e);
            }
        };
        for line in allocator::describe(plan) {
            tracing::info!(pid, "{line}");
        }
        for p in &probes {
            let kind = if p.session {
                " (session: entry, return when needed)"
            } else if p.is_return {
                " (return)"
            } else {
                ""
            };
            tracing::info!(
                pid,
                "probe placed at {}+{:#x}{kind} in {}",
                p.symbol,
                p.offset,
                p.library
            );
        }
        let probes = exec::summary(&probes);
        let rss = procfs::rss_bytes(pid).unwrap_or(0);
        self.say_attached(&info, &probes);
        self.targets.push(Target {
            attached_at: now_rfc3339(),
            series: Series::new(pid),
            rss_bytes: rss,
            rss_step: self.cfg.rss_step.map(|s| StepTrigger::new(rss, s)),
            heap_step: self.cfg.heap_step.map(|s| StepTrigger::new(0, s)),
            oom_written: false,
            hooked: plan.libraries().map(allocator::Library::identity).collect(),
            retired: RetiredStacks::default(),
            probes,
            image: exec::Image::new(pid),
            start_ticks: procfs::read_stat(pid).map(|s| s.start_ticks),
            last_snapshot: None,
            kubernetes: None,
            budget: self.cfg.max_overhead.map(|b| Budget {
                governor: budget::Governor::new(b, budget::Params::default(), Instant::now()),
                attached: SystemTime::now(),
                cpu_ticks: procfs::read_stat(pid).map(|s| s.cpu_ticks()),
                hits: self.profiler.hits(pid).unwrap_or_default(),
            }),
            info,
        });
        Ok(())
    }

    /// The contract's `attached` line: `probes` is (count, libraries).
    fn say_attached(&self, info: &ProcessInfo, probes: &(usize, Vec<String>)) {
        say(&lines::attached(
            info.pid,
            &info.comm,
            probes.0,
            &probes.1.iter().map(String::as_str).collect::<Vec<_>>(),
            self.cfg.sample_bytes,
        ));
    }

    /// OOM victims first (their snapshot is the one users need most, and
    /// they are about to vanish), then exits — but of `held`, a launched
    /// command whose exit its front end reports.
    pub fn tick(&mut self, held: Option<u32>) {
        self.check_execs();
        self.check_oom();
        self.reap_exited(held);
        self.maintain_stacks(false);
        self.govern(Instant::now());
    }

    /// With a CPU budget: measures what each target's probes cost it since
    /// the last call, and attaches or detaches its probes as its governor
    /// says (saying once when a target goes windowed, and back).
    pub fn govern(&mut self, now: Instant) {
        let Some(cost) = self.cost.as_mut() else {
            return;
        };
        if cost
            .stats
            .is_none_or(|(at, _)| now.saturating_duration_since(at) >= RUN_STATS_EVERY)
        {
            if let Some(stats) = self.profiler.run_stats() {
                if let Some((_, prev)) = cost.stats {
                    let runs = stats.runs.saturating_sub(prev.runs);
                    if runs >= 100 {
                        let per =
                            stats.run_time_ns.saturating_sub(prev.run_time_ns) as f64 / runs as f64;
                        cost.program_ns = if cost.program_ns == 0.0 {
                            per
                        } else {
                            0.7 * cost.program_ns + 0.3 * per
                        };
                    }
                }
                cost.stats = Some((now, stats));
            }
        }
        let entry_ns = cost.traps.entry_ns + cost.program_ns;
        let return_ns = cost.traps.return_ns + cost.program_ns;
        let tick_ns = 1e9 / cost.ticks_per_second;
        let mut lost = Vec::new();
        for t in &mut self.targets {
            let pid = t.info.pid;
            let Some(b) = t.budget.as_mut() else {
                continue;
            };
            let Some(stat) = procfs::read_stat(pid) else {
                continue;
            };
            let ticks = stat.cpu_ticks();
            let hits = self.profiler.hits(pid).unwrap_or(b.hits);
            let d = hits.since(b.hits);
            let sample = budget::Sample {
                cpu_ns: ticks.saturating_sub(b.cpu_ticks.unwrap_or(ticks)) as f64 * tick_ns,
                cost_ns: d.entries as f64 * entry_ns + d.returns as f64 * return_ns,
            };
            b.cpu_ticks = Some(ticks);
            b.hits = hits;
            match b.governor.observe(now, sample) {
                Some(budget::Change::Windowed {
                    overhead,
                    on,
                    cycle,
                }) => say(&lines::budget_windowed(
                    pid,
                    &t.info.comm,
                    overhead,
                    b.governor.budget(),
                    on,
                    cycle,
                )),
                Some(budget::Change::Continuous { overhead }) => say(&lines::budget_continuous(
                    pid,
                    &t.info.comm,
                    overhead,
                    b.governor.budget(),
                )),
                None => {}
            }
            let want = match b.governor.attachment() {
                budget::Attachment::All => ebpf::Which::ALL,
                budget::Attachment::FreesOnly => ebpf::Which {
                    allocations: false,
                    frees: true,
                },
                budget::Attachment::Nothing => ebpf::Which::NONE,
            };
            let Some(have) = self.profiler.attached_probes(pid) else {
                continue;
            };
            if have == want {
                continue;
            }
            tracing::debug!(pid, phase = ?b.governor.phase(), "probes {have:?} -> {want:?}");
            let result = if want == ebpf::Which::ALL || (want.frees && !have.frees) {
                self.profiler.resume(pid)
            } else {
                Ok(())
            };
            if let Err(e) = result {
                // The files it was hooked in may be mapped elsewhere now (an
                // exec that kept its allocator, a library unloaded): hook
                // what it maps now, keeping what the kernel holds of it.
                tracing::info!(
                    pid,
                    "cannot attach the probes again ({e}); planning them afresh"
                );
                let info = t.info.clone();
                let replanned = procfs::read_maps(pid)
                    .and_then(|maps| allocator::plan(&info, &maps, &self.cfg.allocator))
                    .and_then(|plan| self.profiler.rehook(pid, &plan));
                if let Err(e) = replanned {
                    lost.push((pid, e));
                    continue;
                }
            }
            if want != ebpf::Which::ALL {
                self.profiler.pause(pid, want.frees);
            }
        }
        // Probes that cannot be attached again: its last snapshot, then let
        // it go (a front end that selects it again attaches it afresh).
        for (pid, e) in lost {
            if let Some(i) = self.index(pid) {
                say(&lines::probes_lost(pid, &self.targets[i].info.comm, &e));
                self.finish(i, Trigger::Stop);
            }
        }
    }

    /// Retires stacks no live block uses when the kernel's stack maps fill
    /// (see `ebpf::retire`); their figures stay with their target.
    fn maintain_stacks(&mut self, before_snapshot: bool) {
        match self
            .profiler
            .maintain_stacks(Instant::now(), before_snapshot)
        {
            Ok(retired) => {
                for r in retired {
                    if let Some(t) = self.targets.iter_mut().find(|t| t.info.pid == r.tgid) {
                        t.retired.add(r.stack_id, r.counters, r.addresses);
                    }
                }
            }
            Err(e) => tracing::warn!("cannot retire idle stacks: {e}"),
        }
    }

    /// Re-reads every target's maps (new modules for symbolization and the
    /// stack walk) and hooks allocator libraries mapped since attach.
    pub fn refresh_all(&mut self) {
        // An image that exec'd keeps its modules for its last snapshot.
        self.check_execs();
        let pids: Vec<u32> = self.targets.iter().map(|t| t.info.pid).collect();
        for pid in pids {
            self.refresh_maps(pid);
        }
        self.pick_up_allocators();
    }

    fn refresh_maps(&mut self, pid: u32) {
        if self.symbolizer.refresh(pid) {
            self.profiler.refresh_unwind(pid);
        }
    }

    /// Hooks allocator libraries targets mapped since they were attached
    /// (`dlopen`, or linked by a launched command), in `--allocator auto`.
    fn pick_up_allocators(&mut self) {
        if self.cfg.allocator != allocator::Choice::Auto {
            return;
        }
        for t in &mut self.targets {
            let pid = t.info.pid;
            let Ok(maps) = procfs::read_maps(pid) else {
                continue;
            };
            for lib in allocator::dedicated(pid, &maps) {
                let id = lib.identity();
                if t.hooked.contains(&id) {
                    continue;
                }
                t.hooked.push(id);
                match self.profiler.attach_more(pid, &lib) {
                    Ok(probes) => {
                        say(&lines::hooked_since(
                            &lib.path,
                            pid,
                            &t.info.comm,
                            probes.len(),
                        ));
                        let (n, libraries) = exec::summary(&probes);
                        t.probes.0 += n;
                        t.probes.1.extend(libraries);
                    }
                    Err(e) => {
                        tracing::warn!(pid, library = %lib.path, "cannot hook an allocator mapped since: {e}")
                    }
                }
            }
        }
    }

    /// A snapshot of every target.
    pub fn snapshot_all(&mut self, trigger: Trigger) {
        self.check_execs();
        for i in 0..self.targets.len() {
            self.snapshot(i, trigger);
        }
    }

    /// A launched command held at the start of its exit (its map is still
    /// there): its final snapshot, then detach.
    pub fn target_exiting(&mut self, pid: u32) {
        self.check_execs();
        if let Some(i) = self.index(pid) {
            self.refresh_maps(pid);
            self.check_oom();
            self.finish(i, Trigger::Exit);
        }
    }

    /// Lets go of target `pid` while it runs on (the agent no longer
    /// selects it): its final snapshot with `trigger`, then detach. Whether
    /// it was a target.
    pub fn release(&mut self, pid: u32, trigger: Trigger) -> bool {
        self.check_execs();
        match self.index(pid) {
            Some(i) => {
                self.finish(i, trigger);
                true
            }
            None => false,
        }
    }

    /// The pod target `pid` runs in, written into its snapshots from now on.
    pub fn set_labels(&mut self, pid: u32, kubernetes: Option<Kubernetes>) {
        if let Some(i) = self.index(pid) {
            self.targets[i].kubernetes = kubernetes;
        }
    }

    /// The final snapshot of target `i` (unless the OOM killer's was
    /// written), then detach and forget it.
    fn finish(&mut self, i: usize, trigger: Trigger) {
        if !self.targets[i].oom_written {
            self.snapshot(i, trigger);
        }
        let pid = self.targets[i].info.pid;
        self.profiler.detach(pid);
        self.symbolizer.forget(pid);
        self.targets.remove(i);
    }

    /// Detaches every target, writing nothing.
    pub fn detach_all(&mut self) {
        for t in self.targets.drain(..) {
            self.profiler.detach(t.info.pid);
            self.symbolizer.forget(t.info.pid);
        }
    }

    fn check_oom(&mut self) {
        for i in 0..self.targets.len() {
            let pid = self.targets[i].info.pid;
            if !self.targets[i].oom_written && self.profiler.take_oom_victim(pid) {
                self.snapshot(i, Trigger::Oom);
                self.targets[i].oom_written = true;
            }
        }
    }

    fn reap_exited(&mut self, held: Option<u32>) {
        let mut i = 0;
        while i < self.targets.len() {
            let pid = self.targets[i].info.pid;
            if held == Some(pid) || self.is_same_process_alive(i) {
                i += 1;
                continue;
            }
            // An OOM kill is an exit too; its snapshot is already written.
            self.check_oom();
            self.finish(i, Trigger::Exit);
        }
    }

    /// Whether target `i` still runs: its pid is alive and was not given to
    /// a later process (another `starttime`).
    fn is_same_process_alive(&self, i: usize) -> bool {
        let t = &self.targets[i];
        match procfs::read_stat(t.info.pid) {
            Some(s) if s.state != 'Z' && s.state != 'X' => {
                t.start_ticks.is_none_or(|start| start == s.start_ticks)
            }
            _ => false,
        }
    }

    /// The pids of the targets profiled now.
    pub fn pids(&self) -> Vec<u32> {
        self.targets.iter().map(|t| t.info.pid).collect()
    }

    /// What each target looks like now (one kernel lookup each).
    pub fn statuses(&self) -> Vec<TargetStatus> {
        self.targets
            .iter()
            .map(|t| TargetStatus {
                pid: t.info.pid,
                comm: t.info.comm.clone(),
                exe: t.info.exe.clone(),
                attached_at: t.attached_at.clone(),
                totals: self.profiler.totals(t.info.pid).unwrap_or_default(),
                overhead: t.budget.as_ref().map_or(0.0, |b| b.governor.overhead()),
                coverage: t
                    .budget
                    .as_ref()
                    .map_or(1.0, |b| b.governor.coverage(Instant::now())),
                windowed: t.budget.as_ref().is_some_and(|b| b.governor.windowed()),
                windows: t
                    .budget
                    .as_ref()
                    .filter(|b| b.governor.windowed())
                    .map(|b| {
                        let plan = b.governor.plan();
                        let ms = |d: std::time::Duration| {
                            humantime::format_duration(std::time::Duration::from_millis(
                                d.as_millis() as u64,
                            ))
                        };
                        format!(
                            "over --max-overhead {}: allocation probes on {} of every {}{}",
                            lines::percent(b.governor.budget()),
                            ms(plan.on),
                            ms(plan.on + b.governor.follow() + plan.off),
                            b.governor
                                .full_overhead()
                                .map(|a| format!(
                                    " (all attached, they cost {} of its CPU time)",
                                    lines::percent(a)
                                ))
                                .unwrap_or_default()
                        )
                    }),
                last_snapshot: t.last_snapshot.clone(),
            })
            .collect()
    }

    /// A snapshot of target `pid` now, written like any other; its files.
    pub fn snapshot_pid(&mut self, pid: u32, trigger: Trigger) -> Result<Vec<PathBuf>> {
        self.check_execs();
        let i = self.index(pid).ok_or(Error::NoSuchProcess { pid })?;
        self.try_snapshot(i, trigger).inspect_err(|e| {
            self.failed_snapshots += 1;
            say(&lines::snapshot_failed(trigger, pid, e));
        })
    }

    /// The live heap of target `pid` now, as gzipped pprof; nothing written.
    pub fn heap_profile(&mut self, pid: u32) -> Result<Vec<u8>> {
        self.check_execs();
        let i = self.index(pid).ok_or(Error::NoSuchProcess { pid })?;
        let snapshot = self.build_snapshot(i, Trigger::Request)?;
        crate::output::Format::Pprof.render(&snapshot)
    }

    /// `--rss-step` and `--heap-step`: a snapshot per new threshold reached.
    pub fn check_steps(&mut self) {
        for i in 0..self.targets.len() {
            let pid = self.targets[i].info.pid;
            if let Some(rss) = procfs::rss_bytes(pid) {
                self.targets[i].rss_bytes = rss;
                if let Some(c) = self.targets[i]
                    .rss_step
                    .as_mut()
                    .and_then(|t| t.observe(rss))
                {
                    say(&lines::step(Trigger::RssStep, pid, "RSS", rss, c));
                    self.snapshot(i, Trigger::RssStep);
                }
            }
            if self.targets[i].heap_step.is_some() {
                if let Some(live) = self.profiler.live_bytes(pid) {
                    if let Some(c) = self.targets[i]
                        .heap_step
                        .as_mut()
                        .and_then(|t| t.observe(live))
                    {
                        say(&lines::step(Trigger::HeapStep, pid, "live heap", live, c));
                        self.snapshot(i, Trigger::HeapStep);
                    }
                }
            }
        }
    }

    fn snapshot(&mut self, i: usize, trigger: Trigger) {
        let pid = self.targets[i].info.pid;
        if let Err(e) = self.try_snapshot(i, trigger) {
            self.failed_snapshots += 1;
            say(&lines::snapshot_failed(trigger, pid, &e));
        }
    }

    /// Kernel data → raw snapshot → symbolized snapshot → files.
    fn try_snapshot(&mut self, i: usize, trigger: Trigger) -> Result<Vec<PathBuf>> {
        let pid = self.targets[i].info.pid;
        let started = Instant::now();
        let snapshot = self.build_snapshot(i, trigger)?;
        if snapshot.totals.dropped_events > 0 {
            say(&format!(
                "warning: pid={pid}: {}",
                lines::dropped_events(
                    &snapshot.totals,
                    Some((self.cfg.max_live_blocks, self.cfg.max_stacks))
                )
            ));
        }
        if let Some(now) = self.out.relocate() {
            say(&lines::output_dir_moved(&self.cfg.output_dir, &now));
        }
        let paths = self.targets[i].series.write(
            &self.out,
            &self.cfg.formats,
            self.cfg.max_snapshots,
            &snapshot,
        )?;
        self.targets[i].last_snapshot = paths
            .first()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned());
        say(&lines::snapshot_written(
            trigger,
            pid,
            snapshot.totals.live_bytes,
            snapshot.totals.live_allocations,
            &paths,
        ));
        tracing::info!(
            pid,
            stacks = snapshot.stacks.len(),
            dropped = snapshot.totals.dropped_events,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot statistics"
        );
        if self.cfg.keep_written {
            if self.written.len() >= MAX_KEPT_WRITTEN {
                self.written.pop_front();
            }
            self.written.push_back(snapshot);
        }
        Ok(paths)
    }

    /// Kernel data → raw snapshot → symbolized snapshot, of target `i` now.
    fn build_snapshot(&mut self, i: usize, trigger: Trigger) -> Result<Snapshot> {
        let pid = self.targets[i].info.pid;
        // The last snapshot of an image that exec'd: its own blocks and
        // figures, as of the exec, with the modules it had.
        let exec = self.targets[i].image.exec;
        // Not the maps of a later process given the same pid.
        if self.is_same_process_alive(i) && exec.is_none() {
            self.refresh_maps(pid);
            if let Some(rss) = procfs::rss_bytes(pid) {
                self.targets[i].rss_bytes = rss;
            }
        }
        self.maintain_stacks(true);
        let mut data = match &exec {
            Some(exec) => self.profiler.drain_before_exec(pid, exec)?,
            None => self.profiler.drain(pid)?,
        };
        let retired = &self.targets[i].retired;
        retired.merge_counters(&mut data);
        let mut addresses = self.profiler.stacks(pid, &data.stack_ids())?;
        retired.fill_addresses(&mut addresses);
        let raw = RawSnapshot::from_kernel(
            data,
            &addresses,
            exec.map_or_else(ebpf::monotonic_ns, |e| e.at_ns),
            self.cfg.min_age.as_millis() as u64,
            self.cfg.sample_bytes,
        );
        let t = &self.targets[i];
        let meta = TargetMeta {
            comm: t.info.comm.clone(),
            exe: t.info.exe.clone(),
            attached_at: t.attached_at.clone(),
            taken_at: now_rfc3339(),
            trigger,
            sample_bytes: self.cfg.sample_bytes,
            rss_bytes: t.rss_bytes,
        };
        let symbolizer = &mut self.symbolizer;
        symbolizer.begin_snapshot();
        let mut snapshot =
            Snapshot::from_raw(&raw, meta, |ips| symbolizer.symbolize_stack(pid, ips));
        snapshot.mappings = self.symbolizer.mapping_infos(pid);
        snapshot.coverage = self.targets[i]
            .budget
            .as_ref()
            .map(|b| b.coverage(Instant::now()));
        snapshot.kubernetes = self.targets[i].kubernetes.clone();
        Ok(snapshot)
    }
}
