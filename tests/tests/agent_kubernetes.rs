//! `heapbpf agent --kubernetes`: pod metadata and the `k8s` rule. The API
//! server is a stand-in in this test (plain HTTP on loopback, reached
//! through a kubeconfig the test writes, `KUBECONFIG`): it serves a `v1
//! PodList` and then watch events, in the JSON `kubectl get pods -o json`
//! and `kubectl get pods --watch -o json` print — the only part not run
//! against the real thing. The processes are real fixtures in real cgroups
//! named as the kubelet names them (cgroup v2: the systemd driver's
//! `kubepods.slice/.../cri-containerd-ID.scope` and the cgroupfs driver's
//! `kubepods/besteffort/podUID/ID`; cgroup v1: docker's
//! `kubepods/podUID/ID`), profiled with real probes.
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use heapbpf_integration_tests::*;
use serde_json::json;

/// Several discovery rounds of the agent (`--discover-every 200ms`).
const ROUNDS: Duration = Duration::from_millis(1200);
const TOKEN: &str = "stand-in-token";

// ---------------------------------------------------------------------
// The API server stand-in.

/// What the stand-in holds: the pods (by name) as they are now, and every
/// change as the watch event that says it, by resource version.
#[derive(Default)]
struct Cluster {
    pods: BTreeMap<String, Value>,
    version: u64,
    events: Vec<(u64, String)>,
    /// Every request's line and whether it carried the bearer token.
    requests: Vec<(String, bool)>,
}

struct StandIn {
    addr: SocketAddr,
    cluster: Arc<(Mutex<Cluster>, Condvar)>,
}

impl StandIn {
    fn start(pods: Vec<Value>) -> StandIn {
        StandIn::start_on(TcpListener::bind("127.0.0.1:0").unwrap(), pods)
    }

    fn start_on(listener: TcpListener, pods: Vec<Value>) -> StandIn {
        let addr = listener.local_addr().unwrap();
        let cluster = Arc::new((Mutex::new(Cluster::default()), Condvar::new()));
        {
            let mut c = cluster.0.lock().unwrap();
            for pod in pods {
                c.version += 1;
                let pod = with_version(pod, c.version);
                c.pods.insert(name_of(&pod), pod);
            }
        }
        let shared = cluster.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || serve(stream, &shared));
            }
        });
        StandIn { addr, cluster }
    }

    /// A change, as the watch says it: `ADDED`, `MODIFIED` or `DELETED`.
    fn event(&self, kind: &str, pod: Value) {
        let (lock, changed) = &*self.cluster;
        let mut c = lock.lock().unwrap();
        c.version += 1;
        let pod = with_version(pod, c.version);
        if kind == "DELETED" {
            c.pods.remove(&name_of(&pod));
        } else {
            c.pods.insert(name_of(&pod), pod.clone());
        }
        let line = json!({"type": kind, "object": pod}).to_string();
        let v = c.version;
        c.events.push((v, line));
        changed.notify_all();
    }

    fn requests(&self) -> Vec<(String, bool)> {
        self.cluster.0.lock().unwrap().requests.clone()
    }

    /// A kubeconfig naming the stand-in, as `kubectl config view` prints one.
    fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        fs::write(
            &path,
            format!(
                "apiVersion: v1\n\
                 kind: Config\n\
                 clusters:\n\
                 - cluster:\n    server: http://{}\n  name: stand-in\n\
                 contexts:\n\
                 - context:\n    cluster: stand-in\n    user: heapbpf\n  name: stand-in\n\
                 current-context: stand-in\n\
                 users:\n\
                 - name: heapbpf\n  user:\n    token: {TOKEN}\n",
                self.addr
            ),
        )
        .unwrap();
        path
    }
}

fn name_of(pod: &Value) -> String {
    format!(
        "{}/{}",
        pod["metadata"]["namespace"].as_str().unwrap(),
        pod["metadata"]["name"].as_str().unwrap()
    )
}

fn with_version(mut pod: Value, version: u64) -> Value {
    pod["metadata"]["resourceVersion"] = json!(version.to_string());
    pod
}

