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

/// An allocator's ELF file, read once at attach: its defined symbols (dynamic
/// and static symbol tables) with their addresses, and the bytes of its
/// loadable segments. Aliases (tcmalloc's `free`, `tc_free` and `operator
/// delete` are one function) share an address.
#[derive(Default)]
pub struct Image {
    data: Option<memmap2::Mmap>,
    symbols: std::collections::HashMap<String, u64>,
    /// (address, size, file offset, file size) of each load segment.
    segments: Vec<(u64, u64, u64, u64)>,
    /// (device, inode) of the file.
    id: (u64, u64),
}

impl Image {
    /// Reads the file at `path`; an unreadable or non-ELF file has no symbols.
    pub fn open(path: &std::path::Path) -> Image {
        use object::{Object, ObjectSegment, ObjectSymbol};
        use std::os::unix::fs::MetadataExt;
        let Ok(file) = std::fs::File::open(path) else {
            return Image::default();
        };
        let id = file.metadata().map_or((0, 0), |m| (m.dev(), m.ino()));
        // SAFETY: a read-only private mapping of a file the target executes.
        let Ok(data) = (unsafe { memmap2::Mmap::map(&file) }) else {
            return Image::default();
        };
        let (symbols, segments) = match object::File::parse(&*data) {
            Ok(elf) => (
                elf.dynamic_symbols()
                    .chain(elf.symbols())
                    .filter(|s| s.is_definition() && s.address() != 0)
                    .filter_map(|s| s.name().ok().map(|n| (n.to_string(), s.address())))
                    .collect(),
                elf.segments()
                    .map(|seg| {
                        let (off, len) = seg.file_range();
                        (seg.address(), seg.size(), off, len)
                    })
                    .collect(),
            ),
            Err(_) => Default::default(),
        };
        Image {
            data: Some(data),
            symbols,
            segments,
            id,
        }
    }

    pub fn defines(&self, symbol: &str) -> bool {
        self.symbols.contains_key(symbol)
    }

    pub fn address(&self, symbol: &str) -> Option<u64> {
        self.symbols.get(symbol).copied()
    }

    /// (device, inode) of the file.
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// Where `symbol`'s code starts in the file (what uprobes are placed by).
    pub fn file_offset(&self, symbol: &str) -> Option<u64> {
        let addr = self.address(symbol)?;
        let &(start, _, seg_off, _) = self
            .segments
            .iter()
            .find(|&&(start, size, _, _)| start <= addr && addr < start + size)?;
        Some(seg_off + (addr - start))
    }

    /// The first `len` bytes of `symbol`'s code.
    pub fn bytes(&self, symbol: &str, len: usize) -> Option<&[u8]> {
        let addr = self.address(symbol)?;
        let &(start, _, seg_off, seg_len) = self
            .segments
            .iter()
            .find(|&&(start, size, _, _)| start <= addr && addr < start + size)?;
        let off = seg_off + (addr - start);
        if off + len as u64 > seg_off + seg_len {
            return None;
        }
        self.data.as_ref()?.get(off as usize..off as usize + len)
    }
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
