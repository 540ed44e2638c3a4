//! `--kubernetes`: the pods of this node, from the API server, joined to
//! processes by container id. A watch (kube-rs's `watcher`, field selector
//! `spec.nodeName=NODE`) runs on a thread and runtime of its own and
//! publishes a [`PodIndex`], container id → [`Container`], which the loop
//! reads without waiting (one short lock). The join itself
//! ([`pod_containers`]) is a pure function of a `v1 Pod`.
//!
//! The API server is reached with the in-cluster service account when
//! `KUBERNETES_SERVICE_HOST` is set, else with the kubeconfig `KUBECONFIG`
//! names (or `~/.kube/config`). Not reaching it is not fatal: said once,
//! retried with backoff; until the first list arrives the index is empty
//! (the `k8s` rule selects nothing), and after an outage the last list
//! stands until the watch is back.
//!
//! Everything read from a pod is the pod owner's text: bounded here,
//! escaped where printed (lines, metrics), never trusted to be a name.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::oneshot;

use super::view::PodMeta;
use crate::{
    error::{Error, Result},
    lines::{self, say},
};

/// `heapbpf.io/profile: "true"`: profile this pod (the `k8s` rule).
pub const PROFILE_ANNOTATION: &str = "heapbpf.io/profile";
/// `heapbpf.io/containers: "a,b"`: only these containers of the pod.
pub const CONTAINERS_ANNOTATION: &str = "heapbpf.io/containers";
/// `heapbpf.io/service-name: NAME`: the `service_name` label.
pub const SERVICE_NAME_ANNOTATION: &str = "heapbpf.io/service-name";
/// The most bytes kept of a name, label or annotation value (a DNS
/// subdomain, the longest name Kubernetes allows, is 253).
const MAX_VALUE_BYTES: usize = 253;
/// The most bytes of an API error said on one line.
const MAX_ERROR_BYTES: usize = 400;
/// How long to wait before building a client again after failing to.
const CLIENT_RETRY_MIN: Duration = Duration::from_millis(500);
const CLIENT_RETRY_MAX: Duration = Duration::from_secs(30);

/// One container of a pod on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub meta: PodMeta,
    /// Whether the `k8s` rule selects it: the pod is annotated
    /// `heapbpf.io/profile: "true"` and, when `heapbpf.io/containers` is
    /// set, the container is one of those it names.
    pub profiled: bool,
}

/// What the watch publishes: container id (64 lowercase hex digits) →
/// [`Container`], for the pods of this node.
#[derive(Debug, Default)]
pub struct PodIndex {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    containers: HashMap<String, Container>,
    /// Bumped at each change, so that the loop re-checks only then.
    generation: u64,
}

impl PodIndex {
    /// The container with id `id`, when a pod of this node has it.
    pub fn get(&self, id: &str) -> Option<Container> {
        self.inner.lock().ok()?.containers.get(id).cloned()
    }

    /// Changes with every change of the index.
    pub fn generation(&self) -> u64 {
        self.inner.lock().map_or(0, |i| i.generation)
    }

    /// How many containers it knows.
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.containers.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn replace(&self, containers: HashMap<String, Container>) {
        if let Ok(mut inner) = self.inner.lock() {
            if inner.containers != containers {
                inner.containers = containers;
                inner.generation += 1;
            }
        }
    }
}

