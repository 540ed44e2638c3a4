//! Addresses → frames, with blazesym. The only module that names blazesym.
//!
//! For each target a [`TargetModules`] keeps the memory map and an open file
//! handle on every file-backed mapping (opened through
//! `/proc/PID/map_files/`, so it is the very file the target mapped, in
//! whatever mount namespace or chroot it lives). Symbolization reads those
//! handles through `/proc/self/fd/N`, so a target that has exited is still
//! fully symbolized. Misses are data (a frame without a function), never
//! errors.
//!
//! A module without DWARF of its own is symbolized from its separate debug
//! file when one is found ([`crate::debuginfo`]: by build id, by
//! `.gnu_debuglink`, from debuginfod), by virtual address (the debug file's
//! code sections are empty, its symbols and DWARF name addresses as
//! linked). How each module is symbolized is decided once, when it is
//! first seen, and said in the snapshot's `mappings`.
use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead, BufReader, Read, Seek, SeekFrom},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
};

use blazesym::symbolize::{self, source::Elf, source::Source, Input, Symbolized};

use crate::{
    debuginfo::{
        self,
        debuginfod::{self, Fetch},
        ElfFacts,
    },
    model::Frame,
    procfs::{self, Mapping},
};

/// How one executable module is symbolized.
struct ModuleDebug {
    /// `None`: not an ELF file heapbpf can read (blazesym tries anyway).
    facts: Option<ElfFacts>,
    source: DebugSource,
}

enum DebugSource {
    /// Its own symbols (and DWARF when it has some).
    Own,
    /// A separate debug file, looked up by virtual address.
    Separate { file: File, shown: String },
    /// Stripped, nothing found: only its dynamic symbols. Why; and the
    /// build id debuginfod failed to give, asked again once its failure
    /// is old enough ([`debuginfod::RETRY_AFTER`]).
    Missing { why: String, retry: Option<String> },
    /// Stripped, its debug file downloading from debuginfod.
    Downloading { build_id: String },
}

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
    /// kept while the target lives.
    perf_map: PerfMap,
    /// The perf map's path as the target sees it, once read.
    perf_map_path: Option<String>,
    /// What was read of it: which file, how far, and how it looked then.
    perf_map_read: Option<PerfMapRead>,
    /// A warning about the perf map was given (once per target).
    perf_map_warned: bool,
    /// How each executable module is symbolized, decided when first seen.
    debug: HashMap<(String, u64), ModuleDebug>,
}

/// Which perf map file was read, up to where, and its state then.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PerfMapRead {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    /// Bytes of it parsed: up to the last complete line.
    consumed: u64,
    /// The first and the last bytes of what was parsed (at most
    /// [`PERF_MAP_EDGE_BYTES`] each), to tell a file that was appended to
    /// from one rewritten in place; `None` when the file changed while it
    /// was read (it is then read anew).
    edges: Option<(Vec<u8>, Vec<u8>)>,
}

impl PerfMapRead {
    /// The same file, in the same state (size and mtime).
    fn unchanged(&self, now: &PerfMapRead) -> bool {
        (self.dev, self.ino, self.len, self.mtime) == (now.dev, now.ino, now.len, now.mtime)
    }
}

