//! Files heapbpf reads, handed over as an attacker or an unlucky operator
//! would: a device, a FIFO with no writer, a gzip bomb, a snapshot whose
//! figures overflow; and a target whose perf map links out of its root, or
//! is huge. Each ends quickly, in bounded memory, with exit 2 and one line
//! (the snapshots) or with the target's own symbols only (the perf maps).
use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use heapbpf_integration_tests::*;

/// How long a refused file may take, and how much memory.
const QUICK: Duration = Duration::from_secs(10);
const SMALL_RSS_KIB: i64 = 128 << 10;
/// The address space heapbpf is given, so that a reader without bounds
/// fails (and shows in its peak RSS) rather than taking the machine.
const ADDRESS_SPACE_BYTES: u64 = 3 << 29;

/// What a bounded run of heapbpf did.
struct Bounded {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    max_rss_kib: i64,
    elapsed: Duration,
    timed_out: bool,
}

/// Runs heapbpf with `args`, killed after [`QUICK`], its address space
/// bounded; its peak RSS from wait4(2).
fn run_bounded(args: &[&str]) -> Bounded {
    let dir = TempDir::new("bounded");
    let out = dir.path().join("stdout");
    let err = dir.path().join("stderr");
    let mut cmd = Command::new(heapbpf_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setrlimit(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: ADDRESS_SPACE_BYTES,
                rlim_max: ADDRESS_SPACE_BYTES,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    #[expect(
        clippy::zombie_processes,
        reason = "reaped below by wait4, which also gives its peak RSS"
    )]
    let child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: rusage is plain data, filled by wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut timed_out = false;
    loop {
        // SAFETY: wait4(2) on our own child with valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(r >= 0, "wait4: {}", std::io::Error::last_os_error());
        if r == pid {
            break;
        }
        if started.elapsed() > QUICK && !timed_out {
            timed_out = true;
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let elapsed = started.elapsed();
    Bounded {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
        max_rss_kib: usage.ru_maxrss,
        elapsed,
        timed_out,
    }
}

/// heapbpf ended quickly and in little memory, with exit 2 and one line
/// on stderr that names `path` and says `what`.
fn assert_refused(args: &[&str], path: &Path, what: &str) {
    let b = run_bounded(args);
    assert!(
        !b.timed_out,
        "heapbpf {args:?} did not end within {QUICK:?} (blocked?); stderr: {}",
        b.stderr
    );
    assert!(
        b.max_rss_kib < SMALL_RSS_KIB,
        "heapbpf {args:?} peaked at {} MiB of RSS in {:?}; stderr: {}",
        b.max_rss_kib >> 10,
        b.elapsed,
        b.stderr
    );
    assert_eq!(
        b.code,
        Some(2),
        "heapbpf {args:?}: exit 2 expected; stderr: {}",
        b.stderr
    );
    assert_eq!(
        b.stderr.lines().count(),
        1,
        "heapbpf {args:?}: one line expected:\n{}",
        b.stderr
    );
    let line = b.stderr.trim_end();
    assert!(
        line.starts_with(&format!("heapbpf: {}: ", path.display())) && line.contains(what),
        "heapbpf {args:?}: a line naming {} and saying {what:?} expected: {line}",
        path.display()
    );
    assert!(b.stdout.is_empty(), "nothing on stdout: {}", b.stdout);
    eprintln!(
        "heapbpf {args:?}: exit 2 in {:?}, peak RSS {} KiB: {line}",
        b.elapsed, b.max_rss_kib
    );
}

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../profiler/tests/golden")
        .join(name)
}

#[test]
fn report_and_diff_refuse_a_device() {
    let zero = Path::new("/dev/zero");
    let good = golden("new.json");
    let good = good.to_str().unwrap();
    let what = "not a regular file (a character device)";
    assert_refused(&["report", "/dev/zero"], zero, what);
    assert_refused(&["diff", "/dev/zero", good], zero, what);
    assert_refused(&["diff", good, "/dev/zero"], zero, what);
}

#[test]
fn report_refuses_a_fifo_without_waiting_for_a_writer() {
    let dir = TempDir::new("fifo");
    let fifo = dir.path().join("snapshot.json");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert_refused(
        &["report", fifo.to_str().unwrap()],
        &fifo,
        "not a regular file (a FIFO)",
    );
}

/// A gzip file of `zeros` zero bytes: one deflate block with the fixed
/// Huffman codes, a literal 0 then copies of 258 bytes at distance 1 (13
/// bits each), so 1 GiB takes 6.5 MB. Its CRC is left 0: a reader that
/// decompresses it whole learns that only at the end.
fn gzip_bomb(zeros: u64) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u64,
        n: u32,
    }
    impl Bits {
        /// A number, least significant bit first (deflate's header fields).
        fn put(&mut self, value: u64, count: u32) {
            self.acc |= value << self.n;
            self.n += count;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// A Huffman code, most significant bit first.
        fn code(&mut self, code: u64, len: u32) {
            let reversed = (0..len).fold(0, |r, i| r | (((code >> i) & 1) << (len - 1 - i)));
            self.put(reversed, len);
        }
    }
    let mut b = Bits {
        out: vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff],
        acc: 0,
        n: 0,
    };
    b.put(1, 1); // the last block
    b.put(1, 2); // fixed Huffman codes
    b.code(0x30, 8); // literal 0
    let copies = (zeros - 1) / 258;
    for _ in 0..copies {
        b.code(0xc5, 8); // length 258 (symbol 285)
        b.code(0, 5); // distance 1
    }
    for _ in 0..(zeros - 1) % 258 {
        b.code(0x30, 8);
    }
    b.code(0, 7); // end of block (symbol 256)
    let pad = (8 - b.n % 8) % 8;
    b.put(0, pad); // to a byte boundary
    b.out.extend_from_slice(&0u32.to_le_bytes()); // CRC-32, not computed
    b.out.extend_from_slice(&(zeros as u32).to_le_bytes());
    b.out
}

