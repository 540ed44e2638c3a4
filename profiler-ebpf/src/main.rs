//! heapbpf's eBPF programs: uprobes on the allocator of traced processes.
//!
//! Entry programs record the arguments of an allocator call per thread (a
//! leaf call in a uprobe session: its size, in the session's cookie); the
//! return turns the result into a live-block record keyed by address, with
//! the user stack of the caller (taken at the return, where the stack
//! pointer and frame pointer are the caller's again, so the first frame is
//! the call site; by the kernel's frame-pointer walk or by heapbpf's own). `free` is entry-only. Nested allocator calls (glibc's
//! `reallocarray` calling `realloc`, `realloc(NULL, n)` calling `malloc`,
//! `memalign` calling `malloc`) are counted once, by the outermost call.
//!
//! Nothing here panics; every early return that loses data bumps a named
//! counter in the target's state (see `heapbpf_common::drop_reason`).
//!
//! One file per concern, each importing only from those above it here:
//!
//! - `maps`: every map.
//! - `state`: the traced processes' state and counters.
//! - `sampling`: Poisson sampling by bytes, and the weight of a sample.
//! - `record`: stacks interned, live blocks recorded, frees accounted.
//! - `walk`: heapbpf's own user-stack walk (`unwind_step`,
//!   `unwind_finish`), tail-called from an allocation's return; it ends in
//!   `record`.
//! - `hooks`: the allocator's entry, return and free, as plain uprobes and
//!   a uretprobe; the return starts the walk.
//! - `session`: the same entry and return as uprobe-session programs.
//! - `oom` (the OOM killer's tracepoint), `exec` (a traced process's
//!   `exec`: the old image's figures set aside, the state started afresh)
//!   and `floor` (empty programs for the benchmark's floors) stand apart.
//!
//! A program's name is its function's; user space names them by
//! `heapbpf_common::names::programs` (`profiler-ebpf/common/tests/names.rs`
//! checks the two agree).
#![no_std]
#![no_main]
// Atomic adds on map values: the BPF target lacks `fetch_add` in core.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod exec;
mod floor;
mod hooks;
mod maps;
mod oom;
mod record;
mod sampling;
mod session;
mod state;
mod walk;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
