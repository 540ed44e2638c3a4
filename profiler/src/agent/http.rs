//! The agent's HTTP API (the contract's *Agent* section): `/healthz`,
//! `/targets`, `/debug/pprof/heap`, `/snapshots`, `/metrics`. Runs on a
//! thread and runtime of its own, so that a slow or hostile client never
//! stalls profiling; reads [`Shared`] and the data directory, and asks the
//! engine through [`Requests`] only for what needs it.
//!
//! Every client is a stranger: requests are bounded in size (headers
//! [`MAX_HEADER_BYTES`], bodies [`MAX_BODY_BYTES`]) and time (headers
//! [`HEADER_READ_TIMEOUT`], the whole request [`REQUEST_TIMEOUT`], a
//! connection [`CONNECTION_LIFETIME`]), connections are capped
//! ([`MAX_CONNECTIONS`]), and every error is one plain line. Label values
//! and JSON strings come from the targets (a process names itself), so
//! both are escaped by their encoders, never pasted.
use std::{
    collections::HashSet,
    io::{self, Read as _},
    net::TcpListener,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    thread::JoinHandle,
    time::Duration,
};

use axum::{
    body::{Body, Bytes, HttpBody},
    extract::{rejection::QueryRejection, Path, Query, Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tower::ServiceExt as _;

use super::view::{self, ApiError, Requests, Shared, TargetView};
use crate::{
    error::{Error, Result},
    output::{dir::OutputDir, writer::SnapshotName},
};

/// Request line and headers together, at most (larger: 431).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Header fields, at most (more: 431).
pub const MAX_HEADERS: usize = 64;
/// A request body, at most (larger: 413); no endpoint reads one.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The request line and headers must arrive within this (also the most a
/// kept-alive connection may sit idle); else the connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request, body included, is answered within this (else 503).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `/debug/pprof/heap` and `POST /snapshots` wait for the engine (else 504).
pub const ENGINE_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection is closed (gracefully) after this, however busy.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(600);
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// What [`Server::stop`] gives requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Bytes read from a snapshot file at a time.
const CHUNK_BYTES: usize = 64 * 1024;

/// What the server needs besides the shared view.
pub struct ServerConfig {
    /// The bearer token every endpoint but `/healthz` requires.
    pub token: Option<Vec<u8>>,
    /// The data directory, for `/snapshots` (a handle of its own).
    pub data_dir: OutputDir,
}

/// The running server; [`Server::stop`] ends it.
pub struct Server {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Starts serving on `listener` (bound by the caller, so a bad `--listen`
/// fails before anything is attached).
pub fn start(
    listener: TcpListener,
    cfg: ServerConfig,
    shared: Arc<Shared>,
    requests: Requests,
) -> Result<Server> {
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::runtime("cannot set up the HTTP listener", e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .thread_name("heapbpf-http")
        .enable_all()
        .build()
        .map_err(|e| Error::runtime("cannot start the HTTP server's runtime", e))?;
    let app = router(App {
        token: cfg.token.map(Arc::from),
        data_dir: Arc::new(Mutex::new(cfg.data_dir)),
        shared,
        requests,
    });
    let (stop, stopped) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("heapbpf-http".into())
        .spawn(move || {
            runtime.block_on(serve(listener, app, stopped));
            runtime.shutdown_timeout(Duration::from_secs(1));
        })
        .map_err(|e| Error::runtime("cannot start the HTTP server's thread", e))?;
    Ok(Server {
        stop: Some(stop),
        thread: Some(thread),
    })
}

impl Server {
    /// Stops accepting, lets requests in flight finish (briefly), joins.
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

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Accepts connections until told to stop, at most [`MAX_CONNECTIONS`]
/// at once; then lets them finish for [`SHUTDOWN_GRACE`].
async fn serve(listener: TcpListener, app: Router, mut stop: oneshot::Receiver<()>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "the HTTP API cannot listen");
            return;
        }
    };
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (shutdown, shutting_down) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = &mut stop => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: wait, do not spin.
                    tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        connections.spawn(connection(
            stream,
            app.clone(),
            shutting_down.clone(),
            permit,
        ));
    }
    drop(listener);
    let _ = shutdown.send(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.abort_all();
}

/// One connection: HTTP/1.1 with bounded headers and header-read time, for
/// at most [`CONNECTION_LIFETIME`]; closed gracefully on shutdown.
async fn connection(
    stream: tokio::net::TcpStream,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        app.clone().oneshot(req.map(Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let deadline = tokio::time::sleep(CONNECTION_LIFETIME);
    tokio::pin!(deadline);
    let mut draining = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = shutdown.changed(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
                deadline.as_mut().reset(tokio::time::Instant::now() + SHUTDOWN_GRACE);
            }
            _ = &mut deadline => {
                if draining {
                    break;
                }
                conn.as_mut().graceful_shutdown();
                draining = true;
                deadline.as_mut().reset(tokio::time::Instant::now() + REQUEST_TIMEOUT);
            }
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
struct App {
    token: Option<Arc<[u8]>>,
    /// Behind a lock: the handle is not `Sync` (it numbers temporary files).
    data_dir: Arc<Mutex<OutputDir>>,
    shared: Arc<Shared>,
    requests: Requests,
}

fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/targets", get(targets))
        .route("/debug/pprof/heap", get(heap))
        .route("/snapshots", get(list_snapshots).post(take_snapshot))
        .route("/snapshots/{name}", get(snapshot_file))
        .route("/metrics", get(metrics))
        .fallback(|| async { plain(StatusCode::NOT_FOUND, "no such endpoint (see /targets, /metrics, /debug/pprof/heap, /snapshots, /healthz)") })
        .method_not_allowed_fallback(|| async {
            plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint")
        })
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Before any handler: the token, the body's size, the request's time.
async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        if req.uri().path() != "/healthz" && !authorized(token, req.headers()) {
            let mut r = plain(
                StatusCode::UNAUTHORIZED,
                "this endpoint needs Authorization: Bearer <token> (the agent's --token-file)",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    let too_large = || {
        let mut r = plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body larger than {MAX_BODY_BYTES} bytes"),
        );
        // What is left of the body is not read: the connection goes.
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large();
    }
    let answer = async {
        // No endpoint reads a body: read it (bounded) so the connection
        // can be kept alive, and drop it.
        let (parts, body) = req.into_parts();
        if axum::body::to_bytes(body, MAX_BODY_BYTES).await.is_err() {
            return too_large();
        }
        next.run(Request::from_parts(parts, Body::empty())).await
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
        Ok(r) => r,
        Err(_) => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "the request took too long and was dropped",
        ),
    }
}

/// `Authorization: Bearer <token>`, compared in constant time.
fn authorized(token: &[u8], headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some(given) = value
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
        .map(|_| value[7..].trim_ascii())
    else {
        return false;
    };
    bool::from(given.ct_eq(token))
}

/// A one-line plain-text answer (control characters of the message, which
/// may quote a target, become spaces).
fn plain(status: StatusCode, message: &str) -> Response {
    let line: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        format!("{line}\n"),
    )
        .into_response()
}

/// A failed request: its status and line.
struct Failure(StatusCode, String);

impl Failure {
    fn bad(message: impl Into<String>) -> Self {
        Failure(StatusCode::BAD_REQUEST, message.into())
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.message,
        )
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        plain(self.0, &self.1)
    }
}

type Answer = std::result::Result<Response, Failure>;

fn json(status: StatusCode, value: &impl Serialize) -> Answer {
    let body = serde_json::to_vec(value).map_err(|e| {
        Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode: {e}"),
        )
    })?;
    Ok((
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response())
}

/// The query of a request: each parameter at most once, only `allowed` ones.
struct Params(Vec<(String, String)>);

impl Params {
    fn read(
        query: std::result::Result<Query<Vec<(String, String)>>, QueryRejection>,
        allowed: &[&str],
    ) -> std::result::Result<Params, Failure> {
        let Query(pairs) = query.map_err(|_| Failure::bad("unreadable query string"))?;
        let mut seen = HashSet::new();
        for (k, _) in &pairs {
            if !allowed.contains(&k.as_str()) {
                return Err(Failure::bad(format!(
                    "unknown parameter {:?} (this endpoint takes {})",
                    truncate(k),
                    allowed.join(", ")
                )));
            }
            if !seen.insert(k.as_str()) {
                return Err(Failure::bad(format!("parameter {k} given twice")));
            }
        }
        Ok(Params(pairs))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `pid=N`, required.
    fn pid(&self) -> std::result::Result<u32, Failure> {
        match self.get("pid") {
            Some(v) => parse_pid(v),
            None => Err(Failure::bad("missing pid=N (see /targets)")),
        }
    }
}

fn parse_pid(v: &str) -> std::result::Result<u32, Failure> {
    if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Failure::bad(format!(
            "pid={:?}: expected a process id (see /targets)",
            truncate(v)
        )));
    }
    v.parse::<u32>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| Failure::bad(format!("pid={v}: expected a process id (see /targets)")))
}

/// Hostile text quoted in an answer, shortened.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// How long the loop may go without a turn before `/healthz` says it is
/// stuck (a snapshot of a million blocks takes about a second).
const STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

async fn healthz(State(app): State<App>) -> Response {
    let since = app.shared.since_beat();
    if since > STUCK_AFTER {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "the profiling loop has not turned for {} s",
                since.as_secs()
            ),
        );
    }
    plain(StatusCode::OK, "ok")
}

