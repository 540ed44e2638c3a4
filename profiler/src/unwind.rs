//! Call-frame tables for the in-kernel stack walk (`--unwind auto|dwarf`).
//!
//! Design: the kernel walks the user stack itself, at the allocation, from
//! tables prepared here; nothing but the finished stack leaves the kernel,
//! so identical stacks are interned there as before and the exact figures
//! do not depend on the unwinding mode. (Copying the top of the stack to
//! user space for each allocation, perf-style, would cost a copy of several
//! KiB per recorded allocation and move stack identity out of the kernel
//! maps.)
//!
//! For each executable module of a target, its `.eh_frame` (or, failing
//! that, `.debug_frame`) is evaluated with gimli into rows: from an address
//! on, CFA = rsp|rbp + offset, the return address at CFA - 8 and rbp saved
//! at CFA + offset or unchanged. Rows are kept per module (by device and
//! inode), shared by every target that maps it. Modules that keep frame
//! pointers are walked by rbp in `auto` mode and need no rows; when every
//! module of a target keeps them, `auto` leaves the walk to the kernel's
//! frame-pointer walk, the cheapest.
use std::collections::HashMap;

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, EndianSlice, LittleEndian, RegisterRule,
    UnwindContext, UnwindSection, X86_64,
};
use heapbpf_common::{module_kind, row_kind, ModuleEntry, ModuleTable, UnwindRow, MAX_MODULES};
use object::{Object, ObjectSection, ObjectSegment};

use crate::procfs::Mapping;

/// The `--unwind` choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Frame pointers where modules keep them, call-frame rows elsewhere.
    Auto,
    /// The kernel's frame-pointer walk only.
    Fp,
    /// Call-frame rows for every module that has them.
    Dwarf,
}

/// What one module's call-frame information says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModuleUnwind {
    /// Sorted by `pc`, one row per change of rule; gaps between functions
    /// are `row_kind::NONE` rows.
    pub rows: Vec<UnwindRow>,
    /// At least 95% of the functions set up a frame pointer (CFA computed
    /// from rbp) somewhere.
    pub frame_pointers: bool,
    /// Functions described.
    pub functions: usize,
}

/// Evaluates the call-frame information of an ELF image.
pub fn parse_module(data: &[u8]) -> Result<ModuleUnwind, String> {
    let file = object::File::parse(data).map_err(|e| e.to_string())?;
    let text = file.section_by_name(".text").map(|s| s.address());
    let mut acc = Collector::default();
    if let Some(section) = file.section_by_name(".eh_frame") {
        let bytes = section.data().map_err(|e| e.to_string())?;
        let mut bases = BaseAddresses::default().set_eh_frame(section.address());
        if let Some(text) = text {
            bases = bases.set_text(text);
        }
        acc.collect(&EhFrame::new(bytes, LittleEndian), &bases);
    }
    if acc.functions == 0 {
        if let Some(section) = file.section_by_name(".debug_frame") {
            let bytes = section.data().map_err(|e| e.to_string())?;
            let mut frame = DebugFrame::new(bytes, LittleEndian);
            frame.set_address_size(8);
            acc.collect(&frame, &BaseAddresses::default());
        }
    }
    Ok(acc.finish())
}

#[derive(Default)]
struct Collector {
    rows: Vec<(u64, UnwindRow)>,
    functions: usize,
    rbp_functions: usize,
}

