//! The probe table: which program goes on which allocator symbol. One row
//! per symbol; where on the symbol each probe sits is `placement`'s choice. Symbols an allocator library does not export are
//! skipped (only `malloc` and `free` are required).

/// One allocator entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    pub symbol: &'static str,
    /// The entry program (reads the arguments).
    pub entry_program: &'static str,
    /// Whether the call also needs the return program (`alloc_return`).
    pub has_return: bool,
}

pub const RETURN_PROGRAM: &str = "alloc_return";

/// The stack walk, tail-called by the return program (never attached), in
/// slot 0 of `UNWIND_PROGS`, and the program that ends it, in slot 1.
pub const UNWIND_PROGRAM: &str = "unwind_step";
pub const UNWIND_FINISH_PROGRAM: &str = "unwind_finish";

/// An allocating function: entry program plus the return program.
const fn alloc(symbol: &'static str, entry_program: &'static str) -> ProbeSpec {
    ProbeSpec {
        symbol,
        entry_program,
        has_return: true,
    }
}

/// A freeing function (pointer in the first argument): entry only.
const fn release(symbol: &'static str) -> ProbeSpec {
    ProbeSpec {
        symbol,
        entry_program: "free_enter",
        has_return: false,
    }
}

/// The C / POSIX allocator surface, and jemalloc's own API (redis uses it).
pub const LIBC_PROBES: &[ProbeSpec] = &[
    alloc("malloc", "malloc_enter"),
    alloc("calloc", "calloc_enter"),
    alloc("realloc", "realloc_enter"),
    alloc("reallocarray", "reallocarray_enter"),
    alloc("posix_memalign", "posix_memalign_enter"),
    alloc("aligned_alloc", "alloc_size1_enter"),
    alloc("memalign", "alloc_size1_enter"),
    alloc("valloc", "alloc_size0_enter"),
    alloc("pvalloc", "alloc_size0_enter"),
    release("free"),
    alloc("mallocx", "malloc_enter"),
    alloc("rallocx", "realloc_enter"),
    release("dallocx"),
    release("sdallocx"),
    // C++ operator new / delete, where the allocator defines its own
    // (jemalloc, tcmalloc, mimalloc: they do not go through its malloc).
    // libstdc++'s call malloc and free, which are hooked already.
    alloc("_Znwm", "alloc_size0_enter"),
    alloc("_Znam", "alloc_size0_enter"),
    alloc("_ZnwmRKSt9nothrow_t", "alloc_size0_enter"),
    alloc("_ZnamRKSt9nothrow_t", "alloc_size0_enter"),
    alloc("_ZnwmSt11align_val_t", "alloc_size0_enter"),
    alloc("_ZnamSt11align_val_t", "alloc_size0_enter"),
    alloc("_ZnwmSt11align_val_tRKSt9nothrow_t", "alloc_size0_enter"),
    alloc("_ZnamSt11align_val_tRKSt9nothrow_t", "alloc_size0_enter"),
    release("_ZdlPv"),
    release("_ZdaPv"),
    release("_ZdlPvm"),
    release("_ZdaPvm"),
    release("_ZdlPvRKSt9nothrow_t"),
    release("_ZdaPvRKSt9nothrow_t"),
    release("_ZdlPvSt11align_val_t"),
    release("_ZdaPvSt11align_val_t"),
    release("_ZdlPvmSt11align_val_t"),
    release("_ZdaPvmSt11align_val_t"),
    release("_ZdlPvSt11align_val_tRKSt9nothrow_t"),
    release("_ZdaPvSt11align_val_tRKSt9nothrow_t"),
    // gperftools' tc_* names (mostly aliases of the above: skipped then).
    alloc("tc_malloc", "malloc_enter"),
    alloc("tc_malloc_skip_new_handler", "alloc_size0_enter"),
    alloc("tc_calloc", "calloc_enter"),
    alloc("tc_realloc", "realloc_enter"),
    alloc("tc_memalign", "alloc_size1_enter"),
    alloc("tc_posix_memalign", "posix_memalign_enter"),
    alloc("tc_valloc", "alloc_size0_enter"),
    alloc("tc_pvalloc", "alloc_size0_enter"),
    alloc("tc_new", "alloc_size0_enter"),
    alloc("tc_newarray", "alloc_size0_enter"),
    alloc("tc_new_nothrow", "alloc_size0_enter"),
    alloc("tc_newarray_nothrow", "alloc_size0_enter"),
    release("tc_free"),
    release("tc_cfree"),
    release("tc_free_sized"),
    release("tc_delete"),
    release("tc_deletearray"),
    release("tc_delete_sized"),
    release("tc_deletearray_sized"),
    release("tc_delete_nothrow"),
    release("tc_deletearray_nothrow"),
    // mimalloc's mi_* API (mi_malloc, mi_free, ... are aliases of malloc,
    // free, ...).
    alloc("mi_malloc", "malloc_enter"),
    alloc("mi_zalloc", "alloc_size0_enter"),
    alloc("mi_calloc", "calloc_enter"),
    alloc("mi_mallocn", "calloc_enter"),
    alloc("mi_realloc", "realloc_enter"),
    alloc("mi_reallocn", "reallocarray_enter"),
    alloc("mi_malloc_aligned", "alloc_size0_enter"),
    alloc("mi_zalloc_aligned", "alloc_size0_enter"),
    alloc("mi_realloc_aligned", "realloc_enter"),
    alloc("mi_new", "alloc_size0_enter"),
    alloc("mi_new_nothrow", "alloc_size0_enter"),
    alloc("mi_new_aligned", "alloc_size0_enter"),
    release("mi_free"),
    release("mi_free_size"),
    release("mi_free_aligned"),
    release("mi_free_size_aligned"),
];

