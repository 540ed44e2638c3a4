//! The privileged edge: loading heapbpf's eBPF programs, attaching them to a
//! target's allocator, and draining the kernel maps into raw snapshots. The
//! only module that names aya.
mod batch;
mod multi;
pub mod placement;
pub mod probes;

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
        TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use heapbpf_common::{
    drop_reason, info_counter, unwind_mode, AllocInfo, AllocKey, ModuleTable, StackKey, StackStats,
    StackTrace, TargetState, UnwindRow, STACK_COMPLETE, STACK_LEN_MASK, STACK_TRUNCATED,
};

use crate::{
    error::{Error, Result},
    model::{aggregate, LiveBlock, RawSnapshot, StackCounters},
    procfs::Mapping,
    unwind,
};
use probes::{ProbeSpec, LIBC_PROBES, RETURN_PROGRAM};

static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/heapbpf"));

/// Tunables of the kernel side.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Capacity of the live-block map (blocks tracked at once, all targets).
    pub max_live_blocks: u32,
    /// Benchmark floors: attach programs that do nothing instead.
    pub floor: Option<Floor>,
    /// Mean bytes between sampled allocations; 0 = exact.
    pub sample_bytes: u64,
    /// How stacks are walked (`--unwind`).
    pub unwind: unwind::Mode,
    /// Hook allocating functions with uprobe sessions where the kernel has
    /// them (entry and return in one program; the return only when needed).
    pub sessions: bool,
}

/// Call-frame rows the kernel can hold for all modules of all targets
/// (12 bytes each): glibc needs about 20 k, a large C++ program a few 100 k.
pub const UNWIND_ROWS: u32 = 1 << 20;

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_live_blocks: 1 << 21,
            floor: None,
            sample_bytes: 0,
            unwind: unwind::Mode::Auto,
            sessions: true,
        }
    }
}

/// What `cargo xtask bench` measures as the least a probe set can cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Floor {
    /// Empty programs at the entry points only.
    Entry,
    /// Empty programs at the entry points and as return probes.
    Return,
}

/// Where the probes of one target went.
#[derive(Clone, Debug)]
pub struct AttachedProbe {
    pub symbol: String,
    pub offset: u64,
    pub is_return: bool,
    /// A uprobe session: entry and, when the entry asks, return.
    pub session: bool,
    /// The library the probe sits in, as the target sees it.
    pub library: String,
}

/// The allocator library of a target, found through its memory map.
#[derive(Clone, Debug)]
pub struct AllocatorLib {
    /// The path as the target sees it.
    pub path: String,
    /// `/proc/PID/map_files/...`: the very file the target mapped.
    pub open_path: PathBuf,
    /// Prefix of the allocator's function names (`je_` for a jemalloc
    /// built with `--with-jemalloc-prefix=je_`); empty for the standard names.
    pub prefix: String,
}

impl AllocatorLib {
    pub fn new(path: String, open_path: PathBuf) -> Self {
        AllocatorLib {
            path,
            open_path,
            prefix: String::new(),
        }
    }

    /// The name of `symbol` in this library.
    pub fn name(&self, symbol: &str) -> String {
        format!("{}{symbol}", self.prefix)
    }

    /// How the `attached` line names it.
    pub fn label(&self) -> String {
        if self.prefix.is_empty() {
            self.path.clone()
        } else {
            format!("{} ({}*)", self.path, self.prefix)
        }
    }
}

/// Which allocator to hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllocatorChoice {
    /// The first of jemalloc, tcmalloc, mimalloc mapped into the target, else
    /// the executable when it defines malloc and free, else libc.
    Auto,
    Libc,
    Jemalloc,
    Tcmalloc,
    Mimalloc,
    /// `--allocator PATH[:PREFIX]`: the mapped file at PATH (as the target
    /// sees it, or just its file name), with function names prefixed.
    Custom {
        path: String,
        prefix: String,
    },
}

impl AllocatorChoice {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "auto" => AllocatorChoice::Auto,
            "libc" => AllocatorChoice::Libc,
            "jemalloc" => AllocatorChoice::Jemalloc,
            "tcmalloc" => AllocatorChoice::Tcmalloc,
            "mimalloc" => AllocatorChoice::Mimalloc,
            custom if custom.contains('/') || custom.contains(':') || custom.contains(".so") => {
                let (path, prefix) = custom.split_once(':').unwrap_or((custom, ""));
                if path.is_empty()
                    || !prefix
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    return None;
                }
                AllocatorChoice::Custom {
                    path: path.to_string(),
                    prefix: prefix.to_string(),
                }
            }
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &str {
        match self {
            AllocatorChoice::Custom { path, .. } => path,
            AllocatorChoice::Auto => "allocator",
            AllocatorChoice::Libc => "libc",
            AllocatorChoice::Jemalloc => "jemalloc",
            AllocatorChoice::Tcmalloc => "tcmalloc",
            AllocatorChoice::Mimalloc => "mimalloc",
        }
    }

    fn matches(&self, file_name: &str) -> bool {
        let lib = |prefix: &str| file_name.starts_with(prefix) && file_name.contains(".so");
        match self {
            AllocatorChoice::Auto | AllocatorChoice::Custom { .. } => false,
            AllocatorChoice::Libc => {
                file_name.starts_with("libc.so")
                    || (file_name.starts_with("libc-") && file_name.ends_with(".so"))
            }
            AllocatorChoice::Jemalloc => lib("libjemalloc"),
            // gperftools: libtcmalloc.so, libtcmalloc_minimal.so, ...
            AllocatorChoice::Tcmalloc => lib("libtcmalloc"),
            AllocatorChoice::Mimalloc => lib("libmimalloc"),
        }
    }
}

