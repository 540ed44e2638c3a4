//! Where an entry-only probe goes. A uprobe on an instruction the kernel
//! must single-step costs ~14 µs a hit here; one on an instruction it
//! emulates (`push`) well under 1 µs. glibc's `free` starts with
//! `test %rdi,%rdi; je <return>` and only then `push %rbp`: putting the probe
//! on the `push` skips nothing heapbpf counts (`free(NULL)` is ignored
//! anyway) and leaves `%rdi` untouched. Only this exact, verified shape is
//! moved; anything else stays at +0. Return probes never move: the kernel
//! takes the return address from the top of the stack at the hit.

/// For a function that starts with a null check of its first argument
/// (`[endbr64] test %rdi,%rdi; je rel`), followed by an instruction the
/// kernel emulates (`push` of a register), the offset of that instruction.
pub fn past_null_check(code: &[u8]) -> Option<u64> {
    let mut at = 0;
    if code.starts_with(&[0xf3, 0x0f, 0x1e, 0xfa]) {
        at += 4; // endbr64
    }
    // test %rdi,%rdi
    if code.get(at..at + 3)? != [0x48, 0x85, 0xff] {
        return None;
    }
    at += 3;
    // je rel8 / je rel32
    match code.get(at)? {
        0x74 => at += 2,
        0x0f if code.get(at + 1) == Some(&0x84) => at += 6,
        _ => return None,
    }
    // push %r (0x50-0x57) or push %r8-%r15 (0x41 0x50-0x57): emulated.
    let emulated = match code.get(at)? {
        0x50..=0x57 => true,
        0x41 => matches!(code.get(at + 1)?, 0x50..=0x57),
        _ => false,
    };
    emulated.then_some(at as u64)
}

/// The defined symbols of the ELF file at `path` (dynamic and static symbol
/// tables) with their addresses: aliases (tcmalloc's `free`, `tc_free` and
/// `operator delete` are one function) share an address.
pub fn exported_symbols(path: &std::path::Path) -> std::collections::HashMap<String, u64> {
    use object::{Object, ObjectSymbol};
    let Ok(file) = std::fs::File::open(path) else {
        return Default::default();
    };
    // SAFETY: a read-only private mapping, dropped before returning.
    let Ok(data) = (unsafe { memmap2::Mmap::map(&file) }) else {
        return Default::default();
    };
    let Ok(file) = object::File::parse(&*data) else {
        return Default::default();
    };
    file.dynamic_symbols()
        .chain(file.symbols())
        .filter(|s| s.is_definition() && s.address() != 0)
        .filter_map(|s| s.name().ok().map(|n| (n.to_string(), s.address())))
        .collect()
}

/// The first bytes of `symbol` in the ELF file at `path`.
pub fn symbol_bytes(path: &std::path::Path, symbol: &str, len: usize) -> Option<Vec<u8>> {
    use object::{Object, ObjectSegment, ObjectSymbol};
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: a read-only private mapping, dropped before returning.
    let data = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let file = object::File::parse(&*data).ok()?;
    let addr = file
        .dynamic_symbols()
        .chain(file.symbols())
        .find(|s| s.name().ok() == Some(symbol) && s.address() != 0)?
        .address();
    let seg = file
        .segments()
        .find(|s| s.address() <= addr && addr < s.address() + s.size())?;
    let (seg_off, seg_len) = seg.file_range();
    let off = seg_off + (addr - seg.address());
    if off + len as u64 > seg_off + seg_len {
        return None;
    }
    data.get(off as usize..off as usize + len)
        .map(<[u8]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_free_moves_past_its_null_check() {
        // Debian 12's glibc 2.36 free: test %rdi,%rdi; je rel32; push %rbp
        let free = [
            0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55, 0x48, 0x8d,
        ];
        assert_eq!(past_null_check(&free), Some(9));
        let short = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x85, 0xff, 0x74, 0x10, 0x41, 0x54,
        ];
        assert_eq!(past_null_check(&short), Some(9));
    }

    #[test]
    fn anything_else_stays_put() {
        // jemalloc's free: mov %rdi,%rax
        assert_eq!(past_null_check(&[0x48, 0x89, 0xf8, 0x48, 0xc1]), None);
        // Null check followed by something the kernel single-steps.
        assert_eq!(
            past_null_check(&[0x48, 0x85, 0xff, 0x74, 0x10, 0x48, 0x8d, 0x77]),
            None
        );
        // jne instead of je: the probe would be skipped for real frees.
        assert_eq!(past_null_check(&[0x48, 0x85, 0xff, 0x75, 0x10, 0x55]), None);
        // Truncated input.
        assert_eq!(past_null_check(&[0x48, 0x85]), None);
        assert_eq!(past_null_check(&[]), None);
    }
}
