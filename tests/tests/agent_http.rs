//! The agent's HTTP API from outside, with the users' own tools: `go tool
//! pprof` on `/debug/pprof/heap`, a real Prometheus scraping `/metrics`,
//! the bearer token, hostile clients, and snapshots taken, listed and
//! fetched over HTTP. Every test profiles a real fixture with real probes.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use heapbpf_integration_tests::*;

const MIB: u64 = 1 << 20;

/// An HTTP answer, read whole.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Writes `bytes`, then reads until the server closes (or resets) the
/// connection; whatever arrived.
fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    // The server may answer and close before reading all of it.
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

fn parse_reply(bytes: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(bytes);
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = bytes[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("chunk size");
            let size_text = String::from_utf8_lossy(&rest[..nl]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .expect("chunk size");
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    Reply {
        status,
        headers,
        body,
    }
}

/// One request on a connection of its own.
fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    parse_reply(&raw(addr, &bytes))
}

fn get(addr: SocketAddr, target: &str) -> Reply {
    request(addr, "GET", target, &[], b"")
}

fn post(addr: SocketAddr, target: &str) -> Reply {
    request(addr, "POST", target, &[], b"")
}

/// A fixture and an agent that profiles it (no interval snapshots unless
/// `interval` says so), once its probes are live.
fn agent_on(fx: &Fixture, data: &Path, extra: &[&str]) -> (Heapbpf, SocketAddr) {
    let pid = fx.pid.to_string();
    let select = format!("pid={pid}");
    let mut args = vec![
        "--select",
        &select,
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--discover-every",
        "200ms",
    ];
    if !extra.contains(&"--interval") {
        args.extend(["--interval", "1h"]);
    }
    args.extend(extra);
    let (mut hb, addr) = Heapbpf::agent_args(&args);
    let fpid = fx.pid;
    hb.wait_for(&format!("attached line of {fpid}"), |l| {
        lines::parse_attached(l).is_some_and(|(p, _)| p == fpid)
    });
    (hb, addr)
}

/// `POST /snapshots?pid=N` and the JSON file it wrote.
fn snapshot_now(hb: &mut Heapbpf, addr: SocketAddr, pid: u32) -> Value {
    let r = post(addr, &format!("/snapshots?pid={pid}"));
    assert_eq!(r.status, 201, "{}", r.text());
    let paths = hb.wait_snapshot("request", pid);
    let json = paths
        .iter()
        .find(|p| p.to_string_lossy().ends_with(".json"))
        .unwrap_or_else(|| panic!("no json in {paths:?}"));
    read_json(json)
}

/// `go tool pprof ARGS`, with its caches in `home`.
fn pprof(home: &Path, args: &[&str]) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .env("HOME", home)
        .env("GOCACHE", home.join("gocache"))
        .env("PPROF_TMPDIR", home.join("pprof"))
        .output()
        .expect("go tool pprof (cargo xtask bootstrap installs golang-go)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "go tool pprof {args:?} failed:\n{stderr}\n{stdout}"
    );
    assert!(
        !stderr.to_lowercase().contains("warning"),
        "go tool pprof {args:?} warned:\n{stderr}"
    );
    stdout
}

/// The bytes `go tool pprof -top -unit=B` shows for `function`.
fn top_bytes(top: &str, function: &str) -> u64 {
    let row = top
        .lines()
        .find(|l| l.trim_end().ends_with(&format!(" {function}")))
        .unwrap_or_else(|| panic!("no {function} in:\n{top}"));
    row.split_whitespace()
        .next()
        .and_then(|f| f.strip_suffix('B'))
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("unreadable row {row:?}"))
}

