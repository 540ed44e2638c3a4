//! Stripped programs whose debug info is installed separately, as
//! distributions ship them: found by build id (in the target's own mount
//! namespace, which a test controls), by `.gnu_debuglink` (CRC checked), and
//! from a real debuginfod server; the frames read as the unstripped build's.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use heapbpf_integration_tests::*;

const LEAKS: u64 = 10;
const LEAK_BYTES: u64 = 1000;

fn build_id(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    heapbpf::debuginfo::ElfFacts::parse(&bytes)
        .and_then(|f| f.build_id)
        .unwrap_or_else(|| panic!("{} has no build id", path.display()))
}

/// The stack of `leak_site`'s blocks: the one whose frames[0] is in
/// `module` with the fixture's figures.
fn leak_stack<'a>(snapshot: &'a Value, module: &str) -> &'a Value {
    let stacks: Vec<&Value> = snapshot["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["frames"][0]["module"] == module && s["live_bytes"] == LEAKS * LEAK_BYTES)
        .collect();
    assert_eq!(
        stacks.len(),
        1,
        "one leak stack in {module}: {:#}",
        snapshot["stacks"]
    );
    assert_eq!(stacks[0]["live_allocations"], LEAKS);
    stacks[0]
}

/// (function, file, line, inlined) of each frame up to `main`.
fn named_frames(stack: &Value) -> Vec<(Value, Value, Value, Value)> {
    let mut out = Vec::new();
    for f in stack["frames"].as_array().unwrap() {
        out.push((
            f["function"].clone(),
            f["file"].clone(),
            f["line"].clone(),
            f["inlined"].clone(),
        ));
        if f["function"] == "main" {
            return out;
        }
    }
    panic!("no main in {stack:#}")
}

fn mapping<'a>(snapshot: &'a Value, path: &str) -> &'a Value {
    snapshot["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["path"] == path)
        .unwrap_or_else(|| panic!("no mapping of {path}: {:#}", snapshot["mappings"]))
}

/// Runs `program` in a mount namespace of its own where `/usr/lib/debug` is
/// `debug_dir`: the target's root holds debug info the host's does not.
fn spawn_with_debug_dir(program: &Path, debug_dir: &Path) -> Fixture {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mkdir -p /usr/lib/debug && mount --bind \"$0\" /usr/lib/debug && exec \"$1\"",
    ])
    .arg(debug_dir)
    .arg(program);
    Fixture::from_command(&mut cmd, |_, own| own)
}

/// The JSON file of the next `signal` snapshot of each of `pids`, in
/// whatever order they are written.
fn signal_snapshots(h: &mut Heapbpf, pids: &[u32]) -> HashMap<u32, PathBuf> {
    let mut written = HashMap::new();
    while written.len() < pids.len() {
        let line = h.wait_for("a signal snapshot", |l| {
            lines::parse_snapshot(l).is_some_and(|s| s.trigger == "signal")
        });
        let s = lines::parse_snapshot(&line).unwrap();
        assert!(pids.contains(&s.pid), "{line}");
        written.insert(s.pid, s.paths[0].clone());
    }
    written
}

