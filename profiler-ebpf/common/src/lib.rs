//! The ABI shared by heapbpf's eBPF programs and its user-space loader.
//!
//! Every type here is `#[repr(C)]` with explicit padding, and a compile-time
//! size guard sits next to it: the kernel side and the user side must agree on
//! every byte. Keep this crate tiny: types and constants, no logic.
#![no_std]

/// Deepest user stack kept per allocation site (the kernel's default
/// `perf_event_max_stack`).
pub const MAX_STACK_DEPTH: usize = 127;

/// Stack id recorded when the user stack could not be captured.
pub const NO_STACK: u64 = 0;

/// Allocation and free counts are kept in thousandths, so that sampled
/// allocations can carry fractional weights (1/p); exact mode adds 1000.
pub const COUNT_UNIT: u64 = 1000;

/// Sampling table: `P[i]` is `1 - exp(-i / SAMPLE_TABLE_STEPS)` in units of
/// 2^-32, for `i` in `0..=SAMPLE_TABLE_LEN - 1`; beyond, every allocation is
/// sampled. Filled by user space.
pub const SAMPLE_TABLE_STEPS: u64 = 256;
pub const SAMPLE_TABLE_LEN: u32 = 16 * SAMPLE_TABLE_STEPS as u32 + 1;

/// Largest `--sample-bytes`: keeps `size << 32` inside 64 bits for every
/// size that is not always sampled (size < 16 * rate).
pub const MAX_SAMPLE_BYTES: u64 = 64 << 20;

/// Indexes into the `CONFIG` array.
pub mod config {
    /// Mean bytes between samples; 0 = exact.
    pub const SAMPLE_BYTES: u32 = 0;
    /// Bumped by user space whenever it changes what the stack walk reads
    /// (module tables, rows): cached lookups of older epochs are void.
    pub const WALK_EPOCH: u32 = 1;
    /// The pid namespace user space numbers processes in (the device and
    /// inode of its `/proc/self/ns/pid`), when it is not the kernel's
    /// initial one (a container without the host's pids); 0: the initial.
    pub const PIDNS_DEV: u32 = 2;
    pub const PIDNS_INO: u32 = 3;
    pub const LEN: u32 = 4;
}

/// What the return probe must do with the call recorded at entry.
pub mod kind {
    /// `malloc`, `calloc`, `valloc`, `pvalloc`, `memalign`, `aligned_alloc`: the
    /// return value is the new block.
    pub const PLAIN: u32 = 0;
    /// `realloc`, `reallocarray`: frees `old_ptr` and returns the new block.
    pub const REALLOC: u32 = 1;
    /// `posix_memalign`: returns 0 on success, the block is stored at `out_ptr`.
    pub const POSIX_MEMALIGN: u32 = 2;
}

/// Indexes into [`TargetState::counters`]: why an event could not be recorded.
pub mod drop_reason {
    /// The live-allocation map was full.
    pub const ALLOCS_FULL: usize = 0;
    /// The stack map was full: the allocation is kept, its stack is unknown.
    pub const STACKS_FULL: usize = 1;
    /// `bpf_get_stack` failed: the allocation is kept, its stack is unknown.
    pub const STACK_ERROR: usize = 2;
    /// The per-thread pending-call map was full: the call was not recorded.
    pub const PENDING_FULL: usize = 3;
    /// The per-stack statistics map was full.
    pub const STATS_FULL: usize = 4;
    /// `posix_memalign`'s result could not be read from the target.
    pub const READ_ERROR: usize = 5;
    /// Number of reasons.
    pub const COUNT: usize = 6;
}

/// Informational counters (not losses), indexes into [`TargetState::counters`]
/// after the drop reasons.
pub mod info_counter {
    use super::drop_reason;
    /// Allocator calls made from inside another probed allocator call.
    pub const NESTED: usize = drop_reason::COUNT;
    /// An allocation landed on an address still recorded as live (its free
    /// went through a path heapbpf does not hook); the old record was retired.
    pub const STALE_REPLACED: usize = drop_reason::COUNT + 1;
    /// Frees of blocks heapbpf never saw allocated (allocated before attach).
    pub const UNTRACKED_FREES: usize = drop_reason::COUNT + 2;
    /// Total number of counters.
    pub const COUNT: usize = drop_reason::COUNT + 3;
}

