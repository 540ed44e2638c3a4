//! The allocator hooks: what happens at an allocator call's entry
//! ([`enter`]), at its return ([`alloc_exit`]) and at a free
//! ([`free_enter`]), and the plain-uprobe programs that run it: the entry
//! programs (`*_enter`) and the return program (`alloc_return`, a
//! uretprobe). User space attaches them from its table of entry points
//! (`profiler/src/allocator.rs`: symbol → call shape; the shape's program in
//! `profiler/src/ebpf/programs.rs`). Where the kernel has
//! uprobe sessions, the session twins of the entry programs (`session.rs`)
//! run the same entry and return.
//!
//! An allocation's return starts the stack walk (`walk.rs`) for targets it
//! walks; nothing below this module and `session.rs` calls into the walk.

use aya_ebpf::{
    helpers::{bpf_get_attach_cookie, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use heapbpf_common::{
    alloc_slot, drop_reason, hit, info_counter, kind, probe_cookie, unwind_mode, AllocInfo,
    AllocKey, Pending, TargetState,
};

use crate::{
    maps::{ALLOCS, PENDING},
    record::{account_free, record_with_stack, stack_id},
    sampling::{sample_bytes, sampled},
    state::{self, count, target},
    walk,
};

/// An allocator call as its entry program reads it.
#[derive(Clone, Copy)]
pub(crate) struct Call {
    /// What the return must do ([`heapbpf_common::kind`]).
    kind: u32,
    size: u64,
    /// `realloc`: the block being resized (0 for `realloc(NULL, n)`).
    old_ptr: u64,
    /// `posix_memalign`: where the result will be stored.
    out_ptr: u64,
    /// The function calls no other hooked function (see [`leaf`]).
    leaf: bool,
}

impl Call {
    /// A call whose return value is the new block.
    #[inline(always)]
    fn plain(size: u64, leaf: bool) -> Self {
        Call {
            kind: kind::PLAIN,
            size,
            old_ptr: 0,
            out_ptr: 0,
            leaf,
        }
    }

    /// `realloc`, `reallocarray`: frees `old_ptr`, returns the new block.
    #[inline(always)]
    fn realloc(size: u64, old_ptr: u64) -> Self {
        Call {
            kind: kind::REALLOC,
            size,
            old_ptr,
            out_ptr: 0,
            leaf: false,
        }
    }

    /// `posix_memalign`: stores the new block at `out_ptr`.
    #[inline(always)]
    fn posix_memalign(size: u64, out_ptr: u64) -> Self {
        Call {
            kind: kind::POSIX_MEMALIGN,
            size,
            old_ptr: 0,
            out_ptr,
            leaf: false,
        }
    }
}

/// What the return of a call needs, as [`enter`] decides it.
pub(crate) enum Return {
    /// Nothing: the call is not recorded (or, in a session, it is nested in
    /// one that is).
    Skip,
    /// [`alloc_exit`]: the call waits in `PENDING`, or it deepened the
    /// nesting count of the outer call that does.
    Pending,
    /// A sampled leaf call in a session: its size is all the return needs,
    /// and the session carries it (`session.rs`).
    Leaf(u64),
}

/// Records the start of an allocator call. Only the outermost call of a
/// thread is recorded. `leaf` calls (user space says which: glibc's malloc
/// and calloc call no other probed function, musl's calloc calls malloc)
/// that sampling skips leave no trace at all.
///
/// With a plain return probe (`session == false`) every call returns through
/// `alloc_return`, so nested calls deepen the outer call's nesting count.
/// In a uprobe session the entry half declines the return half of calls
/// that need nothing more (nested calls, unsampled leaf calls): those cost
/// one trap instead of two, and an unsampled leaf call one random number.
#[inline(always)]
pub(crate) fn enter(call: Call, session: bool) -> Return {
    let Call {
        kind,
        size,
        old_ptr,
        out_ptr,
        leaf,
    } = call;
    let picked = sampled(size, sample_bytes());
    if session && leaf && !picked {
        return Return::Skip;
    }
    let pid_tgid = state::current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(state) = target(tgid) else {
        return Return::Skip;
    };
    if let Some(pending) = PENDING.get_ptr_mut(pid_tgid) {
        // SAFETY: valid map value; only this thread touches its own entry.
        let pending = unsafe { &mut *pending };
        if pending.depth > 0 {
            count(state, info_counter::NESTED);
            if session {
                return Return::Skip;
            }
            pending.depth += 1;
            return Return::Pending;
        }
    }
    if !picked && leaf {
        return Return::Skip;
    }
    if session && leaf {
        // A leaf call has nothing to carry but its size: in the session's
        // cookie, not in a map entry.
        return Return::Leaf(size);
    }
    let mut pending = Pending {
        depth: 1,
        kind,
        size,
        old_ptr,
        out_ptr,
        old_info: AllocInfo {
            size: 0,
            stack_id: 0,
            timestamp_ns: 0,
        },
        has_old: 0,
        sampled: picked as u32,
    };
    if kind == kind::REALLOC && old_ptr != 0 {
        let key = AllocKey {
            tgid,
            slot: alloc_slot::LIVE,
            addr: old_ptr,
        };
        // SAFETY: `ALLOCS` is not preallocated: an entry removed meanwhile is
        // not reused while this program runs; the value is copied out at once.
        if let Some(info) = unsafe { ALLOCS.get(key) } {
            // A block of the image before an exec is not this image's to
            // resize: it stays for the old image's last snapshot.
            // SAFETY: valid map value.
            if info.timestamp_ns >= unsafe { (*state).image_ns } {
                pending.old_info = *info;
                pending.has_old = 1;
                let _ = ALLOCS.remove(key);
            }
        }
    }
    if PENDING.insert(pid_tgid, pending, 0).is_err() {
        // The block taken out above must not vanish with the lost call.
        if pending.has_old == 1 {
            let key = AllocKey {
                tgid,
                slot: alloc_slot::LIVE,
                addr: old_ptr,
            };
            let _ = ALLOCS.insert(key, pending.old_info, 0);
        }
        count(state, drop_reason::PENDING_FULL);
        return Return::Skip;
    }
    Return::Pending
}

/// Argument `n` of the probed call (0 if it cannot be read).
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg(n).unwrap_or(0)
}

/// The cookie user space gave the probe that fired (see
/// `heapbpf_common::probe_cookie`).
#[inline(always)]
pub(crate) fn cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the helper reads the cookie of the probe that fired.
    unsafe { bpf_get_attach_cookie(ctx.as_ptr()) }
}

