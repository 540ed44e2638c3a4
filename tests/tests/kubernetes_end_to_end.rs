//! Issue 15's whole flow once, end to end: heapbpf's image played by
//! `podman kube play` with the DaemonSet's own pod template (as
//! kubernetes_deploy.rs plays it: a Deployment, one pid namespace for the
//! pod, a leaking fixture as a second container), the ConfigMap's own
//! `HEAPBPF_SELECT: k8s` and `HEAPBPF_KUBERNETES: "true"`; an API server
//! stand-in on the host reached the in-cluster way (`KUBERNETES_SERVICE_HOST`
//! and `_PORT`, a service-account directory with `token`, `ca.crt` and
//! `namespace`, TLS with a CA this test makes with the `openssl` CLI) lists
//! the fixture's container, by the id podman gave it, in an annotated pod;
//! a Pyroscope receiver on the host gets its profiles, labelled by
//! namespace, pod and container, and `go tool pprof` reads the fixture's
//! leak in them to the byte. Removing the annotation lets the target go.
//!
//! The stand-in and the receiver listen on the host on every address
//! (`0.0.0.0`, a free port each); the pod reaches them at its default
//! gateway, the host's address on podman's kube network (the certificate
//! names that address). The API server stand-in is the only part not the
//! real thing (agent_kubernetes.rs has the shape of what it serves).
//!
//! Needs the image: `cargo xtask test` builds it and names it in
//! `HEAPBPF_IMAGE`.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    time::{Duration, Instant},
};

use heapbpf_integration_tests::*;
use prost::Message;
use serde_json::json;

#[allow(dead_code)]
#[path = "../../xtask/src/scratch.rs"]
mod scratch;

const MIB: u64 = 1 << 20;
/// The fixture's leak: `leak 10 1048576 0`, 10 blocks of 1 MiB from grow_leak.
const LEAK_BYTES: u64 = 10 * MIB;
/// Where the kubelet mounts a pod's service account.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The network `podman kube play` puts a pod on.
const KUBE_NETWORK: &str = "podman-default-kube-network";
/// The annotated pod and its container, as the stand-in lists them.
const NAMESPACE: &str = "shop";
const POD: &str = "cart-7d9f8c6b5-q4wzx";
const CONTAINER: &str = "cart";
const SERVICE: &str = "cart-svc";

// ---------------------------------------------------------------------
// Commands, the manifests, podman (as kubernetes_deploy.rs has them).

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// heapbpf's image, as `cargo xtask test` built and named it.
fn image() -> String {
    std::env::var("HEAPBPF_IMAGE").unwrap_or_else(|_| {
        panic!(
            "HEAPBPF_IMAGE is not set: run these tests through `cargo xtask test`, which builds \
             heapbpf's image (cargo xtask image) and names it, or set HEAPBPF_IMAGE=localhost/heapbpf:{}",
            env!("CARGO_PKG_VERSION")
        )
    })
}

/// Runs a command to success and returns its stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} ({e}): cargo xtask bootstrap installs it"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn podman(args: &[&str]) -> String {
    run_ok(Command::new("podman").args(args))
}

/// `kubectl kustomize deploy/kubernetes`, its documents as JSON (PyYAML
/// reads the YAML: the python kubernetes-validate is installed into).
fn render() -> Vec<Value> {
    let yaml = run_ok(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(repo().join("deploy/kubernetes")),
    );
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (cargo xtask bootstrap installs kubernetes-validate into it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the rendered kustomization"))
}

fn agent_container(pod_spec: &Value) -> &Value {
    pod_spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "heapbpf")
        .expect("a container named heapbpf in the DaemonSet")
}

fn container_port(container: &Value) -> u16 {
    let port = container["ports"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "api"))
        .expect("a port named api");
    port["containerPort"].as_u64().unwrap() as u16
}

/// 32 random hex digits.
fn random_hex() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Everything the test made in podman, removed on drop, even after a panic.
#[derive(Default)]
struct Podman {
    kube_files: Vec<PathBuf>,
    pods: Vec<String>,
    images: Vec<String>,
}

impl Drop for Podman {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("podman")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        for f in &self.kube_files {
            quiet(&["kube", "down", f.to_str().unwrap()]);
        }
        for p in &self.pods {
            quiet(&["pod", "rm", "-f", "-t", "0", p]);
        }
        for i in &self.images {
            quiet(&["rmi", "-f", i]);
        }
    }
}