#[test]
fn split_debug_info_names_frames_as_the_unstripped_build() {
    require_root();
    let tmp = TempDir::new("debuginfo");
    let unstripped = fixture_path("debuginfo");
    let stripped = fixture_path("debuginfo-stripped");
    let id = build_id(&unstripped);
    assert_eq!(build_id(&stripped), id, "the same image, stripped");

    // By build id, in the target's root only.
    let debug_dir = tmp.path().join("debug");
    let by_id = debug_dir
        .join(".build-id")
        .join(&id[..2])
        .join(format!("{}.debug", &id[2..]));
    std::fs::create_dir_all(by_id.parent().unwrap()).unwrap();
    let on_host = format!("/usr/lib/debug/.build-id/{}/{}.debug", &id[..2], &id[2..]);
    assert!(
        !Path::new(&on_host).exists(),
        "{on_host} exists: the test needs the host without it"
    );
    std::fs::copy(fixture_path("debuginfo.debug"), &by_id).unwrap();
    // By .gnu_debuglink: a stale file of that name beside the program (the
    // wrong CRC: never used), the right one in .debug/.
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(bin.join(".debug")).unwrap();
    let linked = bin.join("app-linked");
    std::fs::copy(fixture_path("debuginfo-linked"), &linked).unwrap();
    std::fs::copy(
        fixture_path("libdebuginfo.so.debug"),
        bin.join("debuginfo.debug"),
    )
    .unwrap();
    std::fs::copy(
        fixture_path("debuginfo.debug"),
        bin.join(".debug/debuginfo.debug"),
    )
    .unwrap();

    let mut reference = Fixture::spawn("debuginfo");
    let mut in_root = spawn_with_debug_dir(&stripped, &debug_dir);
    let mut by_link = Fixture::from_command(&mut Command::new(&linked), |c, _| c.id());
    let mut bare = Fixture::spawn("debuginfo-stripped");
    let pids = [reference.pid, in_root.pid, by_link.pid, bare.pid];
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut h = Heapbpf::attach(&pids, &out, &[]);
    for f in [&mut reference, &mut in_root, &mut by_link, &mut bare] {
        f.command(&format!("leak {LEAKS}"));
    }
    h.signal(libc::SIGUSR2);
    let written = signal_snapshots(&mut h, &pids);
    let snap = |pid: u32| {
        let path = written[&pid].clone();
        (read_json(&path), path)
    };
    let (want_snap, want_path) = snap(reference.pid);
    let (root_snap, _) = snap(in_root.pid);
    let (link_snap, _) = snap(by_link.pid);
    let (bare_snap, bare_path) = snap(bare.pid);

    let unstripped = unstripped.display().to_string();
    let stripped = stripped.display().to_string();
    let linked = linked.display().to_string();
    let want = named_frames(leak_stack(&want_snap, &unstripped));
    assert_eq!(
        (&want[0].0, &want[0].3, &want[1].0),
        (
            &Value::from("make_record"),
            &Value::from(true),
            &Value::from("leak_site")
        ),
        "the unstripped build: an inlined frame, then its function"
    );
    assert!(want[0].1.as_str().unwrap().ends_with("debuginfo.c"));
    assert!(want.iter().all(|f| f.2.as_u64().is_some()), "{want:?}");

    for (snapshot, module, found_at) in [
        (&root_snap, &stripped, by_id.display().to_string()),
        (
            &link_snap,
            &linked,
            bin.join(".debug/debuginfo.debug").display().to_string(),
        ),
    ] {
        assert_eq!(
            named_frames(leak_stack(snapshot, module)),
            want,
            "{module}: the unstripped build's frames"
        );
        let m = mapping(snapshot, module);
        assert_eq!(m["symbols"], "debug-file", "{m:#}");
        assert_eq!(m["build_id"], id.as_str());
        let shown = m["debug_file"].as_str().unwrap();
        // The build-id file is the target's: under its /usr/lib/debug.
        let found_at = found_at
            .strip_prefix(&debug_dir.display().to_string())
            .map_or(found_at.clone(), |rest| format!("/usr/lib/debug{rest}"));
        assert!(shown.starts_with(&found_at), "{shown} is not {found_at}");
        if snapshot == &root_snap {
            assert!(shown.ends_with(" (in the target's root)"), "{shown}");
        }
    }

    // Nothing to be found: unresolved, never guessed, and said.
    let st = leak_stack(&bare_snap, &stripped);
    assert_eq!(st["frames"][0]["function"], Value::Null, "{st:#}");
    let m = mapping(&bare_snap, &stripped);
    assert_eq!(m["symbols"], "none", "{m:#}");
    assert!(m["symbols_note"].as_str().unwrap().contains(&id), "{m:#}");
    let (code, report, _) = run_heapbpf(&["report", bare_path.to_str().unwrap()]);
    assert_eq!(code, 0);
    let line = format!(
        "no symbols for {stripped} (build id {id}): install its debug info, or pass --debuginfod URL"
    );
    assert_eq!(report.matches(&line).count(), 1, "{report}");
    let (_, report, _) = run_heapbpf(&["report", want_path.to_str().unwrap()]);
    assert!(
        !report.contains(&format!("no symbols for {unstripped}")),
        "{report}"
    );
}

