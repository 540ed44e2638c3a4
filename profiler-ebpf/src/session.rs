//! Uprobe sessions (Linux 6.13+): one program runs at an allocator call's
//! entry and, only when its entry half asks for it, again at the call's
//! return. These are the session twins (`*_session`) of the entry programs
//! of `hooks.rs`, running the same entry and return, and their glue: the
//! kfuncs a session program calls, and the session cookie that carries a
//! leaf call's size from entry to return. User space loads and attaches
//! them with its own loader (`profiler/src/ebpf/multi.rs`).

use aya_ebpf::programs::{ProbeContext, RetProbeContext};

use heapbpf_common::hit;

use crate::{
    hooks::{alloc_exit, cookie, enter, read, record_block, Call, Return},
    state::{self, target},
};

/// What an entry program tells a uprobe session: run the return half.
const WANT_RETURN: u32 = 0;
/// ... or do not: the call needs nothing more.
const SKIP_RETURN: u32 = 1;

/// Marks a session cookie that carries the size of a leaf call (sizes are
/// below 2^63: the call fails).
const CARRIED: u64 = 1 << 63;

/// The kfunc `bpf_session_is_return()`: whether a session program runs for
/// the return of the call. The BPF target cannot name a kernel function, so
/// this calls a placeholder helper number that heapbpf's loader rewrites
/// into the kfunc call (see `heapbpf_common::kfunc_call`).
#[inline(always)]
fn session_is_return() -> bool {
    // SAFETY: makes a BPF call instruction with a placeholder number, which
    // heapbpf's loader rewrites into the kfunc call; programs holding it are
    // only loaded through that path (the kernel refuses the placeholder).
    let f: unsafe extern "C" fn() -> u64 =
        unsafe { core::mem::transmute(heapbpf_common::kfunc_call::SESSION_IS_RETURN as usize) };
    // SAFETY: the kfunc takes no arguments; a session program may call it.
    let r = unsafe { f() };
    r & 0xff != 0
}

/// The kfunc `bpf_session_cookie()`: 8 bytes of this session instance, zero
/// at entry, kept for its return half.
#[inline(always)]
fn session_cookie() -> *mut u64 {
    // SAFETY: as in `session_is_return`: a placeholder call, rewritten at load.
    let f: unsafe extern "C" fn() -> *mut u64 =
        unsafe { core::mem::transmute(heapbpf_common::kfunc_call::SESSION_COOKIE as usize) };
    // SAFETY: the kfunc takes no arguments; a session program may call it.
    unsafe { f() }
}

/// The entry half of a session: [`enter`], and whether the return half runs.
#[inline(always)]
fn session_enter(call: Call) -> u32 {
    match enter(call, true) {
        Return::Skip => SKIP_RETURN,
        Return::Pending => WANT_RETURN,
        Return::Leaf(size) => {
            // SAFETY: the kernel's 8-byte cookie of this session instance.
            unsafe { *session_cookie() = size | CARRIED };
            WANT_RETURN
        }
    }
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
    let tgid = (state::current_pid_tgid() >> 32) as u32;
    let Some(state) = target(tgid) else { return 0 };
    let ret: u64 = ctx.ret();
    if ret != 0 {
        record_block(ctx, state, tgid, ret, carried & !CARRIED);
    }
    0
}

/// The session programs: entry and return of an allocating call in one
/// program, reading the call as its plain entry program does.
macro_rules! session_programs {
    ($($name:ident => $read:path;)*) => {$(
        // Not `#[uprobe]`: its wrapper returns 0 whatever the function
        // returns, and a session reads the entry half's return value. The
        // unmangled name is the program's, unique in the object.
        #[unsafe(no_mangle)]
        #[unsafe(link_section = "uprobe")]
        pub fn $name(regs: *mut core::ffi::c_void) -> u32 {
            if session_is_return() {
                let ctx = RetProbeContext::new(regs);
                state::hit(cookie(&ctx), hit::RETURN);
                return session_exit(&ctx);
            }
            let ctx = ProbeContext::new(regs);
            state::hit(cookie(&ctx), hit::ENTRY);
            session_enter($read(&ctx))
        }
    )*};
}

session_programs! {
    malloc_session => read::malloc;
    alloc_size0_session => read::alloc_size0;
    alloc_size1_session => read::alloc_size1;
    calloc_session => read::calloc;
    realloc_session => read::realloc;
    reallocarray_session => read::reallocarray;
    rust_realloc_session => read::rust_realloc;
    posix_memalign_session => read::posix_memalign;
}
