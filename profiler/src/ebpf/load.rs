//! Loading: what heapbpf needs from the kernel and its credentials, the
//! object's programs and maps, sampling settings, the OOM and exec
//! tracepoints, and the stack walk's program slots.
use std::{collections::HashMap, path::Path};

use aya::{
    maps::HashMap as BpfHashMap,
    programs::{RawTracePoint, TracePoint, UProbe},
    Ebpf, EbpfLoader,
};

use heapbpf_common::names::maps;

use super::{
    map_fd, programs, sys, uprobe_session::Sessions, Exec, LoadOptions, Profiler, PROGRAM_OBJECT,
    UNWIND_ROWS,
};
use crate::{
    error::{Error, Result},
    procfs, unwind,
};

/// Checks what heapbpf needs from the kernel and from its own credentials,
/// so that failures name their cause.
pub fn preflight() -> Result<()> {
    if PROGRAM_OBJECT.is_empty() {
        return Err(Error::Unsupported(
            "this heapbpf was built without its eBPF programs (bpf-linker was missing): \
             run `cargo xtask bootstrap`, then build heapbpf again"
                .into(),
        ));
    }
    let status = procfs::read_status("self").unwrap_or_default();
    let cap_eff = procfs::status_field(&status, "CapEff")
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .unwrap_or(0);
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    const CAP_PERFMON: u64 = 1 << 38;
    const CAP_BPF: u64 = 1 << 39;
    let has = |c: u64| cap_eff & c == c;
    if !(has(CAP_SYS_ADMIN) || has(CAP_BPF | CAP_PERFMON)) {
        return Err(Error::Privileges(format!(
            "effective capabilities are {cap_eff:#x} (uid {})",
            // SAFETY: getuid has no preconditions.
            unsafe { libc::getuid() }
        )));
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        return Err(Error::Unsupported(
            "this kernel has no uprobe support (/sys/bus/event_source/devices/uprobe is missing): \
             heapbpf needs a kernel built with CONFIG_UPROBE_EVENTS"
                .into(),
        ));
    }
    // This kernel charges BPF memory to the cgroup; older ones need a high
    // memlock limit. Raising it may be refused (no CAP_SYS_RESOURCE): fine.
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_MEMLOCK; continuing");
    }
    Ok(())
}

/// The error of a failed load or attach, by what the kernel said; `text`
/// is plain words ([`error_chain`]), never a Debug dump.
pub(super) fn load_error(text: impl std::fmt::Display) -> Error {
    let text = text.to_string();
    let lower = text.to_lowercase();
    if lower.contains("operation not permitted") || lower.contains("permission denied") {
        Error::Privileges(text)
    } else if lower.contains("function not implemented") {
        Error::Unsupported(format!("this kernel has no BPF support: {text}"))
    } else {
        Error::runtime("cannot load heapbpf's eBPF programs", text)
    }
}

/// An error and its causes on one line (`map error: failed to create map
/// `ALLOCS`: Argument list too long (os error 7)`): aya puts the kernel's
/// answer in the source. A verifier log (many lines) is left to `-vv`.
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    match text.split_once('\n') {
        Some((first, _)) => {
            tracing::debug!("{text}");
            format!("{} (heapbpf -vv shows the rest)", first.trim_end())
        }
        None => text,
    }
}

/// A map the kernel would not create: which, why, and the flag that sizes
/// it when there is one.
fn map_create_error(e: aya::EbpfError, opts: &LoadOptions) -> Error {
    use aya::maps::MapError;
    match &e {
        aya::EbpfError::MapError(MapError::CreateError { name, io_error }) => {
            // A map too large for the kernel names the flag that sizes it; a
            // refusal for want of privileges does not.
            let denied = io_error.kind() == std::io::ErrorKind::PermissionDenied;
            let flag = match name.as_str() {
                _ if denied => String::new(),
                maps::ALLOCS => format!(
                    " (the live-block map, --max-live-blocks {}: try fewer)",
                    opts.max_live_blocks
                ),
                maps::STACKS | maps::STACK_STATS => format!(
                    " (a stack map, --max-stacks {}: try fewer)",
                    opts.max_stacks
                ),
                _ => String::new(),
            };
            load_error(format!(
                "the kernel would not create heapbpf's eBPF map {name}{flag}: {io_error}"
            ))
        }
        _ => load_error(error_chain(&e)),
    }
}

