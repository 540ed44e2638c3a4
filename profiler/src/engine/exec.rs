//! A target that calls `exec()`: its old image gets a last snapshot
//! (trigger `exec`) with exactly its own blocks and figures, symbolized with
//! its own modules; what it left in the kernel is dropped; the new image's
//! allocator is found and hooked, with the contract's `attached` line — or
//! one plain line says why it cannot be, and the target is let go.
//!
//! The kernel tells of an exec as it happens (`sched_process_exec`: the old
//! image's totals set aside, the process's figures started afresh, a
//! generation per image for per-stack figures; blocks split by their time,
//! see [`crate::ebpf::Exec`]). Without that tracepoint, an exec is noticed
//! at the next look by the executable's (device, inode) changing: then the
//! old image's last snapshot also holds whatever the new one allocated
//! through the same probes until then.
//!
//! When the new image uses the same allocator files (glibc exec'ing another
//! glibc program), the probes stay: they are scoped to the process (bound to
//! its leader thread), not to its image, and have counted the new image's
//! blocks since the exec. Otherwise (a musl program, a static one, another
//! allocator), or when a thread other than the leader exec'd (the leader
//! thread, and the probes with it, are gone), the old probes go and the new
//! plan's are placed; what the new image allocated before that is not seen,
//! as for any attach.
//!
//! The new image is hooked once the dynamic linker has mapped the libraries
//! its executable needs (`DT_NEEDED`): its allocator may not be in its map
//! before. heapbpf looks again at each tick, for at most
//! [`LOADER_WAIT`]; under `heapbpf run` the new program is held at its entry
//! point, where the linker is done.
//!
//! `heapbpf run` attaches before the command's own exec: that first exec
//! is its start, not a change of image.
use std::{path::Path, time::Duration};

use crate::model::RetiredStacks;

use super::{now_rfc3339, Engine};
use crate::{
    allocator::{self, AttachPlan},
    ebpf::{self, AttachedProbe, Exec},
    error::{Error, Result},
    lines::{self, say},
    model::Trigger,
    procfs::{self, Mapping, ProcessInfo},
    trigger::StepTrigger,
};

/// How long an exec'd image may take to map the libraries it needs before
/// heapbpf plans its allocator from whatever is mapped.
const LOADER_WAIT: Duration = Duration::from_secs(2);

/// What tells that a target exec'd, and the exec being handled.
#[derive(Debug, Default)]
pub(super) struct Image {
    /// (device, inode) of the executable: without the exec tracepoint, an
    /// exec shows as a change of it.
    exe_id: Option<(u64, u64)>,
    /// `heapbpf run`, before the command's exec: what runs is heapbpf's
    /// own fork, and the exec to come is the command's start.
    launching: bool,
    /// Set while the last snapshot of the image before an exec is taken.
    pub(super) exec: Option<Exec>,
    /// An image an exec started, not hooked yet.
    unhooked: Option<Unhooked>,
}

/// An image an exec started, waiting for its libraries to be mapped.
#[derive(Clone, Debug)]
struct Unhooked {
    exec: Exec,
    /// The comm of the image before.
    was: String,
    /// The libraries its executable needs (`DT_NEEDED`).
    needed: Vec<String>,
}

impl Image {
    pub(super) fn new(pid: u32) -> Self {
        Image {
            exe_id: procfs::exe_id(pid),
            ..Default::default()
        }
    }
}

/// The `attached` line's figures: how many probes, in which libraries
/// (each once, in the order they were placed).
pub(super) fn summary(probes: &[AttachedProbe]) -> (usize, Vec<String>) {
    let mut libraries: Vec<String> = Vec::new();
    for p in probes {
        if !libraries.contains(&p.library) {
            libraries.push(p.library.clone());
        }
    }
    (probes.len(), libraries)
}

/// Whether every library in `needed` (`DT_NEEDED` names) is mapped: a
/// mapped file's name is the name asked for, or begins with it
/// (`libfoo.so.2` → `libfoo.so.2.0.1`).
fn all_mapped(needed: &[String], maps: &[Mapping]) -> bool {
    needed.iter().all(|n| {
        let n = crate::model::basename(n);
        maps.iter()
            .any(|m| m.is_file() && m.file_name().starts_with(n))
    })
}