impl Collector {
    fn collect<'a, S: UnwindSection<EndianSlice<'a, LittleEndian>>>(
        &mut self,
        section: &S,
        bases: &BaseAddresses,
    ) {
        let mut ctx = Box::new(UnwindContext::new());
        let mut entries = section.entries(bases);
        // A malformed entry ends the section: what came before stays usable.
        while let Ok(Some(entry)) = entries.next() {
            let CieOrFde::Fde(partial) = entry else {
                continue;
            };
            let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) else {
                continue;
            };
            let Ok(mut table) = fde.rows(section, bases, &mut ctx) else {
                continue;
            };
            self.functions += 1;
            let mut uses_rbp = false;
            while let Ok(Some(row)) = table.next_row() {
                let cfa = match row.cfa() {
                    CfaRule::RegisterAndOffset { register, offset } => Some((*register, *offset)),
                    CfaRule::Expression(_) => None,
                };
                let r = convert(cfa, row.register(X86_64::RA), row.register(X86_64::RBP));
                uses_rbp |= r.kind == row_kind::CFA_RBP;
                self.rows.push((row.start_address(), r));
            }
            // Past the function, nothing is known until the next one starts.
            self.rows.push((fde.end_address(), UnwindRow::default()));
            if uses_rbp {
                self.rbp_functions += 1;
            }
        }
    }

    fn finish(mut self) -> ModuleUnwind {
        // At an address where one function ends and the next begins, the
        // function's row wins over the gap row.
        self.rows
            .sort_by_key(|(pc, r)| (*pc, r.kind != row_kind::NONE));
        let mut rows: Vec<UnwindRow> = Vec::with_capacity(self.rows.len());
        for (pc, mut r) in self.rows {
            let Ok(pc) = u32::try_from(pc) else {
                continue;
            };
            r.pc = pc;
            match rows.last_mut() {
                Some(last) if last.pc == pc => *last = r,
                Some(last) if same_rule(last, &r) => continue,
                _ => rows.push(r),
            }
            // A replaced row may now repeat the rule before it.
            let n = rows.len();
            if n >= 2 && same_rule(&rows[n - 2], &rows[n - 1]) {
                rows.pop();
            }
        }
        ModuleUnwind {
            rows,
            // A function without a frame pointer in the middle of a stack
            // makes a frame-pointer walk skip its caller, silently: only
            // modules where (nearly) every function sets one up count.
            frame_pointers: self.functions > 0 && self.rbp_functions * 100 >= self.functions * 95,
            functions: self.functions,
        }
    }
}

fn same_rule(a: &UnwindRow, b: &UnwindRow) -> bool {
    (a.kind, a.cfa_offset, a.rbp_saved, a.rbp_offset)
        == (b.kind, b.cfa_offset, b.rbp_saved, b.rbp_offset)
}

/// One row of rules → the walk's form. Anything the walk cannot follow
/// (a CFA expression or register other than rsp/rbp, a return address not
/// at CFA - 8, rbp restored by an expression) becomes `UNSUPPORTED`: the
/// walk stops there, truncated, rather than guess.
pub fn convert<T: gimli::ReaderOffset>(
    cfa: Option<(gimli::Register, i64)>,
    ra: Option<RegisterRule<T>>,
    rbp: Option<RegisterRule<T>>,
) -> UnwindRow {
    let none = UnwindRow {
        kind: row_kind::UNSUPPORTED,
        ..UnwindRow::default()
    };
    match ra {
        Some(RegisterRule::Undefined) => {
            return UnwindRow {
                kind: row_kind::END,
                ..none
            }
        }
        None | Some(RegisterRule::Offset(-8)) => {}
        Some(_) => return none,
    }
    let Some((register, offset)) = cfa else {
        return none;
    };
    let kind = match register {
        X86_64::RSP => row_kind::CFA_RSP,
        X86_64::RBP => row_kind::CFA_RBP,
        _ => return none,
    };
    let (Ok(cfa_offset), true) = (i32::try_from(offset), offset > 0) else {
        return none;
    };
    let (rbp_saved, rbp_offset) = match rbp {
        None | Some(RegisterRule::Undefined) | Some(RegisterRule::SameValue) => (0, 0),
        Some(RegisterRule::Offset(o)) => match i16::try_from(o) {
            Ok(o) => (1, o),
            Err(_) => return none,
        },
        Some(_) => return none,
    };
    UnwindRow {
        pc: 0,
        cfa_offset,
        rbp_offset,
        kind,
        rbp_saved,
    }
}

/// The bias of a mapping: runtime address minus ELF virtual address, from
/// the load segment that holds the mapping's file offset.
/// An executable mapping maps the page holding the start of its segment, so
/// the segment's file offset may lie above the mapping's (lld aligns
/// segments only in memory): the executable segment whose page-aligned file
/// range holds the mapping's offset is the one.
pub fn mapping_bias(data: &[u8], m: &Mapping) -> Option<u64> {
    const PAGE: u64 = 4096;
    let file = object::File::parse(data).ok()?;
    let holds = |seg: &object::Segment<'_, '_>| {
        let (off, size) = seg.file_range();
        let first_page = off & !(PAGE - 1);
        m.offset >= first_page && m.offset < off + size.max(1)
    };
    let executable = |seg: &object::Segment<'_, '_>| matches!(seg.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0);
    let seg = file
        .segments()
        .find(|s| executable(s) && holds(s))
        .or_else(|| file.segments().find(|s| holds(s)))?;
    let (off, _) = seg.file_range();
    // The mapping's first byte is file offset m.offset, at m.start; the
    // segment's file offset `off` is at ELF address `seg.address()`.
    Some(
        m.start
            .wrapping_add(off)
            .wrapping_sub(m.offset)
            .wrapping_sub(seg.address()),
    )
}