/// Key of the live-allocation map: one block of one process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllocKey {
    pub tgid: u32,
    /// [`alloc_slot::LIVE`], or [`alloc_slot::ASIDE`].
    pub slot: u32,
    pub addr: u64,
}
const _: () = assert!(core::mem::size_of::<AllocKey>() == 16);

/// Values of [`AllocKey::slot`].
pub mod alloc_slot {
    /// A block of the process as it runs: frees and reallocs find it here.
    pub const LIVE: u32 = 0;
    /// A block of the image before an `exec`, moved out of the way of a
    /// block the new image got at the same address: kept, never freed, for
    /// the old image's last snapshot (user space drops it then).
    pub const ASIDE: u32 = 1;
}

/// A live block: its requested size, where it was allocated and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocInfo {
    pub size: u64,
    pub stack_id: u64,
    /// `CLOCK_MONOTONIC` nanoseconds (`bpf_ktime_get_ns`).
    pub timestamp_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AllocInfo>() == 24);

/// Key of the per-stack statistics map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub tgid: u32,
    /// The process's [`TargetState::generation`] (its low 32 bits) when the
    /// figures were counted: each image an `exec` starts has its own.
    pub generation: u32,
    pub stack_id: u64,
}
const _: () = assert!(core::mem::size_of::<StackKey>() == 16);

/// Cumulative figures of one stack since attach. Only ever incremented (atomic
/// adds), so live figures are `allocated - freed`. Sampled allocations add
/// their weight (bytes / p); counts are in [`COUNT_UNIT`]s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackStats {
    pub allocated_bytes: u64,
    pub allocations: u64,
}
const _: () = assert!(core::mem::size_of::<StackStats>() == 16);

/// A user stack: `len` return addresses, innermost first.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackTrace {
    pub len: u64,
    pub ips: [u64; MAX_STACK_DEPTH],
}
const _: () = assert!(core::mem::size_of::<StackTrace>() == 1024);

/// An allocator call seen at entry and waiting for its return, per thread.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    /// Nesting depth of probed allocator calls on this thread; only the
    /// outermost call (depth 1) is recorded.
    pub depth: u32,
    pub kind: u32,
    pub size: u64,
    /// `realloc`: the block being resized (0 for `realloc(NULL, n)`).
    pub old_ptr: u64,
    /// `posix_memalign`: where the result will be stored.
    pub out_ptr: u64,
    /// `realloc`: the record of `old_ptr`, taken out at entry so that a block
    /// another thread gets at the same address cannot be confused with it;
    /// put back if the call fails.
    pub old_info: AllocInfo,
    /// 1 when `old_info` holds a record.
    pub has_old: u32,
    /// 1 when this call was picked by sampling (always in exact mode).
    pub sampled: u32,
}
const _: () = assert!(core::mem::size_of::<Pending>() == 64);

/// Per-target state; its presence in the targets map is what marks a process
/// as traced. Counts of allocations and frees are in [`COUNT_UNIT`]s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TargetState {
    pub allocated_bytes: u64,
    pub allocations: u64,
    pub freed_bytes: u64,
    pub frees: u64,
    /// Indexed by [`drop_reason`] and then [`info_counter`].
    pub counters: [u64; info_counter::COUNT],
    /// How stacks are taken for this process: [`unwind_mode`].
    pub unwind: u64,
    /// `bpf_ktime_get_ns` of the `exec` that started the image the process
    /// runs now (0: none seen). A block recorded before it is the old
    /// image's: the new one cannot free it.
    pub image_ns: u64,
    /// Bumped at each `exec`: per-stack figures are kept per generation
    /// ([`StackKey::generation`]).
    pub generation: u64,
    pub _reserved: [u64; 4],
}
const _: () = assert!(core::mem::size_of::<TargetState>() == 8 * (4 + 9 + 7));