/// The dedicated allocator libraries (jemalloc, tcmalloc, mimalloc) mapped
/// into a target, each once.
pub fn dedicated_allocators(pid: u32, maps: &[Mapping]) -> Vec<AllocatorLib> {
    let mut found: Vec<AllocatorLib> = Vec::new();
    for m in maps.iter().filter(|m| m.is_file()) {
        if is_dedicated_allocator(m.file_name()) && !found.iter().any(|l| l.path == m.path) {
            found.push(AllocatorLib::new(m.path.clone(), m.map_file(pid)));
        }
    }
    found
}

/// The allocators that interpose malloc for the whole process, in the order
/// `--allocator auto` prefers them.
const DEDICATED: [AllocatorChoice; 3] = [
    AllocatorChoice::Jemalloc,
    AllocatorChoice::Tcmalloc,
    AllocatorChoice::Mimalloc,
];

/// Whether a library file name is a dedicated allocator's.
pub fn is_dedicated_allocator(file_name: &str) -> bool {
    DEDICATED.iter().any(|c| c.matches(file_name))
}

/// Finds the allocator library in a target's memory map: a dedicated
/// allocator library when one is mapped (it interposes libc's malloc for the
/// whole process), else the executable when it defines `malloc` and `free`
/// itself (a static program, or one that carries its own allocator), else
/// the C library.
pub fn find_allocator(
    pid: u32,
    maps: &[Mapping],
    choice: &AllocatorChoice,
) -> Option<AllocatorLib> {
    let files = || maps.iter().filter(|m| m.is_file());
    if let AllocatorChoice::Custom { path, prefix } = choice {
        let host = std::fs::canonicalize(path).ok();
        let m = files().find(|m| {
            m.path == *path
                || (!path.contains('/') && m.file_name() == path)
                || (host.is_some() && std::fs::canonicalize(m.map_file(pid)).ok() == host)
        })?;
        return Some(AllocatorLib {
            prefix: prefix.clone(),
            ..AllocatorLib::new(m.path.clone(), m.map_file(pid))
        });
    }
    let mapped = |c: &AllocatorChoice| {
        files()
            .find(|m| c.matches(m.file_name()))
            .map(|m| AllocatorLib::new(m.path.clone(), m.map_file(pid)))
    };
    if *choice != AllocatorChoice::Auto {
        return mapped(choice);
    }
    DEDICATED
        .iter()
        .find_map(mapped)
        .or_else(|| own_allocator(pid, maps, ""))
        .or_else(|| mapped(&AllocatorChoice::Libc))
}

/// The executable, when its symbol table defines `PREFIXmalloc` and
/// `PREFIXfree`.
fn own_allocator(pid: u32, maps: &[Mapping], prefix: &str) -> Option<AllocatorLib> {
    let exe = maps.iter().find(|m| m.is_file() && m.is_exec())?;
    let lib = AllocatorLib {
        prefix: prefix.to_string(),
        ..AllocatorLib::new(exe.path.clone(), exe.map_file(pid))
    };
    let image = placement::Image::open(&lib.open_path);
    (image.defines(&lib.name("malloc")) && image.defines(&lib.name("free"))).then_some(lib)
}

/// Allocators a program carries besides the one that serves `malloc`: a
/// jemalloc linked in with its `je_` prefix (as some programs vendor it).
pub fn prefixed_allocators(pid: u32, maps: &[Mapping]) -> Vec<AllocatorLib> {
    own_allocator(pid, maps, "je_").into_iter().collect()
}

/// A probed function: (device, inode) of its file, its address there, and
/// whether the probe is its return probe.
type FunctionKey = (u64, u64, u64, bool);

struct Target {
    links: Vec<(&'static str, UProbeLinkId)>,
    /// uprobe_multi links of session programs (closing one detaches it).
    session_links: Vec<OwnedFd>,
    /// Functions probed, by (device, inode, address) of their file, entry
    /// and return apart: one probe per function however many names
    /// (aliases, or the same file hooked as two allocators) lead to it.
    hooked: std::collections::HashSet<FunctionKey>,
    /// heapbpf's own stack walk takes this target's stacks (it has a module
    /// table in the kernel).
    walk: bool,
}

/// Loaded programs and maps, and the probes attached per target.
pub struct Profiler {
    floor: Option<Floor>,
    sample_bytes: u64,
    ebpf: Ebpf,
    targets: HashMap<u32, Target>,
    stacks: HashMap<u64, (Vec<u64>, Option<bool>)>,
    oom_watch: bool,
    unwind: unwind::Tables,
    /// Session programs, when this kernel has uprobe sessions.
    sessions: Option<multi::Sessions>,
    /// The module table last written per walked target, and the walk epoch
    /// (bumped when what the walk reads changes: its cache is then void).
    written_modules: HashMap<u32, Box<ModuleTable>>,
    walk_epoch: u64,
}

/// Checks what heapbpf needs from the kernel and from its own credentials,
/// so that failures name their cause.
pub fn preflight() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    const CAP_PERFMON: u64 = 1 << 38;
    const CAP_BPF: u64 = 1 << 39;
    let has = |c: u64| cap_eff & c == c;
    if !(has(CAP_SYS_ADMIN) || has(CAP_BPF | CAP_PERFMON)) {
        return Err(Error::Privileges(format!(
            "effective capabilities are {cap_eff:#x} (uid {})",
            // SAFETY: getuid has no preconditions.
            unsafe { libc::getuid() }
        )));
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        return Err(Error::Unsupported(
            "this kernel has no uprobe support (/sys/bus/event_source/devices/uprobe is missing): \
             heapbpf needs a kernel built with CONFIG_UPROBE_EVENTS"
                .into(),
        ));
    }
    // This kernel charges BPF memory to the cgroup; older ones need a high
    // memlock limit. Raising it may be refused (no CAP_SYS_RESOURCE): fine.
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_MEMLOCK; continuing");
    }
    Ok(())
}

