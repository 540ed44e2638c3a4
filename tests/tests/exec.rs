//! A target that calls `exec()`: its old image gets a last snapshot
//! (trigger `exec`) with exactly its own figures and executable, its blocks
//! are dropped, and the new image is hooked (an `attached` line for it) —
//! whether it uses the same C library (the probes stay) or another one
//! (musl: the new image's allocator is found and hooked). `exec_a` allocates
//! at `a_keep`/`a_gone`, then execs `exec_b` (glibc) or `exec_b_musl`, which
//! allocate at `b_keep`/`b_gone`.
use std::process::Command;

use heapbpf_integration_tests::*;

const GLIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
const MUSL: &str = "/usr/lib/x86_64-linux-musl/libc.so";

/// The old image's last snapshot: exactly `exec_a`'s blocks and figures.
fn assert_first_image(s: &Value, pid: u32) {
    assert_eq!(s["trigger"], "exec", "{s:#}");
    assert_eq!(s["pid"], pid);
    assert_eq!(s["comm"], "exec_a");
    assert!(
        s["exe"].as_str().unwrap().ends_with("/exec_a"),
        "exe names the old program: {}",
        s["exe"]
    );
    assert_eq!(
        site(s, "a_keep"),
        Site {
            live_bytes: 10_000,
            live_allocations: 10,
            allocated_bytes: 10_000,
            allocations: 10
        }
    );
    assert_eq!(
        site(s, "a_gone"),
        Site {
            live_bytes: 0,
            live_allocations: 0,
            allocated_bytes: 5_000,
            allocations: 5
        }
    );
    let t = &s["totals"];
    assert_eq!(
        (
            &t["live_bytes"],
            &t["live_allocations"],
            &t["allocated_bytes"],
            &t["allocations"],
            &t["frees"],
            &t["dropped_events"]
        ),
        (
            &Value::from(10_000),
            &Value::from(10),
            &Value::from(15_000),
            &Value::from(15),
            &Value::from(5),
            &Value::from(0)
        ),
        "totals of the old image only: {t}"
    );
    for st in s["stacks"].as_array().unwrap() {
        let f = &st["frames"][0]["function"];
        assert!(
            f == "a_keep" || f == "a_gone",
            "a stack of the old image only: {st}"
        );
    }
}

