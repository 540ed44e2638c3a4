//! Applying an [`AttachPlan`]: one probe per allocator function of a target
//! (a uprobe session where the kernel has them, else a uprobe and, for
//! allocating functions, a uretprobe), placed where [`placement`] says;
//! detaching, and forgetting a target's data in the kernel maps (all of it,
//! or an old image's after an `exec`).
use std::{collections::HashSet, num::NonZeroU32};

use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
        UProbe,
    },
};
use heapbpf_common::names::maps;
use heapbpf_common::{
    unwind_mode, AllocInfo, AllocKey, ExecEvent, ModuleTable, Pending, StackKey, StackStats,
    TargetState,
};

use super::{
    load::{error_chain, load_error},
    map_fd, programs, sys, AttachedProbe, Exec, Floor, ProbedTarget, Profiler, Which,
};
use crate::{
    allocator::{self, AttachPlan, Call, Library, ENTRY_POINTS},
    elf::placement::Image,
    error::{Error, Result},
};

impl Profiler {
    fn targets_map(&mut self) -> Result<BpfHashMap<&mut MapData, u32, TargetState>> {
        BpfHashMap::try_from(self.map_mut(maps::TARGETS)?)
            .map_err(|e| Error::runtime("TARGETS map", e))
    }

    /// Applies `plan` to `pid`: every entry point of the main allocator
    /// (those it does not define from the fallback), then of each extra
    /// allocator. On error, whatever was attached for this target is
    /// detached again.
    pub fn attach(&mut self, pid: u32, plan: &AttachPlan) -> Result<Vec<AttachedProbe>> {
        if !self.targets.contains_key(&pid) {
            let walk = self.prepare_unwind(pid)?;
            let state = TargetState {
                unwind: if walk {
                    unwind_mode::WALK
                } else {
                    unwind_mode::KERNEL_FP
                },
                ..Default::default()
            };
            self.targets_map()?
                .insert(pid, state, 0)
                .map_err(|e| Error::runtime(format!("cannot register pid {pid}"), e))?;
            let hit_slot = if self.count_hits {
                self.take_hit_slot()
            } else {
                0
            };
            if hit_slot == 0 && self.count_hits {
                tracing::debug!(pid, "no slot left in HITS: its probe hits are not counted");
            }
            let hits_at_attach = self.slot_hits(hit_slot).unwrap_or_default();
            self.targets.insert(
                pid,
                ProbedTarget {
                    links: Vec::new(),
                    session_links: Vec::new(),
                    hooked: Default::default(),
                    walk,
                    hit_slot,
                    hits_at_attach,
                    libraries: Vec::new(),
                    probes: Which::ALL,
                },
            );
        }
        let mut attached = Vec::new();
        let mut libraries = std::iter::once((&plan.main, plan.fallback.as_ref()))
            .chain(plan.extra.iter().map(|lib| (lib, None)));
        let which = self.targets.get(&pid).map_or(Which::ALL, |t| t.probes);
        let result = libraries.try_for_each(|(lib, fallback)| {
            if let Some(t) = self.targets.get_mut(&pid) {
                t.libraries.push((lib.clone(), fallback.cloned()));
            }
            attached.extend(self.attach_library(pid, lib, fallback, which)?);
            Ok(())
        });
        match result {
            Ok(()) => Ok(attached),
            Err(e) => {
                self.detach(pid);
                Err(e)
            }
        }
    }