/// Puts the stack-walk programs in the slots the return program and the
/// walk tail-call.
fn install_unwinder(ebpf: &mut Ebpf) -> Result<()> {
    let mut fds = Vec::new();
    for name in [programs::UNWIND_STEP, programs::UNWIND_FINISH] {
        let prog: &UProbe = ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| Error::Runtime(format!("eBPF object has no program {name}")))?;
        let fd = prog
            .fd()
            .map_err(|e| Error::runtime(format!("program {name}"), e))?
            .try_clone()
            .map_err(|e| Error::runtime(format!("program {name}"), e))?;
        fds.push(fd);
    }
    let map = ebpf
        .map_mut(maps::UNWIND_PROGS)
        .ok_or_else(|| Error::Runtime("no UNWIND_PROGS map".into()))?;
    let mut progs = aya::maps::ProgramArray::try_from(map)
        .map_err(|e| Error::runtime("UNWIND_PROGS map", e))?;
    for (slot, fd) in fds.iter().enumerate() {
        progs
            .set(slot as u32, fd, 0)
            .map_err(|e| Error::runtime("cannot install the stack walk", e))?;
    }
    Ok(())
}

impl Profiler {
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let unwind_rows = if opts.unwind == unwind::Mode::Fp {
            1
        } else {
            UNWIND_ROWS
        };
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::ALLOCS, opts.max_live_blocks)
            .map_max_entries(maps::STACKS, opts.max_stacks)
            .map_max_entries(maps::STACK_STATS, opts.max_stacks.saturating_mul(2))
            .map_max_entries(maps::UNWIND_ROWS, unwind_rows)
            .load(PROGRAM_OBJECT)
            .map_err(|e| map_create_error(e, opts))?;
        for name in programs::uprobes() {
            let prog: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| Error::Runtime(format!("eBPF object has no program {name}")))?
                .try_into()
                .map_err(|e| Error::runtime(format!("program {name}"), e))?;
            prog.load().map_err(|e| load_error(error_chain(&e)))?;
            if let Ok(info) = prog.info() {
                tracing::debug!(
                    program = name,
                    verified_instructions = info.verified_instruction_count(),
                    "program loaded"
                );
            }
        }
        install_unwinder(&mut ebpf)?;
        let sessions = if opts.sessions {
            match Sessions::load(
                PROGRAM_OBJECT,
                &ebpf,
                &programs::sessions(opts.floor.is_some()),
                maps::UNWIND_PROGS,
                [programs::UNWIND_STEP, programs::UNWIND_FINISH],
            ) {
                Ok(s) => Some(s),
                Err(why) => {
                    tracing::info!(
                        "uprobe sessions unavailable ({why}); using uprobe + uretprobe pairs"
                    );
                    None
                }
            }
        } else {
            None
        };
        let mut profiler = Profiler {
            floor: opts.floor,
            sample_bytes: opts.sample_bytes,
            ebpf,
            targets: HashMap::new(),
            stacks: Default::default(),
            unwind: unwind::Tables::new(opts.unwind, unwind_rows),
            sessions,
            written_modules: HashMap::new(),
            walk_epoch: 0,
            max_stacks: opts.max_stacks,
            retire: super::retire::RetireState::new(),
            exec_watched: false,
            run_stats_fd: None,
            count_hits: false,
        };
        profiler.configure_sampling()?;
        profiler.watch_oom();
        if opts.exec_tracepoint {
            profiler.watch_exec();
        } else {
            tracing::info!("exec tracepoint not used: an exec is noticed when the target's executable changes, coarsely");
        }
        Ok(profiler)
    }

    /// Writes the sampling rate and the table of `1 - exp(-x)` the programs
    /// read (no floating point in BPF).
    fn configure_sampling(&mut self) -> Result<()> {
        use heapbpf_common::names::maps;
        use heapbpf_common::{config, SAMPLE_TABLE_LEN, SAMPLE_TABLE_STEPS};
        let err = |e: aya::maps::MapError| Error::runtime("cannot configure sampling", e);
        let sample_bytes = self.sample_bytes;
        let map = self.map_mut(maps::CONFIG)?;
        let mut cfg = aya::maps::Array::<_, u64>::try_from(map).map_err(err)?;
        cfg.set(config::SAMPLE_BYTES, sample_bytes, 0)
            .map_err(err)?;
        // In a pid namespace of its own (a pod without hostPID), heapbpf
        // numbers processes as that namespace does: the programs must too.
        if let Some((dev, ino)) = own_pid_namespace() {
            cfg.set(config::PIDNS_DEV, dev, 0).map_err(err)?;
            cfg.set(config::PIDNS_INO, ino, 0).map_err(err)?;
        }
        let map = self.map_mut(maps::SAMPLE_P)?;
        let mut table = aya::maps::Array::<_, u32>::try_from(map).map_err(err)?;
        for i in 0..SAMPLE_TABLE_LEN {
            let x = i as f64 / SAMPLE_TABLE_STEPS as f64;
            let p = -(-x).exp_m1();
            let q = (p * 4294967296.0).round().min(u32::MAX as f64) as u32;
            table.set(i, q, 0).map_err(err)?;
        }
        Ok(())
    }

    /// Hooks `oom:mark_victim`; without it (old kernel, no tracefs) OOM kills
    /// are only seen as exits.
    fn watch_oom(&mut self) {
        let result = (|| -> Result<(), String> {
            let prog: &mut TracePoint = self
                .ebpf
                .program_mut(programs::OOM_MARK_VICTIM)
                .ok_or("no oom_mark_victim program")?
                .try_into()
                .map_err(|e| format!("{e}"))?;
            prog.load().map_err(|e| format!("{e}"))?;
            prog.attach("oom", "mark_victim")
                .map_err(|e| format!("{e}"))?;
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!(
                "cannot watch the OOM killer (oom:mark_victim): {e}; OOM kills will show as exits"
            );
        }
    }

    /// Takes the OOM killer's pick of `pid`, if it picked it since the last call.
    pub fn take_oom_victim(&mut self, pid: u32) -> bool {
        let Ok(map) = self.map_mut(maps::OOM_VICTIMS) else {
            return false;
        };
        let Ok(mut victims) = BpfHashMap::<_, u32, u64>::try_from(map) else {
            return false;
        };
        if victims.get(&pid, 0).is_ok() {
            let _ = victims.remove(&pid);
            true
        } else {
            false
        }
    }

    /// Hooks `sched_process_exec` (a raw tracepoint: no tracefs needed);
    /// without it, user space notices an exec by the target's executable
    /// changing, coarsely.
    fn watch_exec(&mut self) {
        let result = (|| -> Result<(), String> {
            let prog: &mut RawTracePoint = self
                .ebpf
                .program_mut(programs::SCHED_PROCESS_EXEC)
                .ok_or("no sched_process_exec program")?
                .try_into()
                .map_err(|e| format!("{e}"))?;
            prog.load().map_err(|e| format!("{e}"))?;
            prog.attach("sched_process_exec")
                .map_err(|e| format!("{e}"))?;
            Ok(())
        })();
        match result {
            Ok(()) => self.exec_watched = true,
            Err(e) => tracing::warn!(
                "cannot watch exec (sched_process_exec): {e}; an exec is noticed when the \
                 target's executable changes, coarsely: its old image's last snapshot may hold \
                 the new image's first blocks"
            ),
        }
    }

    /// Whether execs are seen by the kernel as they happen
    /// ([`Profiler::take_exec`]); else the caller notices them itself.
    pub fn watches_exec(&self) -> bool {
        self.exec_watched
    }

    /// Takes the execs of `pid` since the last call, if any.
    pub fn take_exec(&mut self, pid: u32) -> Option<Exec> {
        let fd = self.map(maps::EXECS).and_then(map_fd).ok()?;
        match sys::take::<u32, heapbpf_common::ExecEvent>(fd, &pid) {
            Ok(Some(e)) => Some(Exec {
                at_ns: e.first_ns,
                last_ns: e.last_ns,
                count: e.count,
                leader_replaced: e.leader_replaced != 0,
                before: Some(e.before),
            }),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(pid, error = %e, "cannot read the EXECS map");
                None
            }
        }
    }
}