/// A snapshot of the new image: exactly `exec_b`'s figures, none of the old
/// image's blocks.
fn assert_second_image(s: &Value, pid: u32, comm: &str) {
    assert_eq!(s["pid"], pid);
    assert_eq!(s["comm"], comm, "comm names the new program");
    assert!(
        s["exe"].as_str().unwrap().ends_with(&format!("/{comm}")),
        "exe names the new program: {}",
        s["exe"]
    );
    assert_eq!(
        site(s, "b_keep"),
        Site {
            live_bytes: 21_000,
            live_allocations: 7,
            allocated_bytes: 21_000,
            allocations: 7
        },
        "{s:#}"
    );
    assert_eq!(
        site(s, "b_gone"),
        Site {
            live_bytes: 0,
            live_allocations: 0,
            allocated_bytes: 2_100,
            allocations: 3
        }
    );
    let t = &s["totals"];
    assert_eq!(
        (
            &t["live_bytes"],
            &t["live_allocations"],
            &t["allocated_bytes"],
            &t["allocations"],
            &t["frees"],
            &t["dropped_events"]
        ),
        (
            &Value::from(21_000),
            &Value::from(7),
            &Value::from(23_100),
            &Value::from(10),
            &Value::from(3),
            &Value::from(0)
        ),
        "totals of the new image only: {t}"
    );
    for st in s["stacks"].as_array().unwrap() {
        let f = &st["frames"][0]["function"];
        assert!(
            f == "b_keep" || f == "b_gone",
            "a stack of the new image only: {st}"
        );
        let frames = functions(st);
        assert!(frames.iter().any(|f| f == "main"), "symbolized: {st}");
    }
    let modules: Vec<&str> = s["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|st| st["frames"].as_array().unwrap())
        .filter_map(|f| f["module"].as_str())
        .collect();
    assert!(
        modules.iter().all(|m| !m.ends_with("/exec_a")),
        "no frame of the old program: {modules:?}"
    );
}

/// The `attached` line for the new image: its comm, the library hooked.
fn assert_attached_line(line: &str, pid: u32, comm: &str, library: &str) {
    assert_eq!(lines::parse_attached(line), Some((pid, comm)), "{line}");
    assert!(line.contains(&format!(" probes in {library}")), "{line}");
}

/// `exec_a --wait PROGRAM [ARGS]`, held before its allocations.
fn spawn_a(program: &str, args: &[&str]) -> Fixture {
    let mut cmd = Command::new(fixture_path("exec_a"));
    cmd.arg("--wait").arg(fixture_path(program)).args(args);
    Fixture::from_command(&mut cmd, |child, _| child.id())
}

/// The new program uses the same glibc: the probes on it stay and count the
/// new image's blocks from its first instruction — `exec_b` allocates right
/// after the exec, before heapbpf has looked — and the blocks split at the
/// exec's time.
#[test]
fn exec_into_a_program_on_the_same_libc() {
    require_root();
    let dir = TempDir::new("exec-glibc");
    let mut fx = spawn_a("exec_b", &[]);
    let pid = fx.pid;
    let mut h = Heapbpf::attach(&[pid], dir.path(), &["--format", "json"]);
    fx.ask("go");
    // exec_b answers once it has allocated.
    fx.ask("exec");
    let old = read_json(&h.wait_snapshot("exec", pid)[0]);
    assert_first_image(&old, pid);
    let line = h.wait_for("attached line of the new image", |l| {
        lines::parse_attached(l).is_some_and(|(p, c)| p == pid && c == "exec_b")
    });
    assert_attached_line(&line, pid, "exec_b", GLIBC);
    h.signal(libc::SIGUSR2);
    let new = read_json(&h.wait_snapshot("signal", pid)[0]);
    assert_second_image(&new, pid, "exec_b");
    fx.send("exit");
    assert_eq!(fx.wait_exit().code(), Some(4));
    let last = read_json(&h.wait_snapshot("exit", pid)[0]);
    assert_second_image(&last, pid, "exec_b");
    assert!(h.wait_exit().success(), "{}", h.stderr.join("\n"));
}

/// The same without address randomization (`setarch -R`, inherited
/// across exec): `exec_b`'s first blocks get the very addresses of
/// `exec_a`'s live ones before heapbpf has looked. The old blocks are set
/// aside for the old image's snapshot, not retired or freed by the new one.
#[test]
fn exec_with_the_same_addresses_before_and_after() {
    require_root();
    let dir = TempDir::new("exec-norandom");
    let mut cmd = Command::new("setarch");
    cmd.args(["x86_64", "-R"])
        .arg(fixture_path("exec_a"))
        .arg("--wait")
        .arg(fixture_path("exec_b"));
    let mut fx = Fixture::from_command(&mut cmd, |child, _| child.id());
    let pid = fx.pid;
    let mut h = Heapbpf::attach(&[pid], dir.path(), &["--format", "json"]);
    fx.ask("go");
    fx.ask("exec");
    let old = read_json(&h.wait_snapshot("exec", pid)[0]);
    assert_first_image(&old, pid);
    h.wait_for("attached line of the new image", |l| {
        lines::parse_attached(l).is_some_and(|(p, c)| p == pid && c == "exec_b")
    });
    h.signal(libc::SIGUSR2);
    let new = read_json(&h.wait_snapshot("signal", pid)[0]);
    assert_second_image(&new, pid, "exec_b");
    fx.send("exit");
    assert_eq!(fx.wait_exit().code(), Some(4));
    assert!(h.wait_exit().success(), "{}", h.stderr.join("\n"));
}

/// The new program is linked against musl: heapbpf finds and hooks musl's
/// allocator (the glibc probes go), and says so in an `attached` line.
#[test]
fn exec_into_a_program_on_another_libc() {
    exec_into_musl(&[]);
}

/// Without the exec tracepoint, heapbpf notices the exec at its next look
/// (the executable changed). The old image's snapshot then holds whatever
/// the new one allocated through the same probes until then: none here, as
/// the new program's allocator is another one, hooked before it allocates.
#[test]
fn exec_noticed_without_the_tracepoint() {
    exec_into_musl(&["--no-exec-tracepoint"]);
}

fn exec_into_musl(extra: &[&str]) {
    require_root();
    let dir = TempDir::new("exec-musl");
    let mut fx = spawn_a("exec_b_musl", &["--wait"]);
    let pid = fx.pid;
    let mut args = vec!["--format", "json"];
    args.extend(extra);
    let mut h = Heapbpf::attach(&[pid], dir.path(), &args);
    fx.ask("go");
    fx.send("exec");
    let old = read_json(&h.wait_snapshot("exec", pid)[0]);
    assert_first_image(&old, pid);
    let line = h.wait_for("attached line of the new image", |l| {
        lines::parse_attached(l).is_some_and(|(p, c)| p == pid && c == "exec_b_musl")
    });
    assert_attached_line(&line, pid, "exec_b_musl", MUSL);
    // Hooked: exec_b_musl allocates now.
    fx.ask("go");
    h.signal(libc::SIGUSR2);
    let new = read_json(&h.wait_snapshot("signal", pid)[0]);
    assert_second_image(&new, pid, "exec_b_musl");
    fx.send("exit");
    assert_eq!(fx.wait_exit().code(), Some(4));
    assert!(h.wait_exit().success(), "{}", h.stderr.join("\n"));
}

/// The new program cannot be hooked (static and stripped: no allocator to
/// find): one plain line says so, and heapbpf, with no target left, exits.
#[test]
fn exec_into_a_program_that_cannot_be_hooked() {
    require_root();
    let dir = TempDir::new("exec-stripped");
    let mut fx = spawn_a("exec_b_stripped", &["--wait"]);
    let pid = fx.pid;
    let mut h = Heapbpf::attach(&[pid], dir.path(), &["--format", "json"]);
    fx.ask("go");
    fx.send("exec");
    let old = read_json(&h.wait_snapshot("exec", pid)[0]);
    assert_first_image(&old, pid);
    let why = format!("heapbpf: {pid} (exec_a) exec'd ");
    let line = h.wait_for("the line saying why", |l| l.starts_with(&why));
    assert!(
        line.contains("/exec_b_stripped, which heapbpf cannot hook (")
            && line.ends_with(&format!("); no longer profiling {pid}")),
        "{line}"
    );
    assert!(h.wait_exit().success(), "{}", h.stderr.join("\n"));
    assert!(
        !h.stderr
            .iter()
            .any(|l| l.contains(" attached to ") && l.contains("exec_b")),
        "{}",
        h.stderr.join("\n")
    );
    // The program runs on, unprofiled.
    fx.ask("go");
    fx.send("exit");
    assert_eq!(fx.wait_exit().code(), Some(4));
}

/// `heapbpf run`: the command's own exec is its start (one `attached`
/// line); its second exec, into a program on `library`, is handled as in
/// attach mode while ptrace holds the new image at its entry point — so
/// even a new C library is hooked before the new program's first
/// allocation. heapbpf returns the last program's status.
fn run_through_exec(program: &str, library: &str, extra: &[&str]) {
    require_root();
    let dir = TempDir::new(&format!("run-{program}"));
    let a = fixture_path("exec_a");
    let b = fixture_path(program);
    let mut args = vec![
        "run",
        "--sample-bytes",
        "0",
        "--format",
        "json",
        "-o",
        dir.path().to_str().unwrap(),
    ];
    args.extend(extra);
    args.extend(["--", a.to_str().unwrap(), b.to_str().unwrap()]);
    let (code, _, err) = run_heapbpf(&args);
    assert_eq!(
        code, 4,
        "heapbpf run returns the last program's status:\n{err}"
    );
    let attached: Vec<&str> = err
        .lines()
        .filter(|l| lines::parse_attached(l).is_some())
        .collect();
    assert_eq!(attached.len(), 2, "the command, then its new image:\n{err}");
    let (pid, comm) = lines::parse_attached(attached[0]).unwrap();
    assert_eq!(comm, "exec_a");
    assert_attached_line(attached[1], pid, program, library);
    let old = read_json(&snapshot_line(&err, "exec").paths[0]);
    assert_first_image(&old, pid);
    let new = read_json(&snapshot_line(&err, "exit").paths[0]);
    assert_eq!(new["trigger"], "exit");
    assert_second_image(&new, pid, program);
}

#[test]
fn run_follows_a_command_through_exec_on_the_same_libc() {
    run_through_exec("exec_b", GLIBC, &[]);
}

#[test]
fn run_follows_a_command_through_exec_into_another_libc() {
    run_through_exec("exec_b_musl", MUSL, &[]);
}

/// Without the exec tracepoint, `run` still sees both execs exactly: the
/// command is held at each new image's entry point, where heapbpf looks.
#[test]
fn run_follows_a_command_through_exec_without_the_tracepoint() {
    run_through_exec("exec_b", GLIBC, &["--no-exec-tracepoint"]);
    run_through_exec("exec_b_musl", MUSL, &["--no-exec-tracepoint"]);
}

/// `heapbpf run` of a command whose second thread execs: the kernel ends
/// the main thread first — the traced one, to which the probes are bound
/// too. That is no exit: heapbpf does not take it for one, writes the old
/// image's `exec` snapshot, hooks the new image again, and its exit
/// snapshot comes when heapbpf reaps it.
#[test]
fn run_follows_a_command_whose_thread_execs() {
    require_root();
    let dir = TempDir::new("run-thread-exec");
    let a = fixture_path("exec_a");
    let b = fixture_path("exec_b");
    let mut h = Heapbpf::run(
        dir.path(),
        &["--format", "json"],
        &[
            a.to_str().unwrap(),
            "--from-thread",
            b.to_str().unwrap(),
            "--wait",
        ],
    );
    let line = h.wait_for("attached line of the command", |l| {
        lines::parse_attached(l).is_some_and(|(_, c)| c == "exec_a")
    });
    let (pid, _) = lines::parse_attached(&line).unwrap();
    let old = read_json(&h.wait_snapshot("exec", pid)[0]);
    assert_eq!(old["comm"], "exec_a");
    // pthread_create allocates too: the sites, not the totals, are known.
    assert_eq!(
        site(&old, "a_keep"),
        Site {
            live_bytes: 10_000,
            live_allocations: 10,
            allocated_bytes: 10_000,
            allocations: 10
        }
    );
    let line = h.wait_for("attached line of the new image", |l| {
        lines::parse_attached(l).is_some_and(|(p, c)| p == pid && c == "exec_b")
    });
    assert_attached_line(&line, pid, "exec_b", GLIBC);
    h.send("go");
    h.send("exit");
    let status = h.wait_exit();
    assert_eq!(status.code(), Some(4), "{}", h.stderr.join("\n"));
    let stderr = h.stderr.join("\n");
    let new = read_json(&snapshot_line(&stderr, "exit").paths[0]);
    assert_second_image(&new, pid, "exec_b");
}