/// The arguments (bit i: argument i) an entry program reads.
pub fn arguments_read(entry_program: &str) -> u8 {
    match entry_program {
        "malloc_enter" | "alloc_size0_enter" | "free_enter" => 0b001,
        "alloc_size1_enter" => 0b010,
        "calloc_enter" | "realloc_enter" => 0b011,
        "posix_memalign_enter" => 0b101,
        _ => 0b111,
    }
}

/// Session programs (entry and return in one, see `multi`) of the floors.
pub const NOOP_SESSION_ENTRY: &str = "noop_session_entry";
pub const NOOP_SESSION_RETURN: &str = "noop_session_return";

/// Each entry program of an allocating function and its session twin.
const SESSION_PROGRAMS: &[(&str, &str)] = &[
    ("malloc_enter", "malloc_session"),
    ("alloc_size0_enter", "alloc_size0_session"),
    ("alloc_size1_enter", "alloc_size1_session"),
    ("calloc_enter", "calloc_session"),
    ("realloc_enter", "realloc_session"),
    ("reallocarray_enter", "reallocarray_session"),
    ("posix_memalign_enter", "posix_memalign_session"),
];

/// The session program of an allocating function's entry program.
pub fn session_program(entry_program: &str) -> &'static str {
    SESSION_PROGRAMS
        .iter()
        .find(|(e, _)| *e == entry_program)
        .map_or("", |(_, s)| s)
}

/// The session programs to load: the allocating functions', or the floors'
/// (programs that do nothing) for `cargo xtask bench`.
pub fn session_programs(floor: bool) -> Vec<&'static str> {
    if floor {
        vec![NOOP_SESSION_ENTRY, NOOP_SESSION_RETURN]
    } else {
        SESSION_PROGRAMS.iter().map(|(_, s)| *s).collect()
    }
}

/// Every program name the table uses, each once.
pub fn programs() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = LIBC_PROBES.iter().map(|p| p.entry_program).collect();
    names.push(RETURN_PROGRAM);
    names.extend([
        "noop_enter",
        "noop_return",
        UNWIND_PROGRAM,
        UNWIND_FINISH_PROGRAM,
    ]);
    names.sort_unstable();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_covers_the_allocator_surface_once() {
        let mut symbols: Vec<_> = LIBC_PROBES.iter().map(|p| p.symbol).collect();
        symbols.sort_unstable();
        let n = symbols.len();
        symbols.dedup();
        assert_eq!(symbols.len(), n, "a symbol is listed twice");
        for s in [
            "malloc",
            "calloc",
            "realloc",
            "reallocarray",
            "free",
            "posix_memalign",
            "aligned_alloc",
            "memalign",
            "valloc",
            "pvalloc",
        ] {
            assert!(symbols.contains(&s), "{s} missing");
        }
        // Frees are entry-only, everything else has a return probe.
        for p in LIBC_PROBES {
            assert_eq!(
                p.has_return,
                p.entry_program != "free_enter",
                "{}",
                p.symbol
            );
        }
        assert_eq!(programs().len(), 13);
        // Every allocating function has a session twin.
        for p in LIBC_PROBES.iter().filter(|p| p.has_return) {
            assert!(!session_program(p.entry_program).is_empty(), "{}", p.symbol);
        }
    }
}
