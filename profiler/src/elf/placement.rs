//! Where a probe goes. A uprobe on an instruction the kernel must
//! single-step costs ~14 µs a hit here; one on an instruction it emulates
//! (`push` of a register, `jmp`, `jcc`, `call`) well under 1 µs. Allocator
//! functions often start with something it single-steps: glibc's `free`
//! with `test %rdi,%rdi`, jemalloc's `malloc` with `cmp $0x1000,%rdi`, its
//! `free` with a dozen `mov`s and `shr`s before the first `jne`.
//!
//! So the probe goes on the first instruction the kernel emulates, provided
//! every call reaches it and the program still reads what it would have read
//! at the entry:
//! - the code before it is straight-line (no branch, call or return), so
//!   every call passes through the point exactly once;
//! - no direct branch or call anywhere in the file (the function itself,
//!   its `.cold` part, other functions) lands between the entry and the
//!   point (inclusive), so no call passes it twice; indirect jumps into a
//!   function's first instructions are not something compilers emit;
//! - the argument registers the probe's program reads (`rdi`, `rsi`, `rdx`,
//!   `rcx`) are not written on the way;
//! - for a probe that also takes the return (a return probe or a session),
//!   nothing on the way moves the stack pointer: the kernel takes the
//!   return address from the top of the stack when the probe hits, which is
//!   only the caller's return address while the stack is as the call left
//!   it (after a `push` that slot holds a saved register).
//!
//! Anything else stays at +0. `heapbpf -v` prints where each probe went.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess,
    Register,
};

/// Instructions looked at before giving up (the prefix is short in practice).
const MAX_PREFIX: usize = 24;

/// The registers of the first arguments (System V x86-64); the fourth is
/// `__rust_realloc`'s new size.
const ARGUMENTS: [Register; 4] = [Register::RDI, Register::RSI, Register::RDX, Register::RCX];

/// The offset for a probe on the function whose whole code is `code` (see
/// the module doc); `reads`: the arguments its program reads (bit i for
/// argument i); `with_return`: the probe also takes the return. `None`: no
/// such point, the probe stays at +0.
pub fn emulated_point(code: &[u8], reads: u8, with_return: bool) -> Option<u64> {
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut factory = InstructionInfoFactory::new();
    let mut point = None;
    for _ in 0..MAX_PREFIX {
        if !decoder.can_decode() {
            return None;
        }
        let insn = decoder.decode();
        if insn.is_invalid() {
            return None;
        }
        if emulated(&insn, code) {
            point = Some(insn.ip());
            break;
        }
        if insn.flow_control() != FlowControl::Next {
            return None;
        }
        let writes = factory.info(&insn).used_registers().iter().any(|u| {
            let reg = u.register().full_register();
            let written = !matches!(
                u.access(),
                OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess | OpAccess::None
            );
            let read_later = ARGUMENTS
                .iter()
                .enumerate()
                .any(|(i, a)| reads & (1 << i) != 0 && *a == reg);
            written && (read_later || (with_return && reg == Register::RSP))
        });
        if writes {
            return None;
        }
    }
    let point = point?;
    if point == 0 {
        return Some(0);
    }
    // No branch of the function lands inside the prefix or on the point.
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        let branch = matches!(
            insn.flow_control(),
            FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch | FlowControl::Call
        );
        if branch && (1..=point).contains(&insn.near_branch_target()) {
            return None;
        }
    }
    Some(point)
}

/// Whether one of `targets` (sorted) lies in `(start, point]`: a jump
/// there would pass the probe at `point` a second time.
fn jumped_into(targets: &[u64], start: u64, point: u64) -> bool {
    let first_after = targets.partition_point(|&t| t <= start);
    targets.get(first_after).is_some_and(|&t| t <= point)
}

/// Whether the kernel emulates `insn` (arch/x86/kernel/uprobes.c: relative
/// `jmp`, `jcc` and `call`, `push` of a 64-bit register in its short forms;
/// none with an operand-size prefix) instead of single-stepping it.
fn emulated(insn: &Instruction, code: &[u8]) -> bool {
    let start = insn.ip() as usize;
    let operand_size_prefix = code[start..start + insn.len()]
        .iter()
        .take_while(|b| {
            matches!(
                b,
                0x66 | 0x67 | 0xf2 | 0xf3 | 0x2e | 0x3e | 0x26 | 0x36 | 0x64 | 0x65 | 0x40..=0x4f
            )
        })
        .any(|&b| b == 0x66);
    // `push`: the kernel emulates the one-byte form and REX.B + it only.
    let push = insn.code() == Code::Push_r64
        && matches!((insn.len(), code[start]), (1, 0x50..=0x57) | (2, 0x41));
    !operand_size_prefix
        && (insn.is_jcc_short_or_near()
            || insn.is_jmp_short_or_near()
            || insn.is_call_near()
            || push)
}