fn load_error(e: impl std::fmt::Display + std::fmt::Debug) -> Error {
    let text = e.to_string();
    let lower = format!("{e:?}").to_lowercase();
    if lower.contains("operation not permitted") || lower.contains("permission denied") {
        Error::Privileges(text)
    } else if lower.contains("function not implemented") {
        Error::Unsupported(format!("this kernel has no BPF support: {text}"))
    } else {
        Error::runtime("cannot load heapbpf's eBPF programs", format!("{e:?}"))
    }
}

impl Profiler {
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let unwind_rows = if opts.unwind == unwind::Mode::Fp {
            1
        } else {
            UNWIND_ROWS
        };
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("ALLOCS", opts.max_live_blocks)
            .map_max_entries("UNWIND_ROWS", unwind_rows)
            .load(PROGRAM_OBJECT)
            .map_err(load_error)?;
        for name in probes::programs() {
            let prog: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| Error::Runtime(format!("eBPF object has no program {name}")))?
                .try_into()
                .map_err(|e| Error::runtime(format!("program {name}"), e))?;
            prog.load().map_err(load_error)?;
            if let Ok(info) = prog.info() {
                tracing::debug!(
                    program = name,
                    verified_instructions = info.verified_instruction_count(),
                    "program loaded"
                );
            }
        }
        install_unwinder(&mut ebpf)?;
        let sessions = if opts.sessions {
            match multi::Sessions::load(
                PROGRAM_OBJECT,
                &ebpf,
                &probes::session_programs(opts.floor.is_some()),
                "UNWIND_PROGS",
                [probes::UNWIND_PROGRAM, probes::UNWIND_FINISH_PROGRAM],
            ) {
                Ok(s) => Some(s),
                Err(why) => {
                    tracing::info!(
                        "uprobe sessions unavailable ({why}); using uprobe + uretprobe pairs"
                    );
                    None
                }
            }
        } else {
            None
        };
        let mut profiler = Profiler {
            floor: opts.floor,
            sample_bytes: opts.sample_bytes,
            ebpf,
            targets: HashMap::new(),
            stacks: HashMap::new(),
            oom_watch: false,
            unwind: unwind::Tables::new(opts.unwind, unwind_rows),
            sessions,
            written_modules: HashMap::new(),
            walk_epoch: 0,
        };
        profiler.configure_sampling()?;
        profiler.oom_watch = profiler.watch_oom();
        Ok(profiler)
    }

    /// Writes the sampling rate and the table of `1 - exp(-x)` the programs
    /// read (no floating point in BPF).
    fn configure_sampling(&mut self) -> Result<()> {
        use heapbpf_common::{config, SAMPLE_TABLE_LEN, SAMPLE_TABLE_STEPS};
        let err = |e: aya::maps::MapError| Error::runtime("cannot configure sampling", e);
        let map = self
            .ebpf
            .map_mut("CONFIG")
            .ok_or_else(|| Error::Runtime("no CONFIG map".into()))?;
        let mut cfg = aya::maps::Array::<_, u64>::try_from(map).map_err(err)?;
        cfg.set(config::SAMPLE_BYTES, self.sample_bytes, 0)
            .map_err(err)?;
        let map = self
            .ebpf
            .map_mut("SAMPLE_P")
            .ok_or_else(|| Error::Runtime("no SAMPLE_P map".into()))?;
        let mut table = aya::maps::Array::<_, u32>::try_from(map).map_err(err)?;
        for i in 0..SAMPLE_TABLE_LEN {
            let x = i as f64 / SAMPLE_TABLE_STEPS as f64;
            let p = -(-x).exp_m1();
            let q = (p * 4294967296.0).round().min(u32::MAX as f64) as u32;
            table.set(i, q, 0).map_err(err)?;
        }
        Ok(())
    }

    /// Hooks `oom:mark_victim`; without it (old kernel, no tracefs) OOM kills
    /// are only seen as exits.
    fn watch_oom(&mut self) -> bool {
        let result = (|| -> Result<(), String> {
            let prog: &mut TracePoint = self
                .ebpf
                .program_mut("oom_mark_victim")
                .ok_or("no oom_mark_victim program")?
                .try_into()
                .map_err(|e| format!("{e}"))?;
            prog.load().map_err(|e| format!("{e}"))?;
            prog.attach("oom", "mark_victim")
                .map_err(|e| format!("{e}"))?;
            Ok(())
        })();
        match result {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("cannot watch the OOM killer (oom:mark_victim): {e}; OOM kills will show as exits");
                false
            }
        }
    }

    pub fn watches_oom(&self) -> bool {
        self.oom_watch
    }

    /// Takes the OOM killer's pick of `pid`, if it picked it since the last call.
    pub fn take_oom_victim(&mut self, pid: u32) -> bool {
        let Some(map) = self.ebpf.map_mut("OOM_VICTIMS") else {
            return false;
        };
        let Ok(mut victims) = BpfHashMap::<_, u32, u64>::try_from(map) else {
            return false;
        };
        if victims.get(&pid, 0).is_ok() {
            let _ = victims.remove(&pid);
            true
        } else {
            false
        }
    }

    fn targets_map(&mut self) -> Result<BpfHashMap<&mut MapData, u32, TargetState>> {
        let map = self
            .ebpf
            .map_mut("TARGETS")
            .ok_or_else(|| Error::Runtime("no TARGETS map".into()))?;
        BpfHashMap::try_from(map).map_err(|e| Error::runtime("TARGETS map", e))
    }

    /// Attaches every probe of the table to `lib` for `pid`; symbols `lib`
    /// does not export go to `fallback` (the C library) when given. On error,
    /// whatever was attached for this target is detached again.
    pub fn attach(
        &mut self,
        pid: u32,
        lib: &AllocatorLib,
        fallback: Option<&AllocatorLib>,
    ) -> Result<Vec<AttachedProbe>> {
        if !self.targets.contains_key(&pid) {
            let walk = self.prepare_unwind(pid)?;
            let state = TargetState {
                unwind: if walk {
                    unwind_mode::WALK
                } else {
                    unwind_mode::KERNEL_FP
                },
                ..Default::default()
            };
            self.targets_map()?
                .insert(pid, state, 0)
                .map_err(|e| Error::runtime(format!("cannot register pid {pid}"), e))?;
            self.targets.insert(
                pid,
                Target {
                    links: Vec::new(),
                    session_links: Vec::new(),
                    hooked: Default::default(),
                    walk,
                },
            );
        }
        match self.attach_all(pid, lib, fallback) {
            Ok(attached) => Ok(attached),
            Err(e) => {
                self.detach(pid);
                Err(e)
            }
        }
    }

    /// Prepares the stack walk of `pid`: its module table and the rows of
    /// modules not seen before. Returns whether heapbpf walks its stacks
    /// (false: the kernel's frame-pointer walk is enough, or `--unwind fp`).
    fn prepare_unwind(&mut self, pid: u32) -> Result<bool> {
        if self.unwind.mode() == unwind::Mode::Fp {
            return Ok(false);
        }
        let maps = crate::procfs::read_maps(pid)?;
        let t = self
            .unwind
            .for_target(pid, &maps, &mut |m| open_image(pid, m));
        for path in &t.overflow {
            tracing::warn!(pid, "no room left for the call-frame rows of {path}; stacks through it are marked truncated");
        }
        self.write_rows(&t.new_rows)?;
        let walk = !(self.unwind.mode() == unwind::Mode::Auto && t.all_frame_pointers);
        if walk {
            self.write_modules(pid, &t.table)?;
        }
        tracing::info!(
            pid,
            walk,
            rows = self.unwind.rows_used(),
            "stack walk prepared"
        );
        Ok(walk)
    }

    /// Re-reads the modules of a walked target (after a `dlopen`). A target
    /// left to the kernel's frame-pointer walk keeps it.
    pub fn refresh_unwind(&mut self, pid: u32) {
        if self.unwind.mode() == unwind::Mode::Fp {
            return;
        }
        if !self.targets.get(&pid).is_some_and(|t| t.walk) {
            return;
        }
        let Ok(maps) = crate::procfs::read_maps(pid) else {
            return;
        };
        let t = self
            .unwind
            .for_target(pid, &maps, &mut |m| open_image(pid, m));
        if let Err(e) = self
            .write_rows(&t.new_rows)
            .and_then(|()| self.write_modules(pid, &t.table))
        {
            tracing::warn!(pid, "cannot update the stack walk's module table: {e}");
        }
    }

    fn write_rows(&mut self, new_rows: &[unwind::NewRows]) -> Result<()> {
        if new_rows.is_empty() {
            return Ok(());
        }
        let err = |e: aya::maps::MapError| Error::runtime("cannot write call-frame rows", e);
        let map = self
            .ebpf
            .map_mut("UNWIND_ROWS")
            .ok_or_else(|| Error::Runtime("no UNWIND_ROWS map".into()))?;
        let mut rows = aya::maps::Array::<_, UnwindRow>::try_from(map).map_err(err)?;
        for chunk in new_rows {
            for (i, row) in chunk.rows.iter().enumerate() {
                rows.set(chunk.first + i as u32, *row, 0).map_err(err)?;
            }
        }
        self.bump_walk_epoch()
    }

    /// Voids the walk's cached lookups (after what they were made from
    /// changed).
    fn bump_walk_epoch(&mut self) -> Result<()> {
        use heapbpf_common::config;
        self.walk_epoch += 1;
        let err = |e: aya::maps::MapError| Error::runtime("cannot update the walk epoch", e);
        let map = self
            .ebpf
            .map_mut("CONFIG")
            .ok_or_else(|| Error::Runtime("no CONFIG map".into()))?;
        aya::maps::Array::<_, u64>::try_from(map)
            .map_err(err)?
            .set(config::WALK_EPOCH, self.walk_epoch, 0)
            .map_err(err)
    }

    fn write_modules(&mut self, pid: u32, table: &ModuleTable) -> Result<()> {
        let same = |old: &ModuleTable| {
            let n = (table.count as usize).min(table.entries.len());
            old.count == table.count && old.entries[..n] == table.entries[..n]
        };
        if self.written_modules.get(&pid).is_some_and(|old| same(old)) {
            return Ok(());
        }
        let map = self
            .ebpf
            .map_mut("MODULES")
            .ok_or_else(|| Error::Runtime("no MODULES map".into()))?;
        let mut modules = BpfHashMap::<_, u32, ModuleTable>::try_from(map)
            .map_err(|e| Error::runtime("MODULES map", e))?;
        modules.insert(pid, table, 0).map_err(|e| {
            Error::runtime(format!("cannot write the module table of pid {pid}"), e)
        })?;
        self.written_modules.insert(pid, Box::new(*table));
        self.bump_walk_epoch()
    }

    fn attach_all(
        &mut self,
        pid: u32,
        lib: &AllocatorLib,
        fallback: Option<&AllocatorLib>,
    ) -> Result<Vec<AttachedProbe>> {
        let scope =
            UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(Error::NoSuchProcess { pid })?);
        let lib_image = placement::Image::open(&lib.open_path);
        let fallback = fallback.map(|f| (f, placement::Image::open(&f.open_path)));
        // Each symbol from the allocator library, or from the fallback (the C
        // library) when the allocator does not export it: glibc then serves
        // those calls (jemalloc and tcmalloc have no reallocarray, ...).
        let pick = |symbol: &str| -> Option<(&AllocatorLib, &placement::Image)> {
            if lib_image.defines(&lib.name(symbol)) {
                return Some((lib, &lib_image));
            }
            let (f, image) = fallback.as_ref()?;
            image.defines(&f.name(symbol)).then_some((*f, image))
        };
        if pick("malloc").is_none() || pick("free").is_none() {
            return Err(Error::NotTraceable {
                pid,
                why: format!("{} does not export malloc and free", lib.path),
            });
        }
        let return_program = if self.floor.is_some() {
            "noop_return"
        } else {
            RETURN_PROGRAM
        };
        let with_returns = self.floor != Some(Floor::Entry);
        let mut attached = Vec::new();
        // Allocating functions as uprobe sessions where the kernel has them.
        let mut in_session = HashSet::new();
        let sessions = self.sessions.is_some();
        let session_specs = LIBC_PROBES.iter().filter(|p| p.has_return && sessions);
        for spec in session_specs {
            let Some((target, image)) = pick(spec.symbol) else {
                continue;
            };
            let name = target.name(spec.symbol);
            let Some(start) = image.file_offset(&name) else {
                continue;
            };
            if self.is_hooked(pid, image, &name, false) {
                // An alias of a function hooked already.
                in_session.insert(spec.symbol);
                continue;
            }
            let program = match self.floor {
                Some(Floor::Entry) => probes::NOOP_SESSION_ENTRY,
                Some(Floor::Return) => probes::NOOP_SESSION_RETURN,
                None => probes::session_program(spec.entry_program),
            };
            let offset = probe_offset(spec, image, &name);
            let cookie = probe_cookie(spec, target);
            match self.attach_session(program, &name, start + offset, cookie, target, pid) {
                Ok(()) => {}
                Err(Error::NoSuchProcess { pid }) => return Err(Error::NoSuchProcess { pid }),
                Err(e) => {
                    // Hooked below as a uprobe + uretprobe pair instead.
                    tracing::info!(pid, symbol = %name, error = %e, "no uprobe session; using a uprobe + uretprobe pair");
                    continue;
                }
            }
            self.first_probe(pid, image, &name, false);
            self.first_probe(pid, image, &name, true);
            in_session.insert(spec.symbol);
            attached.push(AttachedProbe {
                symbol: name,
                offset,
                is_return: false,
                session: true,
                library: target.label(),
            });
        }
        // Otherwise return probes first, so that no call is seen entering
        // without its return hooked.
        for spec in LIBC_PROBES
            .iter()
            .filter(|p| p.has_return && with_returns && !in_session.contains(p.symbol))
        {
            let Some((target, image)) = pick(spec.symbol) else {
                continue;
            };
            let name = target.name(spec.symbol);
            if !self.first_probe(pid, image, &name, true) {
                continue;
            }
            let offset = probe_offset(spec, image, &name);
            self.attach_one(return_program, &name, offset, 0, target, scope, pid)?;
            attached.push(AttachedProbe {
                symbol: name,
                offset,
                is_return: true,
                session: false,
                library: target.label(),
            });
        }
        for spec in LIBC_PROBES
            .iter()
            .filter(|p| !in_session.contains(p.symbol))
        {
            let Some((target, image)) = pick(spec.symbol) else {
                tracing::info!(pid, symbol = spec.symbol, "symbol not exported; not hooked");
                continue;
            };
            let name = target.name(spec.symbol);
            if !self.first_probe(pid, image, &name, false) {
                tracing::info!(pid, symbol = %name, library = %target.path, "alias of a function already hooked; not hooked again");
                continue;
            }
            let offset = probe_offset(spec, image, &name);
            let program = if self.floor.is_some() {
                "noop_enter"
            } else {
                spec.entry_program
            };
            let cookie = probe_cookie(spec, target);
            self.attach_one(program, &name, offset, cookie, target, scope, pid)?;
            attached.push(AttachedProbe {
                symbol: name,
                offset,
                is_return: false,
                session: false,
                library: target.label(),
            });
        }
        Ok(attached)
    }

    /// Whether `symbol` of `image` is the first name of its function to be
    /// probed (entry or return) for `pid`: one probe per function, however
    /// many names (aliases, or the same file hooked as two allocators) lead
    /// to it, or each call would be counted twice.
    fn first_probe(&mut self, pid: u32, image: &placement::Image, symbol: &str, ret: bool) -> bool {
        let (Some(addr), Some(t)) = (image.address(symbol), self.targets.get_mut(&pid)) else {
            return true;
        };
        let (dev, ino) = image.id();
        t.hooked.insert((dev, ino, addr, ret))
    }

    /// Whether the function `symbol` of `image` is probed already (entry or
    /// return) for `pid`, under this name or another.
    fn is_hooked(&self, pid: u32, image: &placement::Image, symbol: &str, ret: bool) -> bool {
        let (Some(addr), Some(t)) = (image.address(symbol), self.targets.get(&pid)) else {
            return false;
        };
        let (dev, ino) = image.id();
        t.hooked.contains(&(dev, ino, addr, ret))
    }

    #[allow(clippy::too_many_arguments)]
    fn attach_one(
        &mut self,
        program: &'static str,
        symbol: &str,
        offset: u64,
        cookie: u64,
        lib: &AllocatorLib,
        scope: UProbeScope,
        pid: u32,
    ) -> Result<()> {
        let prog: &mut UProbe = self
            .ebpf
            .program_mut(program)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| Error::Runtime(format!("no uprobe program {program}")))?;
        let location = if offset == 0 {
            UProbeAttachLocation::Symbol(symbol)
        } else {
            UProbeAttachLocation::SymbolOffset(symbol, offset)
        };
        let point = aya::programs::uprobe::UProbeAttachPoint {
            location,
            cookie: Some(cookie),
        };
        match prog.attach(point, &lib.open_path, scope) {
            Ok(link) => {
                tracing::debug!(pid, program, symbol, offset, library = %lib.path, "probe placed");
                if let Some(t) = self.targets.get_mut(&pid) {
                    t.links.push((program, link));
                }
                Ok(())
            }
            Err(e) => {
                if !crate::procfs::is_alive(pid) {
                    Err(Error::NoSuchProcess { pid })
                } else {
                    Err(load_error(format!(
                        "cannot hook {symbol} in {}: {e}",
                        lib.path
                    )))
                }
            }
        }
    }

    /// Attaches session program `program` to `symbol` (at file offset
    /// `offset` of `lib`) in `pid`.
    fn attach_session(
        &mut self,
        program: &'static str,
        symbol: &str,
        offset: u64,
        cookie: u64,
        lib: &AllocatorLib,
        pid: u32,
    ) -> Result<()> {
        let sessions = self
            .sessions
            .as_ref()
            .ok_or_else(|| Error::Runtime("no session programs".into()))?;
        match sessions.attach(program, &lib.open_path, offset, cookie, pid) {
            Ok(link) => {
                tracing::debug!(pid, program, symbol, offset, library = %lib.path, "session probe placed");
                if let Some(t) = self.targets.get_mut(&pid) {
                    t.session_links.push(link);
                }
                Ok(())
            }
            Err(e) if !crate::procfs::is_alive(pid) => {
                tracing::debug!(pid, error = %e, "target gone");
                Err(Error::NoSuchProcess { pid })
            }
            Err(e) => Err(load_error(format!(
                "cannot hook {symbol} in {} (uprobe session): {e}",
                lib.path
            ))),
        }
    }

    /// Hooks one more allocator library of an attached target (one it
    /// mapped after attach). On error, only the probes placed by this call
    /// are removed; the target stays profiled as before.
    pub fn attach_more(&mut self, pid: u32, lib: &AllocatorLib) -> Result<Vec<AttachedProbe>> {
        let (before, sessions_before) = self
            .targets
            .get(&pid)
            .map_or((0, 0), |t| (t.links.len(), t.session_links.len()));
        match self.attach_all(pid, lib, None) {
            Ok(attached) => Ok(attached),
            Err(e) => {
                let links: Vec<_> = self
                    .targets
                    .get_mut(&pid)
                    .map(|t| {
                        t.session_links.truncate(sessions_before);
                        t.links.split_off(before.min(t.links.len()))
                    })
                    .unwrap_or_default();
                self.detach_links(pid, links);
                Err(e)
            }
        }
    }

    fn detach_links(&mut self, pid: u32, links: Vec<(&'static str, UProbeLinkId)>) {
        for (program, link) in links {
            if let Some(prog) = self
                .ebpf
                .program_mut(program)
                .and_then(|p| <&mut UProbe>::try_from(p).ok())
            {
                if let Err(e) = prog.detach(link) {
                    tracing::debug!(pid, program, error = %e, "detach failed");
                }
            }
        }
    }

    /// Detaches the probes of `pid` and forgets its data in the kernel maps.
    pub fn detach(&mut self, pid: u32) {
        if let Some(t) = self.targets.remove(&pid) {
            self.detach_links(pid, t.links);
        }
        if let Ok(mut m) = self.targets_map() {
            let _ = m.remove(&pid);
        }
        self.purge(pid);
    }

    fn purge(&mut self, pid: u32) {
        let alloc_keys: Vec<AllocKey> = self
            .ebpf
            .map("ALLOCS")
            .and_then(|m| map_fd(m).ok())
            .and_then(|fd| batch::lookup_all::<AllocKey, AllocInfo>(fd).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.tgid == pid)
            .collect();
        if let Some(map) = self.ebpf.map_mut("ALLOCS") {
            if let Ok(mut allocs) = BpfHashMap::<_, AllocKey, AllocInfo>::try_from(map) {
                let keys = alloc_keys;
                for k in keys {
                    let _ = allocs.remove(&k);
                }
            }
        }
        if let Some(map) = self.ebpf.map_mut("MODULES") {
            if let Ok(mut modules) = BpfHashMap::<_, u32, ModuleTable>::try_from(map) {
                let _ = modules.remove(&pid);
            }
        }
        self.written_modules.remove(&pid);
        if let Some(map) = self.ebpf.map_mut("STACK_STATS") {
            if let Ok(mut stats) = BpfHashMap::<_, StackKey, StackStats>::try_from(map) {
                let keys: Vec<StackKey> = stats
                    .keys()
                    .filter_map(|k| k.ok())
                    .filter(|k| k.tgid == pid)
                    .collect();
                for k in keys {
                    let _ = stats.remove(&k);
                }
            }
        }
        if let Some(map) = self.ebpf.map_mut("PENDING") {
            if let Ok(mut pending) = BpfHashMap::<_, u64, heapbpf_common::Pending>::try_from(map) {
                let keys: Vec<u64> = pending
                    .keys()
                    .filter_map(|k| k.ok())
                    .filter(|k| (k >> 32) as u32 == pid)
                    .collect();
                for k in keys {
                    let _ = pending.remove(&k);
                }
            }
        }
    }

    /// Live heap bytes of `pid` as counted by the kernel (cheap: one lookup).
    pub fn live_bytes(&self, pid: u32) -> Option<u64> {
        let map = self.ebpf.map("TARGETS")?;
        let targets = BpfHashMap::<_, u32, TargetState>::try_from(map).ok()?;
        let s = targets.get(&pid, 0).ok()?;
        Some(s.allocated_bytes.saturating_sub(s.freed_bytes))
    }

    /// Reads everything the kernel holds for `pid`.
    pub fn drain(&mut self, pid: u32, min_age_ms: u64) -> Result<RawSnapshot> {
        let now_ns = monotonic_ns();
        let map = |name: &str| {
            self.ebpf
                .map(name)
                .ok_or_else(|| Error::Runtime(format!("no {name} map")))
        };
        let targets = BpfHashMap::<_, u32, TargetState>::try_from(map("TARGETS")?)
            .map_err(|e| Error::runtime("TARGETS map", e))?;
        let state = targets.get(&pid, 0).unwrap_or_default();
        let blocks: Vec<LiveBlock> =
            batch::lookup_all::<AllocKey, AllocInfo>(map_fd(map("ALLOCS")?)?)
                .map_err(|e| Error::runtime("cannot read the ALLOCS map", e))?
                .into_iter()
                .filter(|(k, _)| k.tgid == pid)
                .map(|(_, v)| LiveBlock {
                    stack_id: v.stack_id,
                    size_bytes: v.size,
                    allocated_ns: v.timestamp_ns,
                })
                .collect();
        let counters: HashMap<u64, StackCounters> =
            batch::lookup_all::<StackKey, StackStats>(map_fd(map("STACK_STATS")?)?)
                .map_err(|e| Error::runtime("cannot read the STACK_STATS map", e))?
                .into_iter()
                .filter(|(k, _)| k.tgid == pid)
                .map(|(k, v)| {
                    let c = StackCounters {
                        allocated_bytes: v.allocated_bytes,
                        allocations: units(v.allocations),
                    };
                    (k.stack_id, c)
                })
                .collect();
        let mut stacks = aggregate(blocks, &counters, now_ns, min_age_ms, self.sample_bytes);
        let stack_map = BpfHashMap::<_, u64, StackTrace>::try_from(map("STACKS")?)
            .map_err(|e| Error::runtime("STACKS map", e))?;
        for s in &mut stacks {
            if s.stack_id == heapbpf_common::NO_STACK {
                continue;
            }
            if let Some((ips, truncated)) = self.stacks.get(&s.stack_id) {
                s.ips = ips.clone();
                s.truncated = *truncated;
            } else if let Ok(t) = stack_map.get(&s.stack_id, 0) {
                let n = ((t.len & STACK_LEN_MASK) as usize).min(t.ips.len());
                let truncated = if t.len & STACK_TRUNCATED != 0 {
                    Some(true)
                } else if t.len & STACK_COMPLETE != 0 {
                    Some(false)
                } else {
                    None
                };
                let ips: Vec<u64> = t.ips[..n].to_vec();
                self.stacks.insert(s.stack_id, (ips.clone(), truncated));
                s.ips = ips;
                s.truncated = truncated;
            }
        }
        let dropped_events = state.counters[..drop_reason::COUNT].iter().sum();
        tracing::debug!(
            pid,
            nested = state.counters[info_counter::NESTED],
            stale_replaced = state.counters[info_counter::STALE_REPLACED],
            untracked_frees = state.counters[info_counter::UNTRACKED_FREES],
            dropped = ?&state.counters[..drop_reason::COUNT],
            "kernel counters"
        );
        Ok(RawSnapshot {
            pid,
            stacks,
            allocated_bytes: state.allocated_bytes,
            allocations: units(state.allocations),
            frees: units(state.frees),
            dropped_events,
        })
    }
}

