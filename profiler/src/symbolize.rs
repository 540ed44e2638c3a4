//! Addresses → frames, with blazesym. The only module that names blazesym.
//!
//! For each target a [`TargetModules`] keeps the memory map and an open file
//! handle on every file-backed mapping (opened through
//! `/proc/PID/map_files/`, so it is the very file the target mapped, in
//! whatever mount namespace or chroot it lives). Symbolization reads those
//! handles through `/proc/self/fd/N`, so a target that has exited is still
//! fully symbolized. Misses are data (a frame without a function), never
//! errors.
use std::{collections::HashMap, fs::File, os::fd::AsRawFd, path::PathBuf};

use blazesym::symbolize::{self, source::Elf, source::Source, Input, Symbolized};

use crate::{
    model::Frame,
    procfs::{self, Mapping},
};

/// The memory map of one target, and handles that outlive it.
#[derive(Default)]
pub struct TargetModules {
    pid: u32,
    mappings: Vec<Mapping>,
    files: HashMap<(String, u64), File>,
    build_ids: HashMap<(String, u64), Option<String>>,
    /// The map as last read, to tell whether it changed.
    last_read: Vec<Mapping>,
    /// JIT symbols from `/tmp/perf-PID.map` (node --perf-basic-prof, ...),
    /// kept while the target lives: (start, end, name), sorted.
    perf_map: Vec<(u64, u64, String)>,
    /// The perf map's path as the target sees it, and its size when read.
    perf_map_path: Option<String>,
    perf_map_len: u64,
}

impl TargetModules {
    pub fn new(pid: u32) -> Self {
        TargetModules {
            pid,
            ..Default::default()
        }
    }

    /// Re-reads the target's maps (while it is alive) and opens new modules.
    /// Returns whether anything changed. Mappings of modules that were
    /// unmapped are kept: their blocks may still be live.
    pub fn refresh(&mut self) -> bool {
        let perf = self.refresh_perf_map();
        let Ok(fresh) = procfs::read_maps(self.pid) else {
            return perf;
        };
        if fresh.is_empty() || fresh == self.last_read {
            return perf;
        }
        self.last_read = fresh.clone();
        for m in fresh.iter().filter(|m| m.is_file()) {
            let key = (m.dev.clone(), m.inode);
            if !self.files.contains_key(&key) {
                match File::open(m.map_file(self.pid)) {
                    Ok(f) => {
                        self.files.insert(key, f);
                    }
                    Err(e) => {
                        tracing::debug!(pid = self.pid, path = %m.path, error = %e, "cannot open mapped file")
                    }
                }
            }
        }
        // New mappings win; old ones survive where nothing new overlaps them.
        let mut merged: Vec<Mapping> = self
            .mappings
            .drain(..)
            .filter(|old| !fresh.iter().any(|n| n.start < old.end && old.start < n.end))
            .collect();
        merged.extend(fresh);
        merged.sort_by_key(|m| m.start);
        self.mappings = merged;
        true
    }

    /// Re-reads the target's perf map when it grew. It is named after the
    /// pid the target sees (its namespace's) and read through its root.
    fn refresh_perf_map(&mut self) -> bool {
        let status = procfs::read_status(&self.pid.to_string()).unwrap_or_default();
        let ns_pid = procfs::status_field(&status, "NSpid")
            .and_then(|v| v.split_whitespace().last().map(str::to_string))
            .unwrap_or_else(|| self.pid.to_string());
        let seen_as = format!("/tmp/perf-{ns_pid}.map");
        let host = format!("/proc/{}/root{seen_as}", self.pid);
        let Ok(meta) = std::fs::metadata(&host) else {
            return false;
        };
        if meta.len() == self.perf_map_len {
            return false;
        }
        let Ok(text) = std::fs::read_to_string(&host) else {
            return false;
        };
        self.perf_map = parse_perf_map(&text);
        self.perf_map_len = meta.len();
        self.perf_map_path = Some(seen_as);
        true
    }

    /// The JIT symbol at `addr`, from the perf map.
    pub fn perf_symbol(&self, addr: u64) -> Option<&str> {
        let i = self
            .perf_map
            .partition_point(|(start, _, _)| *start <= addr);
        let (start, end, name) = self.perf_map.get(i.checked_sub(1)?)?;
        (*start <= addr && addr < *end).then_some(name.as_str())
    }

    pub fn mapping(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(i.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }

    /// Executable file mappings with their build ids, for pprof.
    pub fn mapping_infos(&mut self) -> Vec<crate::model::MappingInfo> {
        let mut out = Vec::new();
        for m in self.mappings.iter().filter(|m| m.is_file() && m.is_exec()) {
            let key = (m.dev.clone(), m.inode);
            let build_id = match self.build_ids.get(&key) {
                Some(b) => b.clone(),
                None => {
                    let fd = self
                        .files
                        .get(&key)
                        .map(|f| PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())));
                    let b = fd.and_then(|p| crate::elf::build_id(&p));
                    self.build_ids.insert(key, b.clone());
                    b
                }
            };
            out.push(crate::model::MappingInfo {
                start: crate::model::Address(m.start),
                limit: crate::model::Address(m.end),
                offset: crate::model::Address(m.offset),
                path: m.path.clone(),
                build_id,
            });
        }
        out
    }

    fn fd_path(&self, m: &Mapping) -> Option<PathBuf> {
        let f = self.files.get(&(m.dev.clone(), m.inode))?;
        Some(PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd())))
    }
}

/// Parses a perf map (`START SIZE NAME` per line, hex), sorted by start.
/// Later entries for the same start win (code gets recompiled in place).
pub fn parse_perf_map(text: &str) -> Vec<(u64, u64, String)> {
    let mut out: Vec<(u64, u64, String)> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            let start = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
            let size = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
            let name = it.next()?.trim().to_string();
            Some((start, start.checked_add(size)?, name))
        })
        .collect();
    out.reverse();
    out.sort_by_key(|e| e.0);
    out.dedup_by_key(|e| e.0);
    out
}