#[test]
fn go_tool_pprof_reads_the_live_heap_over_http() {
    require_root();
    let data = TempDir::new("agent-pprof");
    let home = TempDir::new("agent-pprof-home");
    let mut fx = Fixture::spawn("grow");
    let (_hb, addr) = agent_on(&fx, data.path(), &[]);
    fx.command("leak 10 1048576 0");
    let url = format!("http://{addr}/debug/pprof/heap?pid={}", fx.pid);

    // inuse_space is what Go shows by default for a heap profile, and
    // what heapbpf marks as the default sample type: both say 10 MiB.
    let top = pprof(
        home.path(),
        &["-top", "-unit=B", "-sample_index=inuse_space", &url],
    );
    assert_eq!(top_bytes(&top, "grow_leak"), 10 * MIB, "{top}");
    let default = pprof(home.path(), &["-top", "-unit=B", &url]);
    assert_eq!(top_bytes(&default, "grow_leak"), 10 * MIB, "{default}");
    // seconds= (which go tool pprof -seconds adds) is accepted and ignored.
    let top = pprof(
        home.path(),
        &["-top", "-unit=B", &format!("{url}&seconds=1")],
    );
    assert_eq!(top_bytes(&top, "grow_leak"), 10 * MIB, "{top}");

    // -base between two fetches: exactly what grew between them.
    let base = home.path().join("base.pb.gz");
    pprof(
        home.path(),
        &["-proto", "-output", base.to_str().unwrap(), &url],
    );
    fx.command("leak 6 1048576 0");
    let grown = pprof(
        home.path(),
        &[
            "-top",
            "-unit=B",
            "-sample_index=inuse_space",
            "-base",
            base.to_str().unwrap(),
            &url,
        ],
    );
    assert_eq!(top_bytes(&grown, "grow_leak"), 6 * MIB, "{grown}");

    // As Go's net/http/pprof answers.
    let r = get(addr, &format!("/debug/pprof/heap?pid={}", fx.pid));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"heap.pb.gz\"")
    );
    assert_eq!(&r.body[..2], &[0x1f, 0x8b], "gzip");
}