/// The image of a mapped file, through the target's own view of it.
fn open_image(pid: u32, m: &Mapping) -> Option<memmap2::Mmap> {
    let file = std::fs::File::open(m.map_file(pid)).ok()?;
    // SAFETY: a read-only private mapping of a file the target executes;
    // heapbpf only reads it while parsing and drops it right after.
    unsafe { memmap2::Mmap::map(&file) }.ok()
}

/// Puts the stack-walk programs in the slots the return program and the
/// walk tail-call.
fn install_unwinder(ebpf: &mut Ebpf) -> Result<()> {
    let mut fds = Vec::new();
    for name in [probes::UNWIND_PROGRAM, probes::UNWIND_FINISH_PROGRAM] {
        let prog: &UProbe = ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| Error::Runtime(format!("eBPF object has no program {name}")))?;
        let fd = prog
            .fd()
            .map_err(|e| Error::runtime(format!("program {name}"), e))?
            .try_clone()
            .map_err(|e| Error::runtime(format!("program {name}"), e))?;
        fds.push(fd);
    }
    let map = ebpf
        .map_mut("UNWIND_PROGS")
        .ok_or_else(|| Error::Runtime("no UNWIND_PROGS map".into()))?;
    let mut progs = aya::maps::ProgramArray::try_from(map)
        .map_err(|e| Error::runtime("UNWIND_PROGS map", e))?;
    for (slot, fd) in fds.iter().enumerate() {
        progs
            .set(slot as u32, fd, 0)
            .map_err(|e| Error::runtime("cannot install the stack walk", e))?;
    }
    Ok(())
}