/// Whether user space marked the probed function a leaf.
fn leaf(ctx: &ProbeContext) -> bool {
    cookie(ctx) & probe_cookie::LEAF != 0
}

/// What each entry program reads of its call. The plain entry programs
/// below and their session twins (`session.rs`) share these.
pub(crate) mod read {
    use aya_ebpf::programs::ProbeContext;

    use super::{arg, leaf, Call};

    #[inline(always)]
    pub(crate) fn malloc(ctx: &ProbeContext) -> Call {
        Call::plain(arg(ctx, 0), leaf(ctx))
    }

    #[inline(always)]
    pub(crate) fn alloc_size0(ctx: &ProbeContext) -> Call {
        Call::plain(arg(ctx, 0), false)
    }

    #[inline(always)]
    pub(crate) fn alloc_size1(ctx: &ProbeContext) -> Call {
        Call::plain(arg(ctx, 1), false)
    }

    /// An overflowing product fails inside calloc; the return sees NULL.
    #[inline(always)]
    pub(crate) fn calloc(ctx: &ProbeContext) -> Call {
        Call::plain(arg(ctx, 0).wrapping_mul(arg(ctx, 1)), leaf(ctx))
    }

    #[inline(always)]
    pub(crate) fn realloc(ctx: &ProbeContext) -> Call {
        Call::realloc(arg(ctx, 1), arg(ctx, 0))
    }

    #[inline(always)]
    pub(crate) fn reallocarray(ctx: &ProbeContext) -> Call {
        Call::realloc(arg(ctx, 1).wrapping_mul(arg(ctx, 2)), arg(ctx, 0))
    }

    /// Rust's `__rust_realloc(ptr, old_size, align, new_size)`.
    #[inline(always)]
    pub(crate) fn rust_realloc(ctx: &ProbeContext) -> Call {
        Call::realloc(arg(ctx, 3), arg(ctx, 0))
    }

    #[inline(always)]
    pub(crate) fn posix_memalign(ctx: &ProbeContext) -> Call {
        Call::posix_memalign(arg(ctx, 2), arg(ctx, 0))
    }
}

/// The entry programs as plain uprobes, each paired with the
/// `alloc_return` uretprobe.
macro_rules! entry_programs {
    ($($name:ident => $read:path;)*) => {$(
        #[uprobe]
        pub fn $name(ctx: ProbeContext) -> u32 {
            state::hit(cookie(&ctx), hit::ENTRY);
            // A plain uprobe's return value means nothing.
            let _ = enter($read(&ctx), false);
            0
        }
    )*};
}

entry_programs! {
    malloc_enter => read::malloc;
    alloc_size0_enter => read::alloc_size0;
    alloc_size1_enter => read::alloc_size1;
    calloc_enter => read::calloc;
    realloc_enter => read::realloc;
    reallocarray_enter => read::reallocarray;
    rust_realloc_enter => read::rust_realloc;
    posix_memalign_enter => read::posix_memalign;
}