/// Whether two lists of library identities name the same files.
fn same_files(a: &[String], b: &[String]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

impl Engine {
    /// `heapbpf run`: attaches to a command held before its `exec`, with the
    /// plan made from the command's file. Its exec is its start.
    pub fn attach_launched(&mut self, info: ProcessInfo, plan: &AttachPlan) -> Result<()> {
        let pid = info.pid;
        self.attach_plan(info, plan)?;
        if let Some(i) = self.index(pid) {
            self.targets[i].image.launching = true;
        }
        Ok(())
    }

    /// Handles the execs of targets since the last look. Runs before
    /// anything reads a target's maps or takes a snapshot, so that an image
    /// that exec'd still has its own modules for its last snapshot.
    pub(super) fn check_execs(&mut self) {
        let mut i = 0;
        while i < self.targets.len() {
            let mut kept = match self.exec_seen(i) {
                Some(exec) => self.on_exec(i, exec),
                None => true,
            };
            if kept && self.targets[i].image.unhooked.is_some() {
                kept = self.hook_when_ready(i);
            }
            if kept {
                i += 1;
            }
        }
    }

    fn exec_seen(&mut self, i: usize) -> Option<Exec> {
        let pid = self.targets[i].info.pid;
        if self.profiler.watches_exec() {
            return self.profiler.take_exec(pid);
        }
        let now = procfs::exe_id(pid)?;
        let image = &mut self.targets[i].image;
        let before = image.exe_id.replace(now);
        (before.is_some_and(|b| b != now)).then(|| Exec::noticed(ebpf::monotonic_ns()))
    }

    /// The old image's last snapshot, its data dropped, the new image
    /// named. Returns whether target `i` is still profiled.
    fn on_exec(&mut self, i: usize, exec: Exec) -> bool {
        let pid = self.targets[i].info.pid;
        if std::mem::take(&mut self.targets[i].image.launching) {
            // What ran before was heapbpf's own fork; the plan applied is
            // the command's already.
            self.profiler.forget_before_exec(pid, &exec);
            self.symbolizer.forget(pid);
            self.symbolizer.track(pid);
            self.profiler.refresh_unwind(pid);
            return true;
        }
        tracing::info!(
            pid,
            precise = exec.is_precise(),
            "exec: the last snapshot of the old image, then its successor"
        );
        self.targets[i].image.exec = Some(exec);
        self.snapshot(i, Trigger::Exec);
        self.targets[i].image.exec = None;
        self.profiler.forget_before_exec(pid, &exec);
        // The old image's retired stacks went into its last snapshot.
        self.targets[i].retired = RetiredStacks::default();
        self.symbolizer.forget(pid);
        if exec.count > 1 {
            tracing::warn!(
                pid,
                "exec'd {} times since heapbpf last looked: the images in between were not profiled",
                exec.count
            );
        }
        let info = match procfs::process_info(pid) {
            Ok(info) => info,
            Err(e) => {
                // Gone already: its successor was never looked at.
                tracing::info!(pid, error = %e, "the new image is gone");
                self.drop_target(i);
                return false;
            }
        };
        // From here on, snapshots are the new image's.
        self.symbolizer.track(pid);
        let (needed, _) = crate::elf::needed_libraries(Path::new(&format!("/proc/{pid}/exe")));
        let t = &mut self.targets[i];
        let was = std::mem::replace(&mut t.info, info).comm;
        t.image.unhooked = Some(Unhooked { exec, was, needed });
        true
    }

    /// Hooks the image target `i` exec'd once its libraries are mapped (or
    /// it waited long enough). Returns whether target `i` is still profiled.
    fn hook_when_ready(&mut self, i: usize) -> bool {
        let pid = self.targets[i].info.pid;
        let Some(u) = self.targets[i].image.unhooked.clone() else {
            return true;
        };
        let maps = match procfs::read_maps(pid) {
            Ok(maps) if !maps.is_empty() => maps,
            _ => {
                tracing::info!(pid, "the new image is gone before it was hooked");
                self.drop_target(i);
                return false;
            }
        };
        let waited = Duration::from_nanos(ebpf::monotonic_ns().saturating_sub(u.exec.at_ns));
        if !all_mapped(&u.needed, &maps) && waited < LOADER_WAIT {
            return true;
        }
        self.targets[i].image.unhooked = None;
        match self.hook_new_image(i, &maps, u.exec.leader_replaced) {
            Ok(()) => true,
            Err(e) => {
                let why = match e {
                    Error::NotTraceable { why, .. } => why,
                    e => e.to_string(),
                };
                say(&lines::exec_unhooked(
                    pid,
                    &u.was,
                    &self.targets[i].info.exe,
                    &why,
                ));
                self.drop_target(i);
                false
            }
        }
    }

    /// Finds and hooks the allocator of the image target `i` runs now, and
    /// starts its figures afresh.
    fn hook_new_image(&mut self, i: usize, maps: &[Mapping], rehook: bool) -> Result<()> {
        let info = self.targets[i].info.clone();
        let pid = info.pid;
        let plan = allocator::plan(&info, maps, &self.cfg.allocator)?;
        for line in allocator::describe(&plan) {
            tracing::info!(pid, "{line}");
        }
        let hooked: Vec<String> = plan.libraries().map(allocator::Library::identity).collect();
        let probes = if !rehook && same_files(&hooked, &self.targets[i].hooked) {
            // Probes are scoped to the process (bound to its leader
            // thread), not to its image: those on these files serve the
            // new image already.
            self.targets[i].probes.clone()
        } else {
            summary(&self.profiler.rehook(pid, &plan)?)
        };
        self.profiler.refresh_unwind(pid);
        let rss = procfs::rss_bytes(pid).unwrap_or(0);
        self.say_attached(&info, &probes);
        let t = &mut self.targets[i];
        t.hooked = hooked;
        t.probes = probes;
        t.attached_at = now_rfc3339();
        t.rss_bytes = rss;
        t.rss_step = self.cfg.rss_step.map(|s| StepTrigger::new(rss, s));
        t.heap_step = self.cfg.heap_step.map(|s| StepTrigger::new(0, s));
        t.oom_written = false;
        t.image = Image::new(pid);
        Ok(())
    }

    /// Lets target `i` go, writing nothing.
    fn drop_target(&mut self, i: usize) {
        let pid = self.targets[i].info.pid;
        self.profiler.detach(pid);
        self.symbolizer.forget(pid);
        self.targets.remove(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(library: &str) -> AttachedProbe {
        AttachedProbe {
            symbol: "malloc".into(),
            offset: 0,
            is_return: false,
            session: true,
            library: library.into(),
        }
    }

    #[test]
    fn the_attached_line_names_each_library_once() {
        let probes = [
            probe("/lib/libc.so.6"),
            probe("/x/libjemalloc.so.2"),
            probe("/lib/libc.so.6"),
        ];
        assert_eq!(
            summary(&probes),
            (
                3,
                vec![
                    "/lib/libc.so.6".to_string(),
                    "/x/libjemalloc.so.2".to_string()
                ]
            )
        );
    }

    #[test]
    fn an_exec_d_image_is_hooked_once_its_libraries_are_mapped() {
        let maps = procfs::parse_maps(
            "55d0c0a00000-55d0c0a01000 r-xp 00001000 fe:01 1234 /usr/local/bin/app\n\
             7f0000000000-7f0000028000 r--p 00000000 fe:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
             7f1000000000-7f1000028000 r--p 00000000 fe:01 98 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2.0.0\n\
             7f2000000000-7f2000001000 rw-p 00000000 00:00 0 \n",
        );
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(all_mapped(&s(&["libc.so.6", "libjemalloc.so.2"]), &maps));
        assert!(all_mapped(&[], &maps), "a static program needs nothing");
        assert!(!all_mapped(&s(&["libc.so.6", "libstdc++.so.6"]), &maps));
        assert!(all_mapped(
            &s(&["/usr/lib/x86_64-linux-gnu/libc.so.6"]),
            &maps
        ));
    }

    #[test]
    fn probes_stay_only_for_the_same_files() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(same_files(&s(&["a:", "b:"]), &s(&["b:", "a:"])));
        assert!(!same_files(&s(&["a:"]), &s(&["a:", "b:"])));
        assert!(!same_files(&s(&["a:", "b:"]), &s(&["a:"])));
        assert!(!same_files(
            &s(&["/usr/lib/x86_64-linux-musl/libc.so:"]),
            &s(&["/usr/lib/x86_64-linux-gnu/libc.so.6:"])
        ));
    }
}