/// A scratch image of fixture `name`, its program renamed `comm`.
fn fixture_image(guard: &mut Podman, dir: &Path, name: &str, comm: &str) -> String {
    let program = dir.join(comm);
    std::fs::copy(fixture_path(name), &program).unwrap();
    let tag = format!("localhost/heapbpf-test-{comm}:{}", std::process::id());
    guard.images.push(tag.clone());
    scratch::build(&scratch::ScratchImage {
        binary: &program,
        entry_name: comm,
        extra_files: &[],
        strip_debug: false,
        tags: std::slice::from_ref(&tag),
        context: &dir.join("image"),
        comment: "a heapbpf test fixture",
    })
    .unwrap_or_else(|e| panic!("{e}"));
    tag
}

/// `podman logs`, stderr and stdout.
fn logs(container: &str) -> String {
    let out = Command::new("podman")
        .args(["logs", container])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}

/// A FIFO the test writes a fixture's commands into (nobody types into a
/// pod), opened read-write so that neither side waits for the other.
fn fifo(path: &Path) -> std::fs::File {
    let cpath = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

/// A fixture container's process: (its pid on the host, its pid in the
/// pod's pid namespace — the one the agent sees — and its container id).
fn container_process(container: &str) -> (u32, u32, String) {
    let out = podman(&["inspect", "-f", "{{.State.Pid}} {{.Id}}", container]);
    let (pid, id) = out.trim().split_once(' ').unwrap();
    let host_pid: u32 = pid.parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).unwrap();
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .expect("NSpid in status");
    let pids: Vec<u32> = nspid
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(
        pids.len(),
        2,
        "{container}: NSpid {nspid}: the pod's own pid namespace"
    );
    assert_eq!(pids[0], host_pid);
    (host_pid, pids[1], id.to_string())
}

/// Waits until a fixture container printed `line`.
fn wait_output(container: &str, line: &str) {
    wait_until(&format!("{container} to print {line:?}"), || {
        logs(container).lines().any(|l| l == line)
    });
}

fn wait_until(what: &str, ok: impl FnMut() -> bool) {
    wait_for(what, ok, String::new);
}

/// As `wait_until`, the agent's log in the message when it times out.
fn wait_agent(agent: &str, what: &str, ok: impl FnMut() -> bool) {
    wait_for(what, ok, || format!(":\n{}", logs(agent)));
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + TIMEOUT;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------
// A CA and the API server's certificate, by the openssl CLI.

/// What the stand-in serves TLS with: its certificate chain and key (DER).
struct ServerTls {
    chain: Vec<u8>,
    key: Vec<u8>,
}

/// A CA (`ca.crt`, PEM, into `service_account`) and a certificate for the
/// API server at `ip` (and `kubernetes.default.svc`) signed by it.
fn make_pki(dir: &Path, ip: IpAddr, service_account: &Path) -> ServerTls {
    let pki = dir.join("pki");
    std::fs::create_dir(&pki).unwrap();
    let openssl = |args: &[&str]| {
        run_ok(Command::new("openssl").args(args).current_dir(&pki));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=heapbpf-test-cluster-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=kube-apiserver",
    ]);
    openssl(&csr);
    std::fs::write(
        pki.join("server.ext"),
        format!(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:{ip},DNS:kubernetes.default.svc\n"
        ),
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ]);
    openssl(&[
        "x509",
        "-in",
        "server.crt",
        "-outform",
        "DER",
        "-out",
        "server.der",
    ]);
    openssl(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        "server.key",
        "-outform",
        "DER",
        "-out",
        "server.key.der",
    ]);
    std::fs::copy(pki.join("ca.crt"), service_account.join("ca.crt")).unwrap();
    ServerTls {
        chain: std::fs::read(pki.join("server.der")).unwrap(),
        key: std::fs::read(pki.join("server.key.der")).unwrap(),
    }
}

fn tls_config(tls: &ServerTls) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from(tls.chain.clone())],
            rustls::pki_types::PrivateKeyDer::Pkcs8(tls.key.clone().into()),
        )
        .unwrap();
    Arc::new(config)
}

