//! Pushing each snapshot the agent writes to a profile store: Grafana
//! Pyroscope (`--push URL`: `POST URL/push.v1.PusherService/Push`, the
//! Connect protocol's unary call over HTTP/1.1 with a protobuf body) and
//! Parca (`--push-parca URL`: `POST URL/profiles/writeraw`, the HTTP/JSON
//! mapping of `ProfileStoreService.WriteRaw`), as gzipped pprof with the
//! contract's labels.
//!
//! Delivery never holds the agent's loop: [`Pusher::push_snapshot`] only
//! hands the snapshot to a thread of its own (a current-thread runtime),
//! which encodes it and appends it to a bounded queue per store ([`Queue`]:
//! when full the oldest profile goes, counted), and sends them in order, one at a time, retrying a failed one with a doubling
//! backoff ([`Backoff`]) before the next. Every failed attempt counts in
//! `heapbpf_push_failures_total`.
//!
//! This module owns the wire formats (prost messages written from the
//! published `.proto` files, no build-time protoc), the labels, the queue
//! and the HTTP client; it never touches the engine.
use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT},
    HeaderMap, Uri,
};
use prost::Message;
use tokio::sync::{mpsc, watch, Notify};

use super::view::{PodMeta, Shared};
use crate::{
    error::{Error, Result},
    lines::{self, say},
    model::Snapshot,
};

/// Pyroscope's `push.v1` and `types.v1` messages (`api/push/v1/push.proto`,
/// `api/types/v1/types.proto`): the fields a push sends.
pub mod proto {
    /// `push.v1.PushRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        #[prost(message, repeated, tag = "1")]
        pub series: Vec<RawProfileSeries>,
    }
    /// `push.v1.RawProfileSeries` (field 3, annotations, is dropped by
    /// Pyroscope's distributors when pushed: not sent).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RawProfileSeries {
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<LabelPair>,
        #[prost(message, repeated, tag = "2")]
        pub samples: Vec<RawSample>,
    }
    /// `push.v1.RawSample`: one pprof profile (gzipped is accepted).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RawSample {
        #[prost(bytes = "vec", tag = "1")]
        pub raw_profile: Vec<u8>,
        /// `ID` in the proto: a unique id of the profile.
        #[prost(string, tag = "2")]
        pub id: String,
    }
    /// `types.v1.LabelPair`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LabelPair {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }
}

/// Where profiles go and how, as the flags say (plain data; the basic-auth
/// file is read when the pusher starts).
#[derive(Clone, Debug, Default)]
pub struct PushConfig {
    /// `--push`: a Pyroscope server's base URL, checked ([`parse_url`]).
    pub pyroscope: Option<String>,
    /// `--push-parca`: a Parca server's base URL, checked.
    pub parca: Option<String>,
    /// `--push-header K:V`, each checked ([`parse_header`]).
    pub headers: Vec<(String, String)>,
    /// `--push-basic-auth FILE`: `user:password` on its first line.
    pub basic_auth_file: Option<PathBuf>,
    /// `--push-tenant ID`: sent as `X-Scope-OrgID`.
    pub tenant: Option<String>,
}

impl PushConfig {
    /// Whether anything is pushed at all.
    pub fn enabled(&self) -> bool {
        self.pyroscope.is_some() || self.parca.is_some()
    }
}

/// The most profiles a store's queue holds; past it the oldest goes.
pub const QUEUE_PROFILES: usize = 64;
/// The most bytes of (gzipped) profiles a store's queue holds.
pub const QUEUE_BYTES: usize = 32 << 20;
/// How long one push may take, connection and answer included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The first wait after a failed push; it doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// At exit, how long the queues may take to drain (in order, until a push
/// fails, without backoff).
pub const DRAIN_AT_EXIT: Duration = Duration::from_secs(10);
/// A label value is cut at this many bytes (Pyroscope refuses values over
/// 2048 by default; Kubernetes names are at most 253).
pub const MAX_LABEL_VALUE_BYTES: usize = 1024;
/// Of an error answer, at most this much is read and at most
/// [`MAX_ERROR_CHARS`] characters of it are said.
const MAX_ERROR_BODY_BYTES: usize = 64 << 10;
const MAX_ERROR_CHARS: usize = 200;