/// A free: the block leaves `ALLOCS`, its weight the target's totals.
#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    state::hit(cookie(&ctx), hit::ENTRY);
    let ptr = arg(&ctx, 0);
    if ptr == 0 {
        return 0;
    }
    let pid_tgid = state::current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let key = AllocKey {
        tgid,
        slot: alloc_slot::LIVE,
        addr: ptr,
    };
    // SAFETY: `ALLOCS` is not preallocated: an entry removed meanwhile is
    // not reused while this program runs; the value is copied out at once.
    let found = (unsafe { ALLOCS.get(key) }).copied();
    if found.is_none() && sample_bytes() != 0 {
        // Sampling: most blocks were never recorded. One lookup, no more.
        return 0;
    }
    let Some(state) = target(tgid) else { return 0 };
    let Some(info) = found else {
        let nested = PENDING
            .get_ptr(pid_tgid)
            // SAFETY: a map value from a successful lookup.
            .is_some_and(|p| unsafe { (*p).depth } > 0);
        // Freed by the allocator itself (realloc(p, 0), the outer call took
        // the block out and accounts for it), or never seen allocated.
        count(
            state,
            if nested {
                info_counter::NESTED
            } else {
                info_counter::UNTRACKED_FREES
            },
        );
        return 0;
    };
    // SAFETY: valid map value.
    if info.timestamp_ns < unsafe { (*state).image_ns } {
        // A block of the image before an exec (the new one got the same
        // address without heapbpf recording it: from an allocator not
        // hooked yet, or in a call sampling skipped): it stays for the old
        // image's last snapshot.
        count(state, info_counter::UNTRACKED_FREES);
        return 0;
    }
    if ALLOCS.remove(key).is_err() {
        // Another thread retired it first (a double free in the target).
        return 0;
    }
    account_free(state, &info);
    0
}

/// Records a new live block of `size` bytes at `addr`, with the stack of
/// the call site. With heapbpf's own stack walk for this target, the walk
/// (a tail call) finishes the record; if the tail call cannot be made, the
/// kernel's frame-pointer walk stands in.
#[inline(always)]
pub(crate) fn record_block(
    ctx: &RetProbeContext,
    state: *mut TargetState,
    tgid: u32,
    addr: u64,
    size: u64,
) {
    // SAFETY: valid map value.
    if unsafe { (*state).unwind } == unwind_mode::WALK {
        walk::start(ctx, tgid, addr, size);
    }
    let stack_id = stack_id(ctx, state);
    record_with_stack(state, tgid, addr, size, stack_id);
}

#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    state::hit(cookie(&ctx), hit::RETURN);
    alloc_exit(&ctx)
}

/// The return of an allocating call: the result becomes a live block.
#[inline(always)]
pub(crate) fn alloc_exit(ctx: &RetProbeContext) -> u32 {
    let pid_tgid = state::current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(state) = target(tgid) else { return 0 };
    let Some(pending) = PENDING.get_ptr_mut(pid_tgid) else {
        // Not sampled, or entered before the entry probes were attached.
        return 0;
    };
    // SAFETY: valid map value; only this thread touches its own entry.
    let p = unsafe { &mut *pending };
    if p.depth > 1 {
        p.depth -= 1;
        return 0;
    }
    let call = *p;
    let _ = PENDING.remove(pid_tgid);
    let ret: u64 = ctx.ret();
    let picked = call.sampled != 0;
    match call.kind {
        kind::REALLOC => {
            let failed = ret == 0 && call.size != 0;
            if call.has_old == 1 {
                if failed {
                    // A failed realloc leaves the old block as it was.
                    let key = AllocKey {
                        tgid,
                        slot: alloc_slot::LIVE,
                        addr: call.old_ptr,
                    };
                    if ALLOCS.insert(key, call.old_info, 0).is_err() {
                        count(state, drop_reason::ALLOCS_FULL);
                    }
                } else {
                    account_free(state, &call.old_info);
                }
            } else if call.old_ptr != 0 && !failed {
                count(state, info_counter::UNTRACKED_FREES);
            }
            if ret != 0 && picked {
                record_block(ctx, state, tgid, ret, call.size);
            }
        }
        kind::POSIX_MEMALIGN => {
            if ret == 0 && call.out_ptr != 0 && picked {
                // SAFETY: reads target memory through the checked helper.
                match unsafe { bpf_probe_read_user(call.out_ptr as *const u64) } {
                    Ok(addr) if addr != 0 => record_block(ctx, state, tgid, addr, call.size),
                    Ok(_) => {}
                    Err(_) => count(state, drop_reason::READ_ERROR),
                }
            }
        }
        _ => {
            if ret != 0 && picked {
                record_block(ctx, state, tgid, ret, call.size);
            }
        }
    }
    0
}