async fn targets(State(app): State<App>) -> Answer {
    json(StatusCode::OK, &app.shared.targets())
}

/// The pid `?pid=N` or `?namespace=&pod=&container=` names.
fn resolve_target(params: &Params, targets: &[TargetView]) -> std::result::Result<u32, Failure> {
    let by_name: Vec<(&str, &str)> = ["namespace", "pod", "container"]
        .into_iter()
        .filter_map(|k| params.get(k).map(|v| (k, v)))
        .collect();
    if params.get("pid").is_some() {
        if !by_name.is_empty() {
            return Err(Failure::bad(
                "give either pid=N or namespace=, pod=, container=, not both",
            ));
        }
        return params.pid();
    }
    if by_name.is_empty() {
        return Err(Failure::bad(
            "missing pid=N (or namespace=, pod=, container=; see /targets)",
        ));
    }
    if let Some((k, _)) = by_name.iter().find(|(_, v)| v.is_empty()) {
        return Err(Failure::bad(format!("{k}= is empty")));
    }
    let matches = |t: &TargetView| {
        by_name.iter().all(|&(k, v)| match k {
            "namespace" => t.namespace.as_deref() == Some(v),
            "pod" => t.pod.as_deref() == Some(v),
            // The container's name in its pod, or its id (or a prefix).
            _ => {
                t.container_name.as_deref() == Some(v)
                    || t.container.as_deref().is_some_and(|c| c.starts_with(v))
            }
        })
    };
    let found: Vec<u32> = targets
        .iter()
        .filter(|t| matches(t))
        .map(|t| t.pid)
        .collect();
    match found.as_slice() {
        [pid] => Ok(*pid),
        [] => Err(Failure(
            StatusCode::NOT_FOUND,
            "no target matches (see /targets)".into(),
        )),
        many => Err(Failure::bad(format!(
            "{} targets match (pids {}); add pid=N or name the container",
            many.len(),
            many.iter()
                .take(10)
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Sends a request to the engine and waits for its answer.
async fn ask<T>(
    app: &App,
    request: impl FnOnce(oneshot::Sender<std::result::Result<T, ApiError>>) -> view::Request,
) -> std::result::Result<T, Failure> {
    let (reply, answer) = oneshot::channel();
    app.requests.try_send(request(reply)).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is busy with other requests; try again shortly".into(),
        ),
        mpsc::error::TrySendError::Closed(_) => Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is stopping".into(),
        ),
    })?;
    match tokio::time::timeout(ENGINE_TIMEOUT, answer).await {
        Err(_) => Err(Failure(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the agent did not answer within {}s",
                ENGINE_TIMEOUT.as_secs()
            ),
        )),
        Ok(Err(_)) => Err(Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is stopping".into(),
        )),
        Ok(Ok(r)) => r.map_err(Failure::from),
    }
}

