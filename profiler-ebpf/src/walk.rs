//! heapbpf's own user-stack walk, for code built without frame pointers.
//!
//! User space prepares, per traced process, the table of its executable
//! mappings (`MODULES`) and, for modules without frame pointers, their
//! call-frame rows taken from `.eh_frame` / `.debug_frame` (`UNWIND_ROWS`).
//! The walk starts in the allocator's return probe, where the registers are
//! the caller's again, and steps out one frame at a time: find the mapping
//! of the address, then either follow rbp (module with frame pointers) or
//! find the row covering the address (binary search) and compute the
//! canonical frame address (CFA) from rsp or rbp. The return address is at
//! CFA - 8. A batch of frames is walked per program run; the program
//! tail-calls itself for the next batch (the verifier bounds each run).
//!
//! The walk ends complete at a frame whose return address is undefined
//! (`_start`, `clone3`) or null, and truncated anywhere else it cannot go
//! on; the flag travels with the stack (`STACK_COMPLETE` / `STACK_TRUNCATED`).
//! Addresses outside the table (code mapped since it was made) are stepped
//! out of by frame pointer, and such a walk carries neither flag.

use aya_ebpf::{
    helpers::bpf_probe_read_user,
    macros::uprobe,
    programs::{ProbeContext, RetProbeContext},
};
use heapbpf_common::{
    config, drop_reason, module_kind, row_kind, ModuleEntry, ModuleTable, UnwindRow, MAX_MODULES,
    MAX_STACK_DEPTH, STACK_COMPLETE, STACK_LEN_MASK, STACK_TRUNCATED, WALK_CACHE_SLOTS,
};

use crate::{
    maps::{CONFIG, MODULES, UNWIND, UNWIND_PROGS, UNWIND_ROWS, WALK_CACHE},
    record::{intern, record_with_stack},
    state::{count, target},
};

/// Frames walked per program run.
const FRAMES_PER_RUN: usize = 5;
/// Runs of the walk after the first: together, at least `MAX_STACK_DEPTH`
/// frames. With the tail call into the walk and the one to finish, the
/// chain stays within the kernel's 33 tail calls.
const MAX_TAIL_CALLS: u32 = MAX_STACK_DEPTH.div_ceil(FRAMES_PER_RUN) as u32 - 1;
/// Slots of `UNWIND_PROGS`.
pub const WALK_SLOT: u32 = 0;
pub const FINISH_SLOT: u32 = 1;
/// Binary-search steps: enough for 2^22 rows of a module and 2^8 mappings.
const ROW_SEARCH_STEPS: usize = 22;
const MODULE_SEARCH_STEPS: usize = 8;

enum Step {
    More,
    Complete,
    Truncated,
}

/// Begins the walk for a block of `size` bytes at `addr`; does not return
/// when the tail call is made.
#[inline(always)]
pub fn start(ctx: &RetProbeContext, tgid: u32, addr: u64, size: u64) {
    let Some(u) = UNWIND.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch value, ours until the walk records the block;
    // `ctx.regs` is the probe's register frame.
    unsafe {
        let u = &mut *u;
        let regs = &*ctx.regs;
        u.pc = regs.rip;
        u.sp = regs.rsp;
        u.bp = regs.rbp;
        u.addr = addr;
        u.size = size;
        u.tgid = tgid;
        u.steps = 0;
        u.guessed = 0;
        u.trace.len = 0;
        UNWIND_PROGS.tail_call(ctx, WALK_SLOT);
    }
}

/// `x`, hidden from the optimizer: keeps the searches below free of
/// branches (LLVM would turn the sign trick back into a compare and a
/// branch, and each branch doubles what the verifier has to explore).
#[inline(always)]
fn opaque(x: u64) -> u64 {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&x) }
}

/// All ones when `a <= b`, else 0, for `a` and `b` below 2^63 (user
/// addresses, row addresses): the sign of `b - a`, without a branch.
#[inline(always)]
fn le_mask(a: u64, b: u64) -> u64 {
    (opaque(b.wrapping_sub(a)) >> 63).wrapping_sub(1)
}

/// The mapping holding `pc`: a branch-free binary search over the sorted
/// table (the index of the last mapping starting at or below `pc`).
#[inline(always)]
fn find_module(table: &ModuleTable, pc: u64) -> Option<ModuleEntry> {
    let count = if table.count > MAX_MODULES as u64 {
        MAX_MODULES as u64
    } else {
        table.count
    };
    if count == 0 {
        return None;
    }
    let (mut base, mut n) = (0u64, count);
    for _ in 0..MODULE_SEARCH_STEPS {
        let half = n / 2;
        let entry = table.entries.get((base + half) as usize)?;
        base += half & le_mask(entry.start, pc);
        n -= half;
    }
    let entry = *table.entries.get(base as usize)?;
    (entry.start <= pc && pc < entry.end).then_some(entry)
}