/// A module's rows in the kernel's row table.
#[derive(Clone, Copy, Debug)]
struct Placed {
    first_row: u32,
    rows: u32,
    kind: u32,
}

/// Rows to write into the kernel's row table at `first`.
pub struct NewRows {
    pub first: u32,
    pub rows: Vec<UnwindRow>,
}

/// The walk's view of one target, ready for the kernel.
pub struct TargetTables {
    pub table: Box<ModuleTable>,
    /// Every module keeps frame pointers: the kernel's own walk will do.
    pub all_frame_pointers: bool,
    pub new_rows: Vec<NewRows>,
    /// Modules whose rows did not fit, by path.
    pub overflow: Vec<String>,
}

/// Rows of every module heapbpf has prepared, shared between targets.
pub struct Tables {
    mode: Mode,
    capacity: u32,
    used: u32,
    /// By (device, inode): where the module's rows are, or `None` when the
    /// module keeps frame pointers.
    modules: HashMap<(String, u64), Placed>,
}

impl Tables {
    pub fn new(mode: Mode, capacity: u32) -> Self {
        Tables {
            mode,
            capacity,
            used: 0,
            modules: HashMap::new(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Rows of the kernel's table in use.
    pub fn rows_used(&self) -> u32 {
        self.used
    }

    /// The module table of `pid` from its maps, preparing modules not seen
    /// before (`open` gives the image of a file mapping).
    pub fn for_target(
        &mut self,
        pid: u32,
        maps: &[Mapping],
        open: &mut dyn FnMut(&Mapping) -> Option<memmap2::Mmap>,
    ) -> TargetTables {
        let mut table = Box::new(ModuleTable {
            count: 0,
            entries: [ModuleEntry::default(); MAX_MODULES],
        });
        let mut new_rows = Vec::new();
        let mut overflow = Vec::new();
        let mut all_fp = true;
        let mut entries: Vec<ModuleEntry> = Vec::new();
        // `[vsyscall]` sits at the top of the address space, above where any
        // caller can be; the walk's search needs addresses below 2^63.
        for m in maps.iter().filter(|m| m.is_exec() && m.end <= 1 << 63) {
            // Unknown until proven otherwise: JIT code, `[vdso]`, a file
            // heapbpf cannot read are stepped through by frame pointer, and
            // the walk's verdict is left to the root check.
            let mut entry = ModuleEntry {
                start: m.start,
                end: m.end,
                kind: module_kind::UNKNOWN,
                ..Default::default()
            };
            if m.is_file() {
                let image = open(m);
                let key = (m.dev.clone(), m.inode);
                let placed = match self.modules.get(&key) {
                    Some(p) => Some(*p),
                    None => image.as_ref().map(|data| {
                        let p = self.place(data, &m.path, &mut new_rows, &mut overflow);
                        self.modules.insert(key, p);
                        p
                    }),
                };
                let bias = image.as_ref().and_then(|data| mapping_bias(data, m));
                match (placed, bias) {
                    (Some(p), Some(bias)) => {
                        entry.kind = p.kind;
                        entry.first_row = p.first_row;
                        entry.rows = p.rows;
                        entry.bias = bias;
                        if p.kind != module_kind::FP {
                            all_fp = false;
                        }
                    }
                    _ => {
                        all_fp = false;
                        tracing::debug!(pid, path = %m.path, "cannot read module for unwinding");
                    }
                }
            }
            entries.push(entry);
        }
        entries.sort_by_key(|e| e.start);
        if entries.len() > MAX_MODULES {
            tracing::warn!(
                pid,
                "{} executable mappings; the stack walk knows the first {MAX_MODULES}, stacks through the others are truncated",
                entries.len()
            );
            entries.truncate(MAX_MODULES);
        }
        table.count = entries.len() as u64;
        table.entries[..entries.len()].copy_from_slice(&entries);
        TargetTables {
            table,
            all_frame_pointers: all_fp,
            new_rows,
            overflow,
        }
    }

    fn place(
        &mut self,
        data: &[u8],
        path: &str,
        new_rows: &mut Vec<NewRows>,
        overflow: &mut Vec<String>,
    ) -> Placed {
        let fp = Placed {
            first_row: 0,
            rows: 0,
            kind: module_kind::FP,
        };
        let parsed = match parse_module(data) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(path, error = %e, "no call-frame information");
                return fp;
            }
        };
        let wanted = match self.mode {
            Mode::Fp => false,
            Mode::Auto => !parsed.frame_pointers,
            Mode::Dwarf => true,
        };
        if !wanted || parsed.rows.is_empty() {
            return fp;
        }
        let n = parsed.rows.len() as u32;
        if self.capacity - self.used < n {
            overflow.push(path.to_string());
            // Rows unknown: the walk stops in this module, truncated.
            return Placed {
                first_row: 0,
                rows: 0,
                kind: module_kind::DWARF,
            };
        }
        let first = self.used;
        self.used += n;
        tracing::debug!(
            path,
            rows = n,
            functions = parsed.functions,
            "call-frame rows prepared"
        );
        new_rows.push(NewRows {
            first,
            rows: parsed.rows,
        });
        Placed {
            first_row: first,
            rows: n,
            kind: module_kind::DWARF,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Rule = RegisterRule<usize>;

    #[test]
    fn rules_the_walk_can_follow() {
        let r = convert(
            Some((X86_64::RSP, 16)),
            Some(Rule::Offset(-8)),
            Some(Rule::Offset(-16)),
        );
        assert_eq!(
            (r.kind, r.cfa_offset, r.rbp_saved, r.rbp_offset),
            (row_kind::CFA_RSP, 16, 1, -16)
        );
        let r = convert(
            Some((X86_64::RBP, 16)),
            Some(Rule::Offset(-8)),
            None::<Rule>,
        );
        assert_eq!(
            (r.kind, r.cfa_offset, r.rbp_saved),
            (row_kind::CFA_RBP, 16, 0)
        );
    }

    #[test]
    fn undefined_return_address_is_the_root() {
        let r = convert(Some((X86_64::RSP, 8)), Some(Rule::Undefined), None);
        assert_eq!(r.kind, row_kind::END);
    }

    #[test]
    fn rules_the_walk_cannot_follow_stop_it() {
        // CFA in another register (stack realignment), an expression, a
        // return address elsewhere, rbp restored from a register.
        for r in [
            convert(Some((gimli::Register(10), 0)), Some(Rule::Offset(-8)), None),
            convert(None, Some(Rule::Offset(-8)), None),
            convert(Some((X86_64::RSP, 16)), Some(Rule::Offset(-16)), None),
            convert(
                Some((X86_64::RSP, 16)),
                Some(Rule::Offset(-8)),
                Some(Rule::Register(X86_64::RBX)),
            ),
        ] {
            assert_eq!(r.kind, row_kind::UNSUPPORTED);
        }
    }

    #[no_mangle]
    #[inline(never)]
    extern "C" fn heapbpf_bias_probe() -> u64 {
        std::hint::black_box(42)
    }

    /// The bias of this test binary's executable mapping (rustc links with
    /// lld here, whose segments are aligned in memory only): runtime
    /// address minus bias is the function's ELF symbol address.
    #[test]
    fn bias_of_a_real_mapping() {
        use object::{Object, ObjectSymbol};
        let runtime = heapbpf_bias_probe as *const () as u64;
        assert_eq!(heapbpf_bias_probe(), 42);
        let maps = crate::procfs::parse_maps(&std::fs::read_to_string("/proc/self/maps").unwrap());
        let m = maps
            .iter()
            .find(|m| m.is_exec() && m.start <= runtime && runtime < m.end)
            .expect("mapping of the test code");
        let data = std::fs::read(&m.path).unwrap();
        let bias = mapping_bias(&data, m).expect("bias");
        let file = object::File::parse(&*data).unwrap();
        let symbol = file
            .symbols()
            .find(|s| s.name() == Ok("heapbpf_bias_probe"))
            .expect("symbol");
        assert_eq!(runtime - bias, symbol.address());
    }

    /// This test binary is Rust code with `.eh_frame`: rows come out sorted,
    /// with no two neighbours alike, and cover the test function itself.
    #[test]
    fn rows_of_a_real_module() {
        let data = std::fs::read("/proc/self/exe").unwrap();
        let m = parse_module(&data).unwrap();
        assert!(m.functions > 100, "{} functions", m.functions);
        assert!(m.rows.windows(2).all(|w| w[0].pc < w[1].pc));
        assert!(m.rows.windows(2).all(|w| !same_rule(&w[0], &w[1])));
        let kinds = |k| m.rows.iter().filter(|r| r.kind == k).count();
        assert!(kinds(row_kind::CFA_RSP) > 100);
        assert!(kinds(row_kind::NONE) > 0);
    }
}