/// The attach cookie of `spec`'s probe in `lib`: `malloc` and `calloc` are
/// leaves (call no other hooked function) in the allocators known not to
/// build one on another; elsewhere (musl's `calloc` calls `malloc`, a
/// program's own allocator may do anything) they mark their nesting.
fn probe_cookie(spec: &ProbeSpec, lib: &AllocatorLib) -> u64 {
    let file_name = Path::new(&lib.path)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let known = is_dedicated_allocator(&file_name) || file_name.starts_with("libc.so.6");
    let leafy = matches!(spec.entry_program, "malloc_enter" | "calloc_enter");
    if known && leafy {
        heapbpf_common::probe_cookie::LEAF
    } else {
        0
    }
}

/// Where the probe on `symbol` goes: on the first instruction the kernel
/// emulates when that is safe (see [`placement`]), else at +0.
fn probe_offset(spec: &ProbeSpec, image: &placement::Image, symbol: &str) -> u64 {
    let reads = probes::arguments_read(spec.entry_program);
    image
        .probe_point(symbol, reads, spec.has_return)
        .unwrap_or(0)
}

/// The file descriptor of a map of the kinds heapbpf's object has.
fn map_fd(map: &aya::maps::Map) -> Result<std::os::fd::BorrowedFd<'_>> {
    use aya::maps::Map;
    use std::os::fd::AsFd;
    match map {
        Map::HashMap(d) | Map::Array(d) | Map::PerCpuArray(d) | Map::ProgramArray(d) => {
            Ok(d.fd().as_fd())
        }
        _ => Err(Error::Runtime("unexpected kind of map".into())),
    }
}

