//! Issue 13, "Text a target controls" and "Misleading messages": what a
//! target (or a crafted snapshot) puts in names, paths and symbols reaches no
//! terminal raw and splits no line; tracing's lines are plain off a
//! terminal; each message says what actually happened. And
//! `--max-live-blocks` is checked. Each test here failed against heapbpf at
//! eb5edfa (`HEAPBPF_BIN=/tmp/base/heapbpf`), but the cgo one, which guards
//! what worked.
use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc::{channel, Receiver},
    time::{Duration, Instant},
};

use heapbpf_integration_tests::*;

/// The name `hostile` gives itself on `rename-escapes`, and how heapbpf
/// shows it.
const ESCAPES: &str = "\x1b]0;X\x07\nY\u{9b}";
const ESCAPES_SHOWN: &str = "\\x1b]0;X\\x07\\nY\\u{9b}";

/// A control character other than the line ends of `text`.
fn controls(text: &str) -> Vec<char> {
    text.chars()
        .filter(|c| c.is_control() && *c != '\n')
        .collect()
}

fn assert_plain(what: &str, text: &str) {
    assert!(
        controls(text).is_empty(),
        "{what} holds control characters {:?}:\n{text:?}",
        controls(text)
    );
}

/// `heapbpf attach` with its stderr as it comes, line by line: the common
/// helper waits for a well-formed `attached` line, which is what these tests
/// check.
struct Raw {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Raw {
    fn attach(pid: u32, dir: &Path, extra: &[&str]) -> Raw {
        let mut child = Command::new(heapbpf_bin())
            .arg("attach")
            .arg(pid.to_string())
            .arg("-o")
            .arg(dir)
            .args(["--sample-bytes", "0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            // Lines as bytes: what heapbpf wrote, not what UTF-8 allows.
            for line in BufReader::new(err).split(b'\n') {
                let Ok(line) = line else { break };
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        Raw {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn wait(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no {what}; heapbpf wrote:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// SIGINT, then everything it wrote until it exited, and its code.
    fn stop(mut self) -> (i32, Vec<String>) {
        self.signal(libc::SIGINT);
        let deadline = Instant::now() + TIMEOUT;
        let code = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "heapbpf did not stop");
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(300)) {
            self.seen.push(l);
        }
        (code, std::mem::take(&mut self.seen))
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn snapshot_paths(stderr: &[String], trigger: &str) -> Vec<std::path::PathBuf> {
    stderr
        .iter()
        .filter_map(|l| lines::parse_snapshot(l))
        .find(|s| s.trigger == trigger)
        .unwrap_or_else(|| panic!("no {trigger} snapshot in:\n{}", stderr.join("\n")))
        .paths
}

#[test]
fn a_target_named_with_escapes_and_a_newline_stays_on_one_line() {
    require_root();
    let mut fx = Fixture::spawn("hostile");
    fx.command("rename-escapes");
    let dir = TempDir::new("escapes");
    let mut h = Raw::attach(fx.pid, dir.path(), &[]);
    let line = h.wait("attached line", |l| {
        l.contains(&format!("attached to {}", fx.pid))
    });
    assert_plain("the attached line", &line);
    assert!(
        line.contains(&format!("attached to {} ({ESCAPES_SHOWN}): ", fx.pid))
            && line.contains(" probes in ")
            && line.contains("; heapbpf pid "),
        "one whole line, the escapes visible: {line:?}"
    );
    assert_eq!(
        lines::parse_attached(&line),
        Some((fx.pid, ESCAPES_SHOWN)),
        "{line:?}"
    );
    fx.command("alloc");
    let (code, stderr) = h.stop();
    assert_eq!(code, 0, "{stderr:?}");
    for l in &stderr {
        assert_plain("a stderr line", l);
    }
    // The data file keeps the name as the process gave it.
    let json = &snapshot_paths(&stderr, "stop")[0];
    assert_eq!(read_json(json)["comm"], ESCAPES);
    // `report` prints it for people: escaped.
    let (code, out, err) = run_heapbpf(&["report", json.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_plain("report", &out);
    assert!(
        out.contains(&format!("({ESCAPES_SHOWN})")),
        "report shows the name escaped:\n{out}"
    );
}

#[test]
fn a_target_named_with_bytes_that_are_not_utf8_is_still_profiled() {
    require_root();
    let mut fx = Fixture::spawn("hostile");
    fx.command("rename-invalid");
    let dir = TempDir::new("invalid");
    let mut h = Raw::attach(fx.pid, dir.path(), &[]);
    let line = h.wait("attached line", |l| l.starts_with("heapbpf: "));
    assert!(
        line.contains(&format!("attached to {} (bad\u{fffd}name): ", fx.pid)),
        "{line:?}"
    );
    let (code, stderr) = h.stop();
    assert_eq!(code, 0, "{stderr:?}");
    let json = &snapshot_paths(&stderr, "stop")[0];
    assert_eq!(read_json(json)["comm"], "bad\u{fffd}name");
}

/// A snapshot with `live_bytes` on one stack, whose strings are `comm`,
/// `exe` and the function `function` (JSON-escaped by serde).
fn crafted(comm: &str, exe: &str, function: &str, live: u64) -> Value {
    serde_json::json!({
        "format": "heapbpf-snapshot", "version": 1,
        "pid": 42, "comm": comm, "exe": exe,
        "taken_at": "2026-11-24T19:00:00Z\u{1b}[2J", "attached_at": "2026-11-24T18:59:00Z",
        "trigger": "signal", "sample_bytes": 0,
        "totals": {
            "live_bytes": live, "live_allocations": 1,
            "allocated_bytes": live, "allocations": 1, "frees": 0,
            "rss_bytes": 0, "dropped_events": 0
        },
        "stacks": [{
            "live_bytes": live, "live_allocations": 1,
            "allocated_bytes": live, "allocations": 1, "oldest_age_ms": 5,
            "frames": [
                {"address": "0x401136", "function": function, "file": "/src/a\u{1b}]8;;x\u{7}.c",
                 "line": 3, "module": "/tmp/m\nod", "inlined": false},
                {"address": "0x401200", "function": null, "file": null, "line": null,
                 "module": "/tmp/\u{1b}]0;lib\u{7}.so", "inlined": false}
            ]
        }]
    })
}

#[test]
fn crafted_snapshot_text_reaches_no_terminal_raw() {
    let dir = TempDir::new("crafted");
    let write = |name: &str, v: &Value| {
        let p = dir.path().join(name);
        std::fs::write(&p, serde_json::to_vec(v).unwrap()).unwrap();
        p.to_string_lossy().into_owned()
    };
    let osc = "\u{1b}]0;pwned\u{7}leak\nnext\rline\u{9b}31m";
    let osc_shown = "\\x1b]0:pwned\\x07leak\\nnext\\rline\\u{9b}31m";
    let old = write(
        "old.json",
        &crafted("app\u{1b}[2J", "/bin/\u{1b}[31mapp", osc, 2048),
    );
    let new = write(
        "new.json",
        &crafted("app", "/other/\u{1b}]0;t\u{7}\nx", osc, 4096),
    );
    let (code, out, err) = run_heapbpf(&["report", &old]);
    assert_eq!(code, 0, "{err}");
    assert_plain("report", &out);
    assert!(out.contains("(app\\x1b[2J) /bin/\\x1b[31mapp"), "{out}");
    assert!(out.contains("taken 2026-11-24T19:00:00Z\\x1b[2J"), "{out}");
    assert!(
        out.contains("\\x1b]0;pwned\\x07leak\\nnext\\rline\\u{9b}31m (a\\x1b]8;;x\\x07.c:3)"),
        "{out}"
    );
    assert!(
        out.contains("[unknown] \\x1b]0;lib\\x07.so 0x401200"),
        "{out}"
    );

    let (code, out, err) = run_heapbpf(&["diff", &old, &new]);
    assert_eq!(code, 0, "{err}");
    assert_plain("diff", &out);
    assert_plain("diff's warning", &err);
    assert_eq!(err.lines().count(), 1, "one warning line:\n{err}");
    assert!(err.contains("/other/\\x1b]0;t\\x07\\nx"), "{err}");
    assert!(out.contains("/other/\\x1b]0;t\\x07\\nx"), "{out}");
    assert!(out.contains("\\x1b]0;pwned\\x07leak"), "{out}");

    // Folded stacks: one line per stack, names escaped (`;` separates frames).
    let (code, out, err) = run_heapbpf(&["diff", &old, &new, "--format", "collapsed"]);
    assert_eq!(code, 0, "{err}");
    assert_plain("collapsed", &out);
    let folded: Vec<&str> = out.lines().collect();
    assert_eq!(folded.len(), 1, "{out}");
    assert!(
        folded[0].ends_with(&format!("{osc_shown} 2048 4096")),
        "{:?}",
        folded[0]
    );
}

#[test]
fn logging_is_plain_off_a_terminal_and_a_failure_is_one_line() {
    require_root();
    let mut fx = Fixture::spawn("hostile");
    let dir = TempDir::new("plainlog");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut h = Raw::attach(fx.pid, &out, &["-v"]);
    h.wait("attached line", |l| l.contains("attached to"));
    fx.command("alloc");
    // The output directory vanishes: the snapshot fails.
    std::fs::remove_dir_all(&out).unwrap();
    h.signal(libc::SIGUSR2);
    h.wait("failed snapshot", |l| l.contains("failed"));
    let (_, stderr) = h.stop();
    let all = stderr.join("\n");
    if let Some(l) = stderr.iter().find(|l| l.contains('\x1b')) {
        panic!("colour on a pipe: {l:?}");
    }
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("INFO") && l.contains("probe placed")),
        "-v shows where probes went:\n{all}"
    );
    // Each failure is said once, in a plain `heapbpf:` line.
    let failures: Vec<&String> = stderr.iter().filter(|l| l.contains("failed")).collect();
    assert!(!failures.is_empty(), "{all}");
    for l in &failures {
        assert!(
            l.starts_with("heapbpf: ") && !l.contains("ERROR"),
            "a failure said other than in one plain line: {l:?}\n{all}"
        );
    }
    let signal_failures = failures
        .iter()
        .filter(|l| l.starts_with("heapbpf: snapshot signal "))
        .count();
    assert_eq!(signal_failures, 1, "{all}");
}

#[test]
fn a_target_exiting_during_attach_is_said_to_have_exited() {
    require_root();
    let dir = TempDir::new("exiting");
    let mut errors = Vec::new();
    for ms in [50, 150, 300, 500, 800, 1200] {
        let mut fx = Fixture::spawn("hostile");
        // Not reaped until the fixture is dropped: a zombie, as a process
        // whose parent is busy.
        fx.command(&format!("exit-after {ms}"));
        let pid = fx.pid.to_string();
        let (code, _, err) = run_heapbpf(&[
            "attach",
            &pid,
            "-o",
            dir.path().to_str().unwrap(),
            "--sample-bytes",
            "0",
        ]);
        for wrong in ["does not export", "stripped", "no allocator", "nothing in"] {
            assert!(!err.contains(wrong), "exit after {ms} ms: {err}");
        }
        match code {
            // Attached before it exited: its exit snapshot.
            0 => assert!(err.contains("snapshot exit"), "{err}"),
            2 => {
                assert!(
                    err.contains(&format!(
                        "process {pid} exited while heapbpf was attaching to it"
                    )) || err.contains("the process has exited"),
                    "exit after {ms} ms: {err}"
                );
                assert!(err.lines().count() <= 2, "{err}");
                errors.push(ms);
            }
            _ => panic!("exit after {ms} ms: exit code {code}: {err}"),
        }
    }
    assert!(
        !errors.is_empty(),
        "no target exited while heapbpf attached: the test did not test"
    );
}

#[test]
fn pid_1_unreadable_even_to_root_is_explained() {
    require_root();
    if std::fs::read("/proc/1/maps").is_ok() {
        // Here root may read pid 1: nothing to explain, and it is not ours
        // to attach to.
        eprintln!("/proc/1/maps is readable here; nothing to check");
        return;
    }
    let dir = TempDir::new("pid1");
    let (code, _, err) = run_heapbpf(&["attach", "1", "-o", dir.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("the kernel refuses heapbpf its memory map (/proc/1/maps")
            && err.contains("although heapbpf runs as root with CAP_SYS_PTRACE")
            && err.contains("pid 1 is the init"),
        "{err}"
    );
    assert!(!err.contains("run heapbpf as root"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

fn go_fixture(name: &str) -> std::path::PathBuf {
    let p = fixture_path(name);
    assert!(
        p.exists(),
        "{} was not built: Go is missing (cargo xtask bootstrap installs golang-go)",
        p.display()
    );
    p
}

#[test]
fn a_pure_go_program_points_to_gos_own_heap_profile() {
    require_root();
    let go = go_fixture("gofx");
    let fx = Fixture::spawn("gofx");
    let dir = TempDir::new("go");
    let out = dir.path().to_str().unwrap();
    let (code, _, err) = run_heapbpf(&["attach", &fx.pid.to_string(), "-o", out]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "gofx is a Go program without a C allocator: its heap is managed by the Go runtime"
        ) && err.contains("runtime/pprof")
            && err.contains("net/http/pprof"),
        "{err}"
    );
    assert!(!err.contains("stripped"), "{err}");
    assert!(err.lines().count() <= 2, "{err}");
    // The same for `run`, before the program runs.
    let (code, _, err) = run_heapbpf(&["run", "-o", out, "--", go.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is a Go program without a C allocator"),
        "{err}"
    );
}

#[test]
fn a_go_program_with_cgo_is_profiled_as_any_other() {
    require_root();
    go_fixture("gocgo");
    let mut fx = Fixture::spawn("gocgo");
    let dir = TempDir::new("cgo");
    let mut h = Heapbpf::attach(&[fx.pid], dir.path(), &[]);
    assert!(
        h.stderr.iter().any(|l| l.contains("libc.so.6")),
        "{:?}",
        h.stderr
    );
    fx.command("alloc");
    h.signal(libc::SIGUSR2);
    let json = &h.wait_snapshot("signal", fx.pid)[0];
    let snap = read_json(json);
    let thousands: u64 = snap["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|st| st["live_bytes"] == st["live_allocations"].as_u64().unwrap() * 1000)
        .map(|st| st["live_allocations"].as_u64().unwrap())
        .sum();
    assert!(thousands >= 10, "C.malloc(1000) x10 not seen: {snap}");
}

#[test]
fn a_static_musl_program_whose_malloc_never_frees_is_profiled() {
    require_root();
    let mut fx = Fixture::spawn("hostile-musl-static");
    let dir = TempDir::new("musl");
    let mut h = Heapbpf::attach(&[fx.pid], dir.path(), &[]);
    assert!(
        h.stderr
            .iter()
            .any(|l| l.contains("probes in") && l.contains("hostile-musl-static")),
        "{:?}",
        h.stderr
    );
    fx.command("alloc");
    fx.command("alloc");
    h.signal(libc::SIGUSR2);
    let snap = read_json(&h.wait_snapshot("signal", fx.pid)[0]);
    let s = site(&snap, "hostile_site");
    assert_eq!((s.live_bytes, s.live_allocations), (20_000, 20), "{snap}");
    assert_eq!(snap["totals"]["live_bytes"], 20_000, "{snap}");

    // `run`: its own malloc from the first allocation, not the C library
    // it never maps.
    let mut run = Command::new(heapbpf_bin())
        .args([
            "run",
            "-o",
            dir.path().to_str().unwrap(),
            "--sample-bytes",
            "0",
            "--",
        ])
        .arg(fixture_path("hostile-musl-static"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    run.stdin
        .take()
        .unwrap()
        .write_all(b"alloc\nalloc\nalloc\nexit\n")
        .unwrap();
    let out = run.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("probes in") && err.contains("hostile-musl-static;"),
        "{err}"
    );
    let exit = snapshot_line(&err, "exit");
    let snap = read_json(&exit.paths[0]);
    let s = site(&snap, "hostile_site");
    assert_eq!((s.live_bytes, s.live_allocations), (30_000, 30), "{snap}");
}

#[test]
fn a_version_of_the_wrong_type_is_said_to_be() {
    let dir = TempDir::new("version");
    let p = dir.path().join("v.json");
    std::fs::write(&p, br#"{"format":"heapbpf-snapshot","version":"1"}"#).unwrap();
    let (code, _, err) = run_heapbpf(&["report", p.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(r#"snapshot version is "1", expected the number 1"#),
        "{err}"
    );
    assert!(!err.contains("has no version"), "{err}");
}

#[test]
fn top_zero_is_a_bad_flag() {
    let dir = TempDir::new("top0");
    let p = dir.path().join("s.json");
    let v = crafted("app", "/bin/app", "leak", 4096);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    let p = p.to_str().unwrap();
    for args in [
        vec!["report", p, "--top", "0"],
        vec!["diff", p, p, "--top", "0"],
    ] {
        let (code, out, err) = run_heapbpf(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(
            err.trim_end(),
            "heapbpf: --top must be at least 1",
            "{args:?}"
        );
        assert!(out.is_empty(), "{out}");
    }
    let (code, out, _) = run_heapbpf(&["report", p, "--top", "1"]);
    assert_eq!(code, 0);
    assert!(out.contains("leak"), "{out}");
}

#[test]
fn max_live_blocks_out_of_range_is_a_bad_flag() {
    require_root();
    let fx = Fixture::spawn("hostile");
    let dir = TempDir::new("maxlive");
    let pid = fx.pid.to_string();
    let out = dir.path().to_str().unwrap();
    for n in ["0", "67108865", "1073741824", "4294967295"] {
        let (code, _, err) = run_heapbpf(&["attach", &pid, "-o", out, "--max-live-blocks", n]);
        assert_eq!(code, 2, "--max-live-blocks {n}: {err}");
        assert_eq!(
            err.lines().next().unwrap_or(""),
            format!("heapbpf: --max-live-blocks {n}: expected 1 to 67108864 (64Mi; the kernel reserves 16 bytes a block when heapbpf starts)"),
            "{err}"
        );
        assert!(!err.contains("MapError") && !err.contains("Os {"), "{err}");
    }
    let (code, _, err) =
        run_heapbpf(&["attach", &pid, "-o", out, "--max-live-blocks", "4294967296"]);
    assert_eq!(code, 2, "{err}");
}