/// Symbolizes the stacks of all targets of a session.
pub struct Symbolizer {
    inner: symbolize::Symbolizer,
    tables: HashMap<u32, TargetModules>,
    cache: HashMap<(u32, u64), Vec<Frame>>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        let inner = symbolize::Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            .build();
        Symbolizer {
            inner,
            tables: HashMap::new(),
            cache: HashMap::new(),
        }
    }

    /// Starts keeping the modules of `pid`.
    pub fn track(&mut self, pid: u32) {
        let mut t = TargetModules::new(pid);
        t.refresh();
        self.tables.insert(pid, t);
    }

    pub fn forget(&mut self, pid: u32) {
        self.tables.remove(&pid);
        self.cache.retain(|(p, _), _| *p != pid);
    }

    /// Picks up libraries loaded since the last call; returns whether the
    /// target's maps changed.
    pub fn refresh(&mut self, pid: u32) -> bool {
        if let Some(t) = self.tables.get_mut(&pid) {
            if t.refresh() {
                self.cache.retain(|(p, _), _| *p != pid);
                return true;
            }
        }
        false
    }

    pub fn mapping_infos(&mut self, pid: u32) -> Vec<crate::model::MappingInfo> {
        self.tables
            .get_mut(&pid)
            .map(|t| t.mapping_infos())
            .unwrap_or_default()
    }

    /// Frames for a stack of return addresses, innermost first. Each address
    /// is looked up at `address - 1` (inside the call instruction).
    pub fn symbolize_stack(&mut self, pid: u32, ips: &[u64]) -> Vec<Frame> {
        let mut out = Vec::with_capacity(ips.len());
        for &ip in ips {
            if let Some(frames) = self.cache.get(&(pid, ip)) {
                out.extend(frames.iter().cloned());
                continue;
            }
            let frames = self.symbolize_return_address(pid, ip);
            out.extend(frames.iter().cloned());
            self.cache.insert((pid, ip), frames);
        }
        out
    }

    fn symbolize_return_address(&self, pid: u32, ip: u64) -> Vec<Frame> {
        let address = crate::model::Address(ip);
        let Some(table) = self.tables.get(&pid) else {
            return vec![Frame {
                address,
                ..Default::default()
            }];
        };
        if let Some(name) = table.perf_symbol(ip.saturating_sub(1)) {
            // JIT code (anonymous memory) named by the runtime's perf map.
            if table
                .mapping(ip.saturating_sub(1))
                .is_none_or(|m| !m.is_file())
            {
                return vec![Frame {
                    address,
                    function: Some(name.to_string()),
                    module: table.perf_map_path.clone(),
                    ..Default::default()
                }];
            }
        }
        let Some(m) = table.mapping(ip.saturating_sub(1)) else {
            return vec![Frame {
                address,
                ..Default::default()
            }];
        };
        let module = (!m.path.is_empty()).then(|| m.path.clone());
        let unresolved = || {
            vec![Frame {
                address,
                module: module.clone(),
                ..Default::default()
            }]
        };
        let Some(path) = table.fd_path(m) else {
            return unresolved();
        };
        let file_offset = ip - 1 - m.start + m.offset;
        let src = Source::Elf(Elf::new(path));
        let sym = match self
            .inner
            .symbolize_single(&src, Input::FileOffset(file_offset))
        {
            Ok(Symbolized::Sym(sym)) => sym,
            Ok(Symbolized::Unknown(reason)) => {
                tracing::trace!(ip, %reason, "unresolved frame");
                return unresolved();
            }
            Err(e) => {
                tracing::debug!(ip, error = %e, "symbolization failed");
                return unresolved();
            }
        };
        let code = |ci: Option<&symbolize::CodeInfo<'_>>| {
            ci.map(|ci| (ci.to_path().to_string_lossy().into_owned(), ci.line))
                .unzip()
        };
        let mut frames = Vec::with_capacity(1 + sym.inlined.len());
        // blazesym lists inlined calls outermost first; frames go innermost
        // first, each inlined function before the one it was inlined into.
        for inl in sym.inlined.iter().rev() {
            let (file, line) = code(inl.code_info.as_ref());
            frames.push(Frame {
                address,
                function: Some(inl.name.to_string()),
                file,
                line: line.flatten(),
                module: module.clone(),
                inlined: true,
            });
        }
        let (file, line) = code(sym.code_info.as_deref());
        frames.push(Frame {
            address,
            function: Some(sym.name.to_string()),
            file,
            line: line.flatten(),
            module,
            inlined: false,
        });
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_maps_name_jit_code() {
        let text = "18c4000 300 Builtin:DeoptimizationEntry_Eager\n\
                    7f79837c7cc0 1d8 JS:^retainBuffers /tmp/nd/retain.js:3:23\n\
                    garbage line\n\
                    7f79837c7cc0 1e0 JS:*retainBuffers /tmp/nd/retain.js:3:23\n";
        let map = parse_perf_map(text);
        assert_eq!(map.len(), 2);
        let mut t = TargetModules::new(1);
        t.perf_map = map;
        assert_eq!(
            t.perf_symbol(0x7f79837c7dd6),
            Some("JS:*retainBuffers /tmp/nd/retain.js:3:23"),
            "the newer entry wins"
        );
        assert_eq!(
            t.perf_symbol(0x18c4000),
            Some("Builtin:DeoptimizationEntry_Eager")
        );
        assert_eq!(t.perf_symbol(0x18c4300), None);
        assert_eq!(t.perf_symbol(0x10), None);
    }
}