/// A `--push` or `--push-parca` URL, checked: `http` or `https`, a host, no
/// user info (credentials go in `--push-basic-auth`, never in a URL that
/// lines and logs repeat), no query or fragment. Returned without its
/// trailing `/`.
pub fn parse_url(flag: &str, text: &str) -> std::result::Result<String, String> {
    let bad = |why: &str| format!("{flag} {}: {why}", lines::escape(text));
    let uri: Uri = text
        .parse()
        .map_err(|_| bad("not a URL (expected http://HOST:PORT or https://HOST[/PATH])"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad("expected an http:// or https:// URL")),
    }
    let Some(authority) = uri.authority() else {
        return Err(bad("no host in it"));
    };
    if authority.as_str().contains('@') {
        return Err(bad(
            "credentials in a URL are not accepted (they would be repeated in lines and logs): put user:password in a file and pass --push-basic-auth FILE",
        ));
    }
    if authority.host().is_empty() {
        return Err(bad("no host in it"));
    }
    if uri.query().is_some() || text.contains('#') {
        return Err(bad(
            "a query or fragment is not accepted; give the server's base URL",
        ));
    }
    Ok(text.trim_end_matches('/').to_string())
}

/// Headers a `--push-header` may not set: the request's own framing and
/// the ones the protocols fix.
const RESERVED_HEADERS: [&str; 7] = [
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "connect-protocol-version",
    "te",
];

/// `--push-header K:V`: a valid HTTP header name and value (spaces around
/// the value trimmed), not one the request needs for itself.
pub fn parse_header(text: &str) -> std::result::Result<(String, String), String> {
    let bad = |why: &str| format!("--push-header {}: {why}", lines::escape(text));
    let Some((name, value)) = text.split_once(':') else {
        return Err(bad("expected NAME:VALUE, as X-Api-Key:abc"));
    };
    let name = name.trim();
    let value = value.trim();
    let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        bad("not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)")
    })?;
    if RESERVED_HEADERS.contains(&parsed.as_str()) {
        return Err(bad("heapbpf sets this header itself"));
    }
    HeaderValue::from_str(value).map_err(|_| {
        bad("not a valid HTTP header value (visible ASCII and spaces only, no control characters)")
    })?;
    Ok((name.to_string(), value.to_string()))
}

/// `--push-tenant ID`: a valid header value, not empty.
pub fn parse_tenant(text: &str) -> std::result::Result<String, String> {
    let t = text.trim();
    if t.is_empty() || HeaderValue::from_str(t).is_err() {
        return Err(format!(
            "--push-tenant {}: expected a tenant id (visible ASCII, as Pyroscope's X-Scope-OrgID takes)",
            lines::escape(text)
        ));
    }
    Ok(t.to_string())
}

