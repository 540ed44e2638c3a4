//! Which program of heapbpf's object serves which allocator call, and which
//! programs a profiler loads. The names are the ABI crate's
//! ([`heapbpf_common::names`]), checked against the object by a test here.

pub use heapbpf_common::names::programs::*;

use crate::allocator::Call;

/// The entry program of a call's uprobe.
pub fn entry(call: Call) -> &'static str {
    match call {
        Call::Malloc => MALLOC_ENTER,
        Call::Calloc => CALLOC_ENTER,
        Call::Realloc => REALLOC_ENTER,
        Call::ReallocArray => REALLOCARRAY_ENTER,
        Call::RustRealloc => RUST_REALLOC_ENTER,
        Call::PosixMemalign => POSIX_MEMALIGN_ENTER,
        Call::Size0 => ALLOC_SIZE0_ENTER,
        Call::Size1 => ALLOC_SIZE1_ENTER,
        Call::Free => FREE_ENTER,
    }
}

/// The session program of an allocating call (entry and return in one).
pub fn session(call: Call) -> Option<&'static str> {
    Some(match call {
        Call::Malloc => MALLOC_SESSION,
        Call::Calloc => CALLOC_SESSION,
        Call::Realloc => REALLOC_SESSION,
        Call::ReallocArray => REALLOCARRAY_SESSION,
        Call::RustRealloc => RUST_REALLOC_SESSION,
        Call::PosixMemalign => POSIX_MEMALIGN_SESSION,
        Call::Size0 => ALLOC_SIZE0_SESSION,
        Call::Size1 => ALLOC_SIZE1_SESSION,
        Call::Free => return None,
    })
}

const CALLS: [Call; 9] = [
    Call::Malloc,
    Call::Calloc,
    Call::Realloc,
    Call::ReallocArray,
    Call::RustRealloc,
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
        assert_eq!(names.len(), 14);
        for c in CALLS {
            assert_eq!(session(c).is_some(), c.allocates(), "{c:?}");
        }
        assert_eq!(sessions(false).len(), 8);
    }

    /// The programs and maps of heapbpf's object, by symbol: global
    /// functions outside `.text` (programs) and objects in the maps section.
    #[cfg(not(heapbpf_no_ebpf))]
    fn object_names() -> (Vec<String>, Vec<String>) {
        use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};
        let file =
            object::File::parse(super::super::PROGRAM_OBJECT).expect("heapbpf's eBPF object");
        let (mut programs, mut maps) = (Vec::new(), Vec::new());
        for sym in file.symbols() {
            let Some(section) = sym
                .section_index()
                .and_then(|i| file.section_by_index(i).ok())
            else {
                continue;
            };
            let section_name = section.name().unwrap_or_default();
            let name = sym.name().unwrap_or_default().to_string();
            if sym.kind() == SymbolKind::Text
                && sym.is_global()
                && section.kind() == SectionKind::Text
                && section_name != ".text"
            {
                programs.push(name);
            } else if sym.kind() == SymbolKind::Data
                && (section_name == "maps" || section_name == ".maps")
            {
                maps.push(name);
            }
        }
        programs.sort();
        maps.sort();
        (programs, maps)
    }

    #[test]
    #[cfg(not(heapbpf_no_ebpf))]
    fn the_abi_names_are_the_objects() {
        use heapbpf_common::names;
        let (programs, maps) = object_names();
        let mut want: Vec<&str> = names::programs::ALL.to_vec();
        want.sort_unstable();
        assert_eq!(
            programs, want,
            "programs of the object vs names::programs::ALL"
        );
        let mut want: Vec<&str> = names::maps::ALL.to_vec();
        want.sort_unstable();
        assert_eq!(maps, want, "maps of the object vs names::maps::ALL");
        for p in uprobes()
            .into_iter()
            .chain(sessions(false))
            .chain(sessions(true))
        {
            assert!(names::programs::ALL.contains(&p), "{p}");
        }
    }
}
