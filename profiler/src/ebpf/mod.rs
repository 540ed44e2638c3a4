//! The privileged edge, and the only module that names aya or calls
//! `bpf(2)`: loading heapbpf's eBPF programs ([`load`]), applying an
//! allocator attach plan to a target and detaching ([`attach`]), keeping the
//! stack walk's tables ([`tables`]), and reading the kernel maps out as plain
//! data ([`drain`]). [`uprobe_session`] and [`sys`] do what aya 0.14 cannot.
//!
//! A [`Profiler`] is one loaded object shared by every target.
mod attach;
mod cost;
mod drain;
mod load;
mod programs;
mod retire;
mod sys;
mod tables;
mod uprobe_session;

use std::{
    collections::{HashMap, HashSet},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use aya::{programs::uprobe::UProbeLinkId, Ebpf};
use heapbpf_common::{ModuleTable, TargetState};

pub use cost::{Hits, RunStats, TrapCost};
pub use drain::{monotonic_ns, LiveTotals};
pub use load::preflight;
pub use retire::RetiredStack;

use crate::{
    error::{Error, Result},
    unwind,
};

static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/heapbpf"));

/// Tunables of the kernel side.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Capacity of the live-block map (blocks tracked at once, all targets).
    pub max_live_blocks: u32,
    /// Capacity of the stack map (distinct stacks at once, all targets);
    /// the per-stack figures get twice as many entries.
    pub max_stacks: u32,
    /// Benchmark floors: attach programs that do nothing instead.
    pub floor: Option<Floor>,
    /// Mean bytes between sampled allocations; 0 = exact.
    pub sample_bytes: u64,
    /// How stacks are walked (`--unwind`).
    pub unwind: unwind::Mode,
    /// Hook allocating functions with uprobe sessions where the kernel has
    /// them (entry and return in one program; the return only when needed).
    pub sessions: bool,
    /// Watch execs with the `sched_process_exec` tracepoint.
    pub exec_tracepoint: bool,
}

/// `--max-stacks` when none is given.
pub const DEFAULT_MAX_STACKS: u32 = 1 << 16;

/// The most `--max-live-blocks` heapbpf accepts. The live-block map
/// allocates its buckets when created, 16 bytes a block (rounded up to a
/// power of two): 1 GiB here. This kernel refuses more than 2^27 (E2BIG:
/// the bucket array would pass 4 GiB), and 2^27 took seconds to create.
pub const MAX_LIVE_BLOCKS: u32 = 1 << 26;

/// Call-frame rows the kernel can hold for all modules of all targets
/// (12 bytes each): glibc needs about 20 k, a large C++ program a few 100 k.
pub const UNWIND_ROWS: u32 = 1 << 20;

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_live_blocks: 1 << 21,
            max_stacks: DEFAULT_MAX_STACKS,
            floor: None,
            sample_bytes: 0,
            unwind: unwind::Mode::Auto,
            sessions: true,
            exec_tracepoint: true,
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

/// A traced process's `exec` (one, or several since the last look): when,
/// and what its old image left in the kernel.
#[derive(Clone, Copy, Debug)]
pub struct Exec {
    /// `CLOCK_MONOTONIC` nanoseconds of the (first) exec: the old image's
    /// blocks are older.
    pub at_ns: u64,
    /// ... of the last, when the process exec'd again before heapbpf
    /// looked: the images in between are lost.
    pub last_ns: u64,
    /// How many execs.
    pub count: u64,
    /// A thread other than the leader exec'd (or heapbpf cannot tell): the
    /// probes scoped to the process went with the old leader thread.
    pub leader_replaced: bool,
    /// The old image's totals, counters and generation as the `exec`
    /// tracepoint kept them; `None` when user space noticed the exec itself
    /// (no tracepoint): then all it can tell is that the exec happened
    /// before now.
    before: Option<TargetState>,
}