/// A label value as a target or the cluster gave it: control characters
/// replaced with `_`, cut at [`MAX_LABEL_VALUE_BYTES`] on a character
/// boundary (strings are valid UTF-8 already).
pub fn label_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_LABEL_VALUE_BYTES));
    for c in text.chars() {
        let c = if c.is_control() { '_' } else { c };
        if out.len() + c.len_utf8() > MAX_LABEL_VALUE_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

/// The labels of a target's profiles, sorted by name: `__name__="memory"`,
/// `__delta__="false"` (inuse is a gauge, alloc figures run since attach),
/// `service_name` (the pod's, else the process's comm: Pyroscope requires
/// one), `namespace`, `pod`, `container` (the container's name with pod
/// metadata, else the container id of the process's cgroup), `node` and
/// `pid`. A label with nothing to say (no pod, no container) is left out,
/// as Prometheus-style stores treat an empty value: absent.
pub fn labels(
    pid: u32,
    comm: &str,
    container_id: Option<&str>,
    meta: Option<&PodMeta>,
    node: &str,
) -> Vec<(String, String)> {
    let service = meta
        .map(|m| m.service_name.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(comm);
    let container = meta
        .map(|m| m.container.as_str())
        .filter(|s| !s.is_empty())
        .or(container_id);
    let mut out: Vec<(String, String)> = [
        ("__name__", Some("memory")),
        ("__delta__", Some("false")),
        ("service_name", Some(service)),
        ("namespace", meta.map(|m| m.namespace.as_str())),
        ("pod", meta.map(|m| m.pod.as_str())),
        ("container", container),
        ("node", Some(node)),
    ]
    .into_iter()
    .filter_map(|(k, v)| {
        let v = label_value(v?);
        (!v.is_empty()).then(|| (k.to_string(), v))
    })
    .collect();
    out.push(("pid".into(), pid.to_string()));
    out.sort();
    out
}

/// One profile to push: its labels, its gzipped pprof bytes, a unique id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub labels: Vec<(String, String)>,
    pub pprof: Vec<u8>,
    pub id: String,
}

impl Profile {
    /// A snapshot as pprof (the four sample types of
    /// [`crate::output::pprof`]) with `labels`.
    pub fn from_snapshot(snapshot: &Snapshot, labels: Vec<(String, String)>) -> Profile {
        Profile {
            labels,
            pprof: crate::output::pprof::to_bytes(snapshot),
            id: random_uuid(),
        }
    }
}

/// A random (version 4) UUID, as Pyroscope's own clients name profiles.
fn random_uuid() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy (never on Linux ≥ 3.17 once booted): the clock, unique enough.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b = t.to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// `push.v1.PushRequest` with one series of one sample: the Push body.
pub fn pyroscope_body(p: &Profile) -> Vec<u8> {
    proto::PushRequest {
        series: vec![proto::RawProfileSeries {
            labels: p
                .labels
                .iter()
                .map(|(name, value)| proto::LabelPair {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            samples: vec![proto::RawSample {
                raw_profile: p.pprof.clone(),
                id: p.id.clone(),
            }],
        }],
    }
    .encode_to_vec()
}

/// `WriteRawRequest` as its HTTP mapping (`body: "*"`) takes it: protobuf's
/// JSON form, `series[].labels.labels[{name, value}]`,
/// `series[].samples[].raw_profile` in base64; `normalized` false (the
/// addresses are the target's runtime ones, with its mappings).
pub fn parca_body(p: &Profile) -> Vec<u8> {
    let labels: Vec<serde_json::Value> = p
        .labels
        .iter()
        .map(|(name, value)| serde_json::json!({"name": name, "value": value}))
        .collect();
    let body = serde_json::json!({
        "series": [{
            "labels": {"labels": labels},
            "samples": [{
                "raw_profile": base64::engine::general_purpose::STANDARD.encode(&p.pprof)
            }]
        }],
        "normalized": false
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// A store's queue: profiles in the order written, bounded by
/// [`QUEUE_PROFILES`] and [`QUEUE_BYTES`]; a new profile that does not fit
/// pushes the oldest out (the newest heap says most). Each entry has a
/// sequence number, so that the one being sent is removed only if it is
/// still at the front once sent.
#[derive(Debug)]
pub struct Queue {
    items: VecDeque<(u64, Arc<Profile>)>,
    bytes: usize,
    next_seq: u64,
    max_items: usize,
    max_bytes: usize,
}

impl Queue {
    pub fn new(max_items: usize, max_bytes: usize) -> Queue {
        Queue {
            items: VecDeque::new(),
            bytes: 0,
            next_seq: 0,
            max_items: max_items.max(1),
            max_bytes,
        }
    }

    /// Appends `p`; how many older profiles were dropped to make room.
    pub fn push(&mut self, p: Arc<Profile>) -> usize {
        let size = p.pprof.len();
        let mut dropped = 0;
        while !self.items.is_empty()
            && (self.items.len() >= self.max_items || self.bytes + size > self.max_bytes)
        {
            if let Some((_, old)) = self.items.pop_front() {
                self.bytes -= old.pprof.len();
                dropped += 1;
            }
        }
        self.bytes += size;
        self.items.push_back((self.next_seq, p));
        self.next_seq += 1;
        dropped
    }

    /// The oldest profile, to send next.
    pub fn front(&self) -> Option<(u64, Arc<Profile>)> {
        self.items.front().cloned()
    }

    /// Profile `seq` was sent: removed if it is still the oldest (else the
    /// queue dropped it meanwhile). Whether it was removed.
    pub fn sent(&mut self, seq: u64) -> bool {
        if self.items.front().is_some_and(|(s, _)| *s == seq) {
            if let Some((_, p)) = self.items.pop_front() {
                self.bytes -= p.pprof.len();
            }
            return true;
        }
        false
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The wait before retrying a failed push: [`BACKOFF_MIN`], doubling up
/// to [`BACKOFF_MAX`], back to the start after a success.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    /// A push failed: how long to wait before the next try.
    pub fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    pub fn succeeded(&mut self) {
        self.next = self.min;
    }
}

/// Which store a lane pushes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    Pyroscope,
    Parca,
}

impl Store {
    pub fn as_str(self) -> &'static str {
        match self {
            Store::Pyroscope => "Pyroscope",
            Store::Parca => "Parca",
        }
    }

    /// The endpoint under a server's base URL.
    pub fn path(self) -> &'static str {
        match self {
            Store::Pyroscope => "/push.v1.PusherService/Push",
            Store::Parca => "/profiles/writeraw",
        }
    }
}

/// One store: where, and its queue.
struct Lane {
    store: Store,
    /// The base URL as given (for lines: it holds no credentials).
    base: String,
    endpoint: Uri,
    queue: Mutex<Queue>,
    wake: Notify,
}

/// The pusher's thread and the lanes it serves.
pub struct Pusher {
    lanes: Vec<Arc<Lane>>,
    shared: Arc<Shared>,
    /// Snapshots to encode on the pusher's thread (closed at stop).
    snapshots: Option<mpsc::Sender<Labelled>>,
    thread: Option<JoinHandle<()>>,
}

/// A snapshot written, with the labels it is pushed with.
type Labelled = (Snapshot, Vec<(String, String)>);

/// Snapshots waiting to be encoded at most (the loop never waits for the
/// pusher: past it, the newest is dropped and counted).
const ENCODE_BACKLOG: usize = 16;

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

impl Pusher {
    /// Reads the basic-auth file and starts the pusher's thread; `None`
    /// when nothing is pushed. A bad file or URL is bad input (exit 2).
    pub fn start(cfg: &PushConfig, shared: Arc<Shared>) -> Result<Option<Pusher>> {
        if !cfg.enabled() {
            return Ok(None);
        }
        let headers = request_headers(cfg)?;
        let mut lanes = Vec::new();
        for (store, base) in [
            (Store::Pyroscope, &cfg.pyroscope),
            (Store::Parca, &cfg.parca),
        ] {
            let Some(base) = base else { continue };
            let endpoint: Uri = format!("{base}{}", store.path()).parse().map_err(|_| {
                Error::BadInput(format!(
                    "{} {}: not a URL once {} is added",
                    match store {
                        Store::Pyroscope => "--push",
                        Store::Parca => "--push-parca",
                    },
                    lines::escape(base),
                    store.path()
                ))
            })?;
            lanes.push(Arc::new(Lane {
                store,
                base: base.clone(),
                endpoint,
                queue: Mutex::new(Queue::new(QUEUE_PROFILES, QUEUE_BYTES)),
                wake: Notify::new(),
            }));
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| Error::Runtime(format!("cannot set up TLS for pushing: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        let client: Client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(https);
        let (stop, stopped) = watch::channel(false);
        let (snapshots, mut inbox) = mpsc::channel(ENCODE_BACKLOG);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::runtime("cannot start the pusher's runtime", e))?;
        let thread_lanes = lanes.clone();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("heapbpf-push".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let tasks: Vec<_> = thread_lanes
                        .iter()
                        .cloned()
                        .map(|lane| {
                            tokio::spawn(run_lane(
                                lane,
                                client.clone(),
                                headers.clone(),
                                thread_shared.clone(),
                                stopped.clone(),
                            ))
                        })
                        .collect();
                    // pprof encoding here, off the profiling loop.
                    while let Some((snapshot, labels)) = inbox.recv().await {
                        let p = Profile::from_snapshot(&snapshot, labels);
                        enqueue(&thread_lanes, &thread_shared, p);
                    }
                    // Closed: the agent stops; the lanes drain and end.
                    let _ = stop.send(true);
                    for t in tasks {
                        let _ = t.await;
                    }
                })
            })
            .map_err(|e| Error::runtime("cannot start the pusher's thread", e))?;
        for lane in &lanes {
            say(&lines::push_to(lane.store.as_str(), &lane.base));
        }
        Ok(Some(Pusher {
            lanes,
            shared,
            snapshots: Some(snapshots),
            thread: Some(thread),
        }))
    }

    /// Hands a snapshot written to the pusher's thread, which encodes it
    /// and queues it for every store; never waits.
    pub fn push_snapshot(&self, snapshot: Snapshot, labels: Vec<(String, String)>) {
        let Some(tx) = &self.snapshots else { return };
        if tx.try_send((snapshot, labels)).is_err() {
            self.shared.push_dropped.inc_by(self.lanes.len() as u64);
            tracing::warn!(
                "{ENCODE_BACKLOG} snapshots wait to be encoded for pushing: the newest dropped"
            );
        }
    }

    /// Queues `p` for every store; never waits.
    pub fn push(&self, p: Profile) {
        enqueue(&self.lanes, &self.shared, p);
    }

    /// Sends what is queued (in order, until a push fails, without
    /// backoff) for at most [`DRAIN_AT_EXIT`], then stops the thread.
    pub fn stop(mut self) {
        // Closing the channel: what it holds is encoded and queued, then
        // the lanes are told to drain and end.
        self.snapshots = None;
        let deadline = Instant::now() + DRAIN_AT_EXIT;
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
        for lane in &self.lanes {
            let left = lane.queue.lock().map(|q| q.len()).unwrap_or(0);
            if left > 0 {
                say(&lines::push_left_unsent(
                    lane.store.as_str(),
                    &lane.base,
                    left,
                ));
            }
        }
    }
}

/// Queues `p` for every store, counting what a full queue drops.
fn enqueue(lanes: &[Arc<Lane>], shared: &Shared, p: Profile) {
    let p = Arc::new(p);
    for lane in lanes {
        let dropped = match lane.queue.lock() {
            Ok(mut q) => q.push(p.clone()),
            Err(_) => continue,
        };
        shared.push_queue.inc();
        if dropped > 0 {
            shared.push_queue.dec_by(dropped as i64);
            shared.push_dropped.inc_by(dropped as u64);
            tracing::warn!(
                store = lane.store.as_str(),
                dropped,
                "push queue full ({QUEUE_PROFILES} profiles or {} MiB): the oldest dropped",
                QUEUE_BYTES >> 20
            );
        }
        lane.wake.notify_one();
    }
}

/// The headers of every push: `--push-header`s, basic auth, the tenant.
fn request_headers(cfg: &PushConfig) -> Result<HeaderMap> {
    let mut h = HeaderMap::new();
    h.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("heapbpf/", env!("CARGO_PKG_VERSION"))),
    );
    for (k, v) in &cfg.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) else {
            return Err(Error::BadInput(format!(
                "--push-header {}: not a valid HTTP header",
                lines::escape(k)
            )));
        };
        h.append(name, value);
    }
    if let Some(tenant) = &cfg.tenant {
        let value = HeaderValue::from_str(tenant).map_err(|_| {
            Error::BadInput(format!(
                "--push-tenant {}: not a valid header value",
                lines::escape(tenant)
            ))
        })?;
        h.insert(HeaderName::from_static("x-scope-orgid"), value);
    }
    if let Some(path) = &cfg.basic_auth_file {
        if h.contains_key(AUTHORIZATION) {
            return Err(Error::BadInput(
                "--push-basic-auth and a --push-header Authorization: give one of them".into(),
            ));
        }
        let line = super::read_first_line("--push-basic-auth", path)?;
        let text = std::str::from_utf8(&line).ok().filter(|t| t.contains(':'));
        let Some(text) = text else {
            return Err(Error::BadInput(format!(
                "--push-basic-auth {}: expected user:password on its first line",
                lines::escape(&path.display().to_string())
            )));
        };
        let encoded = base64::engine::general_purpose::STANDARD.encode(text);
        let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|_| {
            Error::BadInput(format!(
                "--push-basic-auth {}: not usable as a header",
                lines::escape(&path.display().to_string())
            ))
        })?;
        value.set_sensitive(true);
        h.insert(AUTHORIZATION, value);
    }
    Ok(h)
}

