//! `heapbpf run`: starting a command stopped, so probes are live before its
//! first instruction, and holding it at exit until its last snapshot is
//! written (its memory map is gone once it has exited).
//!
//! A watcher thread forks the command, which asks to be traced
//! (`PTRACE_TRACEME`) and stops itself before `exec`. The thread, its tracer,
//! waits for the session to attach, then lets it run. ptrace serves two
//! purposes. `PTRACE_EVENT_EXIT`: a stop at the start of the command's exit,
//! with its memory map intact, held until the session has written the final
//! snapshot. And one stop at the program's entry point after each `exec` (a
//! breakpoint at `AT_ENTRY`, removed at once), when the dynamic linker has
//! mapped its libraries: the session reads the new memory map there, so the
//! stack walk knows the program's modules before `main` runs — and, when
//! the command execs another program, hooks that program's allocator before
//! its `main`. Every other stop is a signal for the command, passed on.
//!
//! Only the leader thread is traced. When another thread execs, the leader
//! stops at its exit first: that is not held (the exec waits for it), and
//! the process, now untraced, goes on as an attached one would.
use std::{
    ffi::CString,
    path::{Path, PathBuf},
    sync::mpsc::{channel, Receiver, Sender},
};

use crate::error::{Error, Result};

/// What the watcher thread reports.
#[derive(Debug)]
pub enum LaunchEvent {
    /// The command reached its entry point after `exec` and is held; answer
    /// on the ack channel to let it go.
    AtEntry,
    /// The command is exiting and held; answer on the ack channel to let it go.
    Exiting,
    /// The command is gone, with the exit code heapbpf should return.
    Exited(i32),
}

pub struct Launched {
    pub pid: u32,
    pub events: Receiver<LaunchEvent>,
    pub ack: Sender<()>,
    go: Sender<()>,
}

impl Launched {
    /// Lets the command run (after its probes are attached).
    pub fn go(&self) {
        let _ = self.go.send(());
    }
}

/// The file `exec` runs for `program`: a path as given (canonical), or the
/// first match in `PATH` for a bare name.
pub fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = Path::new(program);
        return p
            .is_file()
            .then(|| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// [`find_program`], or `program` itself when nothing is found.
pub fn resolve_program(program: &str) -> PathBuf {
    find_program(program).unwrap_or_else(|| PathBuf::from(program))
}

/// Forks `command`, stopped before `exec`, under a watcher thread.
pub fn start(command: &[String]) -> Result<Launched> {
    let args: Vec<CString> = command
        .iter()
        .map(|a| {
            CString::new(a.as_bytes())
                .map_err(|_| Error::BadInput(format!("argument {a:?} contains a NUL byte")))
        })
        .collect::<Result<_>>()?;
    let Some(first) = command.first() else {
        return Err(Error::BadInput(
            "heapbpf run needs a command after --".into(),
        ));
    };
    if find_program(first).is_none() {
        return Err(Error::BadInput(format!("{first}: command not found")));
    }
    let (events_tx, events) = channel();
    let (ack, ack_rx) = channel::<()>();
    let (go, go_rx) = channel::<()>();
    let (pid_tx, pid_rx) = channel::<std::result::Result<u32, String>>();
    std::thread::spawn(move || {
        let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        // SAFETY: the child calls only async-signal-safe functions before
        // exec; this thread, its parent, becomes its tracer.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let _ = pid_tx.send(Err(format!(
                "cannot fork: {}",
                std::io::Error::last_os_error()
            )));
            return;
        }
        if pid == 0 {
            // SAFETY: async-signal-safe calls only.
            unsafe {
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0usize, 0usize);
                libc::raise(libc::SIGSTOP);
                libc::execvp(argv[0], argv.as_ptr());
                libc::_exit(127);
            }
        }
        let mut status = 0;
        // SAFETY: our own child, stopping itself.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r != pid || !libc::WIFSTOPPED(status) {
            let _ = pid_tx.send(Err("the command did not start".into()));
            return;
        }
        let opts = (libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_TRACEEXEC | libc::PTRACE_O_EXITKILL)
            as usize;
        // SAFETY: our stopped tracee.
        unsafe { libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0usize, opts) };
        let _ = pid_tx.send(Ok(pid as u32));
        if go_rx.recv().is_err() {
            // The session failed: nothing may be left behind.
            // SAFETY: our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: reaping our own child into a live status variable.
            unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
            return;
        }
        // Resume, dropping the SIGSTOP it stopped itself with.
        // SAFETY: our stopped tracee.
        unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0usize, 0usize) };
        let mut breakpoint: Option<Breakpoint> = None;
        loop {
            // SAFETY: waiting for our own tracee.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
            if r < 0 {
                let _ = events_tx.send(LaunchEvent::Exited(1));
                return;
            }
            if libc::WIFEXITED(status) {
                let _ = events_tx.send(LaunchEvent::Exited(libc::WEXITSTATUS(status)));
                return;
            }
            if libc::WIFSIGNALED(status) {
                let _ = events_tx.send(LaunchEvent::Exited(128 + libc::WTERMSIG(status)));
                return;
            }
            if !libc::WIFSTOPPED(status) {
                continue;
            }
            let event = (status >> 16) & 0xff;
            let pass = match event {
                libc::PTRACE_EVENT_EXIT if thread_in_exec(pid) => {
                    // Not an exit: another thread execs, and the leader
                    // goes first. That thread, untraced, carries on as the
                    // process (the session sees the exec and handles it
                    // as for an attached process, and its exit as heapbpf
                    // reaps it); holding the leader would only hold the
                    // exec.
                    0
                }
                libc::PTRACE_EVENT_EXIT => {
                    let _ = events_tx.send(LaunchEvent::Exiting);
                    let _ = ack_rx.recv();
                    0
                }
                libc::PTRACE_EVENT_EXEC => {
                    // Each exec (the command's own, and any later one)
                    // holds the new image at its entry point: a breakpoint
                    // of an image the exec replaced is gone with it.
                    breakpoint = set_entry_breakpoint(pid);
                    0
                }
                0 if libc::WSTOPSIG(status) == libc::SIGTRAP
                    && breakpoint.is_some_and(|b| at_breakpoint(pid, b)) =>
                {
                    if let Some(b) = breakpoint.take() {
                        clear_entry_breakpoint(pid, b);
                    }
                    let _ = events_tx.send(LaunchEvent::AtEntry);
                    let _ = ack_rx.recv();
                    0
                }
                _ => libc::WSTOPSIG(status),
            };
            // SAFETY: our stopped tracee.
            unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0usize, pass as usize) };
        }
    });
    match pid_rx.recv() {
        Ok(Ok(pid)) => Ok(Launched {
            pid,
            events,
            ack,
            go,
        }),
        Ok(Err(e)) => Err(Error::Runtime(e)),
        Err(_) => Err(Error::Runtime("the command watcher died".into())),
    }
}