/// The `exec`s of a traced process that user space has not taken yet (the
/// `EXECS` map), written by the `sched_process_exec` tracepoint. At an
/// `exec` the process's [`TargetState`] starts afresh for the new image;
/// what the old image had is kept here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExecEvent {
    /// `bpf_ktime_get_ns` of the first of them.
    pub first_ns: u64,
    /// ... and of the last.
    pub last_ns: u64,
    /// How many.
    pub count: u64,
    /// 1 when a thread other than the leader exec'd: it took the process's
    /// id, and the leader thread, which probes scoped to the process are
    /// bound to, is gone (those probes no longer fire).
    pub leader_replaced: u64,
    /// The process's state just before the first: the old image's totals,
    /// counters and generation.
    pub before: TargetState,
}
const _: () =
    assert!(core::mem::size_of::<ExecEvent>() == 32 + core::mem::size_of::<TargetState>());

/// Values of [`TargetState::unwind`].
pub mod unwind_mode {
    /// The kernel's frame-pointer walk (`bpf_get_stack`): cheapest, complete
    /// only where every caller keeps frame pointers.
    pub const KERNEL_FP: u64 = 0;
    /// heapbpf's own walk over the target's [`super::ModuleTable`]: frame
    /// pointers in modules that keep them, `.eh_frame` rows elsewhere.
    pub const WALK: u64 = 1;
}

/// [`StackTrace::len`] holds the number of frames in its low 32 bits and
/// these flags above them.
pub const STACK_LEN_MASK: u64 = 0xffff_ffff;
/// The walk stopped before the stack's root (no unwind data for an address,
/// unreadable stack, too deep): the callers beyond the last frame are missing.
pub const STACK_TRUNCATED: u64 = 1 << 32;
/// The walk reached the stack's root (a frame whose return address the
/// unwind data marks undefined, as `_start` and `clone3` do, or a null one).
pub const STACK_COMPLETE: u64 = 1 << 33;

/// What an [`UnwindRow`] says about the frame of an address.
pub mod row_kind {
    /// No call-frame information covers the address (a gap between
    /// functions; code without CFI, as V8's embedded builtins): stepped out
    /// of by frame pointer, the walk's verdict left to user space.
    pub const NONE: u8 = 0;
    /// CFA = rsp + offset.
    pub const CFA_RSP: u8 = 1;
    /// CFA = rbp + offset.
    pub const CFA_RBP: u8 = 2;
    /// The return address is undefined: the outermost frame of a stack.
    pub const END: u8 = 3;
    /// A rule the walk cannot follow (a CFA expression, a CFA in another
    /// register, a return address not at CFA - 8): the walk stops here,
    /// truncated.
    pub const UNSUPPORTED: u8 = 4;
}

/// One row of call-frame information, valid from `pc` (an ELF virtual
/// address of its module) up to the next row's `pc`. The return address is
/// at CFA - 8 (x86-64); the caller's rbp at CFA + `rbp_offset` when
/// `rbp_saved`, else unchanged.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    pub pc: u32,
    pub cfa_offset: i32,
    pub rbp_offset: i16,
    pub kind: u8,
    pub rbp_saved: u8,
}
const _: () = assert!(core::mem::size_of::<UnwindRow>() == 12);

/// Bits of the attach cookie of an entry probe.
pub mod probe_cookie {
    /// The function calls no other hooked function (glibc's, jemalloc's,
    /// tcmalloc's, mimalloc's `malloc` and `calloc`; musl's `calloc` calls
    /// its `malloc`): an unsampled call needs no return and no nesting mark.
    pub const LEAF: u64 = 1;
    /// Bits from here up: the target's slot in the `HITS` map (1 to
    /// [`super::HIT_SLOTS`] - 1; 0: its hits are not counted, as for the
    /// benchmark's floors and the calibration of the trap cost).
    pub const SLOT_SHIFT: u32 = 32;
}

/// Slots of the `HITS` map, one per traced process (as `TARGETS` holds).
pub const HIT_SLOTS: u32 = 1024;

/// What a probe hit was, in the `HITS` map: index `slot * hit::KINDS + kind`.
/// Every hit is a trap of the target into the kernel; returns cost more.
pub mod hit {
    /// An entry probe: an allocating call's entry (plain or session), or a free.
    pub const ENTRY: u32 = 0;
    /// A return probe: a uretprobe, or a session's return half.
    pub const RETURN: u32 = 1;
    pub const KINDS: u32 = 2;
}

/// Slots of the stack walk's per-CPU cache of address lookups.
pub const WALK_CACHE_SLOTS: u32 = 4096;