/// One store's loop: the oldest profile, sent until it goes (or the queue
/// drops it), backing off between failures; at stop, what is left is sent
/// until a push fails.
async fn run_lane(
    lane: Arc<Lane>,
    client: Client,
    headers: HeaderMap,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    // Since when it fails, and how many attempts failed since.
    let mut failing: Option<u64> = None;
    loop {
        let stopping = *stop.borrow();
        let next = lane.queue.lock().ok().and_then(|q| q.front());
        let Some((seq, profile)) = next else {
            if stopping {
                return;
            }
            tokio::select! {
                _ = lane.wake.notified() => {}
                _ = stop.changed() => {}
            }
            continue;
        };
        match send(&client, &lane, &headers, &profile).await {
            Ok(()) => {
                if lane.queue.lock().is_ok_and(|mut q| q.sent(seq)) {
                    shared.push_queue.dec();
                }
                backoff.succeeded();
                if let Some(failed) = failing.take() {
                    say(&lines::push_recovered(
                        lane.store.as_str(),
                        &lane.base,
                        failed,
                    ));
                }
                tracing::debug!(store = lane.store.as_str(), id = %profile.id, "profile pushed");
            }
            Err(why) => {
                shared.push_failures.inc();
                let failed = failing.get_or_insert(0);
                *failed += 1;
                if *failed == 1 {
                    say(&lines::push_failing(lane.store.as_str(), &lane.base, &why));
                } else {
                    tracing::debug!(store = lane.store.as_str(), "push failed again: {why}");
                }
                if stopping {
                    // At stop: one try each, in order; what fails stays
                    // queued and is counted as left unsent.
                    return;
                }
                let wait = backoff.failed();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// One request: `Ok` on a 2xx answer, else why, in one plain bounded line.
async fn send(
    client: &Client,
    lane: &Lane,
    headers: &HeaderMap,
    p: &Profile,
) -> std::result::Result<(), String> {
    let (body, content_type) = match lane.store {
        Store::Pyroscope => (pyroscope_body(p), "application/proto"),
        Store::Parca => (parca_body(p), "application/json"),
    };
    let mut req = hyper::Request::post(lane.endpoint.clone())
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    req.headers_mut().extend(headers.clone());
    if lane.store == Store::Pyroscope {
        req.headers_mut().insert(
            HeaderName::from_static("connect-protocol-version"),
            HeaderValue::from_static("1"),
        );
    }
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| innermost(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ERROR_BODY_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok::<_, String>((status, body))
    };
    let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            format!(
                "no answer within {}",
                humantime::format_duration(REQUEST_TIMEOUT)
            )
        })??;
    if status.is_success() {
        Ok(())
    } else {
        Err(describe_failure(status.as_u16(), &body))
    }
}

/// Why an answer is a failure: its status, and the Connect error's
/// `message` (or the body's start), cut and with nothing raw in it.
pub fn describe_failure(status: u16, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ConnectError {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let detail = match serde_json::from_slice::<ConnectError>(body) {
        Ok(e) if !e.code.is_empty() || !e.message.is_empty() => {
            format!("{}: {}", e.code, e.message)
        }
        _ => String::from_utf8_lossy(body).into_owned(),
    };
    let detail: String = detail.trim().chars().take(MAX_ERROR_CHARS).collect();
    let detail = lines::escape(&detail).into_owned();
    if detail.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status} ({detail})")
    }
}

/// The innermost cause of a client error ("connection refused"), with
/// the outer one when it says more.
pub(crate) fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(next) = last.source() {
        last = next;
    }
    let inner = last.to_string();
    let outer = e.to_string();
    let text = if std::ptr::eq(last as *const _ as *const u8, e as *const _ as *const u8) {
        outer
    } else {
        format!("{outer}: {inner}")
    };
    let text: String = text.chars().take(MAX_ERROR_CHARS).collect();
    lines::escape(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(bytes: usize, id: &str) -> Arc<Profile> {
        Arc::new(Profile {
            labels: vec![],
            pprof: vec![7; bytes],
            id: id.into(),
        })
    }

    #[test]
    fn a_push_request_decodes_back_with_its_fields() {
        let p = Profile {
            labels: vec![
                ("__name__".into(), "memory".into()),
                ("pid".into(), "42".into()),
            ],
            pprof: vec![0x1f, 0x8b, 1, 2, 3],
            id: "abc".into(),
        };
        let bytes = pyroscope_body(&p);
        let back = proto::PushRequest::decode(&bytes[..]).unwrap();
        assert_eq!(back.series.len(), 1);
        let s = &back.series[0];
        assert_eq!(s.labels.len(), 2);
        assert_eq!(s.labels[1].name, "pid");
        assert_eq!(s.labels[1].value, "42");
        assert_eq!(s.samples[0].raw_profile, p.pprof);
        assert_eq!(s.samples[0].id, "abc");
        // The wire itself, as push.proto numbers it: series = field 1
        // (length-delimited), labels = 1 and samples = 2 inside it.
        assert_eq!(bytes[0], 0x0a);
        let inner_start = 2;
        assert_eq!(bytes[inner_start], 0x0a, "labels are field 1");
    }

    #[test]
    fn a_parca_body_is_protobuf_json_with_base64() {
        let p = Profile {
            labels: vec![("pod".into(), "web-0".into())],
            pprof: vec![0xff, 0x00, 0x10],
            id: "x".into(),
        };
        let v: serde_json::Value = serde_json::from_slice(&parca_body(&p)).unwrap();
        assert_eq!(v["series"][0]["labels"]["labels"][0]["name"], "pod");
        assert_eq!(v["series"][0]["labels"]["labels"][0]["value"], "web-0");
        assert_eq!(v["series"][0]["samples"][0]["raw_profile"], "/wAQ");
        assert_eq!(v["normalized"], false);
    }

    #[test]
    fn labels_without_pod_metadata_name_the_process() {
        let l = labels(42, "redis-server", Some("0123456789ab"), None, "node-1");
        let want: Vec<(String, String)> = [
            ("__delta__", "false"),
            ("__name__", "memory"),
            ("container", "0123456789ab"),
            ("node", "node-1"),
            ("pid", "42"),
            ("service_name", "redis-server"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(l, want);
        // No container either: no container label.
        let l = labels(42, "x", None, None, "");
        assert!(!l.iter().any(|(k, _)| k == "container" || k == "node"));
    }

    #[test]
    fn labels_with_pod_metadata_use_it() {
        let meta = PodMeta {
            namespace: "shop".into(),
            pod: "cart-7d9f".into(),
            container: "cart".into(),
            service_name: "cart-svc".into(),
        };
        let l = labels(7, "java", Some("deadbeef"), Some(&meta), "n");
        let get = |k: &str| l.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("namespace"), Some("shop"));
        assert_eq!(get("pod"), Some("cart-7d9f"));
        assert_eq!(get("container"), Some("cart"));
        assert_eq!(get("service_name"), Some("cart-svc"));
        // An empty service name falls back to the comm.
        let meta = PodMeta {
            service_name: String::new(),
            ..meta
        };
        let l = labels(7, "java", None, Some(&meta), "n");
        assert!(l.contains(&("service_name".into(), "java".into())));
    }

    #[test]
    fn hostile_label_values_are_bounded_and_plain() {
        assert_eq!(label_value("a\nb\x1b[31m"), "a_b_[31m");
        let long = "é".repeat(2000);
        let v = label_value(&long);
        assert!(v.len() <= MAX_LABEL_VALUE_BYTES);
        assert_eq!(v.len(), MAX_LABEL_VALUE_BYTES, "cut on a char boundary");
        assert!(v.chars().all(|c| c == 'é'));
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            parse_url("--push", "http://127.0.0.1:4040/").unwrap(),
            "http://127.0.0.1:4040"
        );
        assert_eq!(
            parse_url("--push", "https://profiles.example/prefix").unwrap(),
            "https://profiles.example/prefix"
        );
        for bad in [
            "127.0.0.1:4040",
            "ftp://x",
            "http://user:pw@host",
            "http://host/?token=x",
            "http://host/#x",
            "not a url",
            "",
        ] {
            let e = parse_url("--push", bad).unwrap_err();
            assert!(e.starts_with("--push "), "{e}");
            assert!(!e.contains("pw@") || bad.contains("pw@"), "{e}");
        }
    }

    #[test]
    fn headers_are_checked() {
        assert_eq!(
            parse_header("X-Api-Key: abc def").unwrap(),
            ("X-Api-Key".into(), "abc def".into())
        );
        assert!(parse_header("Authorization:Bearer t").is_ok());
        for bad in [
            "NoColon",
            "Bad Name:v",
            ":v",
            "X:a\u{7}b",
            "Content-Type:x",
            "host:y",
        ] {
            assert!(parse_header(bad).is_err(), "{bad}");
        }
        assert!(parse_tenant("team-a").is_ok());
        assert!(parse_tenant(" ").is_err());
        assert!(parse_tenant("a\nb").is_err());
    }

    #[test]
    fn the_queue_drops_the_oldest_when_full() {
        let mut q = Queue::new(3, 1000);
        assert_eq!(q.push(profile(10, "a")), 0);
        assert_eq!(q.push(profile(10, "b")), 0);
        assert_eq!(q.push(profile(10, "c")), 0);
        assert_eq!(q.push(profile(10, "d")), 1);
        assert_eq!(q.front().unwrap().1.id, "b");
        assert_eq!(q.len(), 3);
        assert_eq!(q.bytes(), 30);
        // By bytes: a large one pushes out as many as it needs.
        assert_eq!(q.push(profile(990, "e")), 2);
        assert_eq!(q.len(), 2);
        assert_eq!(q.bytes(), 1000);
        assert_eq!(q.front().unwrap().1.id, "d");
        // One larger than the bound alone is still kept (nothing else is).
        assert_eq!(q.push(profile(5000, "f")), 2);
        assert_eq!(q.front().unwrap().1.id, "f");
    }

    #[test]
    fn a_sent_profile_goes_only_if_still_first() {
        let mut q = Queue::new(2, 1000);
        q.push(profile(1, "a"));
        let (seq, p) = q.front().unwrap();
        assert_eq!(p.id, "a");
        // While it was being sent, two more came and pushed it out.
        q.push(profile(1, "b"));
        q.push(profile(1, "c"));
        assert!(!q.sent(seq), "b must not go for a");
        assert_eq!(q.front().unwrap().1.id, "b");
        let (seq, _) = q.front().unwrap();
        assert!(q.sent(seq));
        assert_eq!(q.front().unwrap().1.id, "c");
        assert_eq!(q.bytes(), 1);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let waits: Vec<u64> = (0..7).map(|_| b.failed().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_secs(1));
    }

    #[test]
    fn failures_are_described_plainly() {
        let connect = br#"{"code":"invalid_argument","message":"bad\nlabel \u001b[31m"}"#;
        assert_eq!(
            describe_failure(400, connect),
            "HTTP 400 (invalid_argument: bad\\nlabel \\x1b[31m)"
        );
        assert_eq!(describe_failure(502, b""), "HTTP 502");
        let long = vec![b'x'; 10_000];
        assert!(describe_failure(500, &long).len() < 250);
    }

    /// A loopback server that answers each request with the next of
    /// `answers` (then 200), one request per connection; the bodies it got.
    fn canned_server(
        answers: Vec<(u16, &'static str)>,
    ) -> (std::net::SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let bodies = got.clone();
        std::thread::spawn(move || {
            let mut answers = answers.into_iter();
            for s in listener.incoming() {
                let Ok(mut s) = s else { break };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let end = loop {
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p;
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut body = buf[end + 4..].to_vec();
                while body.len() < len {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => body.extend_from_slice(&chunk[..n]),
                    }
                }
                bodies.lock().unwrap().push(body);
                let (status, text) = answers.next().unwrap_or((200, ""));
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        (addr, got)
    }

    fn wait_until(what: &str, pred: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pred() {
            assert!(Instant::now() < deadline, "waited for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_failed_push_is_retried_before_the_next_and_counted() {
        let (addr, got) = canned_server(vec![(
            503,
            r#"{"code":"unavailable","message":"ingester \u001b down"}"#,
        )]);
        let cfg = PushConfig {
            pyroscope: Some(format!("http://{addr}")),
            ..PushConfig::default()
        };
        let shared = Arc::new(Shared::default());
        let pusher = Pusher::start(&cfg, shared.clone()).unwrap().unwrap();
        let profile = |id: &str| Profile {
            labels: vec![("pid".into(), "1".into())],
            pprof: vec![1, 2, 3],
            id: id.into(),
        };
        pusher.push(profile("first"));
        pusher.push(profile("second"));
        wait_until("three requests", || got.lock().unwrap().len() >= 3);
        wait_until("an empty queue", || shared.push_queue.get() == 0);
        let ids: Vec<String> = got
            .lock()
            .unwrap()
            .iter()
            .map(|b| {
                proto::PushRequest::decode(&b[..]).unwrap().series[0].samples[0]
                    .id
                    .clone()
            })
            .collect();
        assert_eq!(ids, ["first", "first", "second"]);
        assert_eq!(shared.push_failures.get(), 1);
        assert_eq!(shared.push_dropped.get(), 0);
        pusher.stop();
    }

    #[test]
    fn an_https_url_is_spoken_tls_to() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let first = Arc::new(Mutex::new(Vec::new()));
        let seen = first.clone();
        std::thread::spawn(move || {
            if let Some(Ok(mut s)) = listener.incoming().next() {
                let mut b = [0u8; 3];
                if s.read_exact(&mut b).is_ok() {
                    seen.lock().unwrap().extend_from_slice(&b);
                }
            }
        });
        let cfg = PushConfig {
            parca: Some(format!("https://{addr}")),
            ..PushConfig::default()
        };
        let shared = Arc::new(Shared::default());
        let pusher = Pusher::start(&cfg, shared.clone()).unwrap().unwrap();
        pusher.push(Profile {
            labels: vec![],
            pprof: vec![1],
            id: "x".into(),
        });
        wait_until("a failed TLS handshake", || shared.push_failures.get() >= 1);
        // A TLS handshake record (0x16), version 3.x: a ClientHello.
        assert_eq!(&first.lock().unwrap()[..2], &[0x16, 0x03]);
        assert_eq!(shared.push_queue.get(), 1, "kept for the next try");
        pusher.stop();
    }

    #[test]
    fn profile_ids_are_uuids() {
        let a = random_uuid();
        let b = random_uuid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }
}