/// `GET /debug/pprof/heap`: the live heap now, as Go's net/http/pprof
/// serves it. `seconds=` is accepted and ignored (the heap is a gauge).
async fn heap(
    State(app): State<App>,
    query: std::result::Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Answer {
    let params = Params::read(query, &["pid", "namespace", "pod", "container", "seconds"])?;
    if let Some(s) = params.get("seconds") {
        if s.parse::<u64>().is_err() {
            return Err(Failure::bad(format!(
                "seconds={:?}: expected a whole number of seconds (ignored: the heap is a gauge)",
                truncate(s)
            )));
        }
    }
    let pid = resolve_target(&params, &app.shared.targets())?;
    let profile = ask(&app, |reply| view::Request::Heap { pid, reply }).await?;
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"heap.pb.gz\"",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        profile,
    )
        .into_response())
}

/// One entry of `GET /snapshots`.
#[derive(Debug, Serialize)]
struct SnapshotEntry {
    name: String,
    size: u64,
    taken_at: String,
    format: &'static str,
}

/// Runs blocking file work off the runtime's workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::result::Result<T, Failure> + Send + 'static,
) -> std::result::Result<T, Failure> {
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|_| {
        Err(Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request failed".into(),
        ))
    })
}

async fn list_snapshots(
    State(app): State<App>,
    query: std::result::Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Answer {
    let pid = Params::read(query, &["pid"])?.pid()?;
    let dir = app.data_dir.clone();
    let entries = blocking(move || {
        let dir = dir.lock().map_err(|_| {
            Failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the data directory is unavailable".into(),
            )
        })?;
        let files = dir
            .regular_files(|n| SnapshotName::parse(n).is_some_and(|s| s.pid == pid))
            .map_err(|e| {
                Failure(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "cannot list the data directory: {}",
                        crate::output::dir::plain(&e)
                    ),
                )
            })?;
        Ok(snapshot_entries(files))
    })
    .await?;
    json(StatusCode::OK, &entries)
}