/// A Prometheus server on a free loopback port, scraping `target` every
/// second, its storage in `dir`; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(dir: &Path, target: SocketAddr) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: heapbpf\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (cargo xtask bootstrap installs it)");
        let p = Prometheus { child, addr };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let ready = TcpStream::connect(addr).is_ok() && get(addr, "/-/ready").status == 200;
            if ready {
                return p;
            }
            assert!(Instant::now() < deadline, "prometheus did not get ready");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An instant query's samples: (labels, value).
    fn query(&self, promql: &str) -> Vec<(Value, String)> {
        let encoded: String = promql
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b == b'_' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let r = get(self.addr, &format!("/api/v1/query?query={encoded}"));
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["status"], "success", "{v}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["metric"].clone(),
                    s["value"][1].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn prometheus_scrapes_the_live_heap_of_each_target() {
    require_root();
    let data = TempDir::new("agent-prom");
    let prom_dir = TempDir::new("agent-prom-server");
    let mut fx = Fixture::spawn("grow");
    // A second target whose name (its executable's, so its comm) is made
    // to break the exposition format: a quote, a backslash, a line feed.
    let hostile = "g\"r\\o\nw";
    let exe = prom_dir.path().join(hostile);
    std::fs::copy(fixture_path("grow"), &exe).unwrap();
    let mut other = Fixture::from_command(&mut Command::new(&exe), |c, _| c.id());
    let other_select = format!("pid={}", other.pid);
    let (mut hb, addr) = agent_on(&fx, data.path(), &["--select", &other_select]);
    let other_pid = other.pid;
    let attached = |l: &str| lines::parse_attached(l).is_some_and(|(p, _)| p == other_pid);
    // It may have been attached before the first one.
    if !hb.stderr.iter().any(|l| attached(l)) {
        hb.wait_for("the hostile target attached", attached);
    }
    other.command("leak 1 1048576 0");
    fx.command("leak 3 1048576 0");
    fx.command("old 7");
    // The fixture stays idle from here on.
    let snapshot = snapshot_now(&mut hb, addr, fx.pid);
    let live = snapshot["totals"]["live_bytes"].as_u64().unwrap();
    assert!(live >= 3 * MIB + 7000, "{live}");

    // What the agent says itself.
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200);
    let text = r.text();
    let labels = format!(
        "{{pid=\"{}\",comm=\"grow\",container=\"\",pod=\"\",namespace=\"\",service_name=\"\"}}",
        fx.pid
    );
    assert!(
        text.contains(&format!("heapbpf_target_live_bytes{labels} {live}\n")),
        "{text}"
    );
    let hostile_labels = format!(
        "{{pid=\"{other_pid}\",comm=\"g\\\"r\\\\o\\nw\",container=\"\",pod=\"\",namespace=\"\",service_name=\"\"}}"
    );
    assert!(
        text.contains(&format!("heapbpf_target_live_bytes{hostile_labels} ")),
        "{hostile_labels}: {text}"
    );
    for line in [
        "heapbpf_targets{state=\"attached\"} 2\n",
        "heapbpf_targets{state=\"waiting\"} 0\n",
        "heapbpf_targets{state=\"windowed\"} 0\n",
        "heapbpf_targets{state=\"failed\"} 0\n",
        "heapbpf_push_failures_total 0\n",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    for name in [
        "heapbpf_target_live_allocations{",
        "heapbpf_target_allocated_bytes_total{",
        "heapbpf_target_dropped_events_total{",
        "heapbpf_target_overhead_ratio{",
        "heapbpf_target_coverage_ratio{",
        "heapbpf_snapshot_seconds_count ",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_virtual_memory_bytes ",
        "process_open_fds ",
        "process_max_fds ",
        "process_start_time_seconds ",
    ] {
        assert!(text.contains(name), "{name}: {text}");
    }

    // And what a real Prometheus reads of it.
    let prom = Prometheus::start(prom_dir.path(), addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    let samples = loop {
        let s = prom.query("heapbpf_target_live_bytes{comm=\"grow\"}");
        if !s.is_empty() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped the agent; up: {:?}",
            prom.query("up")
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(samples.len(), 1, "{samples:?}");
    let (metric, value) = &samples[0];
    assert_eq!(value, &live.to_string(), "{metric}");
    assert_eq!(metric["pid"], fx.pid.to_string());
    assert_eq!(metric["job"], "heapbpf");
    // The hostile name went through whole: Prometheus read it back as it is.
    let theirs = prom.query(&format!("heapbpf_target_live_bytes{{pid=\"{other_pid}\"}}"));
    assert_eq!(theirs.len(), 1, "{theirs:?}");
    assert_eq!(theirs[0].0["comm"], hostile);
    assert_eq!(theirs[0].1, MIB.to_string());
    let states = prom.query("heapbpf_targets");
    assert_eq!(states.len(), 4, "{states:?}");
    let up = prom.query("up{job=\"heapbpf\"}");
    assert_eq!(up.first().map(|(_, v)| v.as_str()), Some("1"), "{up:?}");
}

#[test]
fn a_token_guards_everything_but_healthz() {
    require_root();
    let data = TempDir::new("agent-token");
    let token_file = data.path().join("token");
    std::fs::write(&token_file, "s3cret-t0ken\n").unwrap();
    let store = data.path().join("data");
    let fx = Fixture::spawn("grow");
    let (_hb, addr) = agent_on(&fx, &store, &["--token-file", token_file.to_str().unwrap()]);
    let heap = format!("/debug/pprof/heap?pid={}", fx.pid);
    let snaps = format!("/snapshots?pid={}", fx.pid);
    for path in [
        "/targets",
        "/metrics",
        heap.as_str(),
        snaps.as_str(),
        "/nowhere",
    ] {
        let r = get(addr, path);
        assert_eq!(r.status, 401, "{path}: {}", r.text());
        assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{path}");
        assert_eq!(r.text().lines().count(), 1, "{path}");
        for wrong in [
            "Bearer s3cret-t0ke",
            "Bearer s3cret-t0ken2",
            "Basic s3cret-t0ken",
            "s3cret-t0ken",
        ] {
            let r = request(addr, "GET", path, &[("Authorization", wrong)], b"");
            assert_eq!(r.status, 401, "{path} with {wrong}");
        }
        let r = request(
            addr,
            "GET",
            path,
            &[("Authorization", "Bearer s3cret-t0ken")],
            b"",
        );
        let want = if path == "/nowhere" { 404 } else { 200 };
        assert_eq!(r.status, want, "{path}: {}", r.text());
    }
    let r = get(addr, "/healthz");
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let r = request(addr, "POST", &snaps, &[], b"");
    assert_eq!(r.status, 401);

    // Listening beyond loopback needs a token.
    let (code, _, err) = run_heapbpf(&[
        "agent",
        "--select",
        &format!("pid={}", fx.pid),
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        store.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--token-file"), "{err}");
    assert!(err.lines().count() <= 2, "{err}");
}

/// Sends `GET /healthz` one byte at a time; how long until the server
/// closes the connection (it must, before the request is complete).
fn slowloris(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    for b in request.iter().take(request.len() - 2) {
        if s.write_all(&[*b]).is_err() {
            return started.elapsed();
        }
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(n) => {
                let head = String::from_utf8_lossy(&buf[..n]);
                assert!(!head.starts_with("HTTP/1.1 200"), "{head}");
                return started.elapsed();
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return started.elapsed(),
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "a slowloris client was never dropped"
        );
    }
    panic!("the whole request went through byte by byte without the server closing")
}

#[test]
fn hostile_clients_get_4xx_and_the_agent_keeps_profiling() {
    require_root();
    let data = TempDir::new("agent-hostile");
    let mut fx = Fixture::spawn("grow");
    let (mut hb, addr) = agent_on(&fx, data.path(), &[]);
    let pid = fx.pid;

    // A slow client in the background: it must not hold up the others.
    let slow = std::thread::spawn(move || slowloris(addr));

    // Too large: headers (431) and bodies (413), declared or chunked.
    let big = "a".repeat(20 * 1024);
    let r = request(addr, "GET", "/healthz", &[("X-Big", &big)], b"");
    assert_eq!(r.status, 431, "{}", r.text());
    let many: Vec<(String, String)> = (0..100).map(|i| (format!("X-H{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(request(addr, "GET", "/healthz", &many, b"").status, 431);
    let r = parse_reply(&raw(
        addr,
        format!("POST /snapshots?pid={pid} HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
            .as_bytes(),
    ));
    assert_eq!(r.status, 413, "{}", r.text());
    let mut chunked = format!(
        "POST /snapshots?pid={pid} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..80 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b'x'; 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = raw(addr, &chunked);
    // The server may reset the connection on what it did not read.
    if !answer.is_empty() {
        assert_eq!(parse_reply(&answer).status, 413);
    }

    // Bad queries: one plain line each.
    for target in [
        "/debug/pprof/heap".to_string(),
        "/debug/pprof/heap?pid=abc".into(),
        "/debug/pprof/heap?pid=-1".into(),
        "/debug/pprof/heap?pid=0".into(),
        "/debug/pprof/heap?pid=99999999999999999999".into(),
        format!("/debug/pprof/heap?pid={pid}&pid={pid}"),
        format!("/debug/pprof/heap?pid={pid}&debug=1"),
        format!("/debug/pprof/heap?pid={pid}&seconds=x"),
        format!("/debug/pprof/heap?pid={pid}&container=abc"),
        "/debug/pprof/heap?pid=%ff%fe".into(),
        "/debug/pprof/heap?container=".into(),
        "/snapshots".into(),
        "/snapshots?pid=".into(),
        format!("/snapshots?pid={pid}&x=1"),
    ] {
        let r = get(addr, &target);
        assert_eq!(r.status, 400, "{target}: {}", r.text());
        assert_eq!(r.text().lines().count(), 1, "{target}: {}", r.text());
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; charset=utf-8"),
            "{target}"
        );
    }
    // Not a target; not a path; not a method.
    assert_eq!(get(addr, "/debug/pprof/heap?pid=1").status, 404);
    assert_eq!(post(addr, "/snapshots?pid=1").status, 404);
    assert_eq!(
        get(addr, "/debug/pprof/heap?container=feedface").status,
        404
    );
    assert_eq!(get(addr, "/nowhere").status, 404);
    assert_eq!(get(addr, "/targets/").status, 404);
    assert_eq!(request(addr, "DELETE", "/targets", &[], b"").status, 405);
    assert_eq!(
        request(addr, "PUT", "/snapshots?pid=1", &[], b"").status,
        405
    );
    assert_eq!(post(addr, "/metrics").status, 405);

    // Garbage on the socket: an error or a closed connection, never 2xx.
    for garbage in [
        &b"\x00\x01\x02\xff\xfe garbage\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let answer = raw(addr, garbage);
        let head = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || head.starts_with("HTTP/1.1 4"),
            "{garbage:?} -> {head}"
        );
    }

    // Path traversal and things in the data directory that are not
    // snapshots, though named like them.
    let fake = format!("heapbpf-{pid}-20260101T000000Z-0001.json");
    std::os::unix::fs::symlink("/etc/passwd", data.path().join(&fake)).unwrap();
    let fifo = format!("heapbpf-{pid}-20260101T000000Z-0002.json");
    let c = std::ffi::CString::new(data.path().join(&fifo).to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let dir_named = format!("heapbpf-{pid}-20260101T000000Z-0003.json");
    std::fs::create_dir(data.path().join(&dir_named)).unwrap();
    for target in [
        "/snapshots/..".to_string(),
        "/snapshots/../../etc/passwd".into(),
        "/snapshots/%2e%2e".into(),
        "/snapshots/%2e%2e%2f%2e%2e%2fetc%2fpasswd".into(),
        "/snapshots/..%2f..%2fetc%2fpasswd".into(),
        "/snapshots/%2fetc%2fpasswd".into(),
        "/snapshots/passwd".into(),
        format!("/snapshots/{fake}%00"),
        format!("/snapshots/{fake}%2f"),
        format!("/snapshots/.%2f{fake}"),
        format!("/snapshots/{fake}"),
        format!("/snapshots/{fifo}"),
        format!("/snapshots/{dir_named}"),
        format!("/snapshots/heapbpf-{pid}-20260101T000000Z-0009.json"),
        "/snapshots/%ff".into(),
    ] {
        let r = get(addr, &target);
        assert!(
            r.status == 400 || r.status == 404,
            "{target}: {} {}",
            r.status,
            r.text()
        );
        assert!(!r.text().contains("root:"), "{target}: {}", r.text());
    }
    // None of them is listed.
    let listed = get(addr, &format!("/snapshots?pid={pid}")).json();
    assert_eq!(listed, serde_json::json!([]), "{listed}");

    let slow_for = slow.join().unwrap();
    assert!(
        slow_for >= Duration::from_secs(5) && slow_for < Duration::from_secs(20),
        "the slowloris client was dropped after {slow_for:?}"
    );

    // Still answering, still profiling.
    let r = get(addr, "/healthz");
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    fx.command("leak 4 1048576 0");
    let snapshot = snapshot_now(&mut hb, addr, pid);
    assert_eq!(site(&snapshot, "grow_leak").live_bytes, 4 * MIB);
    let targets = get(addr, "/targets").json();
    assert_eq!(targets[0]["pid"], pid);
    assert_eq!(targets[0]["state"], "attached");
    assert!(hb.child.try_wait().unwrap().is_none(), "the agent exited");
}

#[test]
fn snapshots_are_taken_listed_and_fetched_over_http() {
    require_root();
    let data = TempDir::new("agent-snapshots");
    let mut fx = Fixture::spawn("grow");
    let (mut hb, addr) = agent_on(&fx, data.path(), &["--format", "json,pprof,collapsed,svg"]);
    let pid = fx.pid;
    fx.command("leak 2 1048576 0");
    let first = post(addr, &format!("/snapshots?pid={pid}"));
    assert_eq!(first.status, 201, "{}", first.text());
    assert_eq!(first.header("content-type"), Some("application/json"));
    let paths = hb.wait_snapshot("request", pid);
    let names = |paths: &[PathBuf]| -> Vec<String> {
        paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    let files = first.json()["files"].clone();
    assert_eq!(files, serde_json::json!(names(&paths)));
    assert_eq!(paths.len(), 4);
    fx.command("leak 1 1048576 0");
    let second = post(addr, &format!("/snapshots?pid={pid}"));
    assert_eq!(second.status, 201);
    let later = hb.wait_snapshot("request", pid);

    // Listed, newest first, with their sizes, times and formats.
    let listed = get(addr, &format!("/snapshots?pid={pid}"));
    assert_eq!(listed.status, 200);
    let listed = listed.json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 8, "{listed:?}");
    let listed_names: Vec<&str> = listed.iter().map(|e| e["name"].as_str().unwrap()).collect();
    let newer = names(&later);
    assert!(
        listed_names[..4]
            .iter()
            .all(|n| newer.contains(&n.to_string())),
        "{listed_names:?}"
    );
    let json = read_json(
        paths
            .iter()
            .find(|p| p.to_string_lossy().ends_with(".json"))
            .unwrap(),
    );
    for p in paths.iter().chain(&later) {
        let name = p.file_name().unwrap().to_str().unwrap();
        let e = listed
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed"));
        assert_eq!(e["size"], std::fs::metadata(p).unwrap().len());
        let format = match name.rsplit_once('-').unwrap().1.split_once('.').unwrap().1 {
            "pb.gz" => "pprof",
            other => other,
        };
        assert_eq!(e["format"], format, "{name}");
        assert!(e["taken_at"].as_str().unwrap().ends_with('Z'));
    }
    let first_json = listed
        .iter()
        .find(|e| {
            e["name"].as_str().unwrap().ends_with(".json")
                && paths
                    .iter()
                    .any(|p| p.ends_with(e["name"].as_str().unwrap()))
        })
        .unwrap();
    assert_eq!(first_json["taken_at"], json["taken_at"]);

    // Each file, byte for byte, with a content type by its extension.
    for p in paths.iter().chain(&later) {
        let name = p.file_name().unwrap().to_str().unwrap();
        let r = get(addr, &format!("/snapshots/{name}"));
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_eq!(r.body, std::fs::read(p).unwrap(), "{name}");
        let want = if name.ends_with(".json") {
            "application/json"
        } else if name.ends_with(".svg") {
            "image/svg+xml"
        } else if name.ends_with(".collapsed") {
            "text/plain; charset=utf-8"
        } else {
            "application/octet-stream"
        };
        assert_eq!(r.header("content-type"), Some(want), "{name}");
    }
    // Another pid's list is empty; the data directory's own files stay private.
    assert_eq!(get(addr, "/snapshots?pid=1").json(), serde_json::json!([]));
    // A request for a process that is not a target.
    let r = post(addr, "/snapshots?pid=1");
    assert_eq!(r.status, 404, "{}", r.text());
    // What the JSON says is what the agent reported for it.
    assert_eq!(site(&json, "grow_leak").live_bytes, 2 * MIB);
}
