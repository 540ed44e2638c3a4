//! Every map of heapbpf, in one place. Sizes are defaults; user space may
//! resize the large ones before loading.
//!
//! User space names them by `heapbpf_common::names::maps`; a new map gets its
//! constant there too (`profiler-ebpf/common/tests/names.rs` checks).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, ProgramArray},
};
use heapbpf_common::{
    config, hit, AllocInfo, AllocKey, ExecEvent, ModuleTable, Pending, StackKey, StackStats,
    StackTrace, TargetState, UnwindRow, UnwindState, WalkCacheSlot, HIT_SLOTS, SAMPLE_TABLE_LEN,
    WALK_CACHE_SLOTS,
};

/// Traced processes by tgid. A process absent here is ignored.
#[map]
pub static TARGETS: HashMap<u32, TargetState> = HashMap::with_max_entries(1024, 0);

/// Live blocks. Allocated on demand: an idle profiler costs little memory.
#[map]
pub static ALLOCS: HashMap<AllocKey, AllocInfo> =
    HashMap::with_max_entries(1 << 21, BPF_F_NO_PREALLOC);

/// Unique user stacks, keyed by a 64-bit hash of their addresses.
#[map]
pub static STACKS: HashMap<u64, StackTrace> = HashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC);

/// Cumulative figures per (process, stack).
#[map]
pub static STACK_STATS: HashMap<StackKey, StackStats> =
    HashMap::with_max_entries(1 << 17, BPF_F_NO_PREALLOC);

/// Allocator calls between entry and return, per thread (pid_tgid).
#[map]
pub static PENDING: HashMap<u64, Pending> = HashMap::with_max_entries(1 << 15, 0);

/// Scratch space for one stack (too large for the 512-byte BPF stack).
#[map]
pub static SCRATCH: PerCpuArray<StackTrace> = PerCpuArray::with_max_entries(1, 0);

/// Traced processes the OOM killer picked, with the time it did.
#[map]
pub static OOM_VICTIMS: HashMap<u32, u64> = HashMap::with_max_entries(1024, 0);

/// Traced processes that called `exec` since user space last looked (see
/// `heapbpf_common::ExecEvent`).
#[map]
pub static EXECS: HashMap<u32, ExecEvent> = HashMap::with_max_entries(1024, 0);

/// Settings written by user space before attaching (see `heapbpf_common::config`).
#[map]
pub static CONFIG: Array<u64> = Array::with_max_entries(config::LEN, 0);

/// `1 - exp(-x)` in units of 2^-32 for x = i / SAMPLE_TABLE_STEPS.
#[map]
pub static SAMPLE_P: Array<u32> = Array::with_max_entries(SAMPLE_TABLE_LEN, 0);

/// Call-frame rows of every module the stack walk knows, each module's rows
/// sorted by address (see `heapbpf_common::UnwindRow`). Sized by user space.
#[map]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(1, 0);

/// Executable mappings per traced process (tgid), for the stack walk.
#[map]
pub static MODULES: HashMap<u32, ModuleTable> = HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

/// Recent address lookups of the stack walk on this CPU (hot call sites
/// repeat: a hit skips both binary searches).
#[map]
pub static WALK_CACHE: PerCpuArray<WalkCacheSlot> =
    PerCpuArray::with_max_entries(WALK_CACHE_SLOTS, 0);

/// The stack walk in progress on this CPU, carried across tail calls.
#[map]
pub static UNWIND: PerCpuArray<UnwindState> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: the stack walk, which tail-calls itself per batch of frames;
/// slot 1: the program that interns the stack and records the block.
#[map]
pub static UNWIND_PROGS: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// Probe hits per target slot and kind (see `heapbpf_common::hit`), per
/// CPU: what the agent's CPU budget charges each target. Per CPU, so that
/// counting every call of a many-threaded target costs no shared cache line.
#[map]
pub static HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(HIT_SLOTS * hit::KINDS, 0);
