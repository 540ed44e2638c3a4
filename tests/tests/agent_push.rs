//! The agent pushing to profile stores, checked by receivers written here
//! from the stores' published protocols (no Pyroscope or Parca server can be
//! installed on this machine): Pyroscope's `push.v1.PusherService/Push`
//! (Connect, protobuf, `api/push/v1/push.proto`) and Parca's
//! `/profiles/writeraw` (`WriteRaw`'s HTTP/JSON mapping,
//! `profilestore.proto`). The messages are decoded with this file's own
//! prost structs, not heapbpf's; each raw profile goes through
//! `go tool pprof`, which must show the fixture's leak to the byte.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use base64::Engine as _;
use heapbpf_integration_tests::*;
use prost::Message;

const MIB: u64 = 1 << 20;

/// Pyroscope's messages, from `api/push/v1/push.proto` and
/// `api/types/v1/types.proto`.
mod pyroscope {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        #[prost(message, repeated, tag = "1")]
        pub series: Vec<RawProfileSeries>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RawProfileSeries {
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<LabelPair>,
        #[prost(message, repeated, tag = "2")]
        pub samples: Vec<RawSample>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LabelPair {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RawSample {
        #[prost(bytes = "vec", tag = "1")]
        pub raw_profile: Vec<u8>,
        #[prost(string, tag = "2")]
        pub id: String,
    }
}

/// The few fields of pprof's `profile.proto` these tests read.
mod pprof {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
    }
}

/// One request as the receiver read it.
#[derive(Clone, Debug)]
struct Got {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A profile store stand-in on a loopback port: answers every request 200
/// (with an empty message) and keeps it; stopped (its port closed) on
/// [`Receiver::stop`] or drop.
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start(addr: SocketAddr, got: Arc<Mutex<Vec<Got>>>) -> Receiver {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_stop, thread_got) = (stop.clone(), got.clone());
        let thread = std::thread::spawn(move || {
            while !thread_stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        if let Some(g) = serve_one(s) {
                            thread_got.lock().unwrap().push(g);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Receiver {
            addr,
            got,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Waits until `pred` holds of what arrived.
    fn wait(&self, what: &str, pred: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let got = self.got.lock().unwrap().clone();
            if pred(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver waited for {what}; it has {} requests",
                got.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads one HTTP/1.1 request (with a Content-Length body), answers 200
/// and closes.
fn serve_one(mut s: TcpStream) -> Option<Got> {
    s.set_nonblocking(false).ok()?;
    s.set_read_timeout(Some(TIMEOUT)).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .expect("a push has a Content-Length");
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let got = Got {
        method,
        path,
        headers,
        body,
    };
    // Connect's unary answer: the bare (empty) response message; Parca's
    // gateway answers JSON.
    let (ctype, answer): (&str, &[u8]) = if got.path.ends_with("/writeraw") {
        ("application/json", b"{}")
    } else {
        ("application/proto", b"")
    };
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        answer.len()
    );
    let _ = s.write_all(answer);
    Some(got)
}

/// `GET path` on the agent's API: the body.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{path}: {text}");
    text
}

/// A metric's value on `/metrics` (0 when absent).
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = http_get(addr, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// The labels of a Push body, checked to hold one series of one sample:
/// (labels, raw profile, id).
fn decode_push(g: &Got) -> (Vec<(String, String)>, Vec<u8>, String) {
    let req = pyroscope::PushRequest::decode(&g.body[..]).expect("a push.v1.PushRequest");
    assert_eq!(req.series.len(), 1);
    let s = &req.series[0];
    assert_eq!(s.samples.len(), 1);
    (
        s.labels
            .iter()
            .map(|l| (l.name.clone(), l.value.clone()))
            .collect(),
        s.samples[0].raw_profile.clone(),
        s.samples[0].id.clone(),
    )
}

/// A WriteRaw JSON body (protobuf's JSON mapping: either field name form):
/// (labels, raw profile).
fn decode_writeraw(g: &Got) -> (Vec<(String, String)>, Vec<u8>) {
    let v: Value = serde_json::from_slice(&g.body).expect("a JSON WriteRawRequest");
    let series = v["series"].as_array().expect("series[]");
    assert_eq!(series.len(), 1, "{v}");
    let labels = series[0]["labels"]["labels"]
        .as_array()
        .expect("series[].labels.labels[]")
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap().to_string(),
                l["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let samples = series[0]["samples"].as_array().expect("samples[]");
    assert_eq!(samples.len(), 1);
    let b64 = samples[0]["raw_profile"]
        .as_str()
        .or(samples[0]["rawProfile"].as_str())
        .expect("samples[].raw_profile");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64 (protobuf JSON bytes)");
    (labels, raw)
}

fn label<'a>(labels: &'a [(String, String)], name: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A pprof profile's time and its total of `sample_type`.
fn pprof_total(raw: &[u8], sample_type: &str) -> (i64, u64) {
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(raw)
        .read_to_end(&mut bytes)
        .expect("a gzipped profile");
    let p = pprof::Profile::decode(&bytes[..]).expect("a pprof profile");
    let i = p
        .sample_type
        .iter()
        .position(|t| p.string_table[t.r#type as usize] == sample_type)
        .unwrap_or_else(|| panic!("no {sample_type} sample type"));
    let total = p.sample.iter().map(|s| s.value[i] as u64).sum();
    (p.time_nanos, total)
}

/// `go tool pprof -top -unit=B -sample_index=INDEX` on `raw`: the bytes it
/// shows for `function`.
fn pprof_top_bytes(home: &Path, raw: &[u8], index: &str, function: &str) -> u64 {
    let file = home.join("pushed.pb.gz");
    std::fs::write(&file, raw).unwrap();
    let out = Command::new("go")
        .args(["tool", "pprof", "-top", "-unit=B"])
        .arg(format!("-sample_index={index}"))
        .arg(&file)
        .env("HOME", home)
        .env("GOCACHE", home.join("gocache"))
        .env("PPROF_TMPDIR", home.join("pprof"))
        .output()
        .expect("go tool pprof (cargo xtask bootstrap installs golang-go)");
    let top = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "go tool pprof failed:\n{stderr}\n{top}"
    );
    assert!(
        !stderr.to_lowercase().contains("warning"),
        "go tool pprof warned:\n{stderr}"
    );
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

/// The `node` label the agent gives: `NODE_NAME`, else the host name.
fn node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .map(|n| n.trim().to_string())
        .unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap()
                .trim()
                .to_string()
        })
}

/// An agent profiling `fx` with `extra` flags, once its probes are live.
fn agent_on(fx: &Fixture, data: &Path, extra: &[&str]) -> (Heapbpf, SocketAddr) {
    let select = format!("pid={}", fx.pid);
    let mut args = vec!["--select", select.as_str(), "--interval", "1s"];
    args.extend(extra);
    let (mut hb, addr) = Heapbpf::agent(data, &args);
    hb.wait_attached(fx.pid);
    (hb, addr)
}

#[test]
fn pyroscope_gets_every_snapshot_labelled_and_in_order_through_an_outage() {
    require_root();
    let data = TempDir::new("push-pyro");
    let home = TempDir::new("push-pyro-home");
    let auth = home.path().join("auth");
    std::fs::write(&auth, "alice:s3cret pass\n").unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let mut receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), got.clone());
    let url = format!("http://{}/", receiver.addr);
    let mut fx = Fixture::spawn("grow");
    let (mut hb, api) = agent_on(
        &fx,
        data.path(),
        &[
            "--push",
            &url,
            "--push-tenant",
            "team-a",
            "--push-header",
            "X-Scope-Test: yes",
            "--push-basic-auth",
            auth.to_str().unwrap(),
        ],
    );
    fx.command("leak 10 1048576 0");

    // A push that holds the leak: its request and labels as push.proto
    // and Pyroscope's Connect endpoint define them.
    let pid = fx.pid;
    let with_leak = |g: &Got| pprof_total(&decode_push(g).1, "inuse_space").1 >= 10 * MIB;
    let all = receiver.wait("a push with the 10 MiB leak", |g| g.iter().any(with_leak));
    let g = all.iter().find(|g| with_leak(g)).unwrap();
    assert_eq!(g.method, "POST");
    assert_eq!(g.path, "/push.v1.PusherService/Push");
    assert_eq!(g.header("content-type"), Some("application/proto"));
    assert_eq!(g.header("connect-protocol-version"), Some("1"));
    assert_eq!(g.header("x-scope-orgid"), Some("team-a"));
    assert_eq!(g.header("x-scope-test"), Some("yes"));
    let basic = base64::engine::general_purpose::STANDARD.encode("alice:s3cret pass");
    assert_eq!(
        g.header("authorization"),
        Some(format!("Basic {basic}").as_str())
    );
    let (labels, raw, id) = decode_push(g);
    assert_eq!(label(&labels, "__name__"), Some("memory"));
    assert_eq!(label(&labels, "__delta__"), Some("false"));
    assert_eq!(label(&labels, "service_name"), Some("grow"));
    assert_eq!(label(&labels, "pid"), Some(pid.to_string().as_str()));
    assert_eq!(label(&labels, "node"), Some(node_name().as_str()));
    // No pod metadata without --kubernetes: no namespace or pod label.
    assert_eq!(label(&labels, "namespace"), None);
    assert_eq!(label(&labels, "pod"), None);
    assert_eq!(id.len(), 36, "a UUID: {id}");
    // The profile itself, read by Go's own tool: the leak to the byte.
    assert_eq!(
        pprof_top_bytes(home.path(), &raw, "inuse_space", "grow_leak"),
        10 * MIB
    );
    assert_eq!(
        pprof_top_bytes(home.path(), &raw, "alloc_space", "grow_leak"),
        10 * MIB
    );
    assert!(!hb.stderr.iter().any(|l| l.contains("s3cret")));

    // The store goes away: snapshots queue, each attempt is a failure.
    receiver.stop();
    let before = receiver.count();
    let deadline = Instant::now() + TIMEOUT;
    while metric(api, "heapbpf_push_queue_profiles") < 3.0 {
        assert!(
            Instant::now() < deadline,
            "nothing queued while the store is down"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(metric(api, "heapbpf_push_failures_total") >= 1.0);
    assert_eq!(metric(api, "heapbpf_push_dropped_total"), 0.0);
    hb.wait_for("the push failure line", |l| {
        l.contains("cannot push to Pyroscope at http://127.0.0.1:")
            && l.contains("profiles are queued")
    });
    // Meanwhile the heap grows: the queued profiles show it growing.
    fx.command("leak 5 1048576 0");
    std::thread::sleep(Duration::from_secs(2));

    // Back on the same port: the queue drains, in order.
    let receiver = Receiver::start(receiver.addr, got.clone());
    hb.wait_for("the push recovery line", |l| {
        l.contains("pushing to Pyroscope at") && l.contains("works again")
    });
    let deadline = Instant::now() + TIMEOUT;
    while metric(api, "heapbpf_push_queue_profiles") > 0.0 {
        assert!(Instant::now() < deadline, "the queue did not drain");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(receiver.count() > before);
    let failures = metric(api, "heapbpf_push_failures_total");
    assert!(failures >= 1.0);

    // Stop: the final snapshot is pushed too, before the agent exits.
    hb.signal(libc::SIGTERM);
    assert!(hb.wait_exit().success(), "{}", hb.stderr.join("\n"));
    let got = got.lock().unwrap().clone();
    // Every snapshot the agent wrote arrived once, in the order written:
    // the live bytes of its snapshot lines, one by one, are the inuse
    // totals of the profiles received.
    let written: Vec<(String, u64)> = hb
        .stderr
        .iter()
        .filter_map(|l| lines::parse_snapshot(l))
        .filter(|s| s.pid == pid)
        .map(|s| (s.trigger, s.live_bytes))
        .collect();
    let pushed: Vec<(i64, u64)> = got
        .iter()
        .map(|g| pprof_total(&decode_push(g).1, "inuse_space"))
        .collect();
    assert_eq!(
        pushed.iter().map(|p| p.1).collect::<Vec<_>>(),
        written.iter().map(|w| w.1).collect::<Vec<_>>(),
        "pushed vs written ({written:?})"
    );
    assert_eq!(written.last().map(|w| w.0.as_str()), Some("stop"));
    assert!(
        pushed.windows(2).all(|w| w[0].0 <= w[1].0),
        "profile times out of order: {pushed:?}"
    );
    let mut ids: Vec<String> = got.iter().map(|g| decode_push(g).2).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), got.len(), "each profile once");
    let last = &got.last().unwrap();
    assert_eq!(
        pprof_top_bytes(
            home.path(),
            &decode_push(last).1,
            "inuse_space",
            "grow_leak"
        ),
        15 * MIB
    );
    eprintln!(
        "pushed {} profiles, {failures} failed attempts while the store was down",
        got.len()
    );
}

#[test]
fn parca_gets_writeraw_with_the_profile_and_labels() {
    require_root();
    let data = TempDir::new("push-parca");
    let home = TempDir::new("push-parca-home");
    let got = Arc::new(Mutex::new(Vec::new()));
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap(), got.clone());
    let url = format!("http://{}", receiver.addr);
    let mut fx = Fixture::spawn("grow");
    let (mut hb, _api) = agent_on(&fx, data.path(), &["--push-parca", &url]);
    fx.command("leak 12 1048576 0");
    let with_leak = |g: &Got| pprof_total(&decode_writeraw(g).1, "inuse_space").1 >= 12 * MIB;
    let all = receiver.wait("a WriteRaw with the 12 MiB leak", |g| {
        g.iter().any(with_leak)
    });
    let g = all.iter().find(|g| with_leak(g)).unwrap();
    assert_eq!(g.method, "POST");
    assert_eq!(g.path, "/profiles/writeraw");
    assert_eq!(g.header("content-type"), Some("application/json"));
    let v: Value = serde_json::from_slice(&g.body).unwrap();
    assert_eq!(v["normalized"], false);
    let (labels, raw) = decode_writeraw(g);
    assert_eq!(label(&labels, "__name__"), Some("memory"));
    assert_eq!(label(&labels, "service_name"), Some("grow"));
    assert_eq!(label(&labels, "pid"), Some(fx.pid.to_string().as_str()));
    assert_eq!(label(&labels, "node"), Some(node_name().as_str()));
    assert_eq!(label(&labels, "__delta__"), Some("false"));
    assert_eq!(
        pprof_top_bytes(home.path(), &raw, "inuse_space", "grow_leak"),
        12 * MIB
    );

    // The snapshots the engine writes by itself go too: the target
    // exits, its `exit` snapshot is the last profile received, and every
    // snapshot written arrived.
    let pid = fx.pid;
    fx.command("exit");
    fx.wait_exit();
    hb.wait_snapshot("exit", pid);
    let written: Vec<u64> = hb
        .stderr
        .iter()
        .filter_map(|l| lines::parse_snapshot(l))
        .filter(|s| s.pid == pid)
        .map(|s| s.live_bytes)
        .collect();
    let got = receiver.wait("every snapshot written", |g| g.len() >= written.len());
    let pushed: Vec<u64> = got
        .iter()
        .map(|g| pprof_total(&decode_writeraw(g).1, "inuse_space").1)
        .collect();
    assert_eq!(pushed, written);
    assert_eq!(pushed.last(), Some(&(12 * MIB)), "the exit snapshot");
}

#[test]
fn bad_push_flags_are_bad_input() {
    require_root();
    let data = TempDir::new("push-bad");
    let dir = data.path().to_str().unwrap();
    let missing = data.path().join("no-such-file");
    for (args, says) in [
        (vec!["--push", "localhost:4040"], "--push localhost:4040"),
        (vec!["--push", "http://u:p@h:1"], "credentials in a URL"),
        (
            vec!["--push", "http://127.0.0.1:1", "--push-header", "No Colon"],
            "--push-header",
        ),
        (
            vec![
                "--push",
                "http://127.0.0.1:1",
                "--push-basic-auth",
                missing.to_str().unwrap(),
            ],
            "--push-basic-auth",
        ),
        (vec!["--push-tenant", "a"], "go with --push URL"),
    ] {
        let mut all = vec![
            "agent",
            "--select",
            "pid=1",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir,
        ];
        all.extend(args.iter().copied());
        let (code, _, stderr) = run_heapbpf(&all);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