#[test]
fn report_refuses_a_gzip_bomb_at_its_first_bytes() {
    let dir = TempDir::new("bomb");
    let bomb = dir.path().join("heapbpf-1-20260101T000000Z-0001.pb.gz");
    let bytes = gzip_bomb(1 << 30);
    assert!(bytes.len() < 7 << 20, "{} bytes", bytes.len());
    std::fs::write(&bomb, bytes).unwrap();
    assert_refused(
        &["report", bomb.to_str().unwrap()],
        &bomb,
        "not a pprof profile",
    );
}

/// The golden snapshot with two stacks of 2^64-1 live bytes, and totals
/// that say 2^64-1.
fn overflowing_snapshot(dir: &Path) -> PathBuf {
    let mut s: Value = serde_json::from_slice(&std::fs::read(golden("new.json")).unwrap()).unwrap();
    s["stacks"][0]["live_bytes"] = u64::MAX.into();
    s["stacks"][1]["live_bytes"] = u64::MAX.into();
    s["totals"]["live_bytes"] = u64::MAX.into();
    let path = dir.join("overflow.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&s).unwrap()).unwrap();
    path
}

#[test]
fn report_and_diff_refuse_figures_that_do_not_add_up() {
    let dir = TempDir::new("overflow");
    let bad = overflowing_snapshot(dir.path());
    let bad_arg = bad.to_str().unwrap();
    let good = golden("new.json");
    let what = "malformed snapshot: its stacks' live_bytes add up to 36893488147419103230, but totals.live_bytes is 18446744073709551615";
    assert_refused(&["report", bad_arg], &bad, what);
    assert_refused(&["report", bad_arg, "--format", "json"], &bad, what);
    assert_refused(&["diff", good.to_str().unwrap(), bad_arg], &bad, what);
    assert_refused(&["diff", bad_arg, good.to_str().unwrap()], &bad, what);
    // The golden snapshots, whose figures add up, still read.
    let (code, out, err) = run_heapbpf(&[
        "diff",
        golden("old.json").to_str().unwrap(),
        good.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("live heap change: +8.0 MiB"), "{out}");
}

/// Copies the fixture `name` and the libraries it needs into `root`.
fn build_chroot(root: &Path, name: &str) {
    let fixture = fixture_path(name);
    std::fs::copy(&fixture, root.join(name)).unwrap();
    let ldd = Command::new("ldd").arg(&fixture).output().unwrap();
    assert!(ldd.status.success());
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
    {
        let dst = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(lib, &dst).unwrap();
    }
}

/// The function names of every frame of a snapshot.
fn all_functions(snap: &Value) -> Vec<String> {
    snap["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|st| st["frames"].as_array().unwrap().iter())
        .filter_map(|f| f["function"].as_str().map(str::to_string))
        .collect()
}

/// The `jit` fixture's code: "START SIZE" as a perf map line has them.
fn jit_code(fx: &mut Fixture) -> String {
    let at = fx.ask("where");
    assert!(at.split_whitespace().count() == 2, "where: {at:?}");
    at
}

#[test]
fn a_perf_map_linking_out_of_the_targets_root_is_resolved_inside_it() {
    require_root();
    let root = TempDir::new("perfmap-root");
    let host = TempDir::new("perfmap-host");
    let out = TempDir::new("perfmap-out");
    build_chroot(root.path(), "jit");
    // The target's perf map is an absolute link to a path that, from the
    // host, is a file of the host's (outside the target's root) and, inside
    // the target's root, the target's own file.
    let linked = host.path().join("perf.map");
    let own = root.path().join(linked.strip_prefix("/").unwrap());
    std::fs::create_dir_all(root.path().join("tmp")).unwrap();
    std::fs::create_dir_all(own.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&linked, root.path().join("tmp/perf-1.map")).unwrap();

    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--pid", "--fork", "chroot"])
        .arg(root.path())
        .arg("/jit");
    let mut fx = Fixture::from_command(&mut cmd, |unshare, own_pid| {
        assert_eq!(own_pid, 1, "the fixture should be pid 1 of its namespace");
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id())).unwrap();
        children
            .split_whitespace()
            .next()
            .expect("unshare has a child")
            .parse()
            .unwrap()
    });
    let code = jit_code(&mut fx);
    std::fs::write(&linked, format!("{code} HOST_FILE_READ_BY_HEAPBPF\n")).unwrap();
    std::fs::write(&own, format!("{code} jit_in_its_root\n")).unwrap();

    let mut hb = Heapbpf::attach(&[fx.pid], out.path(), &["--format", "json"]);
    fx.command("run");
    hb.signal(libc::SIGUSR2);
    let snap = read_json(&hb.wait_snapshot("signal", fx.pid)[0]);
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));

    let names = all_functions(&snap);
    assert!(
        !names.iter().any(|n| n.contains("HOST_FILE_READ")),
        "heapbpf followed the target's link to a host file: {names:?}"
    );
    assert_eq!(
        site(&snap, "jit_in_its_root").live_bytes,
        20_000,
        "the JIT code is named from the perf map inside the target's root: {names:?}"
    );
}