/// The entries of `files` (all snapshot names), newest first.
fn snapshot_entries(files: Vec<crate::output::dir::DirFile>) -> Vec<SnapshotEntry> {
    let mut named: Vec<(SnapshotName, crate::output::dir::DirFile)> = files
        .into_iter()
        .filter_map(|f| Some((SnapshotName::parse(&f.name)?, f)))
        .collect();
    named.sort_by(|(a, fa), (b, fb)| {
        (&b.stamp, b.seq)
            .cmp(&(&a.stamp, a.seq))
            .then_with(|| fa.name.cmp(&fb.name))
    });
    named
        .into_iter()
        .map(|(n, f)| SnapshotEntry {
            taken_at: n.taken_at(),
            format: n.format(),
            name: f.name,
            size: f.size_bytes,
        })
        .collect()
}

/// `GET /snapshots/NAME`: one kept file, streamed.
async fn snapshot_file(
    State(app): State<App>,
    name: std::result::Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Answer {
    let Ok(Path(name)) = name else {
        return Err(Failure::bad("unreadable file name"));
    };
    let Some(parsed) = SnapshotName::parse(&name) else {
        return Err(Failure::bad(format!(
            "{:?} is not a snapshot name (heapbpf-PID-yyyymmddThhmmssZ-SEQ.json|pb.gz|collapsed|svg; see /snapshots?pid=N)",
            truncate(&name)
        )));
    };
    let dir = app.data_dir.clone();
    let opened = name.clone();
    let (file, size) = blocking(move || {
        let dir = dir.lock().map_err(|_| {
            Failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the data directory is unavailable".into(),
            )
        })?;
        let file = dir.open_regular(&opened).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ELOOP)
                || e.kind() == io::ErrorKind::InvalidInput
            {
                Failure(StatusCode::NOT_FOUND, format!("no snapshot {opened}"))
            } else {
                Failure(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot read {opened}: {}", crate::output::dir::plain(&e)),
                )
            }
        })?;
        let size = file.metadata().map(|m| m.len()).map_err(|e| {
            Failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read {opened}: {}", crate::output::dir::plain(&e)),
            )
        })?;
        Ok((file, size))
    })
    .await?;
    let content_type = match parsed.ext {
        "json" => "application/json",
        "collapsed" => "text/plain; charset=utf-8",
        "svg" => "image/svg+xml",
        _ => "application/octet-stream",
    };
    let mut r = Response::new(Body::new(FileBody::stream(file, size)));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    // The name is checked: only [A-Za-z0-9.-].
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // A flamegraph opened from here runs no script against this origin.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    Ok(r)
}