/// A cached lookup of the stack walk: for return address - 1 `pc` of
/// process `tgid`, the kind of its module and its row (walk epoch `epoch`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WalkCacheSlot {
    pub pc: u64,
    pub tgid: u32,
    pub epoch: u32,
    pub module_kind: u32,
    pub row: UnwindRow,
    /// A hash of the fields above, written last.
    pub check: u64,
}
const _: () = assert!(core::mem::size_of::<WalkCacheSlot>() == 40);

/// How the walk steps out of a frame in a module.
pub mod module_kind {
    /// The module keeps frame pointers: CFA = rbp + 16.
    pub const FP: u32 = 0;
    /// Rows `first_row .. first_row + rows` of the row table.
    pub const DWARF: u32 = 1;
    /// Nothing known (JIT code, `[vdso]`, an unreadable file): stepped
    /// through by frame pointer, and the walk's verdict left to user space.
    pub const UNKNOWN: u32 = 2;
}

/// Most executable mappings the walk knows per process.
pub const MAX_MODULES: usize = 128;

/// One executable mapping of a process: `[start, end)`; an address `a` in it
/// is ELF virtual address `a - bias` of its module.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModuleEntry {
    pub start: u64,
    pub end: u64,
    pub bias: u64,
    pub first_row: u32,
    pub rows: u32,
    pub kind: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ModuleEntry>() == 40);

/// The executable mappings of one process, sorted by `start`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleTable {
    pub count: u64,
    pub entries: [ModuleEntry; MAX_MODULES],
}
const _: () = assert!(core::mem::size_of::<ModuleTable>() == 8 + 40 * MAX_MODULES);

