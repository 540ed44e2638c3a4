//! The allocator hooks. User space attaches them from a table (symbol,
//! program, entry/return); see `profiler/src/ebpf/probes.rs`.

use aya_ebpf::{
    helpers::{bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use heapbpf_common::{
    drop_reason, info_counter, kind, probe_cookie, unwind_mode, AllocInfo, AllocKey, Pending,
    TargetState,
};

use crate::{
    maps::{ALLOCS, PENDING},
    record::{account_free, record_with_stack, stack_id},
    sampling::{sample_bytes, sampled},
    state::{count, target},
};

/// What an entry program tells a uprobe session: run the return half.
const WANT_RETURN: u32 = 0;
/// ... or do not: the call needs nothing more.
const SKIP_RETURN: u32 = 1;

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
fn enter(kind: u32, size: u64, old_ptr: u64, out_ptr: u64, leaf: bool, session: bool) -> u32 {
    let picked = sampled(size, sample_bytes());
    if session && leaf && !picked {
        return SKIP_RETURN;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(state) = target(tgid) else {
        return SKIP_RETURN;
    };
    if let Some(pending) = PENDING.get_ptr_mut(pid_tgid) {
        // SAFETY: valid map value; only this thread touches its own entry.
        let pending = unsafe { &mut *pending };
        if pending.depth > 0 {
            count(state, info_counter::NESTED);
            if session {
                return SKIP_RETURN;
            }
            pending.depth += 1;
            return WANT_RETURN;
        }
    }
    if !picked && leaf {
        return SKIP_RETURN;
    }
    if session && leaf {
        // A leaf call has nothing to carry but its size: in the session's
        // cookie, not in a map entry.
        // SAFETY: the kernel's 8-byte cookie of this session instance.
        unsafe { *session_cookie() = size | CARRIED };
        return WANT_RETURN;
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
            _pad: 0,
            addr: old_ptr,
        };
        // SAFETY: plain data copied out of the map.
        if let Some(info) = unsafe { ALLOCS.get(key) } {
            pending.old_info = *info;
            pending.has_old = 1;
            let _ = ALLOCS.remove(key);
        }
    }
    if PENDING.insert(pid_tgid, pending, 0).is_err() {
        // The block taken out above must not vanish with the lost call.
        if pending.has_old == 1 {
            let key = AllocKey {
                tgid,
                _pad: 0,
                addr: old_ptr,
            };
            let _ = ALLOCS.insert(key, pending.old_info, 0);
        }
        count(state, drop_reason::PENDING_FULL);
        return SKIP_RETURN;
    }
    WANT_RETURN
}

/// The entry programs, each as a plain uprobe (`*_enter`, paired with the
/// `alloc_return` uretprobe) and as a uprobe session program (`*_session`,
/// entry and return in one; see `profiler/src/ebpf/multi.rs`).
macro_rules! entry_programs {
    ($($enter:ident, $session:ident => |$ctx:ident| $args:expr;)*) => {$(
        #[uprobe]
        pub fn $enter($ctx: ProbeContext) -> u32 {
            let (kind, size, old, out, leaf) = $args;
            // A plain uprobe's return value means nothing.
            let _ = enter(kind, size, old, out, leaf, false);
            0
        }

        // Not `#[uprobe]`: its wrapper returns 0 whatever the function
        // returns, and a session reads the entry half's return value.
        #[unsafe(no_mangle)]
        #[unsafe(link_section = "uprobe")]
        pub fn $session(regs: *mut core::ffi::c_void) -> u32 {
            if session_is_return() {
                return session_exit(&RetProbeContext::new(regs));
            }
            let $ctx = ProbeContext::new(regs);
            let (kind, size, old, out, leaf) = $args;
            enter(kind, size, old, out, leaf, true)
        }
    )*};
}

fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg(n).unwrap_or(0)
}

/// Whether user space marked the probed function a leaf (see
/// `heapbpf_common::probe_cookie`).
fn leaf(ctx: &ProbeContext) -> bool {
    // SAFETY: the helper reads the cookie of the probe that fired.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    cookie & probe_cookie::LEAF != 0
}

entry_programs! {
    malloc_enter, malloc_session => |ctx| (kind::PLAIN, arg(&ctx, 0), 0, 0, leaf(&ctx));
    alloc_size0_enter, alloc_size0_session => |ctx| (kind::PLAIN, arg(&ctx, 0), 0, 0, false);
    alloc_size1_enter, alloc_size1_session => |ctx| (kind::PLAIN, arg(&ctx, 1), 0, 0, false);
    // An overflowing product fails inside calloc; the return sees NULL.
    calloc_enter, calloc_session =>
        |ctx| (kind::PLAIN, arg(&ctx, 0).wrapping_mul(arg(&ctx, 1)), 0, 0, leaf(&ctx));
    realloc_enter, realloc_session =>
        |ctx| (kind::REALLOC, arg(&ctx, 1), arg(&ctx, 0), 0, false);
    reallocarray_enter, reallocarray_session =>
        |ctx| (kind::REALLOC, arg(&ctx, 1).wrapping_mul(arg(&ctx, 2)), arg(&ctx, 0), 0, false);
    posix_memalign_enter, posix_memalign_session =>
        |ctx| (kind::POSIX_MEMALIGN, arg(&ctx, 2), 0, arg(&ctx, 0), false);
}

/// Marks a session cookie that carries the size of a leaf call (sizes are
/// below 2^63: the call fails).
const CARRIED: u64 = 1 << 63;

/// The kfunc `bpf_session_is_return()`: whether a session program runs for
/// the return of the call. The BPF target cannot name a kernel function, so
/// this calls a placeholder helper number that heapbpf's loader rewrites
/// into the kfunc call (see `heapbpf_common::kfunc_call`).
#[inline(always)]
fn session_is_return() -> bool {
    // SAFETY: a BPF call instruction with a placeholder number, rewritten at
    // load; programs holding it are only loaded through that path.
    let f: unsafe extern "C" fn() -> u64 =
        unsafe { core::mem::transmute(heapbpf_common::kfunc_call::SESSION_IS_RETURN as usize) };
    let r = unsafe { f() };
    r & 0xff != 0
}

/// The kfunc `bpf_session_cookie()`: 8 bytes of this session instance, zero
/// at entry, kept for its return half.
#[inline(always)]
fn session_cookie() -> *mut u64 {
    // SAFETY: as `session_is_return`.
    let f: unsafe extern "C" fn() -> *mut u64 =
        unsafe { core::mem::transmute(heapbpf_common::kfunc_call::SESSION_COOKIE as usize) };
    unsafe { f() }
}

/// The return half of a session: a leaf call's size is in the cookie;
/// other calls left their arguments in `PENDING`.
#[inline(always)]
fn session_exit(ctx: &RetProbeContext) -> u32 {
    // SAFETY: the kernel's 8-byte cookie of this session instance.
    let carried = unsafe { *session_cookie() };
    if carried & CARRIED == 0 {
        return alloc_exit(ctx);
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(state) = target(tgid) else { return 0 };
    let ret: u64 = ctx.ret();
    if ret != 0 {
        record(ctx, state, tgid, ret, carried & !CARRIED);
    }
    0
}

#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let ptr = arg(&ctx, 0);
    if ptr == 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let key = AllocKey {
        tgid,
        _pad: 0,
        addr: ptr,
    };
    // SAFETY: plain data copied out of the map.
    let found = (unsafe { ALLOCS.get(key) }).copied();
    if found.is_none() && sample_bytes() != 0 {
        // Sampling: most blocks were never recorded. One lookup, no more.
        return 0;
    }
    let Some(state) = target(tgid) else { return 0 };
    let Some(info) = found else {
        // SAFETY: valid map value.
        let nested = PENDING
            .get_ptr(pid_tgid)
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
fn record(ctx: &RetProbeContext, state: *mut TargetState, tgid: u32, addr: u64, size: u64) {
    // SAFETY: valid map value.
    if unsafe { (*state).unwind } == unwind_mode::WALK {
        crate::walk::start(ctx, tgid, addr, size);
    }
    let stack_id = stack_id(ctx, state);
    record_with_stack(state, tgid, addr, size, stack_id);
}

#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    alloc_exit(&ctx)
}

/// The return of an allocating call: the result becomes a live block.
#[inline(always)]
fn alloc_exit(ctx: &RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
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
                        _pad: 0,
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
                record(ctx, state, tgid, ret, call.size);
            }
        }
        kind::POSIX_MEMALIGN => {
            if ret == 0 && call.out_ptr != 0 && picked {
                // SAFETY: reads target memory through the checked helper.
                match unsafe { bpf_probe_read_user(call.out_ptr as *const u64) } {
                    Ok(addr) if addr != 0 => record(ctx, state, tgid, addr, call.size),
                    Ok(_) => {}
                    Err(_) => count(state, drop_reason::READ_ERROR),
                }
            }
        }
        _ => {
            if ret != 0 && picked {
                record(ctx, state, tgid, ret, call.size);
            }
        }
    }
    0
}