/// The kernel's initial pid namespace's inode (`PROC_PID_INIT_INO`).
const INIT_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// The device and inode of heapbpf's pid namespace when it is not the
/// initial one.
fn own_pid_namespace() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata("/proc/self/ns/pid").ok()?;
    (meta.ino() != INIT_PID_NS_INO).then(|| (meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_creation_failures_are_plain_words() {
        let e = aya::EbpfError::MapError(aya::maps::MapError::CreateError {
            name: "ALLOCS".into(),
            io_error: std::io::Error::from_raw_os_error(libc::E2BIG),
        });
        let chain = error_chain(&e);
        assert_eq!(
            chain,
            "map error: failed to create map `ALLOCS`: Argument list too long (os error 7)"
        );
        let opts = LoadOptions {
            max_live_blocks: 1 << 30,
            ..Default::default()
        };
        let msg = map_create_error(e, &opts).to_string();
        assert_eq!(
            msg,
            "cannot load heapbpf's eBPF programs: the kernel would not create heapbpf's eBPF map ALLOCS \
             (the live-block map, --max-live-blocks 1073741824: try fewer): Argument list too long (os error 7)"
        );
        assert!(
            !msg.contains("CreateError") && !msg.contains("Os {"),
            "{msg}"
        );
        // Permission problems stay privilege errors.
        let e = aya::EbpfError::MapError(aya::maps::MapError::CreateError {
            name: "STACKS".into(),
            io_error: std::io::Error::from_raw_os_error(libc::EPERM),
        });
        let e = map_create_error(e, &LoadOptions::default());
        assert!(matches!(e, Error::Privileges(_)), "{e}");
        let big = aya::EbpfError::MapError(aya::maps::MapError::CreateError {
            name: "STACKS".into(),
            io_error: std::io::Error::from_raw_os_error(libc::E2BIG),
        });
        assert!(map_create_error(big, &LoadOptions::default())
            .to_string()
            .contains("--max-stacks 65536: try fewer"));
        assert!(
            e.to_string()
                .contains("map STACKS: Operation not permitted"),
            "{e}"
        );
    }
}
