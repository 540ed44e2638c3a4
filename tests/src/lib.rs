//! Helpers of heapbpf's privileged integration tests: fixture programs that
//! print their pid and obey commands on stdin, the heapbpf binary with its
//! stderr lines, snapshot files. Tests panic with a message, never skip.
use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc::{channel, Receiver},
    time::{Duration, Instant},
};

pub use heapbpf::lines;
pub use serde_json::Value;

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The heapbpf binary under test (`HEAPBPF_BIN`, else the workspace's debug build).
pub fn heapbpf_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HEAPBPF_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/heapbpf");
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo xtask test does)",
        p.display()
    );
    p
}

pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("FIXTURE_DIR")).join(name)
}

/// Fails loudly when the tests cannot do what they are for.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the integration tests attach eBPF probes: run them as root (cargo xtask test)"
    );
}

fn lines_of(r: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(
    rx: &Receiver<String>,
    what: &str,
    pred: impl Fn(&str) -> bool,
    seen: &mut Vec<String>,
) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if pred(&line) {
                    return line;
                }
            }
            Err(_) => panic!(
                "timed out waiting for {what}; seen so far:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// A fixture program: prints `ready PID`, then answers each command with `done`.
pub struct Fixture {
    pub child: Child,
    stdin: ChildStdin,
    out: Receiver<String>,
    seen: Vec<String>,
    /// The pid as the host sees it.
    pub pid: u32,
}

impl Fixture {
    pub fn spawn(name: &str) -> Fixture {
        let mut cmd = Command::new(fixture_path(name));
        Fixture::from_command(&mut cmd, |child, _| child.id())
    }

    /// Spawns a fixture with another allocator preloaded.
    pub fn spawn_preloaded(name: &str, library: &str) -> Fixture {
        assert!(
            Path::new(library).exists(),
            "{library} is missing (cargo xtask bootstrap installs it)"
        );
        let mut cmd = Command::new(fixture_path(name));
        cmd.env("LD_PRELOAD", library);
        Fixture::from_command(&mut cmd, |child, _| child.id())
    }

    /// Spawns `cmd` (which runs a fixture, maybe in a namespace) and finds
    /// the fixture's host pid with `host_pid` once it printed `ready`.
    pub fn from_command(cmd: &mut Command, host_pid: impl FnOnce(&Child, u32) -> u32) -> Fixture {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let out = lines_of(child.stdout.take().unwrap());
        let mut seen = Vec::new();
        let ready = wait_line(
            &out,
            "fixture ready",
            |l| l.starts_with("ready "),
            &mut seen,
        );
        let own_pid: u32 = ready[6..].trim().parse().unwrap();
        let pid = host_pid(&child, own_pid);
        Fixture {
            child,
            stdin,
            out,
            seen,
            pid,
        }
    }

    /// Sends a command without waiting for its answer.
    pub fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    pub fn command(&mut self, cmd: &str) {
        self.ask(cmd);
    }

    /// Sends a command and returns what follows `done` in its answer.
    pub fn ask(&mut self, cmd: &str) -> String {
        self.send(cmd);
        let line = wait_line(
            &self.out,
            &format!("fixture to finish {cmd:?}"),
            |l| l == "done" || l.starts_with("done "),
            &mut self.seen,
        );
        line["done".len()..].trim().to_string()
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `heapbpf attach` (or `heapbpf run`).
pub struct Heapbpf {
    pub child: Child,
    err: Receiver<String>,
    pub stderr: Vec<String>,
    /// `run`: the launched command's stdin.
    stdin: Option<ChildStdin>,
}

impl Heapbpf {
    pub fn attach(pids: &[u32], out_dir: &Path, extra: &[&str]) -> Heapbpf {
        Heapbpf::attach_env(pids, out_dir, extra, &[])
    }

    /// [`Heapbpf::attach`] with environment variables set. Without one,
    /// `DEBUGINFOD_URLS` is removed: no test asks a server it did not start.
    pub fn attach_env(
        pids: &[u32],
        out_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Heapbpf {
        let mut cmd = Command::new(heapbpf_bin());
        cmd.env_remove("DEBUGINFOD_URLS").envs(env.iter().copied());
        cmd.arg("attach");
        for p in pids {
            cmd.arg(p.to_string());
        }
        cmd.arg("-o").arg(out_dir).args(extra);
        // Exact figures unless a test asks for sampling.
        if !extra.contains(&"--sample-bytes") {
            cmd.args(["--sample-bytes", "0"]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = lines_of(child.stderr.take().unwrap());
        let mut h = Heapbpf {
            child,
            err,
            stderr: Vec::new(),
            stdin: None,
        };
        for &pid in pids {
            h.wait_for(&format!("attached line of {pid}"), |l| {
                lines::parse_attached(l).is_some_and(|(p, _)| p == pid)
            });
        }
        h
    }

    /// `heapbpf attach PID...` as a user types it, without a single option
    /// (default sampling, default formats): it runs in `out_dir`, where the
    /// snapshots go by default; their paths are relative to it.
    pub fn attach_plain(pids: &[u32], out_dir: &Path) -> Heapbpf {
        let mut cmd = Command::new(heapbpf_bin());
        cmd.arg("attach");
        for p in pids {
            cmd.arg(p.to_string());
        }
        let mut child = cmd
            .current_dir(out_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = lines_of(child.stderr.take().unwrap());
        let mut h = Heapbpf {
            child,
            err,
            stderr: Vec::new(),
            stdin: None,
        };
        for &pid in pids {
            h.wait_attached(pid);
        }
        h
    }

    /// `heapbpf run [extra] -- command...`, exact unless `extra` says
    /// otherwise; the command's stdin is [`Heapbpf::send`]'s, its stdout is
    /// discarded.
    pub fn run(out_dir: &Path, extra: &[&str], command: &[&str]) -> Heapbpf {
        let mut cmd = Command::new(heapbpf_bin());
        cmd.arg("run").arg("-o").arg(out_dir).args(extra);
        if !extra.contains(&"--sample-bytes") {
            cmd.args(["--sample-bytes", "0"]);
        }
        cmd.arg("--").args(command);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = lines_of(child.stderr.take().unwrap());
        Heapbpf {
            stdin: child.stdin.take(),
            child,
            err,
            stderr: Vec::new(),
        }
    }

    /// `heapbpf agent [extra]` on a free loopback port with its snapshots in
    /// `data_dir`, looking for new processes every 200ms, exact unless
    /// `extra` says otherwise; returns once it listens, with the address
    /// its first line names.
    pub fn agent(data_dir: &Path, extra: &[&str]) -> (Heapbpf, std::net::SocketAddr) {
        let dir = data_dir.to_str().expect("a UTF-8 data directory");
        let mut args = vec!["--listen", "127.0.0.1:0", "--data-dir", dir];
        args.extend_from_slice(extra);
        if !extra.contains(&"--discover-every") {
            args.extend(["--discover-every", "200ms"]);
        }
        Heapbpf::agent_args(&args)
    }

    /// `heapbpf agent ARGS...` (exact unless `args` say otherwise), once
    /// its API listens: the agent and the address it listens on.
    pub fn agent_args(args: &[&str]) -> (Heapbpf, std::net::SocketAddr) {
        Heapbpf::agent_args_env(args, &[])
    }

    /// [`Heapbpf::agent`] with environment variables set (`Some`) or
    /// removed (`None`).
    pub fn agent_env(
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, Option<&str>)],
    ) -> (Heapbpf, std::net::SocketAddr) {
        let dir = data_dir.to_str().expect("a UTF-8 data directory");
        let mut args = vec!["--listen", "127.0.0.1:0", "--data-dir", dir];
        args.extend_from_slice(extra);
        if !extra.contains(&"--discover-every") {
            args.extend(["--discover-every", "200ms"]);
        }
        Heapbpf::agent_args_env(&args, env)
    }

    fn agent_args_env(
        args: &[&str],
        env: &[(&str, Option<&str>)],
    ) -> (Heapbpf, std::net::SocketAddr) {
        let mut cmd = Command::new(heapbpf_bin());
        cmd.arg("agent").args(args);
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        if !args.contains(&"--sample-bytes") {
            cmd.args(["--sample-bytes", "0"]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = lines_of(child.stderr.take().unwrap());
        let mut h = Heapbpf {
            child,
            err,
            stderr: Vec::new(),
            stdin: None,
        };
        let line = h.wait_for("the agent's listening line", |l| {
            lines::parse_agent_listening(l).is_some()
        });
        let addr = lines::parse_agent_listening(&line).unwrap();
        (h, addr)
    }

    /// Waits for the `attached` line of `pid` and returns it.
    pub fn wait_attached(&mut self, pid: u32) -> String {
        self.wait_for(&format!("attached line of {pid}"), |l| {
            lines::parse_attached(l).is_some_and(|(p, _)| p == pid)
        })
    }

    /// Collects stderr for `how_long` (heapbpf keeps running).
    pub fn gather(&mut self, how_long: Duration) {
        let deadline = Instant::now() + how_long;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.err.recv_timeout(left) {
                Ok(l) => self.stderr.push(l),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(left);
                    break;
                }
            }
        }
    }

    /// How many `attached` lines name `pid` in what stderr said so far.
    pub fn attached_count(&self, pid: u32) -> usize {
        self.stderr
            .iter()
            .filter(|l| lines::parse_attached(l).is_some_and(|(p, _)| p == pid))
            .count()
    }

    /// `run`: a line to the launched command.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("heapbpf run's stdin");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        wait_line(&self.err, what, pred, &mut self.stderr)
    }

    /// Waits for the next `snapshot TRIGGER pid=PID` line and returns its paths.
    pub fn wait_snapshot(&mut self, trigger: &str, pid: u32) -> Vec<PathBuf> {
        let line = self.wait_for(&format!("{trigger} snapshot of {pid}"), |l| {
            lines::parse_snapshot(l).is_some_and(|s| s.trigger == trigger && s.pid == pid)
        });
        lines::parse_snapshot(&line)
            .unwrap_or_else(|| panic!("unreadable snapshot line {line:?}"))
            .paths
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Drain what is left of stderr.
                while let Ok(l) = self.err.recv_timeout(Duration::from_millis(200)) {
                    self.stderr.push(l);
                }
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "heapbpf did not exit; stderr:\n{}",
                self.stderr.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Heapbpf {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first `snapshot TRIGGER` line in `stderr`, read as heapbpf writes it.
pub fn snapshot_line(stderr: &str, trigger: &str) -> lines::SnapshotLine {
    stderr
        .lines()
        .filter_map(lines::parse_snapshot)
        .find(|s| s.trigger == trigger)
        .unwrap_or_else(|| panic!("no {trigger} snapshot line in:\n{stderr}"))
}

/// How many snapshot lines of `trigger` (any, for `None`) are in `stderr`.
pub fn count_snapshot_lines<'a>(
    stderr: impl IntoIterator<Item = &'a String>,
    trigger: Option<&str>,
) -> usize {
    stderr
        .into_iter()
        .filter_map(|l| lines::parse_snapshot(l))
        .filter(|s| trigger.is_none_or(|t| s.trigger == t))
        .count()
}

/// Runs heapbpf to completion: (exit code, stdout, stderr).
pub fn run_heapbpf(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(heapbpf_bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "heapbpf-test-{tag}-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        let p = PathBuf::from(p.to_string_lossy().replace(['{', '}', ' ', ':', ','], ""));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Per-site figures of a snapshot: sums over the stacks whose first frame
/// is `function` (with or without a C++ parameter list).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Site {
    pub live_bytes: u64,
    pub live_allocations: u64,
    pub allocated_bytes: u64,
    pub allocations: u64,
}

pub fn site(snapshot: &Value, function: &str) -> Site {
    let mut s = Site::default();
    for st in snapshot["stacks"].as_array().expect("stacks") {
        let f = st["frames"][0]["function"].as_str().unwrap_or("");
        // A demangled C++ name carries its parameter list.
        if f == function
            || f.strip_prefix(function)
                .is_some_and(|rest| rest.starts_with('('))
        {
            s.live_bytes += st["live_bytes"].as_u64().unwrap();
            s.live_allocations += st["live_allocations"].as_u64().unwrap();
            s.allocated_bytes += st["allocated_bytes"].as_u64().unwrap();
            s.allocations += st["allocations"].as_u64().unwrap();
        }
    }
    s
}

/// Function names of a stack's frames, innermost first, inlined ones left out.
pub fn functions(stack: &Value) -> Vec<String> {
    stack["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .filter(|f| f["inlined"] == false)
        .map(|f| f["function"].as_str().unwrap_or("?").to_string())
        .collect()
}
