//! The stack walk's tables in the kernel: call-frame rows of every module
//! (shared across targets) and each walked target's module table, with the
//! epoch that voids the walk's cached lookups when either changes.
use aya::maps::HashMap as BpfHashMap;
use heapbpf_common::names::maps;
use heapbpf_common::{ModuleTable, UnwindRow};

use super::Profiler;
use crate::{
    error::{Error, Result},
    procfs::Mapping,
    unwind,
};

impl Profiler {
    /// Prepares the stack walk of `pid`: its module table and the rows of
    /// modules not seen before. Returns whether heapbpf walks its stacks
    /// (false: the kernel's frame-pointer walk is enough, or `--unwind fp`).
    pub(super) fn prepare_unwind(&mut self, pid: u32) -> Result<bool> {
        if self.unwind.mode() == unwind::Mode::Fp {
            return Ok(false);
        }
        let maps = crate::procfs::read_maps(pid)?;
        let t = self
            .unwind
            .for_target(pid, &maps, &mut |m| open_image(pid, m));
        for path in &t.overflow {
            tracing::warn!(pid, "no room left for the call-frame rows of {path}; stacks through it are marked truncated");
        }
        self.write_rows(&t.new_rows)?;
        let walk = !(self.unwind.mode() == unwind::Mode::Auto && t.all_frame_pointers);
        if walk {
            self.write_modules(pid, &t.table)?;
        }
        tracing::info!(
            pid,
            walk,
            rows = self.unwind.rows_used(),
            "stack walk prepared"
        );
        Ok(walk)
    }

    /// Re-reads the modules of a walked target (after a `dlopen`). A target
    /// left to the kernel's frame-pointer walk keeps it.
    pub fn refresh_unwind(&mut self, pid: u32) {
        if self.unwind.mode() == unwind::Mode::Fp {
            return;
        }
        if !self.targets.get(&pid).is_some_and(|t| t.walk) {
            return;
        }
        let Ok(maps) = crate::procfs::read_maps(pid) else {
            return;
        };
        let t = self
            .unwind
            .for_target(pid, &maps, &mut |m| open_image(pid, m));
        if let Err(e) = self
            .write_rows(&t.new_rows)
            .and_then(|()| self.write_modules(pid, &t.table))
        {
            tracing::warn!(pid, "cannot update the stack walk's module table: {e}");
        }
    }

    fn write_rows(&mut self, new_rows: &[unwind::NewRows]) -> Result<()> {
        if new_rows.is_empty() {
            return Ok(());
        }
        let err = |e: aya::maps::MapError| Error::runtime("cannot write call-frame rows", e);
        let map = self.map_mut(maps::UNWIND_ROWS)?;
        let mut rows = aya::maps::Array::<_, UnwindRow>::try_from(map).map_err(err)?;
        for chunk in new_rows {
            for (i, row) in chunk.rows.iter().enumerate() {
                rows.set(chunk.first + i as u32, *row, 0).map_err(err)?;
            }
        }
        self.bump_walk_epoch()
    }

    /// Voids the walk's cached lookups (after what they were made from
    /// changed).
    fn bump_walk_epoch(&mut self) -> Result<()> {
        use heapbpf_common::config;
        self.walk_epoch += 1;
        let err = |e: aya::maps::MapError| Error::runtime("cannot update the walk epoch", e);
        let epoch = self.walk_epoch;
        let map = self.map_mut(maps::CONFIG)?;
        aya::maps::Array::<_, u64>::try_from(map)
            .map_err(err)?
            .set(config::WALK_EPOCH, epoch, 0)
            .map_err(err)
    }

    fn write_modules(&mut self, pid: u32, table: &ModuleTable) -> Result<()> {
        let same = |old: &ModuleTable| {
            let n = (table.count as usize).min(table.entries.len());
            old.count == table.count && old.entries[..n] == table.entries[..n]
        };
        if self.written_modules.get(&pid).is_some_and(|old| same(old)) {
            return Ok(());
        }
        let map = self.map_mut(maps::MODULES)?;
        let mut modules = BpfHashMap::<_, u32, ModuleTable>::try_from(map)
            .map_err(|e| Error::runtime("MODULES map", e))?;
        modules.insert(pid, table, 0).map_err(|e| {
            Error::runtime(format!("cannot write the module table of pid {pid}"), e)
        })?;
        self.written_modules.insert(pid, Box::new(*table));
        self.bump_walk_epoch()
    }
}

/// The image of a mapped file, through the target's own view of it.
fn open_image(pid: u32, m: &Mapping) -> Option<memmap2::Mmap> {
    let file = std::fs::File::open(m.map_file(pid)).ok()?;
    // SAFETY: a read-only private mapping of a file the target executes;
    // heapbpf only reads it while parsing and drops it right after.
    unsafe { memmap2::Mmap::map(&file) }.ok()
}