    /// Hooks every entry point `lib` defines, or else `fallback` (the C
    /// library: glibc then serves those calls; jemalloc and tcmalloc have no
    /// `reallocarray`, ...): its allocation probes, its free probes, or
    /// both, as `which` says (the others are marked hooked all the same).
    fn attach_library(
        &mut self,
        pid: u32,
        lib: &Library,
        fallback: Option<&Library>,
        which: Which,
    ) -> Result<Vec<AttachedProbe>> {
        // Each probe's cookie carries the target's slot in `HITS`.
        let slot_tag = self.targets.get(&pid).map_or(0, |t| {
            u64::from(t.hit_slot) << heapbpf_common::probe_cookie::SLOT_SHIFT
        });
        let scope =
            UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(Error::NoSuchProcess { pid })?);
        let lib_image = Image::open(&lib.open_path);
        let fallback = fallback.map(|f| (f, Image::open(&f.open_path)));
        // Where `symbol` is hooked, and under which name: in `lib` with its
        // prefix (or as it is, for an entry point that carries the prefix
        // already: `mi_free` of a `mi_` family), else in the fallback.
        let pick = |symbol: &str| -> Option<(&Library, &Image, String)> {
            let name = lib.name(symbol);
            if lib_image.defines(&name) {
                return Some((lib, &lib_image, name));
            }
            if !lib.prefix.is_empty()
                && symbol.starts_with(&lib.prefix)
                && lib_image.defines(symbol)
            {
                return Some((lib, &lib_image, symbol.to_string()));
            }
            let (f, image) = fallback.as_ref()?;
            let name = f.name(symbol);
            image.defines(&name).then_some((*f, image, name))
        };
        // Every function to hook: (what it is called by, its call, where it is, its name).
        let specs: Vec<(String, Call, &Library, &Image, String)> = if lib.is_rust_shims() {
            lib.rust_shims
                .iter()
                .filter(|(name, _)| lib_image.defines(name))
                .map(|(name, call)| (name.clone(), *call, lib, &lib_image, name.clone()))
                .collect()
        } else {
            ENTRY_POINTS
                .iter()
                .filter_map(|p| {
                    let found = pick(p.symbol);
                    if found.is_none() {
                        tracing::info!(pid, symbol = p.symbol, "symbol not exported; not hooked");
                    }
                    let (target, image, name) = found?;
                    Some((p.symbol.to_string(), p.call, target, image, name))
                })
                .collect()
        };
        let missing = if lib.is_rust_shims() {
            specs.is_empty()
        } else if !lib.prefix.is_empty() {
            // A family found by its shape (see `allocator::families`).
            let frees = specs.iter().any(|s| !s.1.allocates());
            !specs.iter().any(|s| s.1.allocates()) || (!frees && !lib.never_frees)
        } else {
            // jemalloc in a Rust program frees with `sdallocx` only.
            let frees = ["free", "sdallocx", "dallocx"]
                .iter()
                .any(|f| pick(f).is_some());
            pick("malloc").is_none() || (!frees && !lib.never_frees)
        };
        if missing {
            // Its files are unreadable once it is gone: that is not a
            // library without malloc.
            if !crate::procfs::is_alive(pid) {
                return Err(Error::Exited { pid });
            }
            // A file heapbpf may not read is not a library without malloc.
            if let Err(e) = std::fs::File::open(&lib.open_path) {
                let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                    "; reading a target's files through /proc/PID/map_files needs CAP_SYS_ADMIN, \
                     CAP_SYS_PTRACE and (for another user's process) CAP_DAC_READ_SEARCH"
                } else {
                    ""
                };
                return Err(Error::NotTraceable {
                    pid,
                    why: format!(
                        "cannot read {} ({}): {e}{hint}",
                        crate::lines::escape(&lib.path),
                        lib.open_path.display()
                    ),
                });
            }
            let what = if lib.is_rust_shims() {
                "has no Rust allocator shims (__rust_alloc, __rust_dealloc)"
            } else {
                "does not export malloc and free"
            };
            return Err(Error::NotTraceable {
                pid,
                why: format!("{} {what}", crate::lines::escape(&lib.path)),
            });
        }
        let return_program = if self.floor.is_some() {
            programs::NOOP_RETURN
        } else {
            programs::ALLOC_RETURN
        };
        let with_returns = self.floor != Some(Floor::Entry);
        let mut attached = Vec::new();
        // Allocating functions as uprobe sessions where the kernel has them.
        let mut in_session = HashSet::new();
        let sessions = self.sessions.is_some() && which.allocations;
        for (key, call, target, image, name) in specs.iter().filter(|s| s.1.allocates() && sessions)
        {
            let Some(start) = image.file_offset(name) else {
                continue;
            };
            if self.is_hooked(pid, image, name, false) {
                // An alias of a function hooked already.
                in_session.insert(key.as_str());
                continue;
            }
            let program = match self.floor {
                Some(Floor::Entry) => programs::NOOP_SESSION_ENTRY,
                Some(Floor::Return) => programs::NOOP_SESSION_RETURN,
                None => match programs::session(*call) {
                    Some(p) => p,
                    None => continue,
                },
            };
            let offset = probe_offset(*call, image, name);
            let cookie = allocator::probe_cookie(*call, target) | slot_tag;
            match self.attach_session(program, name, start + offset, cookie, target, pid) {
                Ok(()) => {}
                Err(Error::Exited { pid }) => return Err(Error::Exited { pid }),
                Err(e) => {
                    // Hooked below as a uprobe + uretprobe pair instead.
                    tracing::info!(pid, symbol = %name, error = %e, "no uprobe session; using a uprobe + uretprobe pair");
                    continue;
                }
            }
            self.first_probe(pid, image, name, false);
            self.first_probe(pid, image, name, true);
            in_session.insert(key.as_str());
            attached.push(AttachedProbe {
                symbol: name.clone(),
                offset,
                is_return: false,
                session: true,
                library: target.label(),
            });
        }
        // Otherwise return probes first, so that no call is seen entering
        // without its return hooked.
        for (_, call, target, image, name) in specs.iter().filter(|s| {
            s.1.allocates()
                && with_returns
                && which.allocations
                && !in_session.contains(s.0.as_str())
        }) {
            if !self.first_probe(pid, image, name, true) {
                continue;
            }
            let offset = probe_offset(*call, image, name);
            self.attach_one(return_program, name, offset, slot_tag, target, scope, pid)?;
            attached.push(AttachedProbe {
                symbol: name.clone(),
                offset,
                is_return: true,
                session: false,
                library: target.label(),
            });
        }
        for (_, call, target, image, name) in
            specs.iter().filter(|s| !in_session.contains(s.0.as_str()))
        {
            if !self.first_probe(pid, image, name, false) {
                tracing::info!(pid, symbol = %name, library = %target.path, "alias of a function already hooked; not hooked again");
                continue;
            }
            let wanted = if call.allocates() {
                which.allocations
            } else {
                which.frees
            };
            if !wanted {
                continue;
            }
            let offset = probe_offset(*call, image, name);
            let program = if self.floor.is_some() {
                programs::NOOP_ENTER
            } else {
                programs::entry(*call)
            };
            let cookie = allocator::probe_cookie(*call, target) | slot_tag;
            self.attach_one(program, name, offset, cookie, target, scope, pid)?;
            attached.push(AttachedProbe {
                symbol: name.clone(),
                offset,
                is_return: false,
                session: false,
                library: target.label(),
            });
        }
        Ok(attached)
    }

    /// Whether `symbol` of `image` is the first name of its function to be
    /// probed (entry or return) for `pid`: one probe per function, however
    /// many names (aliases, or the same file hooked as two allocators) lead
    /// to it, or each call would be counted twice.
    fn first_probe(&mut self, pid: u32, image: &Image, symbol: &str, ret: bool) -> bool {
        let (Some(addr), Some(t)) = (image.address(symbol), self.targets.get_mut(&pid)) else {
            return true;
        };
        let (dev, ino) = image.id();
        t.hooked.insert((dev, ino, addr, ret))
    }

    /// Whether the function `symbol` of `image` is probed already (entry or
    /// return) for `pid`, under this name or another.
    fn is_hooked(&self, pid: u32, image: &Image, symbol: &str, ret: bool) -> bool {
        let (Some(addr), Some(t)) = (image.address(symbol), self.targets.get(&pid)) else {
            return false;
        };
        let (dev, ino) = image.id();
        t.hooked.contains(&(dev, ino, addr, ret))
    }

    #[allow(clippy::too_many_arguments)]
    fn attach_one(
        &mut self,
        program: &'static str,
        symbol: &str,
        offset: u64,
        cookie: u64,
        lib: &Library,
        scope: UProbeScope,
        pid: u32,
    ) -> Result<()> {
        let prog: &mut UProbe = self
            .ebpf
            .program_mut(program)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| Error::Runtime(format!("no uprobe program {program}")))?;
        let location = if offset == 0 {
            UProbeAttachLocation::Symbol(symbol)
        } else {
            UProbeAttachLocation::SymbolOffset(symbol, offset)
        };
        let point = aya::programs::uprobe::UProbeAttachPoint {
            location,
            cookie: Some(cookie),
        };
        match prog.attach(point, &lib.open_path, scope) {
            Ok(link) => {
                tracing::debug!(pid, program, symbol, offset, library = %lib.path, "probe placed");
                if let Some(t) = self.targets.get_mut(&pid) {
                    t.links.push((program, link));
                }
                Ok(())
            }
            Err(e) => {
                if !crate::procfs::is_alive(pid) {
                    Err(Error::Exited { pid })
                } else {
                    Err(load_error(format!(
                        "cannot hook {symbol} in {}: {}",
                        lib.path,
                        error_chain(&e)
                    )))
                }
            }
        }
    }

    /// Attaches session program `program` to `symbol` (at file offset
    /// `offset` of `lib`) in `pid`.
    fn attach_session(
        &mut self,
        program: &'static str,
        symbol: &str,
        offset: u64,
        cookie: u64,
        lib: &Library,
        pid: u32,
    ) -> Result<()> {
        let sessions = self
            .sessions
            .as_ref()
            .ok_or_else(|| Error::Runtime("no session programs".into()))?;
        match sessions.attach(program, &lib.open_path, offset, cookie, pid) {
            Ok(link) => {
                tracing::debug!(pid, program, symbol, offset, library = %lib.path, "session probe placed");
                if let Some(t) = self.targets.get_mut(&pid) {
                    t.session_links.push(link);
                }
                Ok(())
            }
            Err(e) if !crate::procfs::is_alive(pid) => {
                tracing::debug!(pid, error = %e, "target gone");
                Err(Error::Exited { pid })
            }
            Err(e) => Err(load_error(format!(
                "cannot hook {symbol} in {} (uprobe session): {e}",
                lib.path
            ))),
        }
    }

    /// Hooks one more allocator library of an attached target (one it
    /// mapped after attach). On error, only the probes placed by this call
    /// are removed; the target stays profiled as before.
    pub fn attach_more(&mut self, pid: u32, lib: &Library) -> Result<Vec<AttachedProbe>> {
        let (before, sessions_before) = self
            .targets
            .get(&pid)
            .map_or((0, 0), |t| (t.links.len(), t.session_links.len()));
        let which = self.targets.get(&pid).map_or(Which::ALL, |t| t.probes);
        match self.attach_library(pid, lib, None, which) {
            Ok(attached) => {
                if let Some(t) = self.targets.get_mut(&pid) {
                    t.libraries.push((lib.clone(), None));
                }
                Ok(attached)
            }
            Err(e) => {
                let links: Vec<_> = self
                    .targets
                    .get_mut(&pid)
                    .map(|t| {
                        t.session_links.truncate(sessions_before);
                        t.links.split_off(before.min(t.links.len()))
                    })
                    .unwrap_or_default();
                self.detach_links(pid, links);
                Err(e)
            }
        }
    }

    fn detach_links(&mut self, pid: u32, links: Vec<(&'static str, UProbeLinkId)>) {
        for (program, link) in links {
            if let Some(prog) = self
                .ebpf
                .program_mut(program)
                .and_then(|p| <&mut UProbe>::try_from(p).ok())
            {
                if let Err(e) = prog.detach(link) {
                    tracing::debug!(pid, program, error = %e, "detach failed");
                }
            }
        }
    }

    /// Detaches the probes of `pid` and forgets its data in the kernel maps.
    pub fn detach(&mut self, pid: u32) {
        if let Some(t) = self.targets.remove(&pid) {
            self.detach_links(pid, t.links);
        }
        if let Ok(mut m) = self.targets_map() {
            let _ = m.remove(&pid);
        }
        self.purge(pid);
    }

    /// Forgets everything the kernel maps hold of `pid`.
    fn purge(&mut self, pid: u32) {
        self.remove_where::<AllocKey, AllocInfo>(maps::ALLOCS, |k, _| k.tgid == pid);
        self.remove_where::<StackKey, StackStats>(maps::STACK_STATS, |k, _| k.tgid == pid);
        self.remove_where::<u64, Pending>(maps::PENDING, |k, _| (k >> 32) as u32 == pid);
        if let Ok(map) = self.map_mut(maps::MODULES) {
            if let Ok(mut modules) = BpfHashMap::<_, u32, ModuleTable>::try_from(map) {
                let _ = modules.remove(&pid);
            }
        }
        if let Ok(map) = self.map_mut(maps::EXECS) {
            if let Ok(mut execs) = BpfHashMap::<_, u32, ExecEvent>::try_from(map) {
                let _ = execs.remove(&pid);
            }
        }
        self.written_modules.remove(&pid);
        self.stacks.forget(pid);
    }

    /// Forgets what the image of `pid` before `exec` left in the kernel
    /// maps (its blocks and per-stack counters, and those of any image
    /// between it and the last exec), after its last snapshot. Without the
    /// exec tracepoint, everything of `pid`, and its state starts afresh.
    pub fn forget_before_exec(&mut self, pid: u32, exec: &Exec) {
        let Some(before) = exec.before else {
            self.purge(pid);
            let Some(old) = self.target_state(pid) else {
                return;
            };
            let fresh = TargetState {
                unwind: old.unwind,
                image_ns: exec.at_ns,
                generation: old.generation + 1,
                ..Default::default()
            };
            if let Ok(mut m) = self.targets_map() {
                // The new image's increments since it started are lost
                // here: that is what "coarse" means.
                let _ = m.insert(pid, fresh, 0);
            }
            return;
        };
        let last_ns = exec.last_ns;
        // An address read as the old image's may be the new image's by the
        // time it is removed (a block it got there set the old one aside):
        // each is looked at again first.
        self.remove_matching::<AllocKey, AllocInfo>(
            maps::ALLOCS,
            |k, v| k.tgid == pid && v.timestamp_ns < last_ns,
            true,
        );
        let (first, count) = (before.generation as u32, exec.count as u32);
        self.remove_where::<StackKey, StackStats>(maps::STACK_STATS, |k, _| {
            k.tgid == pid && k.generation.wrapping_sub(first) < count
        });
        self.stacks.forget(pid);
    }

    /// Replaces the probes of `pid` by those of `plan` (the allocator of the
    /// image it exec'd), keeping what the kernel maps hold of it. On error,
    /// the target is detached.
    pub fn rehook(&mut self, pid: u32, plan: &AttachPlan) -> Result<Vec<AttachedProbe>> {
        if let Some(t) = self.targets.get_mut(&pid) {
            let links = std::mem::take(&mut t.links);
            // Closing a session link detaches it.
            t.session_links.clear();
            t.hooked.clear();
            t.libraries.clear();
            t.probes = Which::ALL;
            self.detach_links(pid, links);
        }
        self.attach(pid, plan)
    }

    /// Which probes of `pid` are attached (`None`: not a target).
    pub fn attached_probes(&self, pid: u32) -> Option<Which> {
        self.targets.get(&pid).map(|t| t.probes)
    }

    /// Detaches the allocation probes of `pid` and, unless `keep_frees`, its
    /// free probes, keeping everything the kernel holds of it (live blocks,
    /// stacks, counters) and its module table: [`Profiler::resume`] hooks
    /// them again. A call caught between its entry and its return is
    /// forgotten (its `PENDING` entry would make the thread's next calls
    /// look nested): a `realloc` then loses the block it was resizing.
    pub fn pause(&mut self, pid: u32, keep_frees: bool) {
        let Some(t) = self.targets.get_mut(&pid) else {
            return;
        };
        let is_free = |p: &str| p == programs::FREE_ENTER;
        let is_return = |p: &str| p == programs::ALLOC_RETURN || p == programs::NOOP_RETURN;
        let (mut going, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut t.links)
            .into_iter()
            .partition(|(p, _)| !is_free(p) || !keep_frees);
        t.links = kept;
        // Entries before returns: no call is seen entering without its
        // return hooked.
        going.sort_by_key(|(p, _)| is_return(p));
        t.session_links.clear();
        t.probes = Which {
            allocations: false,
            frees: keep_frees && t.probes.frees,
        };
        self.detach_links(pid, going);
        self.remove_where::<u64, Pending>(maps::PENDING, |k, _| (k >> 32) as u32 == pid);
    }

    /// Hooks again what [`Profiler::pause`] detached from `pid`, as it was
    /// (the same libraries). On error the target stays paused as before.
    pub fn resume(&mut self, pid: u32) -> Result<()> {
        let Some(t) = self.targets.get_mut(&pid) else {
            return Err(Error::NoSuchProcess { pid });
        };
        let before = t.probes;
        if before == Which::ALL {
            return Ok(());
        }
        let missing = Which {
            allocations: !before.allocations,
            frees: !before.frees,
        };
        // Marked again as they are placed (or, kept ones, as skipped).
        t.hooked.clear();
        let libraries = t.libraries.clone();
        let (links, sessions) = (t.links.len(), t.session_links.len());
        let result = libraries.iter().try_for_each(|(lib, fallback)| {
            self.attach_library(pid, lib, fallback.as_ref(), missing)
                .map(|_| ())
        });
        let Some(t) = self.targets.get_mut(&pid) else {
            return result;
        };
        match result {
            Ok(()) => {
                t.probes = Which::ALL;
                Ok(())
            }
            Err(e) => {
                t.session_links.truncate(sessions);
                let placed = t.links.split_off(links.min(t.links.len()));
                self.detach_links(pid, placed);
                Err(e)
            }
        }
    }

    /// Removes the entries of hash map `name` that match. The entries are
    /// read in batches ([`sys::lookup_all`]): a `get_next_key` walk of a map
    /// that other targets change all the time can restart or end early.
    fn remove_where<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
        matches: impl Fn(&K, &V) -> bool,
    ) {
        self.remove_matching(name, matches, false);
    }

    /// [`Profiler::remove_where`]; with `recheck`, each entry is read again
    /// just before its removal and kept if it no longer matches.
    fn remove_matching<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
        matches: impl Fn(&K, &V) -> bool,
        recheck: bool,
    ) {
        let keys: Vec<K> = match self.map(name).and_then(map_fd) {
            Ok(fd) => match sys::lookup_all::<K, V>(fd) {
                Ok(entries) => entries
                    .into_iter()
                    .filter(|(k, v)| matches(k, v))
                    .map(|(k, _)| k)
                    .collect(),
                Err(e) => {
                    tracing::debug!(map = name, error = %e, "cannot read map to purge it");
                    return;
                }
            },
            Err(_) => return,
        };
        let Ok(map) = self.map_mut(name) else { return };
        let Ok(mut hash) = BpfHashMap::<_, K, V>::try_from(map) else {
            return;
        };
        for k in keys {
            if recheck && hash.get(&k, 0).is_ok_and(|v| !matches(&k, &v)) {
                continue;
            }
            let _ = hash.remove(&k);
        }
    }
}

/// Where the probe on `symbol` goes: on the first instruction the kernel
/// emulates when that is safe (see [`placement`]), else at +0.
fn probe_offset(call: Call, image: &Image, symbol: &str) -> u64 {
    image
        .probe_point(symbol, call.arguments_read(), call.allocates())
        .unwrap_or(0)
}