/// Whether a thread of `pid` other than the leader is inside `execve`: the
/// leader's exit stop is then the exec taking the process over, not its
/// end. A thread on a CPU shows no system call; asked again a few times.
fn thread_in_exec(pid: i32) -> bool {
    for _ in 0..20 {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        let mut running = false;
        for task in tasks.flatten() {
            if task.file_name().to_str() == Some(&pid.to_string()) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(task.path().join("syscall")) else {
                continue;
            };
            match text.split_whitespace().next() {
                Some("running") => running = true,
                Some(nr) => {
                    let nr: libc::c_long = nr.parse().unwrap_or(-1);
                    if nr == libc::SYS_execve || nr == libc::SYS_execveat {
                        return true;
                    }
                }
                None => {}
            }
        }
        if !running {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}

/// A breakpoint heapbpf placed: its address and the word it replaced.
#[derive(Clone, Copy, Debug)]
struct Breakpoint {
    addr: u64,
    word: libc::c_long,
}

/// `AT_ENTRY` of a process: where the program starts once the dynamic
/// linker is done.
fn entry_point(pid: i32) -> Option<u64> {
    let auxv = std::fs::read(format!("/proc/{pid}/auxv")).ok()?;
    auxv.chunks_exact(16).find_map(|pair| {
        let key = u64::from_ne_bytes(pair[..8].try_into().ok()?);
        let value = u64::from_ne_bytes(pair[8..].try_into().ok()?);
        (key == libc::AT_ENTRY).then_some(value)
    })
}

/// Writes `int3` at the entry point of our stopped tracee.
fn set_entry_breakpoint(pid: i32) -> Option<Breakpoint> {
    let addr = entry_point(pid)?;
    // SAFETY: our stopped tracee; errno tells a failed peek from data.
    unsafe {
        *libc::__errno_location() = 0;
        let word = libc::ptrace(libc::PTRACE_PEEKTEXT, pid, addr as usize, 0usize);
        if *libc::__errno_location() != 0 {
            return None;
        }
        let patched = (word & !0xff) | 0xcc;
        if libc::ptrace(libc::PTRACE_POKETEXT, pid, addr as usize, patched as usize) != 0 {
            return None;
        }
        Some(Breakpoint { addr, word })
    }
}

/// Whether our tracee stopped on our breakpoint (it has executed the int3).
fn at_breakpoint(pid: i32, b: Breakpoint) -> bool {
    // SAFETY: our stopped tracee; `regs` is plain data.
    unsafe {
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        libc::ptrace(
            libc::PTRACE_GETREGS,
            pid,
            0usize,
            &mut regs as *mut _ as usize,
        ) == 0
            && regs.rip == b.addr + 1
    }
}

/// Puts the original instruction back and resumes at it.
fn clear_entry_breakpoint(pid: i32, b: Breakpoint) {
    // SAFETY: our stopped tracee; `regs` is plain data.
    unsafe {
        libc::ptrace(libc::PTRACE_POKETEXT, pid, b.addr as usize, b.word as usize);
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        if libc::ptrace(
            libc::PTRACE_GETREGS,
            pid,
            0usize,
            &mut regs as *mut _ as usize,
        ) == 0
        {
            regs.rip = b.addr;
            libc::ptrace(
                libc::PTRACE_SETREGS,
                pid,
                0usize,
                &regs as *const _ as usize,
            );
        }
    }
}
