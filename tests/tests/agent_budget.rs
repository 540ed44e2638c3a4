//! `heapbpf agent --max-overhead`: a target whose probes cost more than its
//! budget is profiled in windows; its snapshots say what they cover, and a
//! leak still shows as the top live site. The fixture's slowdown under the
//! agent is printed, and only loosely asserted (timing belongs to
//! benchmarks).
use heapbpf_integration_tests::*;

/// The fixture's operations per second over `ms`.
fn ops_per_second(f: &mut Fixture, ms: u64) -> f64 {
    let answer = f.ask(&format!("ops {ms}"));
    answer
        .parse()
        .unwrap_or_else(|_| panic!("fixture answered {answer:?} to ops"))
}

#[test]
fn an_expensive_target_is_profiled_in_windows_and_its_leak_still_shows() {
    require_root();
    let dir = TempDir::new("agent-budget");
    let mut f = Fixture::spawn("churn");
    let pid = f.pid;
    let without_before = ops_per_second(&mut f, 2000);

    let select = format!("pid={pid}");
    // The agent's own default sampling: what a node runs.
    let (mut h, addr) = Heapbpf::agent(
        dir.path(),
        &[
            "--select",
            &select,
            "--max-overhead",
            "1%",
            "--interval",
            "2s",
            "--sample-bytes",
            "64KiB",
        ],
    );
    h.wait_for(&format!("attached line of {pid}"), |l| {
        lines::parse_attached(l).is_some_and(|(p, _)| p == pid)
    });
    let line = h.wait_for(&format!("pid {pid} going windowed"), |l| {
        lines::parse_budget(l).is_some_and(|b| b.pid == pid && b.windowed)
    });
    eprintln!("agent said: {line}");
    let budget = lines::parse_budget(&line).unwrap();
    assert!(
        budget.overhead > 0.01,
        "windowed at {} of its CPU time, under the 1% budget: {line}",
        budget.overhead
    );

    // /targets says it too: windowed, with the duty cycle and what full
    // attachment costs.
    // (The view is published at the end of the loop's turn that said it.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let t = loop {
        let targets = http_get(addr, "/targets");
        let targets: serde_json::Value = serde_json::from_str(&targets).expect("/targets is JSON");
        let t = targets
            .as_array()
            .and_then(|a| a.iter().find(|t| t["pid"] == pid).cloned())
            .unwrap_or_else(|| panic!("pid {pid} in /targets: {targets}"));
        if t["state"] == "windowed" || std::time::Instant::now() > deadline {
            break t;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    eprintln!("/targets: {t}");
    assert_eq!(t["state"], "windowed", "{t}");
    let reason = t["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("over --max-overhead 1%: allocation probes on ")
            && reason.contains(" of every "),
        "{t}"
    );
    assert!(
        t["coverage"].as_f64().is_some_and(|c| c > 0.0 && c < 1.0),
        "{t}"
    );

    let with_1 = ops_per_second(&mut f, 3000);
    let with_2 = ops_per_second(&mut f, 3000);

    // Within a few intervals the leak is the top live site, in snapshots
    // that say they cover part of the time.
    let mut last = None;
    for _ in 0..12 {
        let paths = h.wait_snapshot("interval", pid);
        let json = paths
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == "json"))
            .expect("a JSON snapshot")
            .clone();
        let snap = read_json(&json);
        let top = snap["stacks"][0]["frames"][0]["function"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let cov = snap["coverage"].clone();
        eprintln!(
            "snapshot {}: top site {top}, coverage {}",
            json.display(),
            serde_json::to_string(&cov).unwrap()
        );
        last = Some(snap);
        let windows = cov["windows"].as_array().map_or(0, Vec::len);
        if top == "leak_site" && cov["ratio"].as_f64().is_some_and(|r| r < 1.0) && windows >= 2 {
            break;
        }
    }
    let snap = last.unwrap();
    let cov = &snap["coverage"];
    let ratio = cov["ratio"].as_f64().expect("coverage.ratio");
    assert!(ratio > 0.0 && ratio < 1.0, "coverage {cov}");
    assert!(cov["follow_ms"].as_u64().is_some_and(|ms| ms > 0), "{cov}");
    let windows = cov["windows"].as_array().expect("coverage.windows");
    assert!(windows.len() >= 2, "{cov}");
    for w in windows {
        assert!(
            w["start"].is_string() && w["end"].is_string(),
            "window {w} of {cov}"
        );
    }
    assert_eq!(
        snap["stacks"][0]["frames"][0]["function"], "leak_site",
        "the leak is the top live site within a few intervals"
    );
    assert!(site(&snap, "leak_site").live_bytes >= 4096);

    h.signal(libc::SIGTERM);
    let status = h.wait_exit();
    assert!(status.success(), "agent: {status}\n{}", h.stderr.join("\n"));
    let without_after = ops_per_second(&mut f, 2000);

    let without = (without_before + without_after) / 2.0;
    let with = (with_1 + with_2) / 2.0;
    let ratio = with / without;
    eprintln!(
        "churn ops/s: without the agent {without_before:.0} then {without_after:.0}; \
         with it (windowed, --max-overhead 1%) {with_1:.0} and {with_2:.0}: {ratio:.3}x"
    );
    // Loose: a budget kept misses by far less; this VM is noisy.
    assert!(
        ratio > 0.7,
        "the fixture ran at {ratio:.3}x of its speed under a 1% budget"
    );
    f.command("exit");
}

/// The body of `GET target` (HTTP/1.0, no token: the agent listens on loopback).
fn http_get(addr: std::net::SocketAddr, target: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to the agent");
    write!(conn, "GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}
