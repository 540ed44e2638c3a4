//! What the agent's loop publishes and what its HTTP API asks of it: the
//! one meeting point of the engine side (the loop, on the main thread) and
//! the server (its own thread and runtime). The server reads [`Shared`]
//! without ever waiting on the engine; what needs the engine (a heap
//! profile now, a snapshot now) goes as a [`Request`] with a reply channel.
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge, histogram::Histogram};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// A target's place in the agent, as `/targets` and `heapbpf_targets{state}` say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Probes attached all the time.
    Attached,
    /// Over its CPU budget: profiled in windows.
    Windowed,
    /// Selected, but `--max-targets` are profiled already.
    Waiting,
    /// Could not be attached (`reason` says why).
    Failed,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Attached,
        State::Windowed,
        State::Waiting,
        State::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Attached => "attached",
            State::Windowed => "windowed",
            State::Waiting => "waiting",
            State::Failed => "failed",
        }
    }
}

/// What Kubernetes says of a target's container (with `--kubernetes`): the
/// labels every target, metric, snapshot and pushed profile carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PodMeta {
    pub namespace: String,
    pub pod: String,
    /// The container's name in the pod spec.
    pub container: String,
    /// `heapbpf.io/service-name`, else the pod's `app.kubernetes.io/name`
    /// or `app` label, else the container name.
    pub service_name: String,
}

/// One entry of `/targets` (field names are the contract's).
#[derive(Clone, Debug, Serialize)]
pub struct TargetView {
    pub pid: u32,
    pub comm: String,
    pub exe: String,
    /// The container id from the process's cgroup path, when it has one.
    pub container: Option<String>,
    /// The container's name in its pod (with `--kubernetes`).
    pub container_name: Option<String>,
    /// Kubernetes metadata (filled with `--kubernetes`; `null` until then).
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub service_name: Option<String>,
    pub state: State,
    /// Why it is `failed` or `waiting`, or what windows it is profiled in.
    pub reason: Option<String>,
    pub attached_at: Option<String>,
    pub live_bytes: u64,
    pub live_allocations: u64,
    pub allocated_bytes: u64,
    pub dropped_events: u64,
    /// CPU time the probes added to the target, as a share of its own.
    pub overhead: f64,
    /// Share of the time the allocation probes were attached (1.0 unless windowed).
    pub coverage: f64,
    /// File name (in `--data-dir`) of the JSON (or first) file of its last snapshot.
    pub last_snapshot: Option<String>,
}

/// Published by the loop, read by the server.
pub struct Shared {
    /// Every target the agent knows, profiled, waiting or failed.
    pub targets: Mutex<Vec<TargetView>>,
    /// How long each snapshot took (kernel read, symbolization, files).
    pub snapshot_seconds: Histogram,
    /// Push attempts to a profile store that failed.
    pub push_failures: Counter,
    /// Profiles waiting to be pushed (all stores together).
    pub push_queue: Gauge,
    /// Profiles dropped from a full push queue.
    pub push_dropped: Counter,
    pub started: Instant,
    /// Milliseconds after `started` of the loop's last turn.
    heartbeat_ms: AtomicU64,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            targets: Mutex::new(Vec::new()),
            snapshot_seconds: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            push_failures: Counter::default(),
            push_queue: Gauge::default(),
            push_dropped: Counter::default(),
            started: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
        }
    }
}

impl Shared {
    /// A copy of the targets (the lock is held only for the copy).
    pub fn targets(&self) -> Vec<TargetView> {
        self.targets.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// The loop says it is alive (each turn).
    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.heartbeat_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the loop's last turn.
    pub fn since_beat(&self) -> Duration {
        let ms = self.heartbeat_ms.load(Ordering::Relaxed);
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(ms))
    }

    pub fn publish(&self, targets: Vec<TargetView>) {
        if let Ok(mut t) = self.targets.lock() {
            *t = targets;
        }
    }
}

/// Why a request failed: an HTTP status and one plain line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

/// What only the engine can answer.
#[derive(Debug)]
pub enum Request {
    /// `GET /debug/pprof/heap?pid=N`: the live heap now, as gzipped pprof.
    Heap {
        pid: u32,
        reply: oneshot::Sender<Result<Vec<u8>, ApiError>>,
    },
    /// `POST /snapshots?pid=N`: a snapshot now (trigger `request`); the
    /// names of its files in the data directory.
    Snapshot {
        pid: u32,
        reply: oneshot::Sender<Result<Vec<String>, ApiError>>,
    },
}

/// The sending half the server holds.
pub type Requests = mpsc::Sender<Request>;

/// A profiled target with round figures, for the tests of what reads the view.
#[cfg(test)]
pub(crate) fn sample_target(pid: u32, comm: &str, state: State) -> TargetView {
    TargetView {
        pid,
        comm: comm.into(),
        exe: "/bin/x".into(),
        container: Some("0123456789abcdef".into()),
        container_name: None,
        pod: None,
        namespace: None,
        service_name: None,
        state,
        reason: None,
        attached_at: None,
        live_bytes: 4096,
        live_allocations: 2,
        allocated_bytes: 10_000,
        dropped_events: 3,
        overhead: 0.013,
        coverage: 1.0,
        last_snapshot: None,
    }
}
