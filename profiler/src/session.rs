//! Orchestration: attach to the targets, then write snapshots on signals,
//! timers, thresholds and target exit until stopped. Owns the event loop;
//! the kernel work is in [`crate::ebpf`], the data work in [`crate::model`].
use std::{
    collections::VecDeque,
    io::Write as _,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use tokio::signal::unix::{signal, SignalKind};

use crate::{
    cli::{AttachConfig, DiffArgs, DiffFormat, ReportArgs, ReportFormat},
    ebpf::{self, LoadOptions, Profiler},
    error::{Error, Result},
    model::{RawSnapshot, Snapshot, Stack, Totals, Trigger, SNAPSHOT_FORMAT, SNAPSHOT_VERSION},
    output::{self, json},
    procfs::{self, ProcessInfo},
    report,
    symbolize::Symbolizer,
    trigger::StepTrigger,
};

/// How often targets are checked for exit and thresholds.
const POLL: Duration = Duration::from_millis(100);
/// How often module tables pick up newly loaded libraries.
const MAPS_REFRESH: Duration = Duration::from_secs(2);

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// A line of the contract on stderr (attached, snapshot): user-facing
/// output, not logging.
fn say(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "heapbpf: {line}");
}

struct Target {
    info: ProcessInfo,
    attached_at: String,
    seq: u32,
    written: VecDeque<Vec<PathBuf>>,
    rss_bytes: u64,
    rss_step: Option<StepTrigger>,
    heap_step: Option<StepTrigger>,
    /// The OOM killer picked it and its `oom` snapshot is written.
    oom_written: bool,
    /// Allocator libraries hooked (see [`library_identity`]).
    hooked: Vec<String>,
}

struct Session {
    cfg: AttachConfig,
    profiler: Profiler,
    symbolizer: Symbolizer,
    targets: Vec<Target>,
    /// `heapbpf run`: the command heapbpf started and holds at exit.
    launched: Option<crate::launch::Launched>,
}

pub fn run_attach(cfg: AttachConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::runtime("cannot start the runtime", e))?;
    rt.block_on(attach(cfg))
}

async fn attach(cfg: AttachConfig) -> Result<()> {
    output::check_output_dir(&cfg.output_dir)?;
    // Privileges before pids: without them, /proc of other users' processes
    // is unreadable and the pid errors would hide the real cause.
    ebpf::preflight()?;
    let infos = cfg
        .pids
        .iter()
        .map(|&pid| procfs::process_info(pid))
        .collect::<Result<Vec<_>>>()?;
    // Signal handlers first: a SIGINT during attach still detaches cleanly.
    let (usr2, int, term) = signals()?;
    let mut s = Session::new(cfg)?;
    for info in infos {
        s.attach_target(info)?;
    }
    s.event_loop(usr2, int, term).await.map(|_| ())
}

type Signals = (
    tokio::signal::unix::Signal,
    tokio::signal::unix::Signal,
    tokio::signal::unix::Signal,
);

/// SIGUSR2, SIGINT and SIGTERM, handled by the session from now on.
fn signals() -> Result<Signals> {
    let handler = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| Error::runtime(format!("{name} handler"), e))
    };
    Ok((
        handler(SignalKind::user_defined2(), "SIGUSR2")?,
        handler(SignalKind::interrupt(), "SIGINT")?,
        handler(SignalKind::terminate(), "SIGTERM")?,
    ))
}

/// `heapbpf run`: starts `command` stopped, attaches, lets it run, and
/// returns its exit status once the final snapshot is written.
pub fn run_command(cfg: AttachConfig, command: Vec<String>) -> Result<i32> {
    output::check_output_dir(&cfg.output_dir)?;
    ebpf::preflight()?;
    let launched = crate::launch::start(&command)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::runtime("cannot start the runtime", e))?;
    // On error, dropping `launched` kills the held command.
    rt.block_on(run_launched(cfg, command, launched))
}

