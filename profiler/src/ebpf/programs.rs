//! Which program of heapbpf's object serves which allocator call, and which
//! programs a profiler loads. The names are the object's function names.

use crate::allocator::Call;

/// The return program of uprobe + uretprobe pairs.
pub const ALLOC_RETURN: &str = "alloc_return";
/// The stack walk (slot 0 of `UNWIND_PROGS`, tail-called, never attached)
/// and the program that ends it (slot 1).
pub const UNWIND_STEP: &str = "unwind_step";
pub const UNWIND_FINISH: &str = "unwind_finish";
/// Floor programs for `cargo xtask bench`: they do nothing.
pub const NOOP_ENTER: &str = "noop_enter";
pub const NOOP_RETURN: &str = "noop_return";
pub const NOOP_SESSION_ENTRY: &str = "noop_session_entry";
pub const NOOP_SESSION_RETURN: &str = "noop_session_return";
/// The OOM killer's tracepoint.
pub const OOM_MARK_VICTIM: &str = "oom_mark_victim";

/// The entry program of a call's uprobe.
pub fn entry(call: Call) -> &'static str {
    match call {
        Call::Malloc => "malloc_enter",
        Call::Calloc => "calloc_enter",
        Call::Realloc => "realloc_enter",
        Call::ReallocArray => "reallocarray_enter",
        Call::PosixMemalign => "posix_memalign_enter",
        Call::Size0 => "alloc_size0_enter",
        Call::Size1 => "alloc_size1_enter",
        Call::Free => "free_enter",
    }
}

/// The session program of an allocating call (entry and return in one).
pub fn session(call: Call) -> Option<&'static str> {
    Some(match call {
        Call::Malloc => "malloc_session",
        Call::Calloc => "calloc_session",
        Call::Realloc => "realloc_session",
        Call::ReallocArray => "reallocarray_session",
        Call::PosixMemalign => "posix_memalign_session",
        Call::Size0 => "alloc_size0_session",
        Call::Size1 => "alloc_size1_session",
        Call::Free => return None,
    })
}

const CALLS: [Call; 8] = [
    Call::Malloc,
    Call::Calloc,
    Call::Realloc,
    Call::ReallocArray,
    Call::PosixMemalign,
    Call::Size0,
    Call::Size1,
    Call::Free,
];

/// The uprobe programs aya loads: every entry program, the return program,
/// the floors' and the stack walk.
pub fn uprobes() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = CALLS.iter().map(|&c| entry(c)).collect();
    names.extend([
        ALLOC_RETURN,
        NOOP_ENTER,
        NOOP_RETURN,
        UNWIND_STEP,
        UNWIND_FINISH,
    ]);
    names
}

/// The session programs to load: the allocating calls', or the floors' for
/// `cargo xtask bench`.
pub fn sessions(floor: bool) -> Vec<&'static str> {
    if floor {
        vec![NOOP_SESSION_ENTRY, NOOP_SESSION_RETURN]
    } else {
        CALLS.iter().filter_map(|&c| session(c)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_has_its_programs_once() {
        let mut names = uprobes();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 13);
        for c in CALLS {
            assert_eq!(session(c).is_some(), c.allocates(), "{c:?}");
        }
        assert_eq!(sessions(false).len(), 7);
    }
}
