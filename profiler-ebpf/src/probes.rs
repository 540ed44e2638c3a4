//! The allocator hooks. User space attaches them from a table (symbol,
//! program, entry/return); see `profiler/src/ebpf/probes.rs`.
//!
//! Sampling (`--sample-bytes R`) is Poisson sampling by bytes: sample points
//! fall on the stream of allocated bytes as a Poisson process of rate 1/R.
//! Points in disjoint byte ranges are independent, so each allocation of
//! size s holds at least one point — is sampled — independently, with
//! probability p = 1 - exp(-s/R), and then stands for s/p bytes and 1/p
//! allocations, which makes every estimate unbiased. No per-thread state is
//! needed: one random number per call.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_get_stack,
        bpf_ktime_get_ns, bpf_probe_read_user,
    },
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use heapbpf_common::{
    config, drop_reason, info_counter, kind, AllocInfo, AllocKey, Pending, StackKey, StackStats,
    StackTrace, TargetState, COUNT_UNIT, MAX_STACK_DEPTH, NO_STACK, SAMPLE_TABLE_LEN,
    SAMPLE_TABLE_STEPS, STACK_LEN_MASK,
};
use heapbpf_common::{probe_cookie, unwind_mode};

use crate::maps::{ALLOCS, CONFIG, PENDING, SAMPLE_P, SCRATCH, STACKS, STACK_STATS, TARGETS};

#[inline(always)]
fn add(field: &mut u64, value: u64) {
    // SAFETY: `field` points into a map value, valid and 8-byte aligned; other
    // CPUs update it concurrently, hence the atomic add. The BPF target has no
    // `AtomicU64::fetch_add`; the intrinsic lowers to BPF's atomic add (the
    // result is unused, so no fetch is needed).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field as *mut u64, value) };
}

#[inline(always)]
pub(crate) fn count(state: *mut TargetState, counter: usize) {
    if counter < info_counter::COUNT {
        // SAFETY: `state` comes from a successful map lookup.
        add(unsafe { &mut (*state).counters[counter] }, 1);
    }
}

#[inline(always)]
pub(crate) fn target(tgid: u32) -> Option<*mut TargetState> {
    TARGETS.get_ptr_mut(tgid)
}

#[inline(always)]
fn sample_bytes() -> u64 {
    CONFIG.get(config::SAMPLE_BYTES).copied().unwrap_or(0)
}

/// Probability that an allocation of `size` bytes is sampled, in units of
/// 2^-32 (`u32::MAX` and above: always).
#[inline(always)]
fn sample_p(size: u64, rate: u64) -> u64 {
    if rate == 0 || size >= 16 * rate {
        return 1 << 32;
    }
    // x = size / rate in units of 2^-16.
    // checked_div: a plain `/` leaves a panic path the verifier rejects.
    let x = (size << 16).checked_div(rate).unwrap_or(0);
    let i = x >> 8; // table steps of 1/256
    if i == 0 {
        // p = x - x^2/2 + ..., exact enough below 1/256.
        return (x << 16).saturating_sub((x * x) >> 1).max(1);
    }
    let frac = x & 0xff;
    let lo = SAMPLE_P.get(i as u32).copied().unwrap_or(u32::MAX) as u64;
    let hi = if (i as u32) + 1 < SAMPLE_TABLE_LEN {
        SAMPLE_P.get(i as u32 + 1).copied().unwrap_or(u32::MAX) as u64
    } else {
        lo
    };
    let _ = SAMPLE_TABLE_STEPS;
    (lo + (((hi.saturating_sub(lo)) * frac) >> 8)).max(1)
}

/// The weight of a sampled block: (bytes, allocations in COUNT_UNITs).
#[inline(always)]
fn weight(size: u64, rate: u64) -> (u64, u64) {
    let p = sample_p(size, rate);
    if p >= 1 << 32 {
        return (size, COUNT_UNIT);
    }
    // size < 16 * rate <= 2^30, so size << 32 fits.
    (
        (size << 32).checked_div(p).unwrap_or(size),
        (COUNT_UNIT << 32).checked_div(p).unwrap_or(COUNT_UNIT),
    )
}

#[inline(always)]
fn sampled(size: u64, rate: u64) -> bool {
    let p = sample_p(size, rate);
    p >= 1 << 32 || (unsafe { bpf_get_prandom_u32() } as u64) < p
}

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

#[inline(always)]
fn account_free(state: *mut TargetState, info: &AllocInfo) {
    // Per stack, what is live comes from the blocks themselves (a snapshot
    // needs each block's age anyway); only the target's totals count frees.
    let (bytes, units) = weight(info.size, sample_bytes());
    // SAFETY: valid map value.
    let s = unsafe { &mut *state };
    add(&mut s.freed_bytes, bytes);
    add(&mut s.frees, units);
}