/// One connection: requests read one after another; a list is answered
/// whole, a watch is a chunked stream of events kept open.
fn serve(stream: TcpStream, shared: &(Mutex<Cluster>, Condvar)) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end().to_string();
        let mut authorized = false;
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "authorization" && v == format!("Bearer {TOKEN}") {
                    authorized = true;
                }
                if k == "content-length" {
                    length = v.parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        let _ = reader.read_exact(&mut body);
        shared
            .0
            .lock()
            .unwrap()
            .requests
            .push((line.clone(), authorized));
        let target = line.split(' ').nth(1).unwrap_or("").to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: Vec<(&str, &str)> =
            query.split('&').filter_map(|p| p.split_once('=')).collect();
        let param = |k: &str| params.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        if !authorized {
            respond(
                &mut out,
                "401 Unauthorized",
                &status_json(401, "Unauthorized"),
            );
            continue;
        }
        if path != "/api/v1/pods" {
            respond(&mut out, "404 Not Found", &status_json(404, "NotFound"));
            continue;
        }
        if param("watch") == Some("true") || param("watch") == Some("1") {
            let since: u64 = param("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            watch(out, shared, since);
            return;
        }
        let c = shared.0.lock().unwrap();
        let list = json!({
            "apiVersion": "v1",
            "items": c.pods.values().collect::<Vec<_>>(),
            "kind": "PodList",
            "metadata": {"resourceVersion": c.version.to_string()}
        });
        drop(c);
        respond(&mut out, "200 OK", &list.to_string());
    }
}

fn status_json(code: u16, reason: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
    .to_string()
}

fn respond(out: &mut TcpStream, status: &str, body: &str) {
    let _ = write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
}

/// The events after `since`, one JSON line per chunk, as they come.
fn watch(mut out: TcpStream, shared: &(Mutex<Cluster>, Condvar), mut since: u64) {
    if write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .is_err()
    {
        return;
    }
    let (lock, changed) = shared;
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
            let chunk = format!("{line}\n");
            if write!(out, "{:x}\r\n{chunk}\r\n", chunk.len()).is_err() {
                return;
            }
            since = v;
        }
        if out.flush().is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------
// Pods, as `kubectl get pods -o json` prints them.

struct PodSpec<'a> {
    name: &'a str,
    uid: &'a str,
    annotations: Value,
    labels: Value,
    /// (container name, containerID as the runtime reports it)
    containers: &'a [(&'a str, String)],
    node: &'a str,
}

fn pod(p: &PodSpec) -> Value {
    let statuses: Vec<Value> = p
        .containers
        .iter()
        .map(|(name, id)| {
            json!({
                "containerID": id,
                "image": format!("registry.example/{name}:1.0"),
                "imageID": format!("registry.example/{name}@sha256:5b0d"),
                "lastState": {},
                "name": name,
                "ready": true,
                "restartCount": 0,
                "started": true,
                "state": {"running": {"startedAt": "2026-11-24T18:00:04Z"}}
            })
        })
        .collect();
    let containers: Vec<Value> = p
        .containers
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
            "annotations": p.annotations,
            "creationTimestamp": "2026-11-24T18:00:00Z",
            "labels": p.labels,
            "name": p.name,
            "namespace": "shop",
            "resourceVersion": "1",
            "uid": p.uid
        },
        "spec": {
            "containers": containers,
            "dnsPolicy": "ClusterFirst",
            "nodeName": p.node,
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "serviceAccountName": "default"
        },
        "status": {
            "conditions": [{"lastProbeTime": null, "lastTransitionTime": "2026-11-24T18:00:05Z",
                            "status": "True", "type": "Ready"}],
            "containerStatuses": statuses,
            "hostIP": "10.0.0.5",
            "phase": "Running",
            "podIP": "10.244.1.17",
            "qosClass": "Burstable",
            "startTime": "2026-11-24T18:00:00Z"
        }
    })
}

// ---------------------------------------------------------------------
// Cgroups and fixtures (as agent_select.rs makes them).