// ---------------------------------------------------------------------
// The API server stand-in (agent_kubernetes.rs's, over TLS): a `v1
// PodList` for `GET /api/v1/pods`, then the watch's events, chunked.

#[derive(Default)]
struct Cluster {
    pods: BTreeMap<String, Value>,
    version: u64,
    events: Vec<(u64, String)>,
    /// Every request's line and whether it carried the service account's token.
    requests: Vec<(String, bool)>,
}

type Shared = (Mutex<Cluster>, Condvar);

struct StandIn {
    port: u16,
    cluster: Arc<Shared>,
}

impl StandIn {
    fn start(tls: Arc<rustls::ServerConfig>, token: String) -> StandIn {
        let listener = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cluster: Arc<Shared> = Default::default();
        let shared = cluster.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (shared, tls, token) = (shared.clone(), tls.clone(), token.clone());
                std::thread::spawn(move || {
                    let Ok(conn) = rustls::ServerConnection::new(tls) else {
                        return;
                    };
                    serve(
                        BufReader::new(rustls::StreamOwned::new(conn, stream)),
                        &shared,
                        &token,
                    );
                });
            }
        });
        StandIn { port, cluster }
    }

    /// A change, as the watch says it: `ADDED`, `MODIFIED` or `DELETED`.
    fn event(&self, kind: &str, mut pod: Value) {
        let (lock, changed) = &*self.cluster;
        let mut c = lock.lock().unwrap();
        c.version += 1;
        pod["metadata"]["resourceVersion"] = json!(c.version.to_string());
        let name = format!(
            "{}/{}",
            pod["metadata"]["namespace"].as_str().unwrap(),
            pod["metadata"]["name"].as_str().unwrap()
        );
        if kind == "DELETED" {
            c.pods.remove(&name);
        } else {
            c.pods.insert(name, pod.clone());
        }
        let line = json!({"type": kind, "object": pod}).to_string();
        let v = c.version;
        c.events.push((v, line));
        changed.notify_all();
    }

    fn requests(&self) -> Vec<(String, bool)> {
        self.cluster.0.lock().unwrap().requests.clone()
    }
}

