//! The Kubernetes deployment (`deploy/kubernetes/`) run as far as a machine
//! without a cluster allows: the kustomization rendered by `kubectl` and
//! checked against the Kubernetes OpenAPI schemas offline, then heapbpf's
//! image run by podman with the DaemonSet's own pod template — once as
//! `podman run --pid=host` (the DaemonSet's host pid namespace), once played
//! by `podman kube play` as a Deployment with a fixture container beside the
//! agent. Every setting the pod runs with is read from the rendered
//! manifest, never written here a second time; the few podman 4.3 cannot
//! take are replaced, each said where it is done.
//!
//! Needs the image: `cargo xtask test` builds it (`cargo xtask image`) and
//! names it in `HEAPBPF_IMAGE`.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use heapbpf_integration_tests::*;

#[allow(dead_code)]
#[path = "../../xtask/src/scratch.rs"]
mod scratch;

const MIB: u64 = 1 << 20;
/// The fixture's leak: `leak 10 1048576 0`, 10 blocks of 1 MiB from grow_leak.
const LEAK_BYTES: u64 = 10 * MIB;

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

/// The Python that has kubernetes-validate (its PyYAML reads the YAML).
fn python(code: &str, stdin: &str) -> String {
    let mut child = Command::new("python3")
        .args(["-c", code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (cargo xtask bootstrap installs kubernetes-validate into it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3 -c {code:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl kustomize deploy/kubernetes`: the YAML and its documents.
fn render() -> (String, Vec<Value>) {
    let dir = repo().join("deploy/kubernetes");
    let yaml = run_ok(Command::new("kubectl").arg("kustomize").arg(&dir));
    let json = python(
        "import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        &yaml,
    );
    let docs: Vec<Value> = serde_json::from_str(&json).unwrap();
    (yaml, docs)
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the rendered kustomization"))
}

/// The heapbpf container of a pod spec.
fn agent_container(pod_spec: &Value) -> &Value {
    pod_spec["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "heapbpf")
        .expect("a container named heapbpf in the DaemonSet")
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// A fresh token (the manifests commit none).
fn token() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Everything a test made in podman, removed on drop, even after a panic.
#[derive(Default)]
struct Podman {
    containers: Vec<String>,
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
        for c in &self.containers {
            quiet(&["rm", "-f", "-t", "0", c]);
        }
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

/// A scratch image of fixture `name`, its program renamed `comm` (the name
/// the agent's rule selects, unique to the test).
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

/// The ConfigMap's settings as the test runs them: the fixture selected by
/// its name (the `k8s` rule needs an API server; agent_kubernetes.rs has
/// one), exact figures, no API server, no push.
fn test_settings(configmap: &Value, comm: &str) -> serde_json::Map<String, Value> {
    let mut data = configmap["data"]
        .as_object()
        .expect("ConfigMap data")
        .clone();
    assert_eq!(
        data["HEAPBPF_SELECT"], "k8s",
        "the manifest selects annotated pods"
    );
    data.insert("HEAPBPF_SELECT".into(), format!("comm=^{comm}$").into());
    data.insert("HEAPBPF_SAMPLE_BYTES".into(), "0".into());
    data.insert("HEAPBPF_KUBERNETES".into(), "false".into());
    data
}

/// An HTTP/1.1 GET, read whole: (status, body).
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
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

fn wait_listening(addr: SocketAddr, logs: impl Fn() -> String) {
    let deadline = Instant::now() + TIMEOUT;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the agent never listened on {addr}:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `/targets` lists a process named `comm` as attached; its pid
/// as the agent sees it.
fn wait_target(addr: SocketAddr, token: &str, comm: &str, logs: impl Fn() -> String) -> u32 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            let (status, body) = get(addr, "/targets", Some(token));
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            let targets: Value = serde_json::from_slice(&body).unwrap();
            if let Some(t) = targets
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["comm"] == comm && t["state"] == "attached")
            {
                return t["pid"].as_u64().unwrap() as u32;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not attach to {comm}; its output:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn target(addr: SocketAddr, token: &str, pid: u32) -> Value {
    let (status, body) = get(addr, "/targets", Some(token));
    assert_eq!(status, 200);
    let targets: Value = serde_json::from_slice(&body).unwrap();
    targets
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["pid"] == pid)
        .unwrap_or_else(|| panic!("pid {pid} not in /targets: {targets}"))
        .clone()
}

/// `/debug/pprof/heap?pid=N` (with the token: go tool pprof cannot send
/// one), read by `go tool pprof -top`: the bytes it shows for `function`.
fn pprof_bytes(addr: SocketAddr, token: &str, pid: u32, dir: &Path, function: &str) -> u64 {
    let (status, body) = get(addr, &format!("/debug/pprof/heap?pid={pid}"), Some(token));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let file = dir.join(format!("heap-{pid}.pb.gz"));
    std::fs::write(&file, body).unwrap();
    let top = run_ok(
        Command::new("go")
            .args([
                "tool",
                "pprof",
                "-top",
                "-unit=B",
                "-sample_index=inuse_space",
            ])
            .arg(&file)
            .env("HOME", dir)
            .env("GOCACHE", dir.join("gocache"))
            .env("PPROF_TMPDIR", dir.join("pprof")),
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

/// The capability mask `CapEff` of a process must have for `names`.
fn cap_mask(names: &[String]) -> u64 {
    names
        .iter()
        .map(|n| match n.trim_start_matches("CAP_") {
            "DAC_READ_SEARCH" => 2,
            "SYS_PTRACE" => 19,
            "SYS_ADMIN" => 21,
            "PERFMON" => 38,
            "BPF" => 39,
            other => panic!("the test does not know capability {other}: add its number"),
        })
        .fold(0, |m, bit| m | (1u64 << bit))
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    procfs_field(&status, field)
}

fn procfs_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in status"))
        .trim()
        .to_string()
}

/// The container's process as the host sees it, and what it runs with:
/// exactly the manifest's capabilities, seccomp filtering, root.
fn check_confinement(container: &str, caps: &[String]) -> u32 {
    let pid: u32 = podman(&["inspect", "-f", "{{.State.Pid}}", container])
        .trim()
        .parse()
        .unwrap();
    let eff = u64::from_str_radix(&status_field(pid, "CapEff"), 16).unwrap();
    assert_eq!(
        eff,
        cap_mask(caps),
        "the agent runs with capabilities {eff:#x}, the manifest names {caps:?}"
    );
    assert_eq!(
        status_field(pid, "Seccomp"),
        "2",
        "no seccomp filter on the agent"
    );
    assert_eq!(
        status_field(pid, "Uid").split_whitespace().next(),
        Some("0")
    );
    pid
}

/// Peak memory and CPU time of the cgroup `pid` runs in (cgroup v1 memory
/// and cpuacct, or v2), for the README's resource figures.
fn footprint(pid: u32) -> String {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v1 = |ctl: &str| {
        cgroups.lines().find_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctls, path) = (it.next()?, it.next()?, it.next()?);
            ctls.split(',')
                .any(|c| c == ctl)
                .then(|| format!("/sys/fs/cgroup/{ctl}{path}"))
        })
    };
    let read = |p: String| {
        std::fs::read_to_string(&p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let (peak, cpu) = match (v1("memory"), v1("cpuacct")) {
        (Some(m), Some(c)) => (
            read(format!("{m}/memory.max_usage_in_bytes")),
            read(format!("{c}/cpuacct.usage")).map(|ns| format!("{ns} ns")),
        ),
        _ => {
            let path = cgroups
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or("/");
            let base = if Path::new("/sys/fs/cgroup/unified").exists() {
                "/sys/fs/cgroup/unified"
            } else {
                "/sys/fs/cgroup"
            };
            (
                read(format!("{base}{path}/memory.peak")),
                read(format!("{base}{path}/cpu.stat"))
                    .and_then(|s| s.lines().next().map(str::to_string)),
            )
        }
    };
    format!(
        "memory peak {} bytes, cpu {}",
        peak.unwrap_or_else(|| "?".into()),
        cpu.unwrap_or_else(|| "?".into())
    )
}

/// The address of a container's port on its network (podman's bridge).
fn container_addr(container: &str, port: u16) -> SocketAddr {
    let ip = podman(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        container,
    ]);
    let ip = ip.trim();
    assert!(!ip.is_empty(), "{container} has no IP address");
    format!("{ip}:{port}").parse().unwrap()
}

fn container_port(container: &Value) -> u16 {
    let port = container["ports"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "api"))
        .expect("a port named api");
    port["containerPort"].as_u64().unwrap() as u16
}

/// The volume a mount names.
fn volume<'a>(pod_spec: &'a Value, name: &str) -> &'a Value {
    pod_spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

#[test]
fn the_manifests_render_and_validate_for_the_oldest_and_newest_kubernetes() {
    let started = Instant::now();
    let (yaml, docs) = render();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet"
        ]
    );
    for d in &docs {
        match d["kind"].as_str().unwrap() {
            "Namespace" => assert_eq!(d["metadata"]["name"], "heapbpf"),
            "ClusterRole" | "ClusterRoleBinding" => {}
            _ => assert_eq!(d["metadata"]["namespace"], "heapbpf", "{d}"),
        }
    }
    // Pods, read only: nothing else.
    let rules = &kind(&docs, "ClusterRole")["rules"];
    assert_eq!(rules.as_array().unwrap().len(), 1, "{rules}");
    assert_eq!(strs(&rules[0]["resources"]), ["pods"]);
    assert_eq!(strs(&rules[0]["apiGroups"]), [""]);
    assert_eq!(strs(&rules[0]["verbs"]), ["get", "list", "watch"]);
    let spec = &kind(&docs, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(spec["hostPID"], true);
    assert_eq!(spec["tolerations"][0]["operator"], "Exists");
    let c = agent_container(spec);
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"], true, "least privilege: not privileged");
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert!(strs(&c["args"])
        .iter()
        .any(|a| a.starts_with("--token-file=")));
    assert!(c["resources"]["limits"]["memory"].is_string());

    // kubernetes-validate's own list of the versions it has schemas for.
    let versions = python(
        "import kubernetes_validate.utils as u; print('\\n'.join(u.all_versions()))",
        "",
    );
    let versions: Vec<&str> = versions.lines().collect();
    assert!(
        versions.len() >= 2,
        "kubernetes-validate knows {versions:?}"
    );
    let dir = TempDir::new("kube-validate");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &yaml).unwrap();
    for v in [versions[0], versions[versions.len() - 1]] {
        let out = run_ok(
            Command::new("kubernetes-validate")
                .args(["--strict", "-k", v])
                .arg(&file),
        );
        assert_eq!(
            out.matches(" passed for resource ").count(),
            docs.len(),
            "kubernetes-validate {v}:\n{out}"
        );
        eprintln!(
            "kubernetes-validate --strict -k {v}: {} resources passed",
            docs.len()
        );
    }
    // The check is not vacuous: a field the schema lacks fails it.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        yaml.replace(
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: true\n            readOnlyRootFileSystem: true",
        ),
    )
    .unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "-k", versions[versions.len() - 1]])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "kubernetes-validate --strict accepted a misspelt field"
    );
    eprintln!("manifests: {:.1}s", started.elapsed().as_secs_f64());
}

#[test]
fn the_pod_template_runs_in_the_host_pid_namespace() {
    require_root();
    let started = Instant::now();
    let image = image();
    let (_, docs) = render();
    let spec = &kind(&docs, "DaemonSet")["spec"]["template"]["spec"];
    let c = agent_container(spec);
    let sc = &c["securityContext"];
    assert_eq!(spec["hostPID"], true);
    let dir = TempDir::new("kube-hostpid");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let token = token();
    std::fs::create_dir(dir.path().join("token")).unwrap();
    std::fs::write(dir.path().join("token/token"), &token).unwrap();

    // A fixture on the host, under a name only this test uses.
    let comm = "hbdeploy-host";
    let program = dir.path().join(comm);
    std::fs::copy(fixture_path("grow"), &program).unwrap();
    let mut fx = Fixture::from_command(&mut Command::new(&program), |c, _| c.id());

    // `podman run` with the template's settings, each read from it.
    let name = format!("heapbpf-test-hostpid-{}", std::process::id());
    let mut guard = Podman::default();
    guard.containers.push(name.clone());
    let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), name.clone()];
    args.push("--pid=host".into());
    assert_ne!(sc["privileged"], true);
    for cap in strs(&sc["capabilities"]["drop"]) {
        args.push(format!("--cap-drop={cap}"));
    }
    let caps = strs(&sc["capabilities"]["add"]);
    for cap in &caps {
        args.push(format!("--cap-add={cap}"));
    }
    if sc["readOnlyRootFilesystem"] == true {
        args.push("--read-only".into());
    }
    // RuntimeDefault is podman's default profile: no option (checked below).
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    args.push(format!("--user={}", sc["runAsUser"].as_u64().unwrap()));
    for m in c["volumeMounts"].as_array().unwrap() {
        let mount = m["mountPath"].as_str().unwrap();
        let v = volume(spec, m["name"].as_str().unwrap());
        let source = if v["secret"].is_object() {
            dir.path().join("token")
        } else {
            let host = v["hostPath"]["path"].as_str().unwrap();
            // The node's data directory: the test's own.
            if host == "/var/lib/heapbpf" {
                data.clone()
            } else {
                PathBuf::from(host)
            }
        };
        let ro = if m["readOnly"] == true { ":ro" } else { "" };
        args.push(format!("--volume={}:{mount}{ro}", source.display()));
    }
    for (k, v) in test_settings(kind(&docs, "ConfigMap"), comm) {
        args.push(format!("--env={k}={}", v.as_str().unwrap()));
    }
    for e in c["env"].as_array().unwrap() {
        if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
            args.push(format!("--env={}=podman-node", e["name"].as_str().unwrap()));
        }
    }
    args.push(image.clone());
    args.extend(strs(&c["args"]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    podman(&args);
    let logs = || {
        let out = Command::new("podman")
            .args(["logs", &name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
    };
    let agent_pid = check_confinement(&name, &caps);
    let addr = container_addr(&name, container_port(c));
    wait_listening(addr, logs);

    // The API: the token is required, /healthz is not behind it.
    let (status, body) = get(addr, "/healthz", None);
    assert_eq!((status, String::from_utf8_lossy(&body).trim()), (200, "ok"));
    assert_eq!(get(addr, "/targets", None).0, 401);
    let pid = wait_target(addr, &token, comm, logs);
    assert_eq!(
        pid, fx.pid,
        "the host's pid, as the DaemonSet's hostPID gives it"
    );
    fx.command("leak 10 1048576 0");
    assert_eq!(
        pprof_bytes(addr, &token, pid, dir.path(), "grow_leak"),
        LEAK_BYTES
    );
    let t = target(addr, &token, pid);
    assert_eq!(t["live_bytes"], LEAK_BYTES, "{t}");
    assert_eq!(t["exe"], program.to_str().unwrap());
    eprintln!("host pid: agent {}", footprint(agent_pid));

    // SIGTERM (what the kubelet sends): a final snapshot, exit 0.
    podman(&["stop", "-t", "30", &name]);
    let out = logs();
    let stop = snapshot_line(&out, "stop");
    assert_eq!(stop.pid, fx.pid);
    assert_eq!(stop.live_bytes, LEAK_BYTES, "{out}");
    assert_eq!(
        podman(&["inspect", "-f", "{{.State.ExitCode}}", &name]).trim(),
        "0",
        "{out}"
    );
    // Written in the node's data directory (the hostPath), exact.
    let json = stop
        .paths
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    assert!(json.starts_with("/var/lib/heapbpf"), "{}", json.display());
    let snapshot = read_json(&data.join(json.file_name().unwrap()));
    assert_eq!(site(&snapshot, "grow_leak").live_bytes, LEAK_BYTES);
    eprintln!("host pid test: {:.1}s", started.elapsed().as_secs_f64());
}

#[test]
fn the_pod_template_plays_as_a_deployment_beside_a_leaking_container() {
    require_root();
    let started = Instant::now();
    let image = image();
    let (_, docs) = render();
    let ds = kind(&docs, "DaemonSet");
    let dir = TempDir::new("kube-play");
    let mut guard = Podman::default();
    let comm = "hbdeploy-pod";
    let fixture = fixture_image(&mut guard, dir.path(), "grow", comm);

    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let token = token();
    let token_dir = dir.path().join("token");
    std::fs::create_dir(&token_dir).unwrap();
    std::fs::write(token_dir.join("token"), &token).unwrap();
    // The fixture's commands come through a FIFO (nobody types into a pod).
    let ctl = dir.path().join("ctl");
    std::fs::create_dir(&ctl).unwrap();
    let fifo = ctl.join("cmd");
    let cpath = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);

    // The Deployment: the DaemonSet's pod template, with one pid namespace
    // for its containers and the fixture as a second container.
    let mut template = ds["spec"]["template"].clone();
    let spec = template["spec"].as_object_mut().unwrap();
    spec.insert("shareProcessNamespace".into(), true.into());
    let caps = {
        let c = spec["containers"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|c| c["name"] == "heapbpf")
            .unwrap();
        c["image"] = image.clone().into();
        // podman 4.3 knows no spec.nodeName in the downward API.
        for e in c["env"].as_array_mut().unwrap() {
            if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
                let name = e["name"].clone();
                *e = serde_json::json!({"name": name, "value": "podman-node"});
            }
        }
        strs(&c["securityContext"]["capabilities"]["add"])
    };
    for v in spec["volumes"].as_array_mut().unwrap() {
        if v["hostPath"]["path"] == "/var/lib/heapbpf" {
            v["hostPath"]["path"] = data.to_str().unwrap().into();
        }
        // podman 4.3's kube play panics on a secret volume (a nil pointer
        // in VolumeFromSecret): the token file itself, at the same place.
        if v["secret"].is_object() {
            let name = v["name"].clone();
            *v = serde_json::json!({"name": name, "hostPath": {"path": token_dir, "type": "Directory"}});
        }
    }
    spec["containers"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "name": "fixture",
            "image": fixture,
            "args": ["/ctl/cmd"],
            "volumeMounts": [{"name": "ctl", "mountPath": "/ctl"}],
        }));
    spec["volumes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "ctl", "hostPath": {"path": ctl, "type": "Directory"}}));
    let name = format!("heapbpf-test-play-{}", std::process::id());
    let deployment = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ds["metadata"]["namespace"]},
        "spec": {"replicas": 1, "selector": ds["spec"]["selector"], "template": template},
    });
    let mut configmap = kind(&docs, "ConfigMap").clone();
    configmap["data"] = test_settings(&configmap, comm).into();
    // JSON is YAML: podman reads both.
    let play = dir.path().join("deployment.json");
    std::fs::write(&play, deployment.to_string()).unwrap();
    let cm = dir.path().join("configmap.json");
    std::fs::write(&cm, configmap.to_string()).unwrap();
    guard.kube_files.push(play.clone());
    let pod = format!("{name}-pod-0");
    guard.pods.push(pod.clone());
    podman(&[
        "kube",
        "play",
        "--configmap",
        cm.to_str().unwrap(),
        play.to_str().unwrap(),
    ]);
    let agent = format!("{pod}-heapbpf");
    let fixture_ctr = format!("{pod}-fixture");
    let logs = |c: &str| {
        let out = Command::new("podman").args(["logs", c]).output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
    };
    let mut cmd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let agent_pid = check_confinement(&agent, &caps);
    // What podman made of the liveness probe (said in README).
    let health = podman(&["inspect", "-f", "{{json .Config.Healthcheck}}", &agent]);
    eprintln!(
        "podman's healthcheck for the liveness probe: {}",
        health.trim()
    );
    assert!(health.contains("/healthz"), "{health}");
    let mounts = podman(&["inspect", "-f", "{{json .Mounts}}", &agent]);
    let mounts: Value = serde_json::from_str(&mounts).unwrap();
    for (path, rw) in [
        ("/sys/kernel/tracing", false),
        ("/sys/fs/cgroup", false),
        ("/var/lib/heapbpf", true),
    ] {
        let m = mounts
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["Destination"] == path)
            .unwrap_or_else(|| panic!("{path} not mounted: {mounts}"));
        assert_eq!(m["RW"], rw, "{m}");
    }
    assert_eq!(
        podman(&["inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", &agent]).trim(),
        "true"
    );

    // The pod's address: the port the probe and the users reach.
    let infra = podman(&["pod", "inspect", "-f", "{{.InfraContainerID}}", &pod]);
    let addr = container_addr(
        infra.trim(),
        container_port(agent_container(&ds["spec"]["template"]["spec"])),
    );
    wait_listening(addr, || logs(&agent));
    let (status, body) = get(addr, "/healthz", None);
    assert_eq!((status, String::from_utf8_lossy(&body).trim()), (200, "ok"));
    assert_eq!(get(addr, "/targets", None).0, 401);
    let pid = wait_target(addr, &token, comm, || logs(&agent));
    writeln!(cmd, "leak 10 1048576 0").unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !logs(&fixture_ctr).lines().any(|l| l == "done") {
        assert!(
            Instant::now() < deadline,
            "the fixture did not leak:\n{}",
            logs(&fixture_ctr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        pprof_bytes(addr, &token, pid, dir.path(), "grow_leak"),
        LEAK_BYTES
    );
    let t = target(addr, &token, pid);
    assert_eq!(t["live_bytes"], LEAK_BYTES, "{t}");
    assert_eq!(t["exe"], format!("/{comm}"));
    eprintln!("kube play: agent {}", footprint(agent_pid));
    eprintln!("kube play test: {:.1}s", started.elapsed().as_secs_f64());
}

/// The ConfigMap reaches the agent as `HEAPBPF_*` variables: a value is the
/// flag's, an empty one is the flag left out (the default), a bad one is
/// refused naming the flag, and a flag on the command line wins.
#[test]
fn settings_come_from_the_environment_as_the_configmap_sets_them() {
    require_root();
    let data = TempDir::new("kube-env");
    let fx = Fixture::spawn("grow");
    let agent = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = Command::new(heapbpf_bin());
        cmd.args(["agent", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .args(["--discover-every", "200ms"])
            .args(args)
            .env_remove("HEAPBPF_SAMPLE_BYTES");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    };
    let select = format!("pid={}", fx.pid);
    // Empty HEAPBPF_SAMPLE_BYTES (the ConfigMap's default): the agent's
    // sampling default, as without it; a bad HEAPBPF_INTERVAL does not
    // matter beside --interval on the command line.
    let mut child = agent(
        &[
            ("HEAPBPF_SELECT", &select),
            ("HEAPBPF_SAMPLE_BYTES", ""),
            ("HEAPBPF_INTERVAL", "soon"),
        ],
        &["--interval", "1h"],
    )
    .stderr(Stdio::piped())
    .stdout(Stdio::null())
    .spawn()
    .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let line = loop {
        let mut l = String::new();
        if std::io::BufRead::read_line(&mut err, &mut l).unwrap() == 0 {
            panic!("the agent ended before attaching:\n{seen}");
        }
        seen.push_str(&l);
        if lines::parse_attached(l.trim_end()).is_some_and(|(p, _)| p == fx.pid) {
            break l;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("sampling 64KiB"), "{line}");
    // Alone, a bad value is refused naming its flag, exit 2.
    let out = agent(
        &[("HEAPBPF_SELECT", &select), ("HEAPBPF_INTERVAL", "soon")],
        &[],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--interval"), "{stderr}");
    // No rule at all (HEAPBPF_SELECT empty): the usage error of a missing --select.
    let out = agent(&[("HEAPBPF_SELECT", "")], &[]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--select"), "{stderr}");
}