/// A file's first `size` bytes as a response body, read in chunks off the
/// runtime; ends (with an error, so the client sees it) if the file is
/// shorter than it was, and stops reading when the client goes.
struct FileBody {
    chunks: mpsc::Receiver<io::Result<Bytes>>,
    size: u64,
}

impl FileBody {
    fn stream(file: std::fs::File, size: u64) -> FileBody {
        let (tx, chunks) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut file = Some(file);
            let mut left = size;
            while left > 0 {
                let Some(f) = file.take() else { break };
                let want = left.min(CHUNK_BYTES as u64) as usize;
                let read = tokio::task::spawn_blocking(move || {
                    let mut f = f;
                    let mut buf = vec![0u8; want];
                    let r = f.read(&mut buf).map(|n| {
                        buf.truncate(n);
                        buf
                    });
                    (f, r)
                })
                .await;
                let chunk = match read {
                    Ok((f, Ok(buf))) if !buf.is_empty() => {
                        file = Some(f);
                        left -= buf.len() as u64;
                        Ok(Bytes::from(buf))
                    }
                    Ok((_, Ok(_))) => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file shrank while being sent",
                    )),
                    Ok((_, Err(e))) => Err(e),
                    Err(_) => Err(io::Error::other("the read failed")),
                };
                let failed = chunk.is_err();
                if tx.send(chunk).await.is_err() || failed {
                    break;
                }
            }
        });
        FileBody { chunks, size }
    }
}

impl HttpBody for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<http_body::Frame<Bytes>, io::Error>>> {
        self.chunks
            .poll_recv(cx)
            .map(|c| c.map(|r| r.map(http_body::Frame::data)))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.size)
    }
}