/// At most [`MAX_VALUE_BYTES`] of `text`, cut at a character boundary.
fn bounded(text: &str) -> String {
    if text.len() <= MAX_VALUE_BYTES {
        return text.to_string();
    }
    let mut end = MAX_VALUE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// The id in a status's `containerID` (`containerd://ID`, `cri-o://ID`,
/// `docker://ID`, any `SCHEME://`), lowercased; `None` unless it is a
/// full 64-digit id (a container not started yet has none).
pub fn strip_runtime(container_id: &str) -> Option<String> {
    let id = container_id
        .split_once("://")
        .map_or(container_id, |(_, id)| id);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// The containers of `pod` that have started (their statuses carry an id),
/// init and ephemeral ones included, as the index holds them. A pod the
/// API server says is on another node has none here.
pub fn pod_containers(pod: &Pod, node: &str) -> Vec<(String, Container)> {
    let on_node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_none_or(|n| n == node);
    let Some(status) = pod.status.as_ref().filter(|_| on_node) else {
        return Vec::new();
    };
    let meta = &pod.metadata;
    let annotation = |k: &str| meta.annotations.as_ref().and_then(|a| a.get(k));
    let label = |k: &str| {
        meta.labels
            .as_ref()
            .and_then(|l| l.get(k))
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    let opted_in = annotation(PROFILE_ANNOTATION).is_some_and(|v| v.trim() == "true");
    let only: Option<Vec<&str>> = annotation(CONTAINERS_ANNOTATION).map(|v| {
        v.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect()
    });
    let service_name = annotation(SERVICE_NAME_ANNOTATION)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .or_else(|| label("app.kubernetes.io/name"))
        .or_else(|| label("app"));
    let namespace = bounded(meta.namespace.as_deref().unwrap_or_default());
    let pod_name = bounded(meta.name.as_deref().unwrap_or_default());
    let statuses: [&Option<Vec<ContainerStatus>>; 3] = [
        &status.container_statuses,
        &status.init_container_statuses,
        &status.ephemeral_container_statuses,
    ];
    statuses
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|c| {
            let id = strip_runtime(c.container_id.as_deref()?)?;
            let container = bounded(&c.name);
            Some((
                id,
                Container {
                    profiled: opted_in
                        && only
                            .as_ref()
                            .is_none_or(|names| names.contains(&c.name.as_str())),
                    meta: PodMeta {
                        namespace: namespace.clone(),
                        pod: pod_name.clone(),
                        service_name: service_name.map_or_else(|| container.clone(), bounded),
                        container,
                    },
                },
            ))
        })
        .collect()
}

/// The index of a set of pods, by their keys.
fn index_of(pods: &HashMap<String, Vec<(String, Container)>>) -> HashMap<String, Container> {
    pods.values()
        .flatten()
        .map(|(id, c)| (id.clone(), c.clone()))
        .collect()
}

/// A pod's key in the watch's state: its uid, else namespace/name.
fn key(pod: &Pod) -> String {
    let m = &pod.metadata;
    m.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            m.namespace.as_deref().unwrap_or_default(),
            m.name.as_deref().unwrap_or_default()
        )
    })
}

/// The watch's thread; stopped when dropped.
pub struct Watch {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts watching the pods of `node` into `index`, on a thread of its own
/// with a runtime of its own (built there: nothing of it touches the
/// caller's).
pub fn start(node: String, index: Arc<PodIndex>) -> Result<Watch> {
    let (stop, stopped) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("heapbpf-kube".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    say(&lines::pods_not_watched(&format!(
                        "cannot start the pod watch's runtime: {e}"
                    )));
                    return;
                }
            };
            runtime.block_on(async {
                tokio::select! {
                    _ = stopped => {}
                    _ = watch(&node, &index) => {}
                }
            });
            runtime.shutdown_timeout(Duration::from_millis(200));
        })
        .map_err(|e| Error::runtime("cannot start the pod watch's thread", e))?;
    Ok(Watch {
        stop: Some(stop),
        thread: Some(thread),
    })
}

impl Watch {
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A client as the environment says: in-cluster with a service account,
/// else the kubeconfig.
async fn client() -> std::result::Result<(kube::Client, String), String> {
    let (config, source) = if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        let c = kube::Config::incluster()
            .map_err(|e| format!("cannot read the in-cluster service account: {}", chain(&e)))?;
        (c, "the in-cluster service account".to_string())
    } else {
        let c = kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| {
                format!("no in-cluster service account (KUBERNETES_SERVICE_HOST unset) and no usable kubeconfig (KUBECONFIG): {}", chain(&e))
            })?;
        (c, "the kubeconfig".to_string())
    };
    let url = config.cluster_url.to_string();
    let client = kube::Client::try_from(config)
        .map_err(|e| format!("cannot make a client for {url}: {}", chain(&e)))?;
    Ok((client, format!("{url} ({source})")))
}

/// An error with its causes (kube-rs's own says "client error (Connect)"
/// and leaves the why — a certificate, a refused connection — to them).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}

/// Said once per outage: the first failure, then nothing until the watch
/// is back.
#[derive(Default)]
struct Outage {
    said: bool,
}

impl Outage {
    fn failed(&mut self, why: &str) {
        if !self.said {
            let mut why = why.replace('\n', "; ");
            if why.len() > MAX_ERROR_BYTES {
                let mut end = MAX_ERROR_BYTES;
                while !why.is_char_boundary(end) {
                    end -= 1;
                }
                why.truncate(end);
                why.push_str("...");
            }
            say(&lines::pods_unreachable(&why));
            self.said = true;
        }
    }
}

