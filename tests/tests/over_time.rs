//! Snapshots over time: interval, heap and RSS steps, leak suspects,
//! retention, the OOM killer, and diff between two real snapshots.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use heapbpf_integration_tests::*;

const MIB: u64 = 1 << 20;

/// Waits for every snapshot line of `trigger` until `done` says stop.
fn collect(hb: &mut Heapbpf, trigger: &str, pid: u32, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|_| hb.wait_snapshot(trigger, pid).remove(0))
        .collect()
}

fn count_lines(hb: &Heapbpf, trigger: &str) -> usize {
    count_snapshot_lines(&hb.stderr, Some(trigger))
}

#[test]
fn interval_snapshots_show_steady_growth() {
    require_root();
    let dir = TempDir::new("interval");
    let mut fx = Fixture::spawn("grow");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--interval", "300ms"]);
    // 48 MiB at about 1 MiB per 25 ms.
    fx.command("leak 48 1048576 25000");
    let started = Instant::now();
    let mut live = Vec::new();
    loop {
        let p = hb.wait_snapshot("interval", fx.pid).remove(0);
        let v = site(&read_json(&p), "grow_leak").live_bytes;
        live.push(v);
        if v == 48 * MIB || started.elapsed() > Duration::from_secs(20) {
            break;
        }
    }
    assert!(live.len() >= 3, "{live:?}");
    assert!(
        live.windows(2).all(|w| w[0] <= w[1]),
        "live bytes never fall: {live:?}"
    );
    assert_eq!(*live.last().unwrap(), 48 * MIB);
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));
}

#[test]
fn heap_step_writes_one_snapshot_per_16mib_crossing() {
    require_root();
    let dir = TempDir::new("heapstep");
    let mut fx = Fixture::spawn("grow");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--heap-step", "16MiB"]);
    // 56 MiB at 1 MiB per 60 ms: thresholds 16, 32 and 48 MiB, about a
    // second apart, so each is crossed on its own (heapbpf polls every
    // 100 ms; a debug build's snapshot takes about half a second).
    fx.command("leak 56 1048576 60000");
    let snaps = collect(&mut hb, "heap-step", fx.pid, 3);
    for (k, p) in snaps.iter().enumerate() {
        let s = read_json(p);
        assert_eq!(s["trigger"], "heap-step");
        let live = s["totals"]["live_bytes"].as_u64().unwrap();
        let threshold = (k as u64 + 1) * 16 * MIB;
        assert!(
            live >= threshold && live < threshold + 16 * MIB,
            "snapshot {k}: {live} for threshold {threshold}"
        );
    }
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));
    assert_eq!(count_lines(&hb, "heap-step"), 3, "{}", hb.stderr.join("\n"));
}

#[test]
fn rss_step_fires_as_rss_grows() {
    require_root();
    let dir = TempDir::new("rssstep");
    let mut fx = Fixture::spawn("grow");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--rss-step", "16MiB"]);
    fx.command("leak 56 1048576 20000");
    let snaps = collect(&mut hb, "rss-step", fx.pid, 2);
    let rss: Vec<u64> = snaps
        .iter()
        .map(|p| read_json(p)["totals"]["rss_bytes"].as_u64().unwrap())
        .collect();
    assert!(rss[1] >= rss[0] + 16 * MIB - 4 * MIB, "{rss:?}");
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));
    let n = count_lines(&hb, "rss-step");
    assert!(
        (2..=3).contains(&n),
        "56 MiB of RSS growth crosses 3 steps at most: {n}"
    );
}

#[test]
fn min_age_keeps_only_old_allocations() {
    require_root();
    let dir = TempDir::new("minage");
    let mut fx = Fixture::spawn("grow");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--min-age", "1s"]);
    fx.command("old 30");
    std::thread::sleep(Duration::from_millis(1500));
    fx.command("fresh 40");
    hb.signal(libc::SIGUSR2);
    let s = read_json(&hb.wait_snapshot("signal", fx.pid)[0]);
    assert_eq!(
        site(&s, "site_old"),
        Site {
            live_bytes: 30_000,
            live_allocations: 30,
            allocated_bytes: 30_000,
            allocations: 30
        }
    );
    assert_eq!(
        site(&s, "site_fresh"),
        Site::default(),
        "fresh blocks are left out, stack and all"
    );
    assert_eq!(s["totals"]["live_bytes"], 30_000);
    assert!(s["stacks"][0]["oldest_age_ms"].as_u64().unwrap() >= 1500);
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));
}

#[test]
fn max_snapshots_keeps_the_newest() {
    require_root();
    let dir = TempDir::new("maxsnap");
    let fx = Fixture::spawn("grow");
    let mut hb = Heapbpf::attach(
        &[fx.pid],
        dir.path(),
        &["--max-snapshots", "2", "--format", "json"],
    );
    let mut written = Vec::new();
    for _ in 0..4 {
        hb.signal(libc::SIGUSR2);
        written.push(hb.wait_snapshot("signal", fx.pid).remove(0));
    }
    hb.signal(libc::SIGINT);
    written.push(hb.wait_snapshot("stop", fx.pid).remove(0));
    assert_eq!(hb.wait_exit().code(), Some(0));
    let mut left: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    left.sort();
    assert_eq!(left, written[3..].to_vec());
}