/// The walk in progress on one CPU, carried across tail calls: the registers
/// of the frame to step out of next, and the block to record once the stack
/// is complete.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UnwindState {
    pub pc: u64,
    pub sp: u64,
    pub bp: u64,
    pub addr: u64,
    pub size: u64,
    pub tgid: u32,
    /// Tail calls made so far.
    pub steps: u32,
    /// 1 once the walk stepped out of an address no mapping of the table
    /// holds (mapped after the table was made), by frame pointer: whether
    /// such a walk is complete is then not known.
    pub guessed: u64,
    pub trace: StackTrace,
}
const _: () = assert!(core::mem::size_of::<UnwindState>() == 56 + 1024);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), made of integers, with explicit padding.
    unsafe impl aya::Pod for AllocKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AllocInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for StackKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for StackStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for StackTrace {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Pending {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TargetState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ExecEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for UnwindRow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ModuleEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ModuleTable {}
}

/// Helper numbers the session programs call in place of kfuncs (the BPF
/// target cannot name kernel functions); heapbpf's session loader rewrites
/// each such call into a call of the kfunc. No helper has these numbers: a
/// program still holding one fails to load.
pub mod kfunc_call {
    /// `bpf_session_is_return`
    pub const SESSION_IS_RETURN: i32 = 0x7eb0_0001;
    /// `bpf_session_cookie`
    pub const SESSION_COOKIE: i32 = 0x7eb0_0002;
}

/// Names of the maps and programs in heapbpf's eBPF object, for the
/// user-space loader; a test (`tests/names.rs`) checks them against the object.
pub mod names {
    /// Every map (`profiler-ebpf/src/maps.rs`).
    pub mod maps {
        pub const TARGETS: &str = "TARGETS";
        pub const ALLOCS: &str = "ALLOCS";
        pub const STACKS: &str = "STACKS";
        pub const STACK_STATS: &str = "STACK_STATS";
        pub const PENDING: &str = "PENDING";
        pub const SCRATCH: &str = "SCRATCH";
        pub const OOM_VICTIMS: &str = "OOM_VICTIMS";
        pub const EXECS: &str = "EXECS";
        pub const CONFIG: &str = "CONFIG";
        pub const SAMPLE_P: &str = "SAMPLE_P";
        pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
        pub const MODULES: &str = "MODULES";
        pub const WALK_CACHE: &str = "WALK_CACHE";
        pub const UNWIND: &str = "UNWIND";
        pub const UNWIND_PROGS: &str = "UNWIND_PROGS";
        pub const HITS: &str = "HITS";
        /// All of the above.
        pub const ALL: &[&str] = &[
            TARGETS,
            ALLOCS,
            STACKS,
            STACK_STATS,
            PENDING,
            SCRATCH,
            OOM_VICTIMS,
            EXECS,
            CONFIG,
            SAMPLE_P,
            UNWIND_ROWS,
            MODULES,
            WALK_CACHE,
            UNWIND,
            UNWIND_PROGS,
            HITS,
        ];
    }

    /// Every program.
    pub mod programs {
        // Entry programs (uprobes), each paired with `ALLOC_RETURN` but
        // `FREE_ENTER`.
        pub const MALLOC_ENTER: &str = "malloc_enter";
        pub const ALLOC_SIZE0_ENTER: &str = "alloc_size0_enter";
        pub const ALLOC_SIZE1_ENTER: &str = "alloc_size1_enter";
        pub const CALLOC_ENTER: &str = "calloc_enter";
        pub const REALLOC_ENTER: &str = "realloc_enter";
        pub const REALLOCARRAY_ENTER: &str = "reallocarray_enter";
        /// Rust's `__rust_realloc(ptr, old_size, align, new_size)`.
        pub const RUST_REALLOC_ENTER: &str = "rust_realloc_enter";
        pub const POSIX_MEMALIGN_ENTER: &str = "posix_memalign_enter";
        pub const FREE_ENTER: &str = "free_enter";
        /// The return program of every allocating entry program (uretprobe).
        pub const ALLOC_RETURN: &str = "alloc_return";
        // Session programs (entry and return in one uprobe session): the
        // twins of the allocating entry programs.
        pub const MALLOC_SESSION: &str = "malloc_session";
        pub const ALLOC_SIZE0_SESSION: &str = "alloc_size0_session";
        pub const ALLOC_SIZE1_SESSION: &str = "alloc_size1_session";
        pub const CALLOC_SESSION: &str = "calloc_session";
        pub const REALLOC_SESSION: &str = "realloc_session";
        pub const REALLOCARRAY_SESSION: &str = "reallocarray_session";
        pub const RUST_REALLOC_SESSION: &str = "rust_realloc_session";
        pub const POSIX_MEMALIGN_SESSION: &str = "posix_memalign_session";
        /// The stack walk, slot 0 of `UNWIND_PROGS` (tail-called, never
        /// attached).
        pub const UNWIND_STEP: &str = "unwind_step";
        /// The end of the stack walk, slot 1 of `UNWIND_PROGS`.
        pub const UNWIND_FINISH: &str = "unwind_finish";
        // The benchmark floors' empty programs.
        pub const NOOP_ENTER: &str = "noop_enter";
        pub const NOOP_RETURN: &str = "noop_return";
        pub const NOOP_SESSION_ENTRY: &str = "noop_session_entry";
        pub const NOOP_SESSION_RETURN: &str = "noop_session_return";
        /// The OOM killer's tracepoint (`oom:mark_victim`).
        pub const OOM_MARK_VICTIM: &str = "oom_mark_victim";
        /// A traced process's `exec` (raw tracepoint `sched_process_exec`).
        pub const SCHED_PROCESS_EXEC: &str = "sched_process_exec";
        /// All of the above.
        pub const ALL: &[&str] = &[
            MALLOC_ENTER,
            ALLOC_SIZE0_ENTER,
            ALLOC_SIZE1_ENTER,
            CALLOC_ENTER,
            REALLOC_ENTER,
            REALLOCARRAY_ENTER,
            RUST_REALLOC_ENTER,
            POSIX_MEMALIGN_ENTER,
            FREE_ENTER,
            ALLOC_RETURN,
            MALLOC_SESSION,
            ALLOC_SIZE0_SESSION,
            ALLOC_SIZE1_SESSION,
            CALLOC_SESSION,
            REALLOC_SESSION,
            REALLOCARRAY_SESSION,
            RUST_REALLOC_SESSION,
            POSIX_MEMALIGN_SESSION,
            UNWIND_STEP,
            UNWIND_FINISH,
            NOOP_ENTER,
            NOOP_RETURN,
            NOOP_SESSION_ENTRY,
            NOOP_SESSION_RETURN,
            OOM_MARK_VICTIM,
            SCHED_PROCESS_EXEC,
        ];
    }
}