/// A real debuginfod (elfutils') serving `dir` on a loopback port.
struct Debuginfod {
    child: Child,
    port: u16,
}

impl Debuginfod {
    fn start(dir: &Path, db: &Path) -> Debuginfod {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("debuginfod")
            .args(["-F", "-c", "1", "-p", &port.to_string(), "-d"])
            .arg(db)
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("start debuginfod: {e} (cargo xtask bootstrap installs it)")
            });
        Debuginfod { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The status of `GET /buildid/ID/debuginfo`, 0 when nothing answers.
    fn status(&self, id: &str) -> u16 {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return 0;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let req = format!("GET /buildid/{id}/debuginfo HTTP/1.0\r\nHost: localhost\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return 0;
        }
        let mut head = [0u8; 12];
        if s.read_exact(&mut head).is_err() {
            return 0;
        }
        String::from_utf8_lossy(&head[9..12]).parse().unwrap_or(0)
    }

    /// Waits until the server has indexed `id`.
    fn wait_served(&self, id: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while self.status(id) != 200 {
            assert!(
                Instant::now() < deadline,
                "debuginfod did not serve {id} within {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our child.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
}

impl Drop for Debuginfod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn debuginfod_serves_what_is_missing_and_a_dead_server_never_stalls_a_snapshot() {
    require_root();
    let tmp = TempDir::new("debuginfod");
    let served = tmp.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    for f in ["debuginfo.debug", "libdebuginfo.so.debug"] {
        std::fs::copy(fixture_path(f), served.join(f)).unwrap();
    }
    let exe = fixture_path("debuginfo-stripped");
    let lib = fixture_path("libdebuginfo-stripped.so");
    let (exe_id, lib_id) = (build_id(&exe), build_id(&lib));
    let server = Debuginfod::start(&served, &tmp.path().join("db.sqlite"));
    server.wait_served(&exe_id);
    server.wait_served(&lib_id);

    let cache = tmp.path().join("cache");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut target = Fixture::spawn("debuginfo-stripped");
    let url = server.url();
    let mut h = Heapbpf::attach_env(
        &[target.pid],
        &out,
        &["--debuginfod", &url],
        &[("XDG_CACHE_HOME", cache.to_str().unwrap())],
    );
    let exe = exe.display().to_string();
    let lib_path = lib.display().to_string();

    // Downloaded once, into the cache: the executable's frames are named.
    target.command(&format!("leak {LEAKS}"));
    h.signal(libc::SIGUSR2);
    let first = read_json(&h.wait_snapshot("signal", target.pid)[0]);
    let st = leak_stack(&first, &exe);
    let names: Vec<_> = named_frames(st).into_iter().map(|f| f.0).collect();
    assert_eq!(
        names[..3],
        [
            Value::from("make_record"),
            Value::from("leak_site"),
            Value::from("main")
        ],
        "{st:#}"
    );
    assert!(st["frames"][1]["line"].as_u64().is_some(), "{st:#}");
    let cached = cache
        .join("heapbpf/debuginfod")
        .join(&exe_id)
        .join("debuginfo");
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        std::fs::read(fixture_path("debuginfo.debug")).unwrap()
    );
    let m = mapping(&first, &exe);
    assert_eq!(m["symbols"], "debug-file");
    assert!(
        m["debug_file"]
            .as_str()
            .unwrap()
            .contains(&format!("(debuginfod {url})")),
        "{m:#}"
    );

    // The server stops answering (SIGSTOP: it accepts, never replies), and
    // the target loads a stripped library whose debug info only the server
    // has: the snapshot waits its budget, no more, and leaves the library's
    // frames unresolved and marked.
    server.signal(libc::SIGSTOP);
    target.command(&format!("lib {lib_path}"));
    target.command("liblk 5");
    let asked = Instant::now();
    h.signal(libc::SIGUSR2);
    let second = read_json(&h.wait_snapshot("signal", target.pid)[0]);
    let took = asked.elapsed();
    eprintln!("a snapshot with the server stopped took {took:?}");
    let budget = heapbpf::debuginfo::debuginfod::SNAPSHOT_WAIT;
    assert!(
        took < budget + Duration::from_secs(3),
        "the snapshot took {took:?} with a server that never answers"
    );
    let lib_stack = |s: &Value| {
        s["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|st| st["frames"][0]["module"] == lib_path.as_str())
            .unwrap_or_else(|| panic!("no stack from {lib_path}: {s:#}"))
            .clone()
    };
    let st = lib_stack(&second);
    assert_eq!(
        (st["live_bytes"].as_u64(), st["live_allocations"].as_u64()),
        (Some(2500), Some(5))
    );
    assert_eq!(st["frames"][0]["function"], Value::Null, "{st:#}");
    // Its exported function is named by its dynamic symbols; the program's
    // frames still by the debug info downloaded before.
    assert_eq!(st["frames"][1]["function"], "lib_leak", "{st:#}");
    assert!(functions(&st).contains(&"main".to_string()), "{st:#}");
    let m = mapping(&second, &lib_path);
    assert_eq!(m["symbols"], "pending", "{m:#}");
    assert_eq!(mapping(&second, &exe)["symbols"], "debug-file");

    // Gone for good: the download fails, remembered; still unresolved,
    // now said to be missing, with why.
    server.signal(libc::SIGKILL);
    h.signal(libc::SIGUSR2);
    let third_path = h.wait_snapshot("signal", target.pid)[0].clone();
    let third = read_json(&third_path);
    assert_eq!(lib_stack(&third)["frames"][0]["function"], Value::Null);
    let m = mapping(&third, &lib_path);
    assert_eq!(m["symbols"], "none", "{m:#}");
    assert!(
        m["symbols_note"].as_str().unwrap().contains("debuginfod"),
        "{m:#}"
    );
    assert!(!cache
        .join("heapbpf/debuginfod")
        .join(&lib_id)
        .join("debuginfo")
        .exists());
    let (_, report, _) = run_heapbpf(&["report", third_path.to_str().unwrap()]);
    assert!(
        report.contains(&format!(
            "no symbols for {lib_path} (build id {lib_id}): install its debug info, or pass --debuginfod URL"
        )),
        "{report}"
    );
    h.signal(libc::SIGINT);
    assert!(h.wait_exit().success());
}

#[test]
fn the_agent_keeps_downloaded_debug_info_in_its_data_dir() {
    require_root();
    let tmp = TempDir::new("debuginfod-agent");
    let served = tmp.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::copy(
        fixture_path("debuginfo.debug"),
        served.join("debuginfo.debug"),
    )
    .unwrap();
    let exe = fixture_path("debuginfo-stripped");
    let id = build_id(&exe);
    let server = Debuginfod::start(&served, &tmp.path().join("db.sqlite"));
    server.wait_served(&id);

    let data = tmp.path().join("data");
    let mut target = Fixture::spawn("debuginfo-stripped");
    let select = format!("pid={}", target.pid);
    let url = server.url();
    let (mut h, _) = Heapbpf::agent_env(
        &data,
        &[
            "--select",
            &select,
            "--interval",
            "1s",
            "--debuginfod",
            &url,
        ],
        &[("DEBUGINFOD_URLS", None)],
    );
    h.wait_attached(target.pid);
    target.command(&format!("leak {LEAKS}"));
    let exe = exe.display().to_string();
    let deadline = Instant::now() + TIMEOUT;
    let snapshot = loop {
        let paths = h.wait_snapshot("interval", target.pid);
        let json = paths
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == "json"));
        let s = read_json(json.expect("a JSON snapshot"));
        if s["totals"]["live_bytes"] == LEAKS * LEAK_BYTES {
            break s;
        }
        assert!(Instant::now() < deadline, "no snapshot with the leak");
    };
    let names: Vec<_> = named_frames(leak_stack(&snapshot, &exe))
        .into_iter()
        .map(|f| f.0)
        .collect();
    assert_eq!(names[1], "leak_site", "{names:?}");
    let kept = data.join("debuginfod").join(&id).join("debuginfo");
    assert!(kept.is_file(), "{} is missing", kept.display());
    assert!(mapping(&snapshot, &exe)["debug_file"]
        .as_str()
        .unwrap()
        .starts_with(&kept.display().to_string()));
}