const CGROUP_V2: &str = "/sys/fs/cgroup/unified";
/// A v1 hierarchy whose limits a test process never reaches.
const CGROUP_V1_PIDS: &str = "/sys/fs/cgroup/pids";

struct Cgroups {
    root: PathBuf,
    created: Vec<PathBuf>,
    leaf: PathBuf,
}

impl Cgroups {
    fn create(root: &str, path: &str) -> Cgroups {
        let root = PathBuf::from(root);
        assert!(
            root.join("cgroup.procs").exists(),
            "{} is not a cgroup hierarchy here",
            root.display()
        );
        let mut created = Vec::new();
        let mut dir = root.clone();
        for part in path.trim_start_matches('/').split('/') {
            dir.push(part);
            if !dir.exists() {
                fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                created.push(dir.clone());
            }
        }
        Cgroups {
            root,
            created,
            leaf: dir,
        }
    }

    fn enter(&self, pid: u32) {
        let procs = self.leaf.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", procs.display()));
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            for _ in 0..50 {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.split_whitespace() {
                    let _ = fs::write(self.root.join("cgroup.procs"), pid);
                }
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn random_uuid() -> String {
    fs::read_to_string("/proc/sys/kernel/random/uuid")
        .unwrap()
        .trim()
        .to_string()
}

fn random_container_id() -> String {
    let mut id = String::new();
    while id.len() < 64 {
        id.extend(random_uuid().chars().filter(|c| *c != '-'));
    }
    id.truncate(64);
    id
}

/// `site_malloc` of `allocs` after `runs` times `run` since attach.
fn site_malloc(runs: u64) -> Site {
    Site {
        live_bytes: 40_000 * runs,
        live_allocations: 40 * runs,
        allocated_bytes: 40_000 * runs,
        allocations: 40 * runs,
    }
}

/// The agent's file descriptors that hold probes: uprobe perf events and
/// BPF links (the programs and maps stay loaded a while after the last
/// target goes).
fn probe_fds(agent_pid: u32) -> usize {
    fs::read_dir(format!("/proc/{agent_pid}/fd"))
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|l| {
            let l = l.to_string_lossy();
            l.contains("perf_event") || l.contains("bpf_link") || l.contains("bpf-link")
        })
        .count()
}

fn http_get(addr: SocketAddr, target: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {:?}", String::from_utf8_lossy(&bytes)));
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = bytes[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
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

fn targets(addr: SocketAddr) -> Vec<Value> {
    let (status, body) = http_get(addr, "/targets");
    assert_eq!(status, 200);
    serde_json::from_slice::<Value>(&body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The whole story: an annotated pod's container (a real process in a
/// cgroup named as the kubelet's systemd driver names it) is attached with
/// its labels on /targets, /metrics and its snapshots, reachable by
/// namespace/pod/container on /debug/pprof/heap; a pod without the
/// annotation is never attached; removing the annotation detaches (a
/// `stop` snapshot, gone from /targets, no probe left); putting it back
/// attaches again, and the pod's deletion detaches again.
#[test]
fn annotated_pods_are_profiled_with_their_labels_until_the_annotation_goes() {
    require_root();
    let dir = TempDir::new("agent-k8s");
    let data = dir.path().join("data");
    let node = format!("node-{}", std::process::id());
    let (uid_web, uid_batch) = (random_uuid(), random_uuid());
    let (id_web, id_sidecar, id_batch) = (
        random_container_id(),
        random_container_id(),
        random_container_id(),
    );
    let web_path = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id_web}.scope",
        uid_web.replace('-', "_")
    );
    let batch_path = format!("/kubepods/besteffort/pod{uid_batch}/{id_batch}");
    let web_cgroup = Cgroups::create(CGROUP_V2, &web_path);
    let batch_cgroup = Cgroups::create(CGROUP_V2, &batch_path);
    let mut web = Fixture::spawn("allocs");
    let batch = Fixture::spawn("allocs");
    web_cgroup.enter(web.pid);
    batch_cgroup.enter(batch.pid);
    // A third pod's container, as docker's cgroupfs driver names it on the
    // cgroup v1 pids hierarchy.
    let (uid_worker, id_worker) = (random_uuid(), random_container_id());
    let worker_cgroup = Cgroups::create(
        CGROUP_V1_PIDS,
        &format!("/kubepods/pod{uid_worker}/{id_worker}"),
    );
    let worker = Fixture::spawn("allocs");
    worker_cgroup.enter(worker.pid);
    let cgroup = fs::read_to_string(format!("/proc/{}/cgroup", web.pid)).unwrap();
    assert!(
        cgroup.lines().any(|l| l == format!("0::{web_path}")),
        "{cgroup}"
    );

    let web_containers = [
        ("web", format!("containerd://{id_web}")),
        ("envoy", format!("containerd://{id_sidecar}")),
    ];
    let web_pod = |annotated: bool| {
        let annotations = if annotated {
            json!({"heapbpf.io/profile": "true", "heapbpf.io/containers": "web",
                   "kubectl.kubernetes.io/default-container": "web"})
        } else {
            json!({"kubectl.kubernetes.io/default-container": "web"})
        };
        pod(&PodSpec {
            name: "web-7d4b9c8f6d-x2kqp",
            uid: &uid_web,
            annotations,
            labels: json!({"app.kubernetes.io/name": "storefront", "app": "web",
                           "pod-template-hash": "7d4b9c8f6d"}),
            containers: &web_containers,
            node: &node,
        })
    };
    let batch_containers = [("batch", format!("cri-o://{id_batch}"))];
    let batch_pod = pod(&PodSpec {
        name: "batch-28861440-abcde",
        uid: &uid_batch,
        annotations: json!({}),
        labels: json!({"app": "batch"}),
        containers: &batch_containers,
        node: &node,
    });
    let api = StandIn::start(vec![web_pod(true), batch_pod]);
    let kubeconfig = api.kubeconfig(dir.path());

    let (mut h, addr) = Heapbpf::agent_env(
        &data,
        &[
            "--kubernetes",
            "--select",
            "k8s",
            "--interval",
            "3s",
            "--max-targets",
            "1",
        ],
        &[
            ("NODE_NAME", Some(&node)),
            ("KUBECONFIG", kubeconfig.to_str()),
            ("KUBERNETES_SERVICE_HOST", None),
        ],
    );
    h.wait_for("the pod watch's first list", |l| {
        l.contains(&format!(
            "watching the pods of node {node} on http://{}",
            api.addr
        )) && l.ends_with("2 pods listed")
    });
    let attached = h.wait_attached(web.pid);
    let probes: usize = attached
        .split(": ")
        .nth(2)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no probe count in {attached:?}"));
    let agent_pid = h.child.id();
    web.command("run");

    // /targets: the pod's labels.
    let t = targets(addr);
    let mine = t
        .iter()
        .find(|t| t["pid"] == web.pid)
        .unwrap_or_else(|| panic!("{t:#?}"));
    assert_eq!(mine["container"], id_web.as_str());
    assert_eq!(mine["container_name"], "web");
    assert_eq!(mine["namespace"], "shop");
    assert_eq!(mine["pod"], "web-7d4b9c8f6d-x2kqp");
    assert_eq!(mine["service_name"], "storefront");
    assert!(t.iter().all(|t| t["pid"] != batch.pid), "{t:#?}");

    // /metrics: the same labels.
    let (status, metrics) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    let metrics = String::from_utf8(metrics).unwrap();
    let labels = format!(
        "pid=\"{}\",comm=\"allocs\",container=\"web\",pod=\"web-7d4b9c8f6d-x2kqp\",namespace=\"shop\",service_name=\"storefront\"",
        web.pid
    );
    for family in [
        "heapbpf_target_live_bytes",
        "heapbpf_target_allocated_bytes_total",
    ] {
        assert!(
            metrics.contains(&format!("{family}{{{labels}}} ")),
            "{family}{{{labels}}} in:\n{metrics}"
        );
    }

    // The interval snapshot: the pod, and the leak exactly. The first one
    // may have been taken during the run (the interval counts from the
    // agent's start); snapshots are taken one after another, so the next
    // one is after it.
    let mut snapshot = read_json(&h.wait_snapshot("interval", web.pid)[0]);
    if site(&snapshot, "site_malloc") != site_malloc(1) {
        snapshot = read_json(&h.wait_snapshot("interval", web.pid)[0]);
    }
    assert_eq!(
        snapshot["kubernetes"],
        json!({"namespace": "shop", "pod": "web-7d4b9c8f6d-x2kqp", "container": "web",
               "node": node, "service_name": "storefront"})
    );
    assert_eq!(site(&snapshot, "site_malloc"), site_malloc(1));

    // The heap by namespace/pod/container name; the other pod is no target.
    let (status, body) = http_get(
        addr,
        "/debug/pprof/heap?namespace=shop&pod=web-7d4b9c8f6d-x2kqp&container=web",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..2], &[0x1f, 0x8b], "gzipped pprof");
    let (status, _) = http_get(
        addr,
        "/debug/pprof/heap?namespace=shop&pod=batch-28861440-abcde",
    );
    assert_eq!(status, 404);

    // An annotated pod more waits for the one slot, listed with its pod;
    // its annotation removed, it is dropped without ever being attached.
    let worker_containers = [("worker", format!("docker://{id_worker}"))];
    let worker_pod = |annotated: bool| {
        pod(&PodSpec {
            name: "worker-0",
            uid: &uid_worker,
            annotations: if annotated {
                json!({"heapbpf.io/profile": "true", "heapbpf.io/service-name": "queue-worker"})
            } else {
                json!({"heapbpf.io/service-name": "queue-worker"})
            },
            labels: json!({"app": "worker"}),
            containers: &worker_containers,
            node: &node,
        })
    };
    api.event("ADDED", worker_pod(true));
    wait_until("the worker waiting", || {
        targets(addr).iter().any(|t| {
            t["pid"] == worker.pid
                && t["state"] == "waiting"
                && t["pod"] == "worker-0"
                && t["service_name"] == "queue-worker"
                && t["container_name"] == "worker"
        })
    });
    api.event("MODIFIED", worker_pod(false));
    wait_until("the worker dropped", || {
        targets(addr).iter().all(|t| t["pid"] != worker.pid)
    });

    // The annotation removed: a last snapshot, then detached.
    let attached_fds = probe_fds(agent_pid);
    assert!(
        attached_fds >= probes,
        "{attached_fds} fds, {probes} probes"
    );
    api.event("MODIFIED", web_pod(false));
    h.wait_for("the detach line", |l| {
        l.contains(&format!(
            "detaching from pid {} (allocs): its pod is no longer annotated",
            web.pid
        ))
    });
    let s = h.wait_snapshot("stop", web.pid);
    let last = read_json(&s[0]);
    assert_eq!(last["kubernetes"]["pod"], "web-7d4b9c8f6d-x2kqp");
    assert_eq!(site(&last, "site_malloc"), site_malloc(1));
    wait_until("the target gone from /targets", || {
        targets(addr).iter().all(|t| t["pid"] != web.pid)
    });
    // The probes on the target went; the agent's own tracepoints stay
    // (exec, exit) until the programs are unloaded.
    assert_eq!(
        attached_fds - probe_fds(agent_pid),
        probes,
        "the target's probes gone after the detach"
    );
    h.gather(ROUNDS);
    assert_eq!(h.attached_count(web.pid), 1, "{}", h.stderr.join("\n"));

    // Annotated again: attached again; the pod deleted: detached again.
    api.event("MODIFIED", web_pod(true));
    h.wait_attached(web.pid);
    api.event("DELETED", web_pod(true));
    h.wait_for("the detach line", |l| {
        l.contains(&format!(
            "detaching from pid {} (allocs): its pod is gone",
            web.pid
        ))
    });
    let s = h.wait_snapshot("stop", web.pid);
    assert_eq!(
        read_json(&s[0])["kubernetes"]["pod"],
        "web-7d4b9c8f6d-x2kqp",
        "the last snapshot keeps the labels it had: {}\n{}",
        s[0].display(),
        h.stderr.join("\n")
    );

    h.gather(ROUNDS);
    assert_eq!(h.attached_count(batch.pid), 0, "{}", h.stderr.join("\n"));
    assert_eq!(h.attached_count(worker.pid), 0, "{}", h.stderr.join("\n"));
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit().code(), Some(0), "{}", h.stderr.join("\n"));
    eprintln!("the agent said:\n{}", h.stderr.join("\n"));

    // What kube-rs asked of the stand-in: a list and a watch of this
    // node's pods, with the kubeconfig's token.
    let requests = api.requests();
    let selector = format!("fieldSelector=spec.nodeName%3D{node}");
    eprintln!("requests to the stand-in:");
    for (r, _) in &requests {
        eprintln!("  {r}");
    }
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
    drop(web);
    drop(batch);
    drop(worker);
}

/// An API server that cannot be reached is said once; the agent runs on
/// (healthy, nothing selected) and keeps trying: once the server is there,
/// the pods are listed.
#[test]
fn an_unreachable_api_server_is_said_once_and_tried_again() {
    require_root();
    let dir = TempDir::new("agent-k8s-down");
    // A port nothing listens on, for now.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let kubeconfig = StandIn {
        addr: port,
        cluster: Default::default(),
    }
    .kubeconfig(dir.path());
    let (mut h, addr) = Heapbpf::agent_env(
        &dir.path().join("data"),
        &["--kubernetes", "--select", "k8s"],
        &[
            ("NODE_NAME", Some("node-down")),
            ("KUBECONFIG", kubeconfig.to_str()),
            ("KUBERNETES_SERVICE_HOST", None),
        ],
    );
    h.wait_for("the unreachable line", |l| {
        l.starts_with("heapbpf: cannot watch this node's pods: ")
    });
    h.gather(Duration::from_secs(4));
    let said = |h: &Heapbpf| {
        h.stderr
            .iter()
            .filter(|l| l.contains("cannot watch this node's pods"))
            .count()
    };
    assert_eq!(said(&h), 1, "{}", h.stderr.join("\n"));
    assert_eq!(http_get(addr, "/healthz").0, 200);
    assert_eq!(targets(addr), Vec::<Value>::new());
    // The server comes up.
    let _api = StandIn::start_on(TcpListener::bind(port).unwrap(), Vec::new());
    h.wait_for("the first list", |l| {
        l.contains("watching the pods of node node-down on") && l.ends_with(": 0 pods listed")
    });
    assert_eq!(said(&h), 1, "{}", h.stderr.join("\n"));
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit().code(), Some(0), "{}", h.stderr.join("\n"));
}

/// `heapbpf agent ARGS` to its end with `env` set or removed.
fn agent_exit(args: &[&str], env: &[(&str, Option<&str>)]) -> (i32, String) {
    let mut cmd = Command::new(heapbpf_bin());
    cmd.arg("agent").args(args);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_k8s_rule_needs_kubernetes_and_kubernetes_needs_node_name() {
    let dir = TempDir::new("agent-k8s-args");
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let (code, err) = agent_exit(
        &[
            "--select",
            "k8s",
            "--data-dir",
            data,
            "--listen",
            "127.0.0.1:0",
        ],
        &[("NODE_NAME", Some("node-a"))],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.starts_with("heapbpf: --select k8s needs --kubernetes"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    for node in [None, Some(""), Some("  ")] {
        let (code, err) = agent_exit(
            &[
                "--kubernetes",
                "--select",
                "k8s",
                "--data-dir",
                data,
                "--listen",
                "127.0.0.1:0",
            ],
            &[("NODE_NAME", node)],
        );
        assert_eq!(code, 2, "{err}");
        assert!(
            err.starts_with("heapbpf: --kubernetes needs NODE_NAME"),
            "{node:?}: {err}"
        );
    }
    assert!(!Path::new(data).exists(), "nothing done before refusing");
}