/// Kernel counts are in thousandths (sampled weights are fractional).
fn units(v: u64) -> u64 {
    let unit = heapbpf_common::COUNT_UNIT;
    (v + unit / 2) / unit
}

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod choice_tests {
    use super::{probe_cookie, AllocatorChoice, AllocatorLib, LIBC_PROBES};

    #[test]
    fn malloc_and_calloc_are_leaves_only_in_known_allocators() {
        let spec = |sym: &str| *LIBC_PROBES.iter().find(|p| p.symbol == sym).unwrap();
        let lib = |path: &str| AllocatorLib::new(path.into(), path.into());
        let leaf = heapbpf_common::probe_cookie::LEAF;
        let glibc = lib("/usr/lib/x86_64-linux-gnu/libc.so.6");
        let jemalloc = lib("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2");
        let musl = lib("/lib/ld-musl-x86_64.so.1");
        let own = lib("/srv/app");
        assert_eq!(probe_cookie(&spec("malloc"), &glibc), leaf);
        assert_eq!(probe_cookie(&spec("calloc"), &glibc), leaf);
        assert_eq!(probe_cookie(&spec("calloc"), &jemalloc), leaf);
        assert_eq!(
            probe_cookie(&spec("mi_calloc"), &lib("libmimalloc.so.2.0")),
            leaf
        );
        // musl's calloc calls its malloc; a program's own allocator may.
        assert_eq!(probe_cookie(&spec("calloc"), &musl), 0);
        assert_eq!(probe_cookie(&spec("malloc"), &own), 0);
        // Functions built on others are never leaves.
        assert_eq!(probe_cookie(&spec("realloc"), &glibc), 0);
        assert_eq!(probe_cookie(&spec("_Znwm"), &jemalloc), 0);
    }

    #[test]
    fn allocator_paths_and_prefixes() {
        assert_eq!(
            AllocatorChoice::parse("/opt/app/bin/app:je_"),
            Some(AllocatorChoice::Custom {
                path: "/opt/app/bin/app".into(),
                prefix: "je_".into()
            })
        );
        assert_eq!(
            AllocatorChoice::parse("libhoard.so"),
            Some(AllocatorChoice::Custom {
                path: "libhoard.so".into(),
                prefix: String::new()
            })
        );
        assert_eq!(AllocatorChoice::parse("jemaloc"), None);
        assert_eq!(AllocatorChoice::parse(":je_"), None);
        assert_eq!(AllocatorChoice::parse("/x:je-"), None);
    }
}