/// Removes a file at the end of a test, whatever happens.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn vm_hwm_kib(pid: u32) -> i64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn a_huge_perf_map_is_read_only_up_to_its_bound() {
    require_root();
    let out = TempDir::new("bigmap-out");
    let mut fx = Fixture::spawn("jit");
    let code = jit_code(&mut fx);
    // 1 GiB: one real line, then zeros (a sparse file).
    let map = PathBuf::from(format!("/tmp/perf-{}.map", fx.pid));
    let _cleanup = RemoveOnDrop(map.clone());
    std::fs::write(&map, format!("{code} jit_named_early\n")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&map)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();

    let started = Instant::now();
    let mut hb = Heapbpf::attach(&[fx.pid], out.path(), &["--format", "json"]);
    let to_attach = started.elapsed();
    fx.command("run");
    hb.signal(libc::SIGUSR2);
    let snap = read_json(&hb.wait_snapshot("signal", fx.pid)[0]);
    // Later refreshes find the map unchanged and read nothing.
    std::thread::sleep(Duration::from_millis(2500));
    hb.signal(libc::SIGUSR2);
    hb.wait_snapshot("signal", fx.pid);
    let hwm = vm_hwm_kib(hb.child.id());
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));

    eprintln!("attached in {to_attach:?}, peak RSS {hwm} KiB");
    assert!(
        to_attach < Duration::from_secs(5),
        "attaching took {to_attach:?}"
    );
    assert!(hwm < SMALL_RSS_KIB, "heapbpf peaked at {} MiB", hwm >> 10);
    assert_eq!(site(&snap, "jit_named_early").live_bytes, 20_000);
    let warnings: Vec<&String> = hb
        .stderr
        .iter()
        .filter(|l| l.contains(&format!("perf map /tmp/perf-{}.map", fx.pid)))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning: {:?}", hb.stderr);
    assert!(
        warnings[0].contains("1.0 GiB, over the 64MiB heapbpf reads"),
        "{}",
        warnings[0]
    );
}