/// One connection: requests one after another; a list answered whole, a
/// watch a chunked stream kept open.
fn serve<S: Read + Write>(mut conn: BufReader<S>, shared: &Shared, token: &str) {
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end().to_string();
        let (mut authorized, mut length) = (false, 0usize);
        loop {
            let mut h = String::new();
            if conn.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let Some((k, v)) = h.trim_end().split_once(':') else {
                break;
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            authorized |= k == "authorization" && v == format!("Bearer {token}");
            if k == "content-length" {
                length = v.parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        let _ = conn.read_exact(&mut body);
        shared
            .0
            .lock()
            .unwrap()
            .requests
            .push((line.clone(), authorized));
        let target = line.split(' ').nth(1).unwrap_or("").to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let param = |k: &str| {
            query
                .split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        let out = conn.get_mut();
        if !authorized {
            respond(out, "401 Unauthorized", &status_json(401, "Unauthorized"));
        } else if path != "/api/v1/pods" {
            respond(out, "404 Not Found", &status_json(404, "NotFound"));
        } else if matches!(param("watch").as_deref(), Some("true" | "1")) {
            let since = param("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            watch(out, shared, since);
            return;
        } else {
            let c = shared.0.lock().unwrap();
            let list = json!({
                "apiVersion": "v1",
                "items": c.pods.values().collect::<Vec<_>>(),
                "kind": "PodList",
                "metadata": {"resourceVersion": c.version.to_string()}
            });
            drop(c);
            respond(out, "200 OK", &list.to_string());
        }
    }
}

fn status_json(code: u16, reason: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
    .to_string()
}

fn respond(out: &mut impl Write, status: &str, body: &str) {
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = out.flush();
}

/// The events after `since`, one JSON line per chunk, as they come.
fn watch(out: &mut impl Write, (lock, changed): &Shared, mut since: u64) {
    if write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .and_then(|()| out.flush())
    .is_err()
    {
        return;
    }
    loop {
        let c = lock.lock().unwrap();
        let (c, _) = changed.wait_timeout(c, Duration::from_millis(200)).unwrap();
        let new: Vec<(u64, String)> = c
            .events
            .iter()
            .filter(|(v, _)| *v > since)
            .cloned()
            .collect();
        drop(c);
        for (v, line) in new {
            // One write per event, as the API server sends one.
            let chunk = format!("{line}\n");
            let framed = format!("{:x}\r\n{chunk}\r\n", chunk.len());
            if out.write_all(framed.as_bytes()).is_err() {
                return;
            }
            since = v;
        }
        if out.flush().is_err() {
            return;
        }
    }
}

/// A pod as `kubectl get pods -o json` prints it, its containers running
/// with the ids given (`containerd://ID`).
/// A pod's `uid` stays what it was through its `MODIFIED` events (the
/// agent keys pods by it).
fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    annotations: Value,
    containers: &[(&str, &str)],
    node: &str,
) -> Value {
    let statuses: Vec<Value> = containers
        .iter()
        .map(|(name, id)| {
            json!({
                "containerID": format!("containerd://{id}"),
                "image": format!("registry.example/{name}:1.0"),
                "imageID": format!("registry.example/{name}@sha256:5b0d"),
                "lastState": {},
                "name": name,
                "ready": true,
                "restartCount": 0,
                "started": true,
                "state": {"running": {"startedAt": "2026-12-03T16:00:04Z"}}
            })
        })
        .collect();
    let specs: Vec<Value> = containers
        .iter()
        .map(|(name, _)| {
            json!({"image": format!("registry.example/{name}:1.0"),
                   "imagePullPolicy": "IfNotPresent", "name": name, "resources": {},
                   "terminationMessagePath": "/dev/termination-log",
                   "terminationMessagePolicy": "File"})
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "annotations": annotations,
            "creationTimestamp": "2026-12-03T16:00:00Z",
            "labels": {"app": name.split('-').next().unwrap()},
            "name": name,
            "namespace": namespace,
            "resourceVersion": "1",
            "uid": uid
        },
        "spec": {
            "containers": specs,
            "dnsPolicy": "ClusterFirst",
            "nodeName": node,
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "serviceAccountName": "default"
        },
        "status": {
            "containerStatuses": statuses,
            "hostIP": "10.0.0.5",
            "phase": "Running",
            "podIP": "10.244.1.17",
            "qosClass": "Burstable",
            "startTime": "2026-12-03T16:00:00Z"
        }
    })
}

// ---------------------------------------------------------------------
// The Pyroscope receiver (agent_push.rs's): `push.v1.PusherService/Push`
// decoded with this file's own prost structs from Pyroscope's push.proto.

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

/// The few fields of pprof's `profile.proto` read here.
mod pprof {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
    }
}

/// One push as received: its path, labels (sorted) and raw profile.
#[derive(Clone, Debug)]
struct Push {
    path: String,
    labels: Vec<(String, String)>,
    raw: Vec<u8>,
}

impl Push {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The profile's `inuse_space` total.
    fn inuse_bytes(&self) -> u64 {
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(&self.raw[..])
            .read_to_end(&mut bytes)
            .expect("a gzipped profile");
        let p = pprof::Profile::decode(&bytes[..]).expect("a pprof profile");
        let i = p
            .sample_type
            .iter()
            .position(|t| p.string_table[t.r#type as usize] == "inuse_space")
            .expect("an inuse_space sample type");
        p.sample.iter().map(|s| s.value[i] as u64).sum()
    }
}

/// A profile store stand-in: answers every request 200 and keeps it.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Push>>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let (got, stop): (Arc<Mutex<Vec<Push>>>, Arc<AtomicBool>) = Default::default();
        let (thread_got, thread_stop) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            while !thread_stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        if let Some(p) = receive(s) {
                            thread_got.lock().unwrap().push(p);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Receiver { port, got, stop }
    }

    /// The pushes of `pid`, so far.
    fn of(&self, pid: u32) -> Vec<Push> {
        let pid = pid.to_string();
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.label("pid") == Some(pid.as_str()))
            .cloned()
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One HTTP/1.1 request with a Content-Length body, decoded as a
/// PushRequest of one series of one sample; answered 200 (Connect's empty
/// unary answer).
fn receive(mut s: TcpStream) -> Option<Push> {
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
    let path = head.split(' ').nth(1)?.to_string();
    let len: usize = head
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .expect("a push has a Content-Length");
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: application/proto\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let req = pyroscope::PushRequest::decode(&body[..]).expect("a push.v1.PushRequest");
    assert_eq!(req.series.len(), 1);
    let series = &req.series[0];
    assert_eq!(series.samples.len(), 1);
    let mut labels: Vec<(String, String)> = series
        .labels
        .iter()
        .map(|l| (l.name.clone(), l.value.clone()))
        .collect();
    labels.sort();
    Some(Push {
        path,
        labels,
        raw: series.samples[0].raw_profile.clone(),
    })
}

/// `go tool pprof -top -unit=B -sample_index=inuse_space` on a profile:
/// the bytes it shows for `function`.
fn pprof_top_bytes(home: &Path, raw: &[u8], function: &str) -> u64 {
    let file = home.join("pushed.pb.gz");
    std::fs::write(&file, raw).unwrap();
    let out = Command::new("go")
        .args([
            "tool",
            "pprof",
            "-top",
            "-unit=B",
            "-sample_index=inuse_space",
        ])
        .arg(&file)
        .env("HOME", home)
        .env("GOCACHE", home.join("gocache"))
        .env("PPROF_TMPDIR", home.join("pprof"))
        .output()
        .expect("go tool pprof (cargo xtask bootstrap installs golang-go)");
    let top = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "go tool pprof failed:\n{}\n{top}",
        String::from_utf8_lossy(&out.stderr)
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

// ---------------------------------------------------------------------
// The agent's API.

/// An HTTP/1.1 GET with the bearer token, read whole: (status, body).
fn get(addr: SocketAddr, path: &str, token: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer from {addr}{path}"));
    let head = String::from_utf8_lossy(&bytes[..end]).to_lowercase();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
    let mut body = bytes[end + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let (mut out, mut rest) = (Vec::new(), &body[..]);
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..nl])
                    .split(';')
                    .next()
                    .unwrap()
                    .trim(),
                16,
            )
            .unwrap();
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    (status, body)
}

fn targets(addr: SocketAddr, token: &str) -> Vec<Value> {
    let (status, body) = get(addr, "/targets", token);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice::<Value>(&body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

// ---------------------------------------------------------------------

/// The story: the DaemonSet's pod template played by podman beside a
/// leaking `cart` container and an idle `batch` one; the API server
/// stand-in, reached in-cluster over TLS, announces (by watch events once
/// the agent listed none) the cart container in a pod annotated
/// `heapbpf.io/profile: "true"`, the batch container and the agent's own
/// in pods that are not; the agent attaches to the cart container only,
/// its pushes carry the pod's labels and the leak to the byte; the
/// annotation removed, its last snapshot is pushed and the target goes.
#[test]
fn an_annotated_pod_beside_the_played_agent_is_pushed_with_its_labels_until_unannotated() {
    require_root();
    let started = Instant::now();
    let image = image();
    let docs = render();
    let ds = kind(&docs, "DaemonSet");
    let dir = TempDir::new("kube-e2e");
    let mut guard = Podman::default();
    let comm = "cart-server";
    let fixture = fixture_image(&mut guard, dir.path(), "grow", comm);
    let node = format!("e2e-node-{}", std::process::id());

    // Where the pod reaches the host: its gateway on podman's kube
    // network (kube play makes that network the first time; so does this).
    if Command::new("podman")
        .args(["network", "exists", KUBE_NETWORK])
        .status()
        .is_ok_and(|s| !s.success())
    {
        podman(&["network", "create", KUBE_NETWORK]);
    }
    let gateway: IpAddr = podman(&[
        "network",
        "inspect",
        "-f",
        "{{range .Subnets}}{{.Gateway}}{{end}}",
        KUBE_NETWORK,
    ])
    .trim()
    .parse()
    .expect("a gateway address of podman's kube network");

    // The service account the kubelet would mount: a token, the cluster's
    // CA, the namespace.
    let service_account = dir.path().join("serviceaccount");
    std::fs::create_dir(&service_account).unwrap();
    let sa_token = random_hex();
    std::fs::write(service_account.join("token"), &sa_token).unwrap();
    std::fs::write(service_account.join("namespace"), "heapbpf").unwrap();
    let tls = make_pki(dir.path(), gateway, &service_account);
    let api = StandIn::start(tls_config(&tls), sa_token.clone());
    let receiver = Receiver::start();

    // The agent's own settings: its API token, its data directory.
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let token = random_hex();
    let token_dir = dir.path().join("token");
    std::fs::create_dir(&token_dir).unwrap();
    std::fs::write(token_dir.join("token"), &token).unwrap();
    let ctl = dir.path().join("ctl");
    std::fs::create_dir(&ctl).unwrap();
    let mut cart_cmd = fifo(&ctl.join("cart"));
    let _batch_cmd = fifo(&ctl.join("batch"));

    // The ConfigMap as the manifest has it, but for where to push, a short
    // interval and exact figures.
    let mut configmap = kind(&docs, "ConfigMap").clone();
    let settings = configmap["data"].as_object_mut().unwrap();
    assert_eq!(settings["HEAPBPF_SELECT"], "k8s", "the manifest's rule");
    assert_eq!(
        settings["HEAPBPF_KUBERNETES"], "true",
        "the manifest's --kubernetes"
    );
    assert_eq!(
        settings["HEAPBPF_PUSH"], "",
        "the manifest pushes nowhere by itself"
    );
    let push_url = format!("http://{gateway}:{}", receiver.port);
    settings.insert("HEAPBPF_PUSH".into(), push_url.clone().into());
    settings.insert("HEAPBPF_INTERVAL".into(), "2s".into());
    settings.insert("HEAPBPF_SAMPLE_BYTES".into(), "0".into());

    // The Deployment: the DaemonSet's pod template, one pid namespace for
    // its containers (podman ignores hostPID), the fixtures beside it.
    let mut template = ds["spec"]["template"].clone();
    let spec = template["spec"].as_object_mut().unwrap();
    spec.insert("shareProcessNamespace".into(), true.into());
    {
        let c = spec["containers"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|c| c["name"] == "heapbpf")
            .unwrap();
        c["image"] = image.clone().into();
        let env = c["env"].as_array_mut().unwrap();
        // podman 4.3 knows no spec.nodeName in the downward API.
        for e in env.iter_mut() {
            if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
                let name = e["name"].clone();
                *e = json!({"name": name, "value": node});
            }
        }
        // What the kubelet gives every pod: the API server's service and
        // the service account's files.
        env.push(json!({"name": "KUBERNETES_SERVICE_HOST", "value": gateway.to_string()}));
        env.push(json!({"name": "KUBERNETES_SERVICE_PORT", "value": api.port.to_string()}));
        c["volumeMounts"].as_array_mut().unwrap().push(
            json!({"name": "kube-api-access", "mountPath": SERVICE_ACCOUNT, "readOnly": true}),
        );
    }
    for v in spec["volumes"].as_array_mut().unwrap() {
        if v["hostPath"]["path"] == "/var/lib/heapbpf" {
            v["hostPath"]["path"] = data.to_str().unwrap().into();
        }
        // podman 4.3's kube play panics on a secret volume: the token
        // file itself, at the same place (as kubernetes_deploy.rs does).
        if v["secret"].is_object() {
            let name = v["name"].clone();
            *v = json!({"name": name, "hostPath": {"path": token_dir, "type": "Directory"}});
        }
    }
    let volumes = spec["volumes"].as_array_mut().unwrap();
    volumes.push(json!({"name": "kube-api-access",
                        "hostPath": {"path": service_account, "type": "Directory"}}));
    volumes.push(json!({"name": "ctl", "hostPath": {"path": ctl, "type": "Directory"}}));
    let containers = spec["containers"].as_array_mut().unwrap();
    for name in ["cart", "batch"] {
        containers.push(json!({
            "name": name,
            "image": fixture,
            "args": [format!("/ctl/{name}")],
            "volumeMounts": [{"name": "ctl", "mountPath": "/ctl"}],
        }));
    }
    let name = format!("heapbpf-test-e2e-{}", std::process::id());
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ds["metadata"]["namespace"]},
        "spec": {"replicas": 1, "selector": ds["spec"]["selector"], "template": template},
    });
    let play = dir.path().join("deployment.json");
    std::fs::write(&play, deployment.to_string()).unwrap();
    let cm = dir.path().join("configmap.json");
    std::fs::write(&cm, configmap.to_string()).unwrap();
    guard.kube_files.push(play.clone());
    let pod_name = format!("{name}-pod-0");
    guard.pods.push(pod_name.clone());
    podman(&[
        "kube",
        "play",
        "--configmap",
        cm.to_str().unwrap(),
        play.to_str().unwrap(),
    ]);
    let agent = format!("{pod_name}-heapbpf");
    let cart = format!("{pod_name}-cart");
    let batch = format!("{pod_name}-batch");
    let infra = podman(&["pod", "inspect", "-f", "{{.InfraContainerID}}", &pod_name]);
    let infra = infra.trim();
    let pod_gateway = podman(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}",
        infra,
    ]);
    assert_eq!(pod_gateway.trim(), gateway.to_string(), "the pod's gateway");
    let ip = podman(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        infra,
    ]);
    let addr = SocketAddr::new(
        ip.trim().parse().unwrap(),
        container_port(agent_container(&ds["spec"]["template"]["spec"])),
    );

    // The containers' processes: the ids podman gave them, named by their
    // cgroups, and their pids in the pod, as they print them.
    let (cart_host_pid, cart_pid, cart_id) = container_process(&cart);
    let (_, batch_pid, batch_id) = container_process(&batch);
    let (_, agent_pid, agent_id) = container_process(&agent);
    let cgroup = std::fs::read_to_string(format!("/proc/{cart_host_pid}/cgroup")).unwrap();
    assert!(
        cgroup
            .lines()
            .any(|l| l.ends_with(&format!("libpod-{cart_id}"))
                || l.contains(&format!("libpod-{cart_id}."))
                || l.contains(&format!("libpod-{cart_id}/"))),
        "the cart container's cgroup names {cart_id}:\n{cgroup}"
    );
    wait_output(&cart, &format!("ready {cart_pid}"));
    wait_output(&batch, &format!("ready {batch_pid}"));

    // The agent lists this node's pods (none yet) through the in-cluster
    // service account, over TLS.
    let listed = format!(
        "watching the pods of node {node} on https://{gateway}:{}/ (the in-cluster service account): 0 pods listed",
        api.port
    );
    wait_until("the agent's first list of pods", || {
        let l = logs(&agent);
        assert!(
            !l.contains("cannot watch this node's pods"),
            "the agent cannot reach the stand-in:\n{l}"
        );
        l.contains(&listed)
    });

    // The pods arrive by the watch: the cart container annotated, the
    // batch container and the agent's own not.
    let cart_pod = |annotated: bool| {
        let mut annotations = json!({"heapbpf.io/service-name": SERVICE});
        if annotated {
            annotations["heapbpf.io/profile"] = "true".into();
        }
        pod(
            NAMESPACE,
            POD,
            "0f6a3c2e-5d41-4b7a-9c8e-2d1f3a4b5c6d",
            annotations,
            &[(CONTAINER, &cart_id)],
            &node,
        )
    };
    api.event("ADDED", cart_pod(true));
    api.event(
        "ADDED",
        pod(
            NAMESPACE,
            "batch-28861440-x7k2p",
            "7b2e9d14-3c6a-4f58-8e1d-6a0b9c2f4e73",
            json!({}),
            &[("batch", &batch_id)],
            &node,
        ),
    );
    api.event(
        "ADDED",
        pod(
            "heapbpf",
            "heapbpf-p9z4k",
            "c3d8e1f0-9a2b-4c7d-8e6f-5a4b3c2d1e0f",
            json!({}),
            &[("heapbpf", &agent_id)],
            &node,
        ),
    );

    // Attached by the k8s rule, with its pod on /targets.
    let mut seen = Vec::new();
    wait_agent(&agent, "the cart container attached", || {
        seen = targets(addr, &token);
        seen.iter()
            .any(|t| t["pid"] == cart_pid && t["state"] == "attached")
    });
    let t = seen.iter().find(|t| t["pid"] == cart_pid).unwrap();
    assert_eq!(t["namespace"], NAMESPACE, "{t}");
    assert_eq!(t["pod"], POD, "{t}");
    assert_eq!(t["service_name"], SERVICE, "{t}");
    assert_eq!(t["container_name"], CONTAINER, "{t}");
    assert_eq!(t["container"], cart_id.as_str(), "{t}");
    assert_eq!(t["comm"], comm, "{t}");

    // The leak, then a push holding it: labelled exactly, read to the
    // byte by go tool pprof.
    writeln!(cart_cmd, "leak 10 1048576 0").unwrap();
    wait_output(&cart, "done");
    let mut pushes = Vec::new();
    wait_agent(&agent, "a push of the 10 MiB leak", || {
        pushes = receiver.of(cart_pid);
        pushes.iter().any(|p| p.inuse_bytes() == LEAK_BYTES)
    });
    let push = pushes
        .iter()
        .find(|p| p.inuse_bytes() == LEAK_BYTES)
        .unwrap();
    let labels = |pid: u32| -> Vec<(String, String)> {
        let mut l: Vec<(String, String)> = [
            ("__name__", "memory"),
            ("service_name", SERVICE),
            ("namespace", NAMESPACE),
            ("pod", POD),
            ("container", CONTAINER),
            ("node", &node),
            ("pid", &pid.to_string()),
            ("__delta__", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        l.sort();
        l
    };
    assert_eq!(push.path, "/push.v1.PusherService/Push");
    assert_eq!(push.labels, labels(cart_pid));
    let home = dir.path().join("go");
    std::fs::create_dir(&home).unwrap();
    assert_eq!(pprof_top_bytes(&home, &push.raw, "grow_leak"), LEAK_BYTES);

    // The annotation removed: let go of, its last snapshot pushed.
    api.event("MODIFIED", cart_pod(false));
    wait_agent(&agent, "the detach line", || {
        logs(&agent).contains(&format!(
            "detaching from pid {cart_pid} ({comm}): its pod is no longer annotated"
        ))
    });
    let stop = {
        let mut stop = None;
        wait_agent(&agent, "the stop snapshot", || {
            stop = logs(&agent)
                .lines()
                .filter_map(lines::parse_snapshot)
                .find(|s| s.pid == cart_pid && s.trigger == "stop");
            stop.is_some()
        });
        stop.unwrap()
    };
    assert_eq!(stop.live_bytes, LEAK_BYTES);
    wait_agent(&agent, "the target gone from /targets", || {
        targets(addr, &token).iter().all(|t| t["pid"] != cart_pid)
    });
    // Every snapshot written was pushed, in order: the last is the stop one.
    let written = |l: &str| {
        l.lines()
            .filter_map(lines::parse_snapshot)
            .filter(|s| s.pid == cart_pid)
            .count()
    };
    let count = written(&logs(&agent));
    wait_agent(&agent, "every snapshot pushed", || {
        receiver.of(cart_pid).len() >= count
    });
    let pushes = receiver.of(cart_pid);
    assert_eq!(pushes.len(), count, "one push per snapshot written");
    let last = pushes.last().unwrap();
    assert_eq!(last.labels, labels(cart_pid), "the stop snapshot's labels");
    assert_eq!(last.inuse_bytes(), LEAK_BYTES);
    assert_eq!(pprof_top_bytes(&home, &last.raw, "grow_leak"), LEAK_BYTES);

    // The pods not annotated were never attached; nothing else was pushed.
    let out = logs(&agent);
    let attached: Vec<u32> = out
        .lines()
        .filter_map(lines::parse_attached)
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(
        attached,
        [cart_pid],
        "attached once, to the cart only:\n{out}"
    );
    assert!(receiver.of(batch_pid).is_empty() && receiver.of(agent_pid).is_empty());
    assert_eq!(
        receiver.got.lock().unwrap().len(),
        count,
        "pushes of the cart only"
    );

    // What the agent asked of the stand-in: the node's pods, listed then
    // watched, with the service account's token.
    let requests = api.requests();
    let selector = format!("fieldSelector=spec.nodeName%3D{node}");
    assert!(requests.iter().all(|(_, auth)| *auth), "{requests:#?}");
    assert!(
        requests
            .iter()
            .any(|(r, _)| r.starts_with("GET /api/v1/pods?")
                && r.contains(&selector)
                && !r.contains("watch=")),
        "{requests:#?}"
    );
    assert!(
        requests
            .iter()
            .any(|(r, _)| r.starts_with("GET /api/v1/pods?")
                && r.contains(&selector)
                && r.contains("watch=true")),
        "{requests:#?}"
    );
    eprintln!(
        "end to end: {} pushes of the cart, {:.1}s",
        count,
        started.elapsed().as_secs_f64()
    );
}