/// Captures the user stack of the current call site and interns it.
#[inline(always)]
fn stack_id<C: EbpfContext>(ctx: &C, state: *mut TargetState) -> u64 {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        count(state, drop_reason::STACK_ERROR);
        return NO_STACK;
    };
    // SAFETY: per-CPU scratch value, ours for the duration of this program.
    let buf = unsafe { &mut *buf };
    let bytes = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            buf.ips.as_mut_ptr() as *mut _,
            (MAX_STACK_DEPTH * 8) as u32,
            BPF_F_USER_STACK as u64,
        )
    };
    if bytes <= 0 {
        count(state, drop_reason::STACK_ERROR);
        return NO_STACK;
    }
    buf.len = (bytes as u64) / 8;
    intern(state, buf)
}

/// Interns `trace` (length and flags in `len`) by an FNV-1a hash of its
/// addresses; returns the stack id, or [`NO_STACK`] when the map is full.
#[inline(always)]
pub(crate) fn intern(state: *mut TargetState, trace: &StackTrace) -> u64 {
    let len = trace.len & STACK_LEN_MASK;
    // 0 is reserved for "no stack".
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..MAX_STACK_DEPTH {
        if i as u64 >= len {
            break;
        }
        hash = (hash ^ trace.ips[i]).wrapping_mul(0x0100_0000_01b3);
    }
    hash = (hash ^ trace.len).wrapping_mul(0x0100_0000_01b3);
    if hash == NO_STACK {
        hash = 1;
    }
    // Most stacks are known: a lookup takes no lock, an insert does.
    // SAFETY: only tests presence.
    if unsafe { STACKS.get(&hash) }.is_some() {
        return hash;
    }
    match STACKS.insert(hash, trace, BPF_NOEXIST as u64) {
        Ok(()) => hash,
        Err(e) if e == -17 => hash, // EEXIST: already interned
        Err(_) => {
            count(state, drop_reason::STACKS_FULL);
            NO_STACK
        }
    }
}

/// Records a new live block of `size` bytes at `addr`, with the stack of
/// the call site. With heapbpf's own stack walk for this target, the walk
/// (a tail call) finishes the record; if the tail call cannot be made, the
/// kernel's frame-pointer walk stands in.
#[inline(always)]
fn record(ctx: &RetProbeContext, state: *mut TargetState, tgid: u32, addr: u64, size: u64) {
    // SAFETY: valid map value.
    if unsafe { (*state).unwind } == unwind_mode::WALK {
        crate::unwind::start(ctx, tgid, addr, size);
    }
    let stack_id = stack_id(ctx, state);
    record_with_stack(state, tgid, addr, size, stack_id);
}

/// Records a new live block of `size` bytes at `addr` allocated by the
/// interned stack `stack_id`.
#[inline(always)]
pub(crate) fn record_with_stack(
    state: *mut TargetState,
    tgid: u32,
    addr: u64,
    size: u64,
    stack_id: u64,
) {
    let key = AllocKey {
        tgid,
        _pad: 0,
        addr,
    };
    let info = AllocInfo {
        size,
        stack_id,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
    };
    match ALLOCS.insert(key, info, BPF_NOEXIST as u64) {
        Ok(()) => {}
        Err(e) if e == -17 => {
            // EEXIST: a block still recorded at this address was freed by a
            // path heapbpf does not see; retire it so its stack does not
            // grow forever.
            // SAFETY: plain data copied out of the map.
            if let Some(stale) = (unsafe { ALLOCS.get(key) }).copied() {
                account_free(state, &stale);
                count(state, info_counter::STALE_REPLACED);
            }
            if ALLOCS.insert(key, info, 0).is_err() {
                count(state, drop_reason::ALLOCS_FULL);
                return;
            }
        }
        Err(_) => {
            count(state, drop_reason::ALLOCS_FULL);
            return;
        }
    }
    let (bytes, units) = weight(size, sample_bytes());
    // SAFETY: valid map value.
    let s = unsafe { &mut *state };
    add(&mut s.allocated_bytes, bytes);
    add(&mut s.allocations, units);
    let skey = StackKey {
        tgid,
        _pad: 0,
        stack_id,
    };
    let stats = match STACK_STATS.get_ptr_mut(skey) {
        Some(stats) => stats,
        None => {
            let _ = STACK_STATS.insert(skey, StackStats::default(), BPF_NOEXIST as u64);
            match STACK_STATS.get_ptr_mut(skey) {
                Some(stats) => stats,
                None => {
                    count(state, drop_reason::STATS_FULL);
                    return;
                }
            }
        }
    };
    // SAFETY: valid map value.
    let stats = unsafe { &mut *stats };
    add(&mut stats.allocated_bytes, bytes);
    add(&mut stats.allocations, units);
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