/// `POST /snapshots?pid=N`: a snapshot now (trigger `request`).
async fn take_snapshot(
    State(app): State<App>,
    query: std::result::Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Answer {
    let pid = Params::read(query, &["pid"])?.pid()?;
    let files = ask(&app, |reply| view::Request::Snapshot { pid, reply }).await?;
    #[derive(Serialize)]
    struct Taken {
        files: Vec<String>,
    }
    json(StatusCode::CREATED, &Taken { files })
}

/// `GET /metrics`.
async fn metrics(State(app): State<App>) -> Answer {
    let text = super::metrics::encode(&app.shared).map_err(|_| {
        Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics".into(),
        )
    })?;
    Ok((
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::view::{sample_target as target, State as TargetState};

    #[test]
    fn tokens_compare_whole() {
        let mut h = axum::http::HeaderMap::new();
        assert!(!authorized(b"secret", &h));
        for (value, ok) in [
            ("Bearer secret", true),
            ("bearer secret", true),
            ("Bearer  secret ", true),
            ("Bearer secre", false),
            ("Bearer secrets", false),
            ("Bearer ", false),
            ("Basic secret", false),
            ("secret", false),
            ("Bearersecret", false),
        ] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            assert_eq!(authorized(b"secret", &h), ok, "{value}");
        }
    }

    #[test]
    fn targets_resolve_by_pid_or_container() {
        let mut a = target(7, "a", TargetState::Attached);
        let mut b = target(8, "b", TargetState::Attached);
        b.container = Some("fedcba".into());
        a.namespace = Some("prod".into());
        a.pod = Some("web-1".into());
        a.container_name = Some("web".into());
        let t = [a, b];
        let p = |q: &[(&str, &str)]| {
            Params(
                q.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let ok = |q: &[(&str, &str)]| resolve_target(&p(q), &t).ok();
        let status = |q: &[(&str, &str)]| resolve_target(&p(q), &t).err().map(|f| f.0);
        assert_eq!(ok(&[("pid", "8")]), Some(8));
        assert_eq!(ok(&[("container", "0123")]), Some(7));
        assert_eq!(ok(&[("container", "fed")]), Some(8));
        assert_eq!(ok(&[("namespace", "prod"), ("pod", "web-1")]), Some(7));
        assert_eq!(
            ok(&[
                ("namespace", "prod"),
                ("pod", "web-1"),
                ("container", "web")
            ]),
            Some(7)
        );
        assert_eq!(
            status(&[("namespace", "prod"), ("pod", "web-1"), ("container", "db")]),
            Some(StatusCode::NOT_FOUND)
        );
        assert_eq!(status(&[("namespace", "dev")]), Some(StatusCode::NOT_FOUND));
        for bad in [
            &[][..],
            &[("pid", "x")][..],
            &[("pid", "0")][..],
            &[("pid", "-1")][..],
            &[("pid", "+1")][..],
            &[("pid", "99999999999")][..],
            &[("pid", "7"), ("container", "0123")][..],
            &[("container", "")][..],
        ] {
            assert_eq!(status(bad), Some(StatusCode::BAD_REQUEST), "{bad:?}");
        }
    }

    #[test]
    fn snapshots_list_newest_first() {
        let path = std::env::temp_dir().join(format!("heapbpf-http-list-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        let names = [
            "heapbpf-7-20261124T190000Z-0001.json",
            "heapbpf-7-20261124T190000Z-0001.pb.gz",
            "heapbpf-7-20261124T190500Z-0002.json",
            "heapbpf-7-20261124T190500Z-0003.svg",
            "heapbpf-8-20261124T191000Z-0001.json",
            "heapbpf-7-20261124T190000Z-0001.json.bak",
        ];
        for (i, n) in names.iter().enumerate() {
            std::fs::write(path.join(n), vec![b'x'; i + 1]).unwrap();
        }
        let dir = OutputDir::open(&path).unwrap();
        let files = dir
            .regular_files(|n| SnapshotName::parse(n).is_some_and(|s| s.pid == 7))
            .unwrap();
        let got: Vec<(String, u64, String, &str)> = snapshot_entries(files)
            .into_iter()
            .map(|e| (e.name, e.size, e.taken_at, e.format))
            .collect();
        let want = [
            (names[3], 4, "2026-11-24T19:05:00Z", "svg"),
            (names[2], 3, "2026-11-24T19:05:00Z", "json"),
            (names[0], 1, "2026-11-24T19:00:00Z", "json"),
            (names[1], 2, "2026-11-24T19:00:00Z", "pprof"),
        ]
        .map(|(n, s, t, f)| (n.to_string(), s, t.to_string(), f));
        assert_eq!(got, want);
        std::fs::remove_dir_all(&path).unwrap();
    }
}