/// The last row of `module` at or below the module address `rel`, by a
/// branch-free binary search.
#[inline(always)]
fn find_row(module: &ModuleEntry, rel: u64) -> Option<UnwindRow> {
    if rel > u32::MAX as u64 || module.rows == 0 {
        return None;
    }
    let (mut base, mut n) = (module.first_row as u64, module.rows as u64);
    for _ in 0..ROW_SEARCH_STEPS {
        let half = n / 2;
        let row = UNWIND_ROWS.get((base + half) as u32)?;
        base += half & le_mask(row.pc as u64, rel);
        n -= half;
    }
    let row = UNWIND_ROWS.get(base as u32).copied()?;
    (row.pc as u64 <= rel).then_some(row)
}

#[inline(always)]
fn read(addr: u64) -> Option<u64> {
    // SAFETY: reads target memory through the checked helper.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// The kind of the module holding `at` and, in a module walked by rows,
/// its row (both searches).
#[inline(always)]
fn search(table: &ModuleTable, at: u64) -> (u32, UnwindRow) {
    // An address outside every known mapping (mapped since the table was
    // made; user space refreshes it) is stepped out of by frame pointer,
    // as the kernel's own walk would.
    let module = find_module(table, at).unwrap_or(ModuleEntry {
        kind: module_kind::UNKNOWN,
        ..ModuleEntry::default()
    });
    let row = if module.kind == module_kind::DWARF {
        // No row: code without call-frame information (V8's embedded
        // builtins in node's text, hand-written stubs).
        find_row(&module, at.wrapping_sub(module.bias)).unwrap_or_default()
    } else {
        UnwindRow::default()
    };
    (module.kind, row)
}

/// [`search`] through this CPU's cache of recent lookups.
#[inline(always)]
fn locate(table: &ModuleTable, at: u64, tgid: u32, epoch: u32) -> (u32, UnwindRow) {
    let slot = ((at ^ (at >> 13)) as u32) & (WALK_CACHE_SLOTS - 1);
    let Some(slot) = WALK_CACHE.get_ptr_mut(slot) else {
        return search(table, at);
    };
    // SAFETY: per-CPU map value. Another task on this CPU may preempt this
    // one between the writes below: the check, written last, catches a slot
    // left half one task's and half the other's.
    let slot = unsafe { &mut *slot };
    if slot.pc == at
        && slot.tgid == tgid
        && slot.epoch == epoch
        && slot.check == slot_check(at, tgid, epoch, slot.module_kind, &slot.row)
    {
        return (slot.module_kind, slot.row);
    }
    let (kind, row) = search(table, at);
    slot.pc = at;
    slot.tgid = tgid;
    slot.epoch = epoch;
    slot.module_kind = kind;
    slot.row = row;
    slot.check = slot_check(at, tgid, epoch, kind, &row);
    (kind, row)
}

/// A hash of a cache slot's fields.
#[inline(always)]
fn slot_check(pc: u64, tgid: u32, epoch: u32, kind: u32, row: &UnwindRow) -> u64 {
    let a = pc ^ ((tgid as u64) << 32 | epoch as u64).rotate_left(17);
    let b = (row.pc as u64) << 32 | row.cfa_offset as u32 as u64;
    let c = (row.rbp_offset as u16 as u64) << 32
        | (row.kind as u64) << 24
        | (row.rbp_saved as u64) << 16
        | kind as u64;
    (a ^ b.rotate_left(29) ^ c.rotate_left(43)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Steps from the frame of `pc` (a return address) to its caller's.
#[inline(always)]
fn step(
    pc: &mut u64,
    sp: &mut u64,
    bp: &mut u64,
    guessed: &mut u64,
    table: &ModuleTable,
    tgid: u32,
    epoch: u32,
) -> Step {
    if *pc == 0 {
        return Step::Complete;
    }
    // A return address: the call is the instruction before it.
    let at = *pc - 1;
    let (kind, row) = locate(table, at, tgid, epoch);
    if kind == module_kind::UNKNOWN || (kind == module_kind::DWARF && row.kind == row_kind::NONE) {
        *guessed = 1;
    }
    let (cfa, saved_bp) = if row.kind == row_kind::NONE {
        if *bp == 0 {
            return Step::Complete;
        }
        (bp.wrapping_add(16), Some(*bp))
    } else {
        let base = match row.kind {
            row_kind::CFA_RSP => *sp,
            row_kind::CFA_RBP => *bp,
            row_kind::END => return Step::Complete,
            _ => return Step::Truncated,
        };
        let cfa = base.wrapping_add(row.cfa_offset as i64 as u64);
        let saved = (row.rbp_saved != 0).then(|| cfa.wrapping_add(row.rbp_offset as i64 as u64));
        (cfa, saved)
    };
    // Callers' frames lie above: a walk that does not climb is lost.
    if cfa <= *sp {
        return Step::Truncated;
    }
    let ret = match saved_bp {
        // rbp pushed right after the call (frame-pointer code, and most
        // rows that save rbp): saved rbp and return address in one read.
        Some(at) if at == cfa.wrapping_sub(16) => {
            // SAFETY: reads target memory through the checked helper.
            let Ok([saved, ret]) = (unsafe { bpf_probe_read_user(at as *const [u64; 2]) }) else {
                return Step::Truncated;
            };
            *bp = saved;
            ret
        }
        _ => {
            let Some(ret) = read(cfa - 8) else {
                return Step::Truncated;
            };
            if let Some(at) = saved_bp {
                match read(at) {
                    Some(v) => *bp = v,
                    None => return Step::Truncated,
                }
            }
            ret
        }
    };
    *sp = cfa;
    *pc = ret;
    if ret == 0 {
        return Step::Complete;
    }
    Step::More
}

#[uprobe]
pub fn unwind_step(ctx: ProbeContext) -> u32 {
    let Some(u) = UNWIND.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch value, ours for the duration of the walk.
    let u = unsafe { &mut *u };
    // The epoch before the table: user space writes a table, then bumps
    // the epoch, so lookups in an older table never get the newer epoch.
    let epoch = CONFIG.get(config::WALK_EPOCH).copied().unwrap_or(0) as u32;
    // SAFETY: `MODULES` is not preallocated: a table user space replaces
    // meanwhile stays valid while this program runs; it is only read.
    let flags = match unsafe { MODULES.get(u.tgid) } {
        None => STACK_TRUNCATED,
        Some(table) => {
            let (mut pc, mut sp, mut bp) = (u.pc, u.sp, u.bp);
            let mut flags = 0;
            for _ in 0..FRAMES_PER_RUN {
                let n = (u.trace.len & STACK_LEN_MASK) as usize;
                let Some(slot) = u.trace.ips.get_mut(n) else {
                    flags = STACK_TRUNCATED;
                    break;
                };
                *slot = pc;
                u.trace.len += 1;
                match step(
                    &mut pc,
                    &mut sp,
                    &mut bp,
                    &mut u.guessed,
                    table,
                    u.tgid,
                    epoch,
                ) {
                    Step::More => {}
                    Step::Complete => {
                        flags = STACK_COMPLETE;
                        break;
                    }
                    Step::Truncated => {
                        flags = STACK_TRUNCATED;
                        break;
                    }
                }
            }
            if flags == 0 {
                u.pc = pc;
                u.sp = sp;
                u.bp = bp;
                if u.steps < MAX_TAIL_CALLS {
                    u.steps += 1;
                    // SAFETY: same program type, same context.
                    unsafe { UNWIND_PROGS.tail_call(&ctx, WALK_SLOT) };
                }
                STACK_TRUNCATED
            } else {
                flags
            }
        }
    };
    // A walk that went by guess may end anywhere, as the kernel's own
    // frame-pointer walk does: leave the verdict to user space, which looks
    // for a root function at the end.
    let flags = if u.guessed != 0 { 0 } else { flags };
    u.trace.len |= flags;
    // Interning and recording run in their own program: verified once, not
    // once per way out of the walk above.
    // SAFETY: same program type, same context.
    unsafe { UNWIND_PROGS.tail_call(&ctx, FINISH_SLOT) };
    // Only if the tail call could not be made: the block is lost, and said.
    if let Some(state) = target(u.tgid) {
        count(state, drop_reason::STACK_ERROR);
    }
    0
}

/// Interns the walked stack and records the block.
#[uprobe]
pub fn unwind_finish(_ctx: ProbeContext) -> u32 {
    let Some(u) = UNWIND.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch value, filled by the walk.
    let u = unsafe { &mut *u };
    let Some(state) = target(u.tgid) else {
        return 0;
    };
    let stack_id = intern(state, &u.trace);
    record_with_stack(state, u.tgid, u.addr, u.size, stack_id);
    0
}