/// An allocator's ELF file, read once at attach: its defined symbols (dynamic
/// and static symbol tables) with their addresses, and the bytes of its
/// loadable segments. Aliases (tcmalloc's `free`, `tc_free` and `operator
/// delete` are one function) share an address.
#[derive(Default)]
pub struct Image {
    data: Option<memmap2::Mmap>,
    /// Address and size of each symbol.
    symbols: std::collections::HashMap<String, (u64, u64)>,
    /// (address, size, file offset, file size, executable) of each load
    /// segment.
    segments: Vec<(u64, u64, u64, u64, bool)>,
    /// (device, inode) of the file.
    id: (u64, u64),
    /// Targets of every direct branch and call in the executable segments,
    /// sorted; made on first use.
    branch_targets: std::sync::OnceLock<Vec<u64>>,
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
                    .filter_map(|s| {
                        let n = s.name().ok()?;
                        Some((n.to_string(), (s.address(), s.size())))
                    })
                    .collect(),
                elf.segments()
                    .map(|seg| {
                        let (off, len) = seg.file_range();
                        let exec = match seg.flags() {
                            object::SegmentFlags::Elf { p_flags } => {
                                p_flags & object::elf::PF_X != 0
                            }
                            _ => false,
                        };
                        (seg.address(), seg.size(), off, len, exec)
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
            branch_targets: Default::default(),
        }
    }

    pub fn defines(&self, symbol: &str) -> bool {
        self.symbols.contains_key(symbol)
    }

    pub fn address(&self, symbol: &str) -> Option<u64> {
        self.symbols.get(symbol).map(|&(addr, _)| addr)
    }

    /// Where the probe on `symbol` goes (see the module doc), or `None`
    /// for its entry: [`emulated_point`] on the function's own code, and no
    /// direct branch anywhere in the file (`.cold` parts, other functions)
    /// lands between the entry and that point.
    pub fn probe_point(&self, symbol: &str, reads: u8, with_return: bool) -> Option<u64> {
        let point = emulated_point(self.code(symbol)?, reads, with_return)?;
        if point == 0 {
            return Some(0);
        }
        let start = self.address(symbol)?;
        let targets = self
            .branch_targets
            .get_or_init(|| self.scan_branch_targets());
        (!jumped_into(targets, start, start + point)).then_some(point)
    }

    /// Targets of the direct branches and calls of the executable segments,
    /// decoded linearly (data between functions may desynchronize the
    /// decoder for a few instructions; it resynchronizes at the next
    /// function in practice).
    fn scan_branch_targets(&self) -> Vec<u64> {
        let Some(data) = self.data.as_ref() else {
            return Vec::new();
        };
        let mut targets = Vec::new();
        for &(addr, _, off, len, exec) in &self.segments {
            let Some(code) = data.get(off as usize..(off + len) as usize) else {
                continue;
            };
            if !exec {
                continue;
            }
            let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
            let mut insn = Instruction::default();
            while decoder.can_decode() {
                decoder.decode_out(&mut insn);
                if matches!(
                    insn.flow_control(),
                    FlowControl::ConditionalBranch
                        | FlowControl::UnconditionalBranch
                        | FlowControl::Call
                ) && insn.near_branch_target() != 0
                {
                    targets.push(insn.near_branch_target());
                }
            }
        }
        targets.sort_unstable();
        targets
    }

    /// The code of `symbol`, as long as its symbol says (at most 64 KiB).
    pub fn code(&self, symbol: &str) -> Option<&[u8]> {
        let &(_, size) = self.symbols.get(symbol)?;
        self.bytes(symbol, size.min(1 << 16) as usize)
    }

    /// (device, inode) of the file.
    pub fn id(&self) -> (u64, u64) {
        self.id
    }

    /// Where `symbol`'s code starts in the file (what uprobes are placed by).
    pub fn file_offset(&self, symbol: &str) -> Option<u64> {
        let addr = self.address(symbol)?;
        let &(start, _, seg_off, _, _) = self
            .segments
            .iter()
            .find(|&&(start, size, _, _, _)| start <= addr && addr < start + size)?;
        Some(seg_off + (addr - start))
    }

