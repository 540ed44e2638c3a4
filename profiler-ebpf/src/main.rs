//! heapbpf's eBPF programs: uprobes on the allocator of traced processes.
//!
//! Entry programs record the arguments of an allocator call per thread; one
//! return program turns the result into a live-block record keyed by address,
//! with the user stack of the caller (taken at the return, where the stack
//! pointer and frame pointer are the caller's again, so the first frame is the
//! call site). `free` is entry-only. Nested allocator calls (glibc's
//! `reallocarray` calling `realloc`, `realloc(NULL, n)` calling `malloc`,
//! `memalign` calling `malloc`) are counted once, by the outermost call.
//!
//! Nothing here panics; every early return that loses data bumps a named
//! counter in the target's state (see `heapbpf_common::drop_reason`).
#![no_std]
#![no_main]
// Atomic adds on map values: the BPF target lacks `fetch_add` in core.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod floor;
mod maps;
mod oom;
mod probes;
mod record;
mod sampling;
mod state;
mod walk;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