#[test]
fn diff_puts_the_growing_function_first_with_the_exact_growth() {
    require_root();
    let dir = TempDir::new("diff");
    let mut fx = Fixture::spawn("grow");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &[]);
    fx.command("old 5");
    fx.command("leak 10 1048576 0");
    hb.signal(libc::SIGUSR2);
    let a = hb.wait_snapshot("signal", fx.pid).remove(0);
    fx.command("leak 20 1048576 0");
    fx.command("fresh 3");
    hb.signal(libc::SIGUSR2);
    let b = hb.wait_snapshot("signal", fx.pid).remove(0);
    let (code, out, err) = run_heapbpf(&[
        "diff",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let d: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(d["format"], "heapbpf-diff");
    assert_eq!(d["entries"][0]["frames"][0]["function"], "grow_leak");
    assert_eq!(d["entries"][0]["delta_bytes"], 20 * MIB);
    assert_eq!(d["entries"][0]["delta_allocations"], 20);
    assert_eq!(d["entries"][0]["status"], "grew");
    assert_eq!(d["entries"][1]["frames"][0]["function"], "site_fresh");
    assert_eq!(d["entries"][1]["status"], "new");
    assert_eq!(d["entries"][1]["delta_bytes"], 6000);
    assert_eq!(d["totals"]["delta_bytes"], 20 * MIB + 6000);
    let old = d["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["frames"][0]["function"] == "site_old")
        .unwrap();
    assert_eq!(old["status"], "same");
    let (code, text, _) = run_heapbpf(&["diff", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(code, 0);
    let first = text.lines().find(|l| l.contains("grow_leak")).unwrap();
    assert!(
        first.contains("+20.0 MiB") && first.contains("grew"),
        "{text}"
    );
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
}

/// A memory cgroup (v1) with a 64 MiB limit; removed on drop.
struct MemCgroup(PathBuf);

impl MemCgroup {
    fn new() -> MemCgroup {
        let root = PathBuf::from("/sys/fs/cgroup/memory");
        assert!(
            root.join("memory.limit_in_bytes").exists(),
            "the OOM test needs the cgroup v1 memory controller at {}",
            root.display()
        );
        let p = root.join(format!("heapbpf-test-{}", std::process::id()));
        let _ = std::fs::create_dir(&p);
        std::fs::write(p.join("memory.limit_in_bytes"), "64M").unwrap();
        MemCgroup(p)
    }
    fn add(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn the_oom_killer_gets_a_last_snapshot() {
    require_root();
    let cg = MemCgroup::new();
    let dir = TempDir::new("oom");
    let mut fx = Fixture::spawn("grow");
    cg.add(fx.pid);
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &[]);
    // Grows 1 MiB per 2 ms until the cgroup's OOM killer takes it.
    fx.send("forever 1048576 2000");
    let p = hb.wait_snapshot("oom", fx.pid).remove(0);
    let s = read_json(&p);
    assert_eq!(s["trigger"], "oom");
    assert_eq!(
        s["stacks"][0]["frames"][0]["function"], "grow_leak",
        "symbolized, largest first"
    );
    let live = s["totals"]["live_bytes"].as_u64().unwrap();
    assert!(live > 32 * MIB && live <= 64 * MIB, "{live}");
    let st = fx.wait_exit();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
    assert_eq!(hb.wait_exit().code(), Some(0));
    assert_eq!(
        count_lines(&hb, "exit"),
        0,
        "the OOM snapshot is the final one"
    );
}

#[test]
fn sampling_estimates_are_unbiased_and_close() {
    require_root();
    let dir = TempDir::new("sampling");
    let mut fx = Fixture::spawn("grow");
    let mut hb = Heapbpf::attach(
        &[fx.pid],
        dir.path(),
        &["--sample-bytes", "64KiB", "--format", "json"],
    );
    assert!(
        hb.stderr.iter().any(|l| l.contains("sampling 64KiB")),
        "{:?}",
        hb.stderr
    );
    // 32 MiB in 4 KiB blocks: each sampled with p = 1 - exp(-1/16) ~ 6%.
    fx.command("leak 8192 4096 0");
    // And a few large blocks, always sampled, exactly.
    fx.command("old 0");
    hb.signal(libc::SIGUSR2);
    let s = read_json(&hb.wait_snapshot("signal", fx.pid)[0]);
    assert_eq!(s["sample_bytes"], 64 << 10);
    let leak = site(&s, "grow_leak");
    let truth = 32.0 * MIB as f64;
    let err = (leak.live_bytes as f64 - truth).abs() / truth;
    assert!(
        err < 0.25,
        "estimated {} bytes for {truth}: {:.1}% off",
        leak.live_bytes,
        err * 100.0
    );
    let count_err = (leak.live_allocations as f64 - 8192.0).abs() / 8192.0;
    assert!(
        count_err < 0.25,
        "estimated {} allocations for 8192",
        leak.live_allocations
    );
    fx.command("leak 4 1048576 0");
    hb.signal(libc::SIGUSR2);
    let s = read_json(&hb.wait_snapshot("signal", fx.pid)[0]);
    let big: u64 = s["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|st| st["frames"][0]["function"] == "grow_leak")
        .map(|st| st["live_bytes"].as_u64().unwrap())
        .sum();
    assert!(
        big >= leak.live_bytes + 4 * MIB - 1,
        "1 MiB blocks are always sampled, at weight 1"
    );
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));
}