async fn run_launched(
    cfg: AttachConfig,
    command: Vec<String>,
    launched: crate::launch::Launched,
) -> Result<i32> {
    let pid = launched.pid;
    let (usr2, int, term) = signals()?;
    let mut s = Session::new(cfg)?;
    // The command has not run `exec` yet: its allocator is the C library
    // heapbpf itself maps (same root), plus any allocator it preloads.
    let own = procfs::read_maps(std::process::id())?;
    let libc = ebpf::find_allocator(std::process::id(), &own, &ebpf::AllocatorChoice::Libc)
        .ok_or_else(|| Error::Runtime("heapbpf cannot find its own C library".into()))?;
    let preloaded = std::env::var("LD_PRELOAD")
        .unwrap_or_default()
        .split([' ', ':'])
        .find_map(|lib| {
            let name = lib.rsplit('/').next().unwrap_or(lib);
            ebpf::is_dedicated_allocator(name)
                .then(|| ebpf::AllocatorLib::new(lib.to_string(), lib.into()))
        });
    // An allocator the command links against (DT_NEEDED), found where its
    // dynamic linker will find it.
    let linked = || -> Option<ebpf::AllocatorLib> {
        let exe = exe_path(&command[0]);
        let (needed, search) = crate::elf::needed_libraries(std::path::Path::new(&exe));
        needed
            .iter()
            .filter(|n| ebpf::is_dedicated_allocator(n))
            .find_map(|n| crate::elf::resolve_library(n, &search))
            .map(|p| ebpf::AllocatorLib::new(p.display().to_string(), p))
    };
    let preloaded = preloaded.or_else(linked);
    let program = &command[0];
    let exe = exe_path(program);
    let comm: String = exe
        .rsplit('/')
        .next()
        .unwrap_or(&exe)
        .chars()
        .take(15)
        .collect();
    let info = ProcessInfo { pid, comm, exe };
    match &preloaded {
        Some(alloc) => s.attach_libs(info, alloc, Some(&libc), &[])?,
        None => s.attach_libs(info, &libc, None, &[])?,
    }
    launched.go();
    s.launched = Some(launched);
    s.event_loop(usr2, int, term)
        .await
        .map(|code| code.unwrap_or(0))
}

/// What tells allocator libraries apart: the real path of the file
/// (`/proc/PID/map_files/` links and preloaded names resolve to it).
fn library_identity(lib: &ebpf::AllocatorLib) -> String {
    let path = std::fs::canonicalize(&lib.open_path)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| lib.path.clone());
    format!("{path}:{}", lib.prefix)
}

/// The file `exec` will run for `program` (searched in `PATH` when it has no
/// slash).
fn exe_path(program: &str) -> String {
    if program.contains('/') {
        std::fs::canonicalize(program)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| program.to_string())
    } else {
        std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(program))
                    .find(|p| p.is_file())
            })
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| program.to_string())
    }
}

impl Session {
    /// Loads the eBPF programs for `cfg`; no target yet.
    fn new(cfg: AttachConfig) -> Result<Self> {
        let profiler = Profiler::load(&LoadOptions {
            max_live_blocks: cfg.max_live_blocks,
            floor: cfg.floor,
            sample_bytes: cfg.sample_bytes,
            unwind: cfg.unwind,
            sessions: cfg.sessions,
        })?;
        Ok(Session {
            cfg,
            profiler,
            symbolizer: Symbolizer::new(),
            targets: Vec::new(),
            launched: None,
        })
    }

    /// Runs until every target is gone or heapbpf is told to stop. Returns
    /// the launched command's exit status in `run` mode.
    async fn event_loop(
        &mut self,
        mut usr2: tokio::signal::unix::Signal,
        mut int: tokio::signal::unix::Signal,
        mut term: tokio::signal::unix::Signal,
    ) -> Result<Option<i32>> {
        let s = self;

        let started = Instant::now();
        let mut deadline = s.cfg.duration.map(|d| started + d);
        let mut next_interval = s.cfg.interval.map(|i| started + i);
        // Quickly at first: a launched command maps its libraries right
        // after exec.
        let mut next_refresh = started + Duration::from_millis(100);
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut exit_code = None;
        loop {
            tokio::select! {
                _ = usr2.recv() => s.snapshot_all(Trigger::Signal),
                _ = int.recv() => { if s.stop(libc::SIGINT) { break; } }
                _ = term.recv() => { if s.stop(libc::SIGTERM) { break; } }
                _ = tick.tick() => {
                    let now = Instant::now();
                    if deadline.is_some_and(|d| now >= d) {
                        s.snapshot_all(Trigger::Duration);
                        deadline = None;
                        if s.launched.is_none() {
                            break;
                        }
                        // run: stop profiling, let the command finish.
                        s.detach_all();
                    }
                    if let Some(code) = s.launched_events() {
                        exit_code = Some(code);
                        break;
                    }
                    s.check_oom();
                    s.reap_exited();
                    if s.targets.is_empty() && s.launched.is_none() {
                        break;
                    }
                    if next_interval.is_some_and(|t| now >= t) {
                        s.snapshot_all(Trigger::Interval);
                        next_interval = s.cfg.interval.map(|i| now + i);
                    }
                    s.check_steps();
                    if now >= next_refresh {
                        let pids: Vec<u32> = s.targets.iter().map(|t| t.info.pid).collect();
                        for pid in pids {
                            s.refresh_maps(pid);
                        }
                        s.pick_up_allocators();
                        // Quickly at first: a launched command maps its
                        // libraries right after exec.
                        next_refresh = now
                            + if now.duration_since(started) < MAPS_REFRESH {
                                Duration::from_millis(100)
                            } else {
                                MAPS_REFRESH
                            };
                    }
                }
            }
        }
        s.detach_all();
        Ok(exit_code)
    }

