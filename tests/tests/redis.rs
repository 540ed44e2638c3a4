//! A real program nobody here wrote: Debian's redis-server (jemalloc),
//! filled after attach by redis-benchmark. heapbpf's live bytes grow by what
//! redis itself reports (`used_memory`), and the stacks name redis' code.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use heapbpf_integration_tests::*;

const PORT: &str = "16399";

fn used_memory() -> u64 {
    let out = Command::new("redis-cli")
        .args(["-p", PORT, "info", "memory"])
        .output()
        .expect("redis-cli (cargo xtask bootstrap installs redis-tools)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO memory")
}

struct Redis(std::process::Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn redis_live_heap_growth_matches_its_own_accounting() {
    require_root();
    let server = Redis(
        Command::new("redis-server")
            .args([
                "--port",
                PORT,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (cargo xtask bootstrap installs it)"),
    );
    let start = Instant::now();
    while Command::new("redis-cli")
        .args(["-p", PORT, "ping"])
        .output()
        .map(|o| !String::from_utf8_lossy(&o.stdout).contains("PONG"))
        .unwrap_or(true)
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dir = TempDir::new("redis");
    let mut hb = Heapbpf::attach(&[server.0.id()], dir.path(), &["--format", "json"]);
    assert!(
        hb.stderr.iter().any(|l| l.contains("libjemalloc")),
        "auto picks jemalloc: {:?}",
        hb.stderr
    );
    let before = used_memory();
    hb.signal(libc::SIGUSR2);
    let a = read_json(&hb.wait_snapshot("signal", server.0.id())[0]);
    let out = Command::new("redis-benchmark")
        .args([
            "-p", PORT, "-t", "set", "-n", "20000", "-d", "1000", "-r", "50000", "-q",
        ])
        .output()
        .expect("redis-benchmark");
    assert!(out.status.success());
    let after = used_memory();
    hb.signal(libc::SIGUSR2);
    let b = read_json(&hb.wait_snapshot("signal", server.0.id())[0]);
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", server.0.id());
    assert_eq!(hb.wait_exit().code(), Some(0));

    let redis_growth = after as f64 - before as f64;
    let ours = b["totals"]["live_bytes"].as_u64().unwrap() as f64
        - a["totals"]["live_bytes"].as_u64().unwrap() as f64;
    let off = (ours - redis_growth).abs() / redis_growth;
    assert!(
        redis_growth > 8e6,
        "the benchmark should add megabytes: {redis_growth}"
    );
    assert!(
        off < 0.15,
        "heapbpf saw {ours:.0} bytes of growth, redis {redis_growth:.0} ({:.1}% off)",
        off * 100.0
    );
    assert_eq!(b["totals"]["dropped_events"], 0);
    // The largest site is redis' own allocation wrapper.
    let top = b["stacks"][0]["frames"][0]["function"]
        .as_str()
        .unwrap_or("");
    assert!(
        top.starts_with('z') || top.contains("alloc"),
        "top frame {top:?}"
    );
    assert!(b["exe"].as_str().unwrap().contains("redis"), "{}", b["exe"]);
}