/// The watch, for ever: builds a client (again, with backoff, until it
/// can), then follows the pods of `node`.
async fn watch(node: &str, index: &PodIndex) {
    let mut outage = Outage::default();
    let mut listed = false;
    let mut retry = CLIENT_RETRY_MIN;
    loop {
        let (client, server) = match client().await {
            Ok(c) => c,
            Err(why) => {
                outage.failed(&why);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(CLIENT_RETRY_MAX);
                continue;
            }
        };
        follow(node, index, client, &server, &mut outage, &mut listed).await;
        // The watcher retries for ever; should it give up all the same,
        // start again rather than leave the index as it is for good.
        outage.failed(&format!("{server}: the watch of the pods ended"));
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(CLIENT_RETRY_MAX);
    }
}

/// Follows the pods of `node` with `client` into `index` for as long as
/// the watcher runs.
async fn follow(
    node: &str,
    index: &PodIndex,
    client: kube::Client,
    server: &str,
    outage: &mut Outage,
    listed: &mut bool,
) {
    let api: kube::Api<Pod> = kube::Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    // The watcher lists, then watches from the list's version; on an error
    // it backs off and starts over (a fresh list: `Init` .. `InitDone`).
    let events = watcher(api, cfg).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut pods: HashMap<String, Vec<(String, Container)>> = HashMap::new();
    let mut listing: Option<HashMap<String, Vec<(String, Container)>>> = None;
    while let Some(event) = events.next().await {
        match event {
            Err(e) => outage.failed(&format!("{server}: {}", chain(&e))),
            Ok(watcher::Event::Init) => listing = Some(HashMap::new()),
            Ok(watcher::Event::InitApply(pod)) => {
                listing
                    .get_or_insert_default()
                    .insert(key(&pod), pod_containers(&pod, node));
            }
            Ok(watcher::Event::InitDone) => {
                pods = listing.take().unwrap_or_default();
                index.replace(index_of(&pods));
                if outage.said || !*listed {
                    say(&lines::pods_watched(node, server, pods.len()));
                }
                outage.said = false;
                *listed = true;
            }
            Ok(watcher::Event::Apply(pod)) => {
                pods.insert(key(&pod), pod_containers(&pod, node));
                index.replace(index_of(&pods));
            }
            Ok(watcher::Event::Delete(pod)) => {
                pods.remove(&key(&pod));
                index.replace(index_of(&pods));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID_WEB: &str = "4f1c0a1e5b7d9c3e2a6f8b0d1e3c5a7f9b2d4e6a8c0e1f3a5b7c9d1e3f5a7b9c";
    const ID_SIDECAR: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    const ID_INIT: &str = "0f0e0d0c0b0a09080706050403020100f0e0d0c0b0a090807060504030201000";
    const ID_DEBUG: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    /// A pod as `kubectl get pods -o json` prints one (trimmed of fields
    /// the join does not read, kept in the shape and order it prints).
    fn pod_json(annotations: &str, labels: &str) -> String {
        format!(
            r#"{{
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {{
        "annotations": {{{annotations}}},
        "creationTimestamp": "2026-11-24T18:00:00Z",
        "generateName": "web-7d4b9c8f6d-",
        "labels": {{{labels}}},
        "name": "web-7d4b9c8f6d-x2kqp",
        "namespace": "shop",
        "ownerReferences": [{{"apiVersion": "apps/v1", "blockOwnerDeletion": true, "controller": true, "kind": "ReplicaSet", "name": "web-7d4b9c8f6d", "uid": "5e2f6a0c-7c44-4a3e-9d0b-2b8e1f6c9a11"}}],
        "resourceVersion": "48213",
        "uid": "8d7c3e2a-1b4f-4c5d-9e6f-0a1b2c3d4e5f"
    }},
    "spec": {{
        "containers": [
            {{"image": "shop/web:1.4", "imagePullPolicy": "IfNotPresent", "name": "web", "resources": {{}}}},
            {{"image": "envoyproxy/envoy:v1.31", "imagePullPolicy": "IfNotPresent", "name": "sidecar", "resources": {{}}}}
        ],
        "initContainers": [{{"image": "busybox:1.36", "name": "migrate", "resources": {{}}}}],
        "nodeName": "node-a",
        "restartPolicy": "Always",
        "serviceAccountName": "default"
    }},
    "status": {{
        "conditions": [{{"lastProbeTime": null, "lastTransitionTime": "2026-11-24T18:00:05Z", "status": "True", "type": "Ready"}}],
        "containerStatuses": [
            {{"containerID": "containerd://{ID_WEB}", "image": "docker.io/shop/web:1.4", "imageID": "docker.io/shop/web@sha256:0d3c", "lastState": {{}}, "name": "web", "ready": true, "restartCount": 0, "started": true, "state": {{"running": {{"startedAt": "2026-11-24T18:00:04Z"}}}}}},
            {{"containerID": "cri-o://{sidecar}", "image": "docker.io/envoyproxy/envoy:v1.31", "imageID": "docker.io/envoyproxy/envoy@sha256:9a1b", "lastState": {{}}, "name": "sidecar", "ready": true, "restartCount": 0, "started": true, "state": {{"running": {{"startedAt": "2026-11-24T18:00:04Z"}}}}}},
            {{"image": "docker.io/shop/cache:2", "imageID": "", "lastState": {{}}, "name": "cache", "ready": false, "restartCount": 0, "started": false, "state": {{"waiting": {{"reason": "ContainerCreating"}}}}}}
        ],
        "ephemeralContainerStatuses": [
            {{"containerID": "docker://{ID_DEBUG}", "image": "busybox:1.36", "imageID": "", "lastState": {{}}, "name": "debugger-abcde", "ready": false, "restartCount": 0, "state": {{"running": {{"startedAt": "2026-11-24T18:10:00Z"}}}}}}
        ],
        "hostIP": "10.0.0.5",
        "initContainerStatuses": [
            {{"containerID": "containerd://{ID_INIT}", "image": "docker.io/library/busybox:1.36", "imageID": "docker.io/library/busybox@sha256:1c7e", "lastState": {{}}, "name": "migrate", "ready": true, "restartCount": 0, "started": false, "state": {{"terminated": {{"containerID": "containerd://{ID_INIT}", "exitCode": 0, "finishedAt": "2026-11-24T18:00:03Z", "reason": "Completed", "startedAt": "2026-11-24T18:00:02Z"}}}}}}
        ],
        "phase": "Running",
        "podIP": "10.244.1.17",
        "qosClass": "BestEffort",
        "startTime": "2026-11-24T18:00:00Z"
    }}
}}"#,
            sidecar = ID_SIDECAR.to_ascii_uppercase(),
        )
    }

    fn pod(annotations: &str, labels: &str) -> Pod {
        let json = pod_json(annotations, labels);
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}\n{json}"))
    }

    fn by_id(pod: &Pod) -> HashMap<String, Container> {
        pod_containers(pod, "node-a").into_iter().collect()
    }

    const LABELS: &str = r#""app": "web-legacy", "app.kubernetes.io/name": "web", "pod-template-hash": "7d4b9c8f6d""#;

    #[test]
    fn runtime_prefixes_are_stripped() {
        let id = ID_WEB;
        for prefix in ["containerd://", "cri-o://", "docker://", "podman://", ""] {
            assert_eq!(
                strip_runtime(&format!("{prefix}{id}")).as_deref(),
                Some(id),
                "{prefix}"
            );
        }
        assert_eq!(
            strip_runtime(&format!("cri-o://{}", id.to_ascii_uppercase())).as_deref(),
            Some(id)
        );
        for bad in [
            String::new(),
            "containerd://".into(),
            format!("containerd://{}", &id[1..]),
            format!("containerd://{id}0"),
            format!("containerd://{}z", &id[1..]),
            format!("containerd://../../{}", &id[6..]),
        ] {
            assert_eq!(strip_runtime(&bad), None, "{bad}");
        }
    }

    #[test]
    fn every_started_container_is_joined_by_its_id() {
        let p = pod(r#""heapbpf.io/profile": "true""#, LABELS);
        let c = by_id(&p);
        // cache has not started: no id, nothing to join.
        assert_eq!(c.len(), 4, "{c:#?}");
        let web = &c[ID_WEB];
        assert_eq!(
            web.meta,
            PodMeta {
                namespace: "shop".into(),
                pod: "web-7d4b9c8f6d-x2kqp".into(),
                container: "web".into(),
                service_name: "web".into(),
            }
        );
        assert!(web.profiled);
        assert_eq!(c[ID_SIDECAR].meta.container, "sidecar", "cri-o, uppercase");
        assert_eq!(c[ID_INIT].meta.container, "migrate");
        assert_eq!(c[ID_DEBUG].meta.container, "debugger-abcde");
        assert!(c.values().all(|c| c.profiled));
    }

    #[test]
    fn service_name_precedence() {
        let service = |annotations: &str, labels: &str| {
            by_id(&pod(annotations, labels))[ID_WEB]
                .meta
                .service_name
                .clone()
        };
        assert_eq!(
            service(r#""heapbpf.io/service-name": "checkout""#, LABELS),
            "checkout"
        );
        assert_eq!(
            service(r#""heapbpf.io/service-name": "  ""#, LABELS),
            "web",
            "blank annotation"
        );
        assert_eq!(service("", LABELS), "web", "app.kubernetes.io/name");
        assert_eq!(service("", r#""app": "web-legacy""#), "web-legacy", "app");
        assert_eq!(service("", ""), "web", "the container name");
        let c = by_id(&pod("", ""));
        assert_eq!(c[ID_SIDECAR].meta.service_name, "sidecar");
    }

    #[test]
    fn opt_in_only() {
        for annotations in [
            "",
            r#""heapbpf.io/profile": "false""#,
            r#""heapbpf.io/profile": "yes""#,
            r#""heapbpf.io/containers": "web""#,
        ] {
            let c = by_id(&pod(annotations, LABELS));
            assert!(c.values().all(|c| !c.profiled), "{annotations}");
            assert_eq!(
                c[ID_WEB].meta.pod, "web-7d4b9c8f6d-x2kqp",
                "metadata all the same"
            );
        }
    }

    #[test]
    fn the_containers_annotation_names_the_profiled_ones() {
        let c = by_id(&pod(
            r#""heapbpf.io/profile": "true", "heapbpf.io/containers": " web, migrate,,nosuch""#,
            LABELS,
        ));
        let profiled: Vec<&str> = {
            let mut v: Vec<&str> = c
                .values()
                .filter(|c| c.profiled)
                .map(|c| c.meta.container.as_str())
                .collect();
            v.sort();
            v
        };
        assert_eq!(profiled, ["migrate", "web"]);
        let none = by_id(&pod(
            r#""heapbpf.io/profile": "true", "heapbpf.io/containers": """#,
            LABELS,
        ));
        assert!(none.values().all(|c| !c.profiled));
    }

    #[test]
    fn removing_the_annotation_unselects_and_bumps_the_generation() {
        let index = PodIndex::default();
        let annotated = pod(r#""heapbpf.io/profile": "true""#, LABELS);
        let mut pods = HashMap::new();
        pods.insert(key(&annotated), pod_containers(&annotated, "node-a"));
        index.replace(index_of(&pods));
        let g = index.generation();
        assert!(index.get(ID_WEB).unwrap().profiled);
        // The same list again changes nothing.
        index.replace(index_of(&pods));
        assert_eq!(index.generation(), g);
        // MODIFIED without the annotation.
        let plain = pod("", LABELS);
        assert_eq!(key(&plain), key(&annotated));
        pods.insert(key(&plain), pod_containers(&plain, "node-a"));
        index.replace(index_of(&pods));
        assert!(index.generation() > g);
        let web = index.get(ID_WEB).unwrap();
        assert!(!web.profiled);
        assert_eq!(web.meta.namespace, "shop", "still labelled");
        // DELETED.
        pods.remove(&key(&plain));
        index.replace(index_of(&pods));
        assert_eq!(index.get(ID_WEB), None);
        assert!(index.is_empty());
    }

    #[test]
    fn a_pod_list_as_kubectl_prints_it() {
        let list = format!(
            r#"{{"apiVersion": "v1", "items": [{}], "kind": "List", "metadata": {{"resourceVersion": ""}}}}"#,
            pod_json(r#""heapbpf.io/profile": "true""#, LABELS)
        );
        // kubectl prints a plain `List`; its items are pods as the API
        // server's `PodList` (what the watch reads) has them.
        let list: serde_json::Value = serde_json::from_str(&list).unwrap();
        let items: Vec<Pod> = serde_json::from_value(list["items"].clone()).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(by_id(&items[0]).len(), 4);
        let served = format!(
            r#"{{"apiVersion": "v1", "items": [{}], "kind": "PodList", "metadata": {{"resourceVersion": "48213"}}}}"#,
            pod_json("", LABELS)
        );
        let served: k8s_openapi::List<Pod> = serde_json::from_str(&served).unwrap();
        assert_eq!(
            by_id(&served.items[0]),
            by_id(&items[0])
                .into_iter()
                .map(|(id, mut c)| {
                    c.profiled = false;
                    (id, c)
                })
                .collect()
        );
    }

    #[test]
    fn pods_of_another_node_are_left_out() {
        let p = pod(r#""heapbpf.io/profile": "true""#, LABELS);
        assert!(pod_containers(&p, "node-b").is_empty());
    }

    #[test]
    fn hostile_values_are_bounded() {
        let long = "é".repeat(400);
        let p = pod(
            &format!(
                r#""heapbpf.io/profile": "true", "heapbpf.io/service-name": "{long}\u001b[2J""#
            ),
            LABELS,
        );
        let web = &by_id(&p)[ID_WEB];
        assert!(web.meta.service_name.len() <= MAX_VALUE_BYTES);
        assert!(web.meta.service_name.chars().all(|c| c == 'é'));
        assert_eq!(bounded("short"), "short");
    }
}