impl Exec {
    /// An exec noticed by user space at `now_ns`, without the tracepoint.
    pub fn noticed(now_ns: u64) -> Self {
        Exec {
            at_ns: now_ns,
            last_ns: now_ns,
            count: 1,
            leader_replaced: true,
            before: None,
        }
    }

    /// Whether the kernel saw it as it happened (the old image's figures are
    /// exactly its own).
    pub fn is_precise(&self) -> bool {
        self.before.is_some()
    }
}

/// A probed function: (device, inode) of its file, its address there, and
/// whether the probe is its return probe.
type FunctionKey = (u64, u64, u64, bool);

/// What heapbpf placed in one target.
struct ProbedTarget {
    links: Vec<(&'static str, UProbeLinkId)>,
    /// uprobe_multi links of session programs (closing one detaches it).
    session_links: Vec<OwnedFd>,
    /// Functions probed, by (device, inode, address) of their file, entry
    /// and return apart: one probe per function however many names
    /// (aliases, or the same file hooked as two allocators) lead to it.
    hooked: HashSet<FunctionKey>,
    /// heapbpf's own stack walk takes this target's stacks (it has a module
    /// table in the kernel).
    walk: bool,
    /// Its slot in the `HITS` map (0: none), and what the slot had counted
    /// when it was given.
    hit_slot: u32,
    hits_at_attach: Hits,
    /// The libraries hooked (each with the library that serves what it
    /// does not define), to hook again after [`Profiler::pause`].
    libraries: Vec<(crate::allocator::Library, Option<crate::allocator::Library>)>,
    /// Which of its probes are attached: allocation probes (entries,
    /// returns, sessions) and free probes; [`Profiler::pause`] detaches
    /// them without forgetting anything the kernel holds of it.
    probes: Which,
}

/// Which probes of a target: allocation probes, free probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Which {
    pub allocations: bool,
    pub frees: bool,
}

impl Which {
    pub const ALL: Which = Which {
        allocations: true,
        frees: true,
    };
    pub const NONE: Which = Which {
        allocations: false,
        frees: false,
    };
}

/// Loaded programs and maps, and the probes attached per target.
pub struct Profiler {
    floor: Option<Floor>,
    sample_bytes: u64,
    ebpf: Ebpf,
    targets: HashMap<u32, ProbedTarget>,
    /// Addresses of the stacks of each target's last snapshot, so that the
    /// next does not read them from the kernel again.
    stacks: drain::StackCache,
    unwind: unwind::Tables,
    /// Session programs, when this kernel has uprobe sessions.
    sessions: Option<uprobe_session::Sessions>,
    /// The module table last written per walked target, and the walk epoch
    /// (bumped when what the walk reads changes: its cache is then void).
    written_modules: HashMap<u32, Box<ModuleTable>>,
    walk_epoch: u64,
    /// Capacity of the stack map, and when idle stacks were last retired.
    max_stacks: u32,
    retire: retire::RetireState,
    /// The `exec` tracepoint is attached: [`Profiler::take_exec`] tells.
    exec_watched: bool,
    /// Keeps BPF run-time statistics on ([`Profiler::enable_run_stats`]).
    run_stats_fd: Option<OwnedFd>,
    /// Targets get a slot in `HITS` ([`Profiler::count_hits`]).
    count_hits: bool,
}

impl Profiler {
    /// A map of the object, by name.
    fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or_else(|| Error::Runtime(format!("heapbpf's eBPF object has no map {name}")))
    }

    /// A map of the object, by name, to write.
    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| Error::Runtime(format!("heapbpf's eBPF object has no map {name}")))
    }
}

/// The file descriptor of a map of the kinds heapbpf's object has.
fn map_fd(map: &aya::maps::Map) -> Result<BorrowedFd<'_>> {
    use aya::maps::Map;
    match map {
        Map::HashMap(d) | Map::Array(d) | Map::PerCpuArray(d) | Map::ProgramArray(d) => {
            Ok(d.fd().as_fd())
        }
        _ => Err(Error::Runtime("unexpected kind of map".into())),
    }
}