/// How much of a perf map is read. node writes ~100 bytes a symbol, so
/// this is ~600,000 JIT symbols; beyond it heapbpf says so once and names
/// what it read.
pub const PERF_MAP_MAX_BYTES: u64 = 64 << 20;
/// The longest perf map line read (a symbol name of a few KiB at most).
const PERF_MAP_MAX_LINE: u64 = 64 << 10;
/// How many symbols a perf map may give (each costs memory however short
/// its line).
pub const PERF_MAP_MAX_SYMBOLS: usize = 1 << 20;
/// How much of the start and of the end of what was read of a perf map is
/// kept to check, when it grew, that it was appended to (node) rather than
/// rewritten (the JVM's `jcmd PID Compiler.perfmap` truncates the same
/// file and writes every symbol again, new ones in the middle).
const PERF_MAP_EDGE_BYTES: u64 = 512;

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
    pub fn refresh(&mut self, client: Option<&debuginfod::Client>) -> bool {
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
        for m in fresh.iter().filter(|m| m.is_file() && m.is_exec()) {
            let key = (m.dev.clone(), m.inode);
            if !self.debug.contains_key(&key) {
                let d = self.module_debug(&key, &m.path, client);
                self.debug.insert(key, d);
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

    /// How the module `key` (mapped from `path`, as the target sees it) is
    /// to be symbolized: see [`crate::debuginfo`] for the lookup.
    fn module_debug(
        &self,
        key: &(String, u64),
        path: &str,
        client: Option<&debuginfod::Client>,
    ) -> ModuleDebug {
        let facts = self.files.get(key).and_then(ElfFacts::read);
        let source = match &facts {
            None => DebugSource::Own,
            Some(f) if f.has_dwarf => DebugSource::Own,
            Some(f) => match debuginfo::find_local(self.pid, f, path, &debuginfo::default_dirs()) {
                Some(found) => DebugSource::Separate {
                    file: found.file,
                    shown: found.shown,
                },
                None if !f.stripped() => DebugSource::Own,
                None => match (client, &f.build_id) {
                    (Some(c), Some(id)) => settled(c, id, c.request(id)),
                    _ => DebugSource::Missing {
                        why: not_found(f),
                        retry: None,
                    },
                },
            },
        };
        if let DebugSource::Separate { shown, .. } = &source {
            tracing::debug!(pid = self.pid, module = %path, debug_file = %shown, "separate debug info");
        }
        ModuleDebug { facts, source }
    }

    /// Reads what is new in the target's perf map: only when its file,
    /// size or mtime changed, only what was appended when it grew, and at
    /// most [`PERF_MAP_MAX_BYTES`]. It is named after the pid the target
    /// sees (its namespace's) and resolved inside its root, so that a link
    /// planted there cannot make heapbpf read one of its own files.
    fn refresh_perf_map(&mut self) -> bool {
        let status = procfs::read_status(&self.pid.to_string()).unwrap_or_default();
        let ns_pid = procfs::status_field(&status, "NSpid")
            .and_then(|v| v.split_whitespace().last().map(str::to_string))
            .unwrap_or_else(|| self.pid.to_string());
        let seen_as = format!("/tmp/perf-{ns_pid}.map");
        let file = match procfs::open_in_root(self.pid, &seen_as) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
            Err(e) => {
                self.warn_perf_map(&seen_as, &format!("{e}; its JIT frames stay unnamed"));
                return false;
            }
        };
        let Ok(meta) = file.metadata() else {
            return false;
        };
        let mut now = PerfMapRead {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            consumed: 0,
            edges: None,
        };
        let from = match &self.perf_map_read {
            Some(was) if was.unchanged(&now) => return false,
            // The same file, grown, what was read still as it was: node
            // appends to it, so only the new lines are read. Anything else
            // (the JVM rewrites the same file) is read anew.
            Some(PerfMapRead {
                dev,
                ino,
                len,
                consumed,
                edges: Some(edges),
                ..
            }) if (*dev, *ino) == (now.dev, now.ino)
                && now.len > *len
                && perf_map_edges(&file, *consumed).as_ref().ok() == Some(edges) =>
            {
                *consumed
            }
            _ => 0,
        };
        if from == 0 {
            self.perf_map = PerfMap::default();
        }
        now.consumed = from;
        let room = PERF_MAP_MAX_BYTES.saturating_sub(from);
        if now.len > PERF_MAP_MAX_BYTES {
            self.warn_perf_map(
                &seen_as,
                &format!(
                    "it is {}, over the {} heapbpf reads; JIT code named after that stays unnamed",
                    crate::units::human_bytes(now.len as i128),
                    crate::units::size_label(PERF_MAP_MAX_BYTES)
                ),
            );
        }
        let before = self.perf_map.len();
        if room > 0 && now.len > from {
            if (&file).seek(SeekFrom::Start(from)).is_err() {
                return false;
            }
            let read = self
                .perf_map
                .extend_from(BufReader::new((&file).take(room)), PERF_MAP_MAX_SYMBOLS);
            now.consumed = from + read;
            if self.perf_map.len() >= PERF_MAP_MAX_SYMBOLS {
                self.warn_perf_map(
                    &seen_as,
                    &format!("it names over {PERF_MAP_MAX_SYMBOLS} symbols; the rest stay unnamed"),
                );
            }
        }
        // What was parsed, as it is now; unless the file changed while it
        // was read, when its edges may not be what was parsed.
        let same = file
            .metadata()
            .is_ok_and(|m| (m.len(), (m.mtime(), m.mtime_nsec())) == (now.len, now.mtime));
        now.edges = same
            .then(|| perf_map_edges(&file, now.consumed).ok())
            .flatten();
        self.perf_map_read = Some(now);
        self.perf_map_path = Some(seen_as);
        from == 0 || self.perf_map.len() != before
    }

    fn warn_perf_map(&mut self, path: &str, why: &str) {
        if !self.perf_map_warned {
            self.perf_map_warned = true;
            tracing::warn!(pid = self.pid, "perf map {path} of pid {}: {why}", self.pid);
        }
    }

    /// The JIT symbol at `addr`, from the perf map.
    pub fn perf_symbol(&self, addr: u64) -> Option<&str> {
        self.perf_map.symbol(addr)
    }

    pub fn mapping(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(i.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }

    /// Executable file mappings with their build ids, for pprof, and where
    /// their symbols came from.
    pub fn mapping_infos(&mut self) -> Vec<crate::model::MappingInfo> {
        use crate::model::{SYMBOLS_DEBUG_FILE, SYMBOLS_NONE, SYMBOLS_PENDING};
        let mut out = Vec::new();
        for m in self.mappings.iter().filter(|m| m.is_file() && m.is_exec()) {
            let key = (m.dev.clone(), m.inode);
            let debug = self.debug.get(&key);
            let known = debug.and_then(|d| d.facts.as_ref()?.build_id.clone());
            let build_id = match self.build_ids.get(&key) {
                Some(b) => b.clone(),
                None if known.is_some() => {
                    self.build_ids.insert(key.clone(), known.clone());
                    known
                }
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
            let (symbols, debug_file, symbols_note) = match debug.map(|d| &d.source) {
                Some(DebugSource::Separate { shown, .. }) => {
                    (Some(SYMBOLS_DEBUG_FILE), Some(shown.clone()), None)
                }
                Some(DebugSource::Missing { why, .. }) => (Some(SYMBOLS_NONE), None, Some(why.clone())),
                Some(DebugSource::Downloading { .. }) => (
                    Some(SYMBOLS_PENDING),
                    None,
                    Some(format!(
                        "its debug info was still downloading from debuginfod after {} (frames left unresolved; the next snapshot has them)",
                        humantime::format_duration(debuginfod::SNAPSHOT_WAIT)
                    )),
                ),
                Some(DebugSource::Own) | None => (None, None, None),
            };
            out.push(crate::model::MappingInfo {
                start: crate::model::Address(m.start),
                limit: crate::model::Address(m.end),
                offset: crate::model::Address(m.offset),
                path: m.path.clone(),
                build_id,
                symbols: symbols.map(str::to_string),
                debug_file,
                symbols_note,
            });
        }
        out
    }

    fn fd_path(&self, m: &Mapping) -> Option<PathBuf> {
        let f = self.files.get(&(m.dev.clone(), m.inode))?;
        Some(fd_path(f))
    }
}

fn fd_path(f: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// A stripped module's source once debuginfod answered `fetch` (or not yet).
fn settled(client: &debuginfod::Client, build_id: &str, fetch: Fetch) -> DebugSource {
    match fetch {
        Fetch::Pending => DebugSource::Downloading {
            build_id: build_id.to_string(),
        },
        Fetch::Failed(why) => DebugSource::Missing {
            why: format!(
                "stripped; no debug info on this machine for build id {build_id}, nor from debuginfod ({why})"
            ),
            retry: Some(build_id.to_string()),
        },
        Fetch::Ready(path) => {
            let opened = procfs::open_in_root(std::process::id(), &path.to_string_lossy())
                .map_err(|e| e.to_string())
                .and_then(|f| {
                    debuginfo::proves(&f, &debuginfo::Proof::BuildId(build_id.to_string()))
                        .map(|()| f)
                });
            match opened {
                Ok(file) => DebugSource::Separate {
                    file,
                    shown: format!("{} (debuginfod {})", path.display(), client.servers()),
                },
                Err(why) => DebugSource::Missing {
                    why: format!(
                        "the debug file downloaded into {} is unusable: {why}",
                        path.display()
                    ),
                    retry: None,
                },
            }
        }
    }
}

/// Why a stripped module has no symbols, when nothing was found locally and
/// no debuginfod server was given.
fn not_found(f: &ElfFacts) -> String {
    let mut tried = Vec::new();
    if let Some(id) = &f.build_id {
        tried.push(format!("build id {id} under /usr/lib/debug/.build-id"));
    }
    if let Some((name, _)) = &f.debuglink {
        tried.push(format!("its .gnu_debuglink {}", crate::lines::escape(name)));
    }
    if tried.is_empty() {
        "stripped, with neither a build id nor a .gnu_debuglink to find its debug info by".into()
    } else {
        format!(
            "stripped; no debug info found by {}",
            tried.join(", nor by ")
        )
    }
}

/// The first and the last [`PERF_MAP_EDGE_BYTES`] of the first `consumed`
/// bytes of a perf map, read at their offsets (the file's position is left
/// alone).
fn perf_map_edges(file: &File, consumed: u64) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    use std::os::unix::fs::FileExt;
    let n = consumed.min(PERF_MAP_EDGE_BYTES);
    let mut head = vec![0; n as usize];
    file.read_exact_at(&mut head, 0)?;
    let mut tail = vec![0; n as usize];
    file.read_exact_at(&mut tail, consumed - n)?;
    Ok((head, tail))
}

/// JIT symbols of a perf map (`START SIZE NAME` per line, hex), sorted by
/// start; later entries for the same start win (code gets recompiled in
/// place). Names live in one string, so a symbol costs 24 bytes and its
/// name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PerfMap {
    /// (start, end, offset and length of the name in `names`).
    symbols: Vec<(u64, u64, u32, u32)>,
    names: String,
}

impl PerfMap {
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// The symbol at `addr`.
    pub fn symbol(&self, addr: u64) -> Option<&str> {
        let i = self.symbols.partition_point(|s| s.0 <= addr);
        let &(start, end, off, len) = self.symbols.get(i.checked_sub(1)?)?;
        let name = self.names.get(off as usize..off as usize + len as usize)?;
        (start <= addr && addr < end).then_some(name)
    }

    /// The symbols in order: (start, end, name).
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, &str)> {
        self.symbols.iter().map(|&(start, end, off, len)| {
            (
                start,
                end,
                &self.names[off as usize..off as usize + len as usize],
            )
        })
    }

    /// Adds the complete lines of `r` (newer than those read before) while
    /// the map has fewer than `max_symbols`; returns the bytes consumed, up
    /// to the end of the last complete line. Malformed lines are skipped.
    pub fn extend_from(&mut self, mut r: impl BufRead, max_symbols: usize) -> u64 {
        let mut consumed = 0u64;
        let mut line = Vec::new();
        let mut added = false;
        while self.symbols.len() < max_symbols {
            line.clear();
            match (&mut r)
                .take(PERF_MAP_MAX_LINE)
                .read_until(b'\n', &mut line)
            {
                Ok(n) if line.ends_with(b"\n") => consumed += n as u64,
                // No symbol has a line this long: skip it, never hold it.
                Ok(n) if n as u64 == PERF_MAP_MAX_LINE => {
                    consumed += n as u64;
                    match r.skip_until(b'\n') {
                        Ok(k) => consumed += k as u64,
                        Err(_) => break,
                    }
                    continue;
                }
                // EOF, a line still being written, or a read error.
                _ => break,
            }
            let text = String::from_utf8_lossy(&line);
            let Some((start, end, name)) = parse_perf_map_line(&text) else {
                continue;
            };
            // Offsets are u32: far more than the bytes a map is read for.
            if u32::try_from(self.names.len() + name.len()).is_err() {
                break;
            }
            let (off, len) = (self.names.len() as u32, name.len() as u32);
            self.names.push_str(name);
            self.symbols.push((start, end, off, len));
            added = true;
        }
        if added {
            // Stable: of entries with the same start, the last read wins.
            self.symbols.sort_by_key(|s| s.0);
            let mut kept: Vec<(u64, u64, u32, u32)> = Vec::with_capacity(self.symbols.len());
            for s in self.symbols.drain(..) {
                match kept.last_mut() {
                    Some(last) if last.0 == s.0 => *last = s,
                    _ => kept.push(s),
                }
            }
            self.symbols = kept;
        }
        consumed
    }
}

fn parse_perf_map_line(line: &str) -> Option<(u64, u64, &str)> {
    let mut it = line.splitn(3, ' ');
    let start = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
    let size = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
    let name = it.next()?.trim();
    Some((start, start.checked_add(size)?, name))
}

/// Parses the text of a perf map (every line, complete or not).
pub fn parse_perf_map(text: &str) -> PerfMap {
    let mut map = PerfMap::default();
    let mut text = text.to_string();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    map.extend_from(text.as_bytes(), PERF_MAP_MAX_SYMBOLS);
    map
}

/// Symbolizes the stacks of all targets of a session.
pub struct Symbolizer {
    inner: symbolize::Symbolizer,
    tables: HashMap<u32, TargetModules>,
    cache: HashMap<(u32, u64), Vec<Frame>>,
    /// Downloads of debug info, with `--debuginfod` / `DEBUGINFOD_URLS`.
    debuginfod: Option<debuginfod::Client>,
    /// Until when the snapshot being symbolized may wait for downloads.
    wait_until: Option<std::time::Instant>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Self::with_debuginfod(None)
    }

    /// A symbolizer that downloads missing debug info from debuginfod.
    pub fn with_debuginfod(debuginfod: Option<debuginfod::Client>) -> Self {
        let inner = symbolize::Symbolizer::builder()
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .enable_demangling(true)
            .build();
        Symbolizer {
            inner,
            tables: HashMap::new(),
            cache: HashMap::new(),
            debuginfod,
            wait_until: None,
        }
    }

    /// A snapshot is being built: from now it may wait up to
    /// [`debuginfod::SNAPSHOT_WAIT`], all modules together, for debug info
    /// still downloading.
    pub fn begin_snapshot(&mut self) {
        self.wait_until = Some(std::time::Instant::now() + debuginfod::SNAPSHOT_WAIT);
    }

    /// Starts keeping the modules of `pid`.
    pub fn track(&mut self, pid: u32) {
        let mut t = TargetModules::new(pid);
        t.refresh(self.debuginfod.as_ref());
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
            if t.refresh(self.debuginfod.as_ref()) {
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
            let settled = self.settle(pid, ip);
            let frames = self.symbolize_return_address(pid, ip);
            out.extend(frames.iter().cloned());
            // Frames of a module still downloading are not kept: the next
            // snapshot may have its debug info.
            if settled {
                self.cache.insert((pid, ip), frames);
            }
        }
        out
    }

    /// Waits (within the snapshot's budget) for the debug info of the
    /// module of `ip` when it is downloading, and asks debuginfod again for
    /// one it failed to give once that failure is old enough. False while
    /// the module's frames may still get names (not to be cached).
    fn settle(&mut self, pid: u32, ip: u64) -> bool {
        let Some(table) = self.tables.get_mut(&pid) else {
            return true;
        };
        let Some(key) = table
            .mapping(ip.saturating_sub(1))
            .map(|m| (m.dev.clone(), m.inode))
        else {
            return true;
        };
        let Some(d) = table.debug.get_mut(&key) else {
            return true;
        };
        let Some(client) = self.debuginfod.as_ref() else {
            return true;
        };
        let build_id = match &d.source {
            DebugSource::Downloading { build_id } => build_id.clone(),
            DebugSource::Missing {
                retry: Some(build_id),
                ..
            } => {
                let build_id = build_id.clone();
                match client.request(&build_id) {
                    // Still remembered as failed: as it was.
                    Fetch::Failed(_) => return false,
                    fetch => d.source = settled(client, &build_id, fetch),
                }
                build_id
            }
            _ => return true,
        };
        if let (DebugSource::Downloading { .. }, Some(until)) = (&d.source, self.wait_until) {
            d.source = settled(client, &build_id, client.wait(&build_id, until));
        }
        !matches!(
            d.source,
            DebugSource::Downloading { .. } | DebugSource::Missing { retry: Some(_), .. }
        )
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
        let debug = table.debug.get(&(m.dev.clone(), m.inode));
        let (src, input) = match debug {
            Some(ModuleDebug {
                facts: Some(facts),
                source: DebugSource::Separate { file, .. },
            }) => {
                let Some(vaddr) = facts.vaddr_of(file_offset) else {
                    return unresolved();
                };
                (Elf::new(fd_path(file)), Input::VirtOffset(vaddr))
            }
            _ => {
                let mut elf = Elf::new(path);
                // Its own DWARF when it has some. A module without, that
                // names a debug link, is read for its symbols only: the
                // link was followed above, inside the target's root
                // (blazesym would look beside the /proc/self/fd path, and
                // refuse the whole module over a stale link's CRC).
                elf.debug_syms = match debug.and_then(|d| d.facts.as_ref()) {
                    Some(f) => f.has_dwarf || f.debuglink.is_none(),
                    None => true,
                };
                (elf, Input::FileOffset(file_offset))
            }
        };
        let src = Source::Elf(src);
        let sym = match self.inner.symbolize_single(&src, input) {
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
        assert_eq!(
            parse_perf_map("10 10 a\nffffffffffffffff 10 overflow\nzz 1 b\n1 1\n20 4 last")
                .iter()
                .collect::<Vec<_>>(),
            vec![(0x10, 0x20, "a"), (0x20, 0x24, "last")]
        );
    }

    #[test]
    fn perf_maps_are_read_by_appended_lines_and_bounded() {
        let mut map = PerfMap::default();
        // A line still being written is left for the next read.
        let first = "100 10 old\n200 10 two\n300 1";
        assert_eq!(
            map.extend_from(first.as_bytes(), 10),
            "100 10 old\n200 10 two\n".len() as u64
        );
        assert_eq!(map.len(), 2);
        map.extend_from("300 10 three\n100 20 recompiled\n".as_bytes(), 10);
        assert_eq!(map.symbol(0x105), Some("recompiled"), "newer lines win");
        assert_eq!(map.symbol(0x115), Some("recompiled"));
        assert_eq!(map.symbol(0x305), Some("three"));
        // At most `max_symbols`, however short the lines.
        let many: String = (0..100).map(|i| format!("{i:x}0 1 s\n")).collect();
        let mut small = PerfMap::default();
        let used = small.extend_from(many.as_bytes(), 7);
        assert_eq!((small.len(), used), (7, 7 * "00 1 s\n".len() as u64));
        // A line far too long is skipped whole, never held.
        let long = format!("1 1 {}\n2 1 after\n", "x".repeat(1 << 20));
        let mut m = PerfMap::default();
        assert_eq!(m.extend_from(long.as_bytes(), 10), long.len() as u64);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![(2, 3, "after")]);
    }

    #[test]
    fn files_in_a_target_are_opened_inside_its_root_and_only_if_regular() {
        let me = std::process::id();
        let dir = std::env::temp_dir().join(format!("heapbpf-inroot-{me}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let at = |name: &str| format!("{}/{name}", dir.display());
        std::fs::write(at("map"), "1 1 x\n").unwrap();
        let mut text = String::new();
        procfs::open_in_root(me, &at("map"))
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "1 1 x\n");
        let kind = |path: &str| procfs::open_in_root(me, path).unwrap_err();
        assert_eq!(kind(&at("absent")).kind(), std::io::ErrorKind::NotFound);
        let e = kind("/dev/zero");
        assert!(
            e.to_string()
                .contains("not a regular file (a character device)"),
            "{e}"
        );
        assert!(kind(&dir.to_string_lossy())
            .to_string()
            .contains("a directory"));
        // A magic link of /proc leads anywhere: never followed.
        std::os::unix::fs::symlink("/proc/self/root/etc/hostname", at("magic")).unwrap();
        assert_eq!(kind(&at("magic")).raw_os_error(), Some(libc::ELOOP));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_perf_map_is_read_again_only_when_it_changed() {
        use std::io::Write as _;
        // This test process is the target: its perf map is in /tmp.
        let me = std::process::id();
        let path = format!("/tmp/perf-{me}.map");
        let write = |text: &str| std::fs::write(&path, text).unwrap();
        let mut t = TargetModules::new(me);
        assert!(!t.refresh_perf_map(), "no map yet");
        write("100 10 first\n");
        assert!(t.refresh_perf_map());
        assert_eq!(t.perf_symbol(0x100), Some("first"));
        assert_eq!(t.perf_map_path.as_deref(), Some(&*path));
        assert!(!t.refresh_perf_map(), "unchanged: not read again");
        // Appended to (node): only the new lines are read. Shown by a line
        // between the edges that were kept changed in place: not read again.
        let filler: String = (0..100)
            .map(|i| format!("{:x} 1 filler{i:02}\n", 0x1000 + i))
            .collect();
        let mut text = format!("100 10 first\n{filler}");
        write(&text);
        assert!(t.refresh_perf_map());
        assert_eq!(t.perf_symbol(0x1032), Some("filler50"));
        text = text.replace("filler50", "FILLER50") + "200 10 second\n";
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        assert!(t.refresh_perf_map());
        assert_eq!(t.perf_symbol(0x200), Some("second"));
        assert_eq!(t.perf_symbol(0x1032), Some("filler50"), "not read again");
        // Rewritten in place, grown, a symbol added in the middle (the JVM:
        // `jcmd PID Compiler.perfmap` truncates the same file and writes
        // every symbol again): read anew, the inserted symbol is named.
        let ino = std::fs::metadata(&path).unwrap().ino();
        text = text.replacen("1000 1 filler00\n", "1000 1 filler00\n150 10 inserted\n", 1);
        write(&text);
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            ino,
            "the same file"
        );
        assert!(t.refresh_perf_map());
        assert_eq!(t.perf_symbol(0x150), Some("inserted"));
        assert_eq!(t.perf_symbol(0x1032), Some("FILLER50"));
        assert_eq!(t.perf_symbol(0x200), Some("second"));
        // Replaced by a shorter file: read anew.
        std::fs::remove_file(&path).unwrap();
        write("300 10 third\n");
        assert!(t.refresh_perf_map());
        assert_eq!(
            (t.perf_symbol(0x100), t.perf_symbol(0x300)),
            (None, Some("third"))
        );
        // Not a regular file: left alone, with one warning.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(!t.refresh_perf_map());
        assert!(t.perf_map_warned);
        assert_eq!(t.perf_symbol(0x300), Some("third"));
        std::fs::remove_dir(&path).unwrap();
    }
}