    /// The first `len` bytes of `symbol`'s code.
    pub fn bytes(&self, symbol: &str, len: usize) -> Option<&[u8]> {
        let addr = self.address(symbol)?;
        let &(start, _, seg_off, seg_len, _) = self
            .segments
            .iter()
            .find(|&&(start, size, _, _, _)| start <= addr && addr < start + size)?;
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

    /// `code` followed by filler the decoder reads as `ret`s.
    fn body(code: &[u8]) -> Vec<u8> {
        let mut v = code.to_vec();
        v.resize(code.len() + 32, 0xc3);
        v
    }

    #[test]
    fn glibc_free_probe_sits_on_its_null_check_branch() {
        // Debian 12's glibc 2.36 free: test %rdi,%rdi; je rel32; push %rbp
        let free = body(&[0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55]);
        assert_eq!(emulated_point(&free, 1, false), Some(3));
        // With endbr64 and a short je.
        let short = body(&[
            0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x85, 0xff, 0x74, 0x10, 0x41, 0x54,
        ]);
        assert_eq!(emulated_point(&short, 1, false), Some(7));
    }

    #[test]
    fn jemalloc_malloc_probe_sits_on_its_first_branch_also_with_the_return() {
        // cmp $0x1000,%rdi; ja +0x93: the stack and %rdi untouched.
        let malloc = body(&[
            0x48, 0x81, 0xff, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x87, 0x93, 0, 0, 0,
        ]);
        assert_eq!(emulated_point(&malloc, 1, true), Some(7));
        assert_eq!(emulated_point(&malloc, 1, false), Some(7));
    }

    #[test]
    fn jemalloc_free_probe_sits_on_its_first_branch() {
        // Debian 12's jemalloc 5.3 free: rdi is only read before the jne;
        // rdx (not read by the free program) is written.
        let free = body(&[
            0x48, 0x89, 0xf8, // mov %rdi,%rax
            0x48, 0x8b, 0x15, 0x0e, 0x53, 0x0a, 0x00, // mov 0xa530e(%rip),%rdx
            0x48, 0x89, 0xf9, // mov %rdi,%rcx
            0x48, 0xc1, 0xe8, 0x1a, // shr $0x1a,%rax
            0x48, 0x81, 0xe1, 0x00, 0x00, 0x00, 0xc0, // and $0xffffffffc0000000,%rcx
            0x25, 0xf0, 0x00, 0x00, 0x00, // and $0xf0,%eax
            0x64, 0x48, 0x03, 0x04, 0x25, 0x00, 0x00, 0x00, 0x00, // add %fs:0x0,%rax
            0x48, 0x01, 0xd0, // add %rdx,%rax
            0x48, 0x3b, 0x88, 0xb0, 0x01, 0x00, 0x00, // cmp 0x1b0(%rax),%rcx
            0x0f, 0x85, 0x8a, 0x00, 0x00, 0x00, // jne
        ]);
        assert_eq!(emulated_point(&free, 0b001, false), Some(0x30));
        // A program reading the third argument could not move.
        assert_eq!(emulated_point(&free, 0b101, false), None);
    }

    #[test]
    fn jumps_from_elsewhere_into_the_prefix_are_found() {
        let targets = [0x100, 0x1000, 0x2008];
        // Entry 0x2000, point 0x2007: nothing lands in (0x2000, 0x2007].
        assert!(!jumped_into(&targets, 0x2000, 0x2007));
        // ... a jump to 0x2008 lands on a point there.
        assert!(jumped_into(&targets, 0x2000, 0x2008));
        // A jump to the entry itself fires the probe just as at +0.
        assert!(!jumped_into(&targets, 0x1000, 0x1003));
        assert!(!jumped_into(&[], 0x1000, 0x1003));
    }

    #[test]
    fn a_push_first_stays_at_the_entry() {
        // glibc's malloc: push %r12
        assert_eq!(emulated_point(&body(&[0x41, 0x54, 0x55]), 1, true), Some(0));
    }

    #[test]
    fn nothing_moves_past_a_written_argument_or_a_moved_stack() {
        // mov %rsi,%rdi; jmp: the first argument is overwritten; fine for a
        // program that reads only the second.
        let mov = body(&[0x48, 0x89, 0xf7, 0xeb, 0x00]);
        assert_eq!(emulated_point(&mov, 0b001, false), None);
        assert_eq!(emulated_point(&mov, 0b010, false), Some(3));
        // mov %rdx,%rcx; jmp: `__rust_realloc`'s new size (the fourth
        // argument) is overwritten.
        let mov = body(&[0x48, 0x89, 0xd1, 0xeb, 0x00]);
        assert_eq!(emulated_point(&mov, 0b1001, false), None);
        assert_eq!(emulated_point(&mov, 0b0001, false), Some(3));
        // sub $8,%rsp; je: fine for an entry-only probe, not with the return.
        let sub = body(&[0x48, 0x83, 0xec, 0x08, 0x74, 0x00]);
        assert_eq!(emulated_point(&sub, 1, false), Some(4));
        assert_eq!(emulated_point(&sub, 1, true), None);
        // A return before any emulated instruction.
        assert_eq!(emulated_point(&[0x48, 0x85, 0xff, 0xc3], 1, false), None);
        // Truncated or empty code.
        assert_eq!(emulated_point(&[0x48, 0x85], 1, false), None);
        assert_eq!(emulated_point(&[], 1, false), None);
    }

    #[test]
    fn nothing_moves_when_a_branch_lands_inside_the_prefix() {
        // 0: test %rdi,%rdi; 3: je +0 (-> 5); 5: ... 7: jmp back to 3.
        let code = body(&[0x48, 0x85, 0xff, 0x74, 0x00, 0x90, 0x90, 0xeb, 0xfa]);
        assert_eq!(emulated_point(&code, 1, false), None);
        // A jump to the entry itself is fine: the probe there fires again
        // just as it would at +0.
        let code = body(&[0x48, 0x85, 0xff, 0x74, 0x00, 0xeb, 0xf9]);
        assert_eq!(emulated_point(&code, 1, false), Some(3));
    }
}