    fn detach_all(&mut self) {
        let pids: Vec<u32> = self.targets.iter().map(|t| t.info.pid).collect();
        for pid in pids {
            self.profiler.detach(pid);
        }
        self.targets.clear();
    }

    /// SIGINT/SIGTERM: final snapshot and stop; in `run` mode the signal is
    /// the command's (it ends, and its exit writes the final snapshot).
    fn stop(&mut self, sig: i32) -> bool {
        match &self.launched {
            Some(l) => {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(l.pid as i32, sig) };
                false
            }
            None => {
                self.snapshot_all(Trigger::Stop);
                true
            }
        }
    }

    /// `run` mode: the command's exit. Returns its status once it is gone.
    fn launched_events(&mut self) -> Option<i32> {
        loop {
            let event = self.launched.as_ref()?.events.try_recv();
            match event {
                Ok(crate::launch::LaunchEvent::AtEntry) => {
                    // The program's libraries are mapped; main has not run.
                    let pid = self.launched.as_ref()?.pid;
                    self.refresh_maps(pid);
                    self.pick_up_allocators();
                    let _ = self.launched.as_ref()?.ack.send(());
                }
                Ok(crate::launch::LaunchEvent::Exiting) => {
                    let pid = self.launched.as_ref()?.pid;
                    if let Some(i) = self.targets.iter().position(|t| t.info.pid == pid) {
                        // Held at the start of its exit: the map is still there.
                        self.refresh_maps(pid);
                        self.check_oom();
                        if !self.targets[i].oom_written {
                            self.snapshot(i, Trigger::Exit);
                        }
                        self.profiler.detach(pid);
                        self.targets.remove(i);
                    }
                    let _ = self.launched.as_ref()?.ack.send(());
                }
                Ok(crate::launch::LaunchEvent::Exited(code)) => return Some(code),
                Err(std::sync::mpsc::TryRecvError::Empty) => return None,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return Some(1),
            }
        }
    }

    fn attach_target(&mut self, info: ProcessInfo) -> Result<()> {
        let pid = info.pid;
        let maps = procfs::read_maps(pid)?;
        let choice = self.cfg.allocator.clone();
        let chosen = ebpf::find_allocator(pid, &maps, &choice).ok_or_else(|| Error::NotTraceable {
            pid,
            why: match &choice {
                ebpf::AllocatorChoice::Custom { path, .. } => format!(
                    "{path} is not mapped into {} (--allocator names a file the process has mapped: its path as in /proc/{pid}/maps, or its file name)",
                    info.comm
                ),
                _ => format!(
                    "no {} library is mapped into {} (a stripped static program?); heapbpf hooks the allocator of a shared library or of an executable with a symbol table",
                    choice.as_str(),
                    info.comm
                ),
            },
        })?;
        let libc = ebpf::find_allocator(pid, &maps, &ebpf::AllocatorChoice::Libc)
            .filter(|l| l.path != chosen.path);
        if !chosen.prefix.is_empty() {
            // A prefixed allocator lives beside the program's malloc (glibc's,
            // or one that interposes it), which the rest of the program keeps
            // using: hook both.
            let main = ebpf::find_allocator(pid, &maps, &ebpf::AllocatorChoice::Auto);
            return match main {
                Some(main) => {
                    let fallback = libc.filter(|l| l.path != main.path);
                    self.attach_libs(info, &main, fallback.as_ref(), &[chosen])
                }
                None => self.attach_libs(info, &chosen, None, &[]),
            };
        }
        let fallback = if choice == ebpf::AllocatorChoice::Libc {
            None
        } else {
            libc
        };
        let extra: Vec<ebpf::AllocatorLib> = if choice == ebpf::AllocatorChoice::Auto {
            ebpf::prefixed_allocators(pid, &maps)
        } else {
            Vec::new()
        };
        self.attach_libs(info, &chosen, fallback.as_ref(), &extra)
    }

    /// Hooks the allocator in each of `libs` and registers the target.
    fn attach_libs(
        &mut self,
        info: ProcessInfo,
        lib: &ebpf::AllocatorLib,
        fallback: Option<&ebpf::AllocatorLib>,
        extra: &[ebpf::AllocatorLib],
    ) -> Result<()> {
        let pid = info.pid;
        // Open every mapped module before the first allocation is seen, so
        // that the stacks stay symbolizable after the target exits.
        self.symbolizer.track(pid);
        let mut probes = self.profiler.attach(pid, lib, fallback)?;
        for more in extra {
            match self.profiler.attach_more(pid, more) {
                Ok(p) => probes.extend(p),
                Err(e) => {
                    self.profiler.detach(pid);
                    return Err(e);
                }
            }
        }
        for p in &probes {
            tracing::info!(pid, symbol = p.symbol, offset = p.offset, ret = p.is_return, library = %p.library, "probe placed at {}+{:#x}{} in {}", p.symbol, p.offset, if p.session { " (session: entry, return when needed)" } else if p.is_return { " (return)" } else { "" }, p.library);
        }
        let mut lib_paths: Vec<&str> = Vec::new();
        for p in &probes {
            if !lib_paths.contains(&p.library.as_str()) {
                lib_paths.push(&p.library);
            }
        }
        let rss = procfs::rss_bytes(pid).unwrap_or(0);
        say(&format!(
            "attached to {pid} ({}): {} probes in {}; sampling {}; heapbpf pid {}",
            info.comm,
            probes.len(),
            lib_paths.join(", "),
            if self.cfg.sample_bytes == 0 {
                "EXACT".to_string()
            } else {
                crate::units::size_label(self.cfg.sample_bytes)
            },
            std::process::id()
        ));
        self.targets.push(Target {
            attached_at: now_rfc3339(),
            seq: 0,
            written: VecDeque::new(),
            rss_bytes: rss,
            rss_step: self.cfg.rss_step.map(|s| StepTrigger::new(rss, s)),
            heap_step: self.cfg.heap_step.map(|s| StepTrigger::new(0, s)),
            oom_written: false,
            hooked: std::iter::once(lib)
                .chain(fallback)
                .chain(extra)
                .map(library_identity)
                .collect(),
            info,
        });
        Ok(())
    }

    /// Re-reads a target's maps: new modules for symbolization and for the
    /// stack walk.
    fn refresh_maps(&mut self, pid: u32) {
        if self.symbolizer.refresh(pid) {
            self.profiler.refresh_unwind(pid);
        }
    }

    /// Hooks allocator libraries targets mapped since they were attached
    /// (`dlopen`, or linked by a launched command), in `--allocator auto`.
    fn pick_up_allocators(&mut self) {
        if self.cfg.allocator != ebpf::AllocatorChoice::Auto {
            return;
        }
        for t in &mut self.targets {
            let pid = t.info.pid;
            let Ok(maps) = procfs::read_maps(pid) else {
                continue;
            };
            for lib in ebpf::dedicated_allocators(pid, &maps) {
                let id = library_identity(&lib);
                if t.hooked.contains(&id) {
                    continue;
                }
                t.hooked.push(id);
                match self.profiler.attach_more(pid, &lib) {
                    Ok(probes) => say(&format!(
                        "hooked {} in {pid} ({}), mapped since: {} probes",
                        lib.path,
                        t.info.comm,
                        probes.len()
                    )),
                    Err(e) => {
                        tracing::warn!(pid, library = %lib.path, "cannot hook an allocator mapped since: {e}")
                    }
                }
            }
        }
    }

    fn snapshot_all(&mut self, trigger: Trigger) {
        for i in 0..self.targets.len() {
            self.snapshot(i, trigger);
        }
    }

    /// The OOM killer's victims first: their snapshot is the one users need
    /// most, and they are about to vanish.
    fn check_oom(&mut self) {
        for i in 0..self.targets.len() {
            let pid = self.targets[i].info.pid;
            if !self.targets[i].oom_written && self.profiler.take_oom_victim(pid) {
                self.snapshot(i, Trigger::Oom);
                self.targets[i].oom_written = true;
            }
        }
    }

    fn reap_exited(&mut self) {
        let mut i = 0;
        while i < self.targets.len() {
            let pid = self.targets[i].info.pid;
            let launched = self.launched.as_ref().is_some_and(|l| l.pid == pid);
            if launched || procfs::is_alive(pid) {
                i += 1;
                continue;
            }
            // An OOM kill is an exit too; its snapshot is already written.
            self.check_oom();
            if !self.targets[i].oom_written {
                self.snapshot(i, Trigger::Exit);
            }
            self.profiler.detach(pid);
            self.symbolizer.forget(pid);
            self.targets.remove(i);
        }
    }

    fn check_steps(&mut self) {
        for i in 0..self.targets.len() {
            let pid = self.targets[i].info.pid;
            if let Some(rss) = procfs::rss_bytes(pid) {
                self.targets[i].rss_bytes = rss;
                if let Some(c) = self.targets[i]
                    .rss_step
                    .as_mut()
                    .and_then(|t| t.observe(rss))
                {
                    say(&step_line("rss-step", pid, "RSS", rss, c));
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
                        say(&step_line("heap-step", pid, "live heap", live, c));
                        self.snapshot(i, Trigger::HeapStep);
                    }
                }
            }
        }
    }

    fn snapshot(&mut self, i: usize, trigger: Trigger) {
        let pid = self.targets[i].info.pid;
        if let Err(e) = self.try_snapshot(i, trigger) {
            tracing::error!(pid, "snapshot failed: {e}");
            say(&format!(
                "snapshot {} pid={pid} failed: {e}",
                trigger.as_str()
            ));
        }
    }

    fn try_snapshot(&mut self, i: usize, trigger: Trigger) -> Result<()> {
        let pid = self.targets[i].info.pid;
        let started = Instant::now();
        if procfs::is_alive(pid) {
            self.refresh_maps(pid);
            if let Some(rss) = procfs::rss_bytes(pid) {
                self.targets[i].rss_bytes = rss;
            }
        }
        let min_age_ms = self.cfg.min_age.as_millis() as u64;
        let raw = self.profiler.drain(pid, min_age_ms)?;
        let t = &self.targets[i];
        let snapshot = build_snapshot(
            &raw,
            &t.info,
            &t.attached_at,
            trigger,
            self.cfg.sample_bytes,
            t.rss_bytes,
            |ips| self.symbolizer.symbolize_stack(pid, ips),
        );
        let mut snapshot = snapshot;
        snapshot.mappings = self.symbolizer.mapping_infos(pid);
        if snapshot.totals.dropped_events > 0 {
            say(&format!(
                "warning: pid={pid}: {} events could not be recorded (full maps or failed stack walks); \
                 figures are lower bounds; raise --max-live-blocks (now {}) if the live-block map filled",
                snapshot.totals.dropped_events, self.cfg.max_live_blocks
            ));
        }
        let taken_at = snapshot.taken_at.clone();
        let t = &mut self.targets[i];
        t.seq += 1;
        let mut paths = Vec::new();
        for format in &self.cfg.formats {
            let bytes = format.render(&snapshot)?;
            let ext = format.ext();
            let seq = &mut t.seq;
            let name = output::file_name(pid, &taken_at, *seq, ext);
            let path = output::publish(&self.cfg.output_dir, name, &bytes, || {
                *seq += 1;
                output::file_name(pid, &taken_at, *seq, ext)
            })?;
            paths.push(path);
        }
        say(&format!(
            "snapshot {} pid={pid} live={} allocations={} -> {}",
            trigger.as_str(),
            snapshot.totals.live_bytes,
            snapshot.totals.live_allocations,
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        tracing::info!(
            pid,
            stacks = snapshot.stacks.len(),
            dropped = snapshot.totals.dropped_events,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot statistics"
        );
        t.written.push_back(paths);
        if let Some(max) = self.cfg.max_snapshots {
            while t.written.len() > max {
                for p in t.written.pop_front().unwrap_or_default() {
                    if let Err(e) = std::fs::remove_file(&p) {
                        tracing::warn!(path = %p.display(), error = %e, "cannot delete old snapshot");
                    }
                }
            }
        }
        Ok(())
    }
}

/// The stderr line before a step snapshot: which threshold, and whether
/// several were jumped at once.
fn step_line(
    trigger: &str,
    pid: u32,
    what: &str,
    value: u64,
    c: crate::trigger::Crossing,
) -> String {
    let jumped = if c.skipped > 0 {
        format!(" (jumped over {} more)", c.skipped)
    } else {
        String::new()
    };
    format!(
        "{trigger} pid={pid}: {what} {} reached threshold {}{jumped}",
        crate::units::human_bytes(value as i128),
        crate::units::human_bytes(c.threshold as i128)
    )
}

/// Raw snapshot + symbolizer → the canonical snapshot.
pub fn build_snapshot(
    raw: &RawSnapshot,
    info: &ProcessInfo,
    attached_at: &str,
    trigger: Trigger,
    sample_bytes: u64,
    rss_bytes: u64,
    mut symbolize: impl FnMut(&[u64]) -> Vec<crate::model::Frame>,
) -> Snapshot {
    let stacks: Vec<Stack> = raw
        .stacks
        .iter()
        .map(|r| {
            let mut frames = symbolize(&r.ips);
            crate::model::strip_allocator_frames(&mut frames);
            Stack {
                live_bytes: r.live_bytes,
                live_allocations: r.live_allocations,
                allocated_bytes: r.allocated_bytes,
                allocations: r.allocations,
                oldest_age_ms: r.oldest_age_ms,
                truncated: r
                    .truncated
                    .unwrap_or_else(|| !crate::model::reaches_root(&frames)),
                frames,
            }
        })
        .collect();
    Snapshot {
        format: SNAPSHOT_FORMAT.into(),
        version: SNAPSHOT_VERSION,
        pid: raw.pid,
        comm: info.comm.clone(),
        exe: info.exe.clone(),
        taken_at: now_rfc3339(),
        attached_at: attached_at.to_string(),
        trigger,
        sample_bytes,
        totals: Totals {
            live_bytes: stacks.iter().map(|s| s.live_bytes).sum(),
            live_allocations: stacks.iter().map(|s| s.live_allocations).sum(),
            allocated_bytes: raw.allocated_bytes,
            allocations: raw.allocations,
            frees: raw.frees,
            rss_bytes,
            dropped_events: raw.dropped_events,
            truncated_stacks: stacks.iter().filter(|s| s.truncated).count() as u64,
        },
        stacks,
        mappings: Vec::new(),
    }
}

pub fn run_report(args: &ReportArgs) -> Result<()> {
    let snapshot = json::read(&args.snapshot)?;
    let text = match args.format {
        ReportFormat::Text => report::text(&snapshot, args.top, color_stdout()),
        ReportFormat::Json => report::json(&snapshot, args.top),
    };
    write_stdout(&text)
}

pub fn run_diff(args: &DiffArgs) -> Result<()> {
    let old = json::read(&args.old)?;
    let new = json::read(&args.new)?;
    let d = crate::model::diff(&old, &new);
    if d.different_executables() {
        say(&format!(
            "warning: {} is of {} and {} of {}; stacks are matched by module and function names",
            args.old.display(),
            d.old.exe,
            args.new.display(),
            d.new.exe
        ));
    }
    let text = match args.format {
        DiffFormat::Json => report::diff_json(&d, args.top),
        DiffFormat::Text => report::diff_text(&d, args.top, color_stdout()),
        // Flamegraphs show every stack, not just the top N.
        DiffFormat::Collapsed => crate::output::collapsed::diff_to_string(&d),
        DiffFormat::Svg => {
            String::from_utf8_lossy(&crate::output::svg::diff_to_bytes(&d)?).into_owned()
        }
    };
    write_stdout(&text)
}

/// Colour only for people: stdout is a terminal and NO_COLOR is unset.
fn color_stdout() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

fn write_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()) {
        Ok(()) => Ok(()),
        // `heapbpf report x | head` is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::runtime("cannot write the report", e)),
    }
}
