//! `heapbpf agent`: the node agent, one more front end over the
//! [`Engine`]. It finds the processes its rules select ([`select`]), keeps
//! at most `--max-targets` of them profiled (the rest wait), writes a
//! snapshot of each every `--interval` into the data directory (bounded by
//! `--max-snapshots` and `--max-disk`), keeps each within its CPU budget,
//! and serves all of it over HTTP ([`http`]) from a thread of its own.
//!
//! The loop runs on the main thread and owns the engine; the server never
//! touches it but through [`view::Request`]s, answered between ticks, and
//! reads what the loop publishes ([`view::Shared`]).
pub mod http;
pub mod kube;
pub mod metrics;
pub mod push;
pub mod select;
pub mod view;

use std::{
    collections::{HashMap, VecDeque},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use self::{
    select::{Process, Rule},
    view::{ApiError, PodMeta, Request, Shared, State, TargetView},
};
use crate::{
    engine::{Config, Engine},
    error::{Error, Result},
    lines::{self, say},
    model::Trigger,
    output::dir::OutputDir,
    procfs,
};

/// Everything the agent is told, as plain data.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Per-target profiling, as `attach` would; `output_dir` is the data
    /// directory, `interval` the snapshot period.
    pub engine: Config,
    pub rules: Vec<Rule>,
    pub listen: SocketAddr,
    /// `--token-file`, read at start.
    pub token_file: Option<PathBuf>,
    /// `--max-overhead` as a fraction (0.02 for 2%).
    pub max_overhead: f64,
    pub max_targets: usize,
    pub max_disk: Option<u64>,
    pub discover_every: Duration,
    /// This node's name (`NODE_NAME`, else the host name): the `node` label.
    pub node: String,
    /// `--push`, `--push-parca` and their options.
    pub push: push::PushConfig,
    /// `--kubernetes`: pod metadata from the API server ([`kube`]).
    pub kubernetes: bool,
}

/// How often targets are checked for exits, execs and OOM kills.
const POLL: Duration = Duration::from_millis(100);
/// How often module tables pick up newly loaded libraries.
const MAPS_REFRESH: Duration = Duration::from_secs(2);
/// Requests waiting for the engine at most (more get 503 from the server).
const REQUEST_QUEUE: usize = 16;
/// How long the engine stays loaded without a target (a target that
/// restarts is attached again without reloading).
const UNLOAD_AFTER: Duration = Duration::from_secs(30);
/// The most bytes a token file may hold.
const MAX_TOKEN_BYTES: u64 = 4096;

/// `heapbpf agent`.
pub fn run_agent(mut cfg: AgentConfig) -> Result<()> {
    if cfg.rules.iter().any(|r| matches!(r, Rule::K8s)) && !cfg.kubernetes {
        return Err(Error::BadInput(
            "--select k8s needs --kubernetes (the pods' annotations come from the API server)"
                .into(),
        ));
    }
    let token = match &cfg.token_file {
        Some(path) => Some(read_token(path)?),
        None => None,
    };
    if token.is_none() && !cfg.listen.ip().is_loopback() {
        return Err(Error::BadInput(format!(
            "--listen {}: a non-loopback address needs --token-file (the API serves heap profiles; anyone who can reach it could read them)",
            cfg.listen
        )));
    }
    let out = open_data_dir(&cfg.engine.output_dir)?;
    crate::ebpf::preflight()?;
    let listener = TcpListener::bind(cfg.listen).map_err(|e| {
        Error::BadInput(format!(
            "--listen {}: cannot listen there: {} (pick another address or port)",
            cfg.listen,
            crate::output::dir::plain(&e)
        ))
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::runtime("cannot read the address listened on", e))?;
    let shared = Arc::new(Shared::default());
    // Reads --push-basic-auth (bad input: exit 2) and starts its thread.
    let pusher = push::Pusher::start(&cfg.push, shared.clone())?;
    cfg.engine.keep_written = pusher.is_some();
    let (requests, inbox) = mpsc::channel(REQUEST_QUEUE);
    let server_dir = out
        .try_clone()
        .map_err(|e| Error::runtime("cannot open the data directory twice", e))?;
    let server = http::start(
        listener,
        http::ServerConfig {
            token,
            data_dir: server_dir,
        },
        shared.clone(),
        requests,
    )?;
    let pods = cfg.kubernetes.then(|| Arc::new(kube::PodIndex::default()));
    let mut watch = None;
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::runtime("cannot start the runtime", e))
        .and_then(|rt| {
            rt.block_on(async {
                let signals = Signals::new()?;
                say(&lines::agent_listening(local, out.path()));
                // After the listening line: what the watch says comes after it.
                if let Some(index) = &pods {
                    watch = Some(kube::start(cfg.node.clone(), index.clone())?);
                }
                Agent::new(cfg, out, shared, pusher, pods)
                    .run(signals, inbox)
                    .await
            })
        });
    server.stop();
    if let Some(watch) = watch {
        watch.stop();
    }
    result
}

/// The token file: its first line, trimmed; refused when empty, too large,
/// or not a regular file (never through a symlink).
fn read_token(path: &std::path::Path) -> Result<Vec<u8>> {
    read_first_line("--token-file", path)
}

/// A secret file given with `flag`: its first line, trimmed; refused when
/// empty, too large, or not a regular file (never through a symlink).
pub(crate) fn read_first_line(flag: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let bad = |why: String| {
        Error::BadInput(format!(
            "{flag} {}: {why}",
            lines::escape(&path.display().to_string())
        ))
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| bad(crate::output::dir::plain(&e)))?;
    let meta = file
        .metadata()
        .map_err(|e| bad(crate::output::dir::plain(&e)))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_TOKEN_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(crate::output::dir::plain(&e)))?;
    if bytes.len() as u64 > MAX_TOKEN_BYTES {
        return Err(bad(format!("larger than {MAX_TOKEN_BYTES} bytes")));
    }
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let token = line.trim_ascii();
    if token.is_empty() {
        return Err(bad("empty (write the token on its first line)".into()));
    }
    Ok(token.to_vec())
}

/// The data directory: created (0700) when missing, then opened like any
/// output directory.
fn open_data_dir(path: &std::path::Path) -> Result<OutputDir> {
    use std::os::unix::fs::DirBuilderExt;
    if !path.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| Error::OutputDir {
                path: path.to_path_buf(),
                why: format!(
                    "cannot create it: {} (pick another with --data-dir)",
                    crate::output::dir::plain(&e)
                ),
            })?;
    }
    let out = OutputDir::open(path)?;
    if let Some(why) = out.writable_by_others() {
        return Err(Error::OutputDir {
            path: path.to_path_buf(),
            why: format!(
                "{why}; the agent serves and deletes the files it finds there: use a directory only it can write (chmod go-w, or another --data-dir)"
            ),
        });
    }
    let stale = out.remove_stale_temps();
    if !stale.is_empty() {
        say(&lines::stale_temps_removed(out.path(), stale.len()));
    }
    Ok(out)
}

/// SIGUSR2, SIGINT and SIGTERM.
struct Signals {
    usr2: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        let handler = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| Error::runtime(format!("{name} handler"), e))
        };
        Ok(Signals {
            usr2: handler(SignalKind::user_defined2(), "SIGUSR2")?,
            int: handler(SignalKind::interrupt(), "SIGINT")?,
            term: handler(SignalKind::terminate(), "SIGTERM")?,
        })
    }
}

/// A selected process the engine does not profile.
#[derive(Clone, Debug)]
struct Idle {
    process: Process,
    state: State,
    reason: Option<String>,
}

/// The loop's state besides the engine.
struct Agent {
    cfg: AgentConfig,
    /// The eBPF programs and maps with the targets they serve: loaded when
    /// the first target is attached, unloaded when the last is gone, so
    /// that an agent with nothing to profile holds no kernel memory.
    engine: Option<Engine>,
    /// When the engine was left without targets.
    idle_since: Option<Instant>,
    /// Snapshots that could not be written by engines unloaded since.
    failed_snapshots: usize,
    /// Why the engine could not be loaded, as last said.
    engine_error: Option<String>,
    out: OutputDir,
    shared: Arc<Shared>,
    /// Selected processes that wait for a slot (oldest first) or failed,
    /// by pid.
    idle: Vec<Idle>,
    /// What discovery knows of each profiled pid.
    profiled: HashMap<u32, Process>,
    /// Targets whose interval snapshot is due, taken one per loop turn so
    /// that requests and ticks go on between them.
    due: VecDeque<u32>,
    /// With `--push` or `--push-parca`: where each snapshot written goes.
    pusher: Option<push::Pusher>,
    /// With `--kubernetes`: this node's containers, as the watch publishes
    /// them, and the generation of it the targets were last checked against.
    pods: Option<Arc<kube::PodIndex>>,
    pods_seen: u64,
}

impl Agent {
    fn new(
        cfg: AgentConfig,
        out: OutputDir,
        shared: Arc<Shared>,
        pusher: Option<push::Pusher>,
        pods: Option<Arc<kube::PodIndex>>,
    ) -> Self {
        Agent {
            cfg,
            engine: None,
            idle_since: None,
            failed_snapshots: 0,
            engine_error: None,
            out,
            shared,
            idle: Vec::new(),
            profiled: HashMap::new(),
            due: VecDeque::new(),
            pusher,
            pods,
            pods_seen: 0,
        }
    }

    async fn run(mut self, mut signals: Signals, mut inbox: mpsc::Receiver<Request>) -> Result<()> {
        let started = Instant::now();
        let interval = self.cfg.engine.interval;
        let mut next_interval = interval.map(|i| started + i);
        let mut next_discovery = started;
        let mut next_refresh = started + MAPS_REFRESH;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = signals.usr2.recv() => self.snapshot_all(Trigger::Signal),
                _ = signals.int.recv() => break,
                _ = signals.term.recv() => break,
                Some(request) = inbox.recv() => self.answer(request),
                _ = tick.tick() => {
                    let now = Instant::now();
                    if let Some(engine) = &mut self.engine {
                        engine.tick(None);
                        engine.check_steps();
                    }
                    // Before forget_finished: an exit snapshot's process
                    // is still known (its container).
                    self.push_written();
                    self.forget_finished();
                    self.recheck_pods();
                    if now >= next_discovery {
                        self.discover();
                        next_discovery = now + self.cfg.discover_every;
                    }
                    if next_interval.is_some_and(|t| now >= t) {
                        for pid in self.pids() {
                            if !self.due.contains(&pid) {
                                self.due.push_back(pid);
                            }
                        }
                        next_interval = interval.map(|i| now + i);
                    }
                    if let Some(pid) = self.due.pop_front() {
                        self.snapshot(pid, Trigger::Interval);
                    }
                    if now >= next_refresh {
                        if let Some(engine) = &mut self.engine {
                            engine.refresh_all();
                        }
                        next_refresh = now + MAPS_REFRESH;
                    }
                    self.unload_when_idle(now);
                    self.publish();
                    self.shared.beat();
                }
            }
        }
        self.snapshot_all(Trigger::Stop);
        self.unload();
        if let Some(pusher) = self.pusher.take() {
            pusher.stop();
        }
        if self.failed_snapshots > 0 {
            return Err(Error::Runtime(lines::snapshots_failed(
                self.failed_snapshots,
            )));
        }
        Ok(())
    }

    /// What Kubernetes says of a process: the pod its container is in.
    fn meta(&self, pid: u32) -> Option<PodMeta> {
        let process = self
            .profiled
            .get(&pid)
            .or_else(|| self.idle.iter().map(|i| &i.process).find(|p| p.pid == pid))?;
        self.container(process).map(|c| c.meta)
    }

    /// The container of this node's pods that `process` runs in.
    fn container(&self, process: &Process) -> Option<kube::Container> {
        self.pods.as_ref()?.get(process.container.as_deref()?)
    }

    /// Whether any rule selects `process`; `k8s` by its pod's annotations.
    fn selects(&self, process: &Process) -> bool {
        self.cfg.rules.iter().any(|r| match r {
            Rule::K8s => self.container(process).is_some_and(|c| c.profiled),
            r => r.matches(process),
        })
    }

    /// The labels of `process`'s snapshots.
    fn labels(&self, process: &Process) -> Option<crate::model::Kubernetes> {
        self.container(process).map(|c| crate::model::Kubernetes {
            namespace: c.meta.namespace,
            pod: c.meta.pod,
            container: c.meta.container,
            node: self.cfg.node.clone(),
            service_name: c.meta.service_name,
        })
    }

    /// After a change of the pods: every target's labels again, and the
    /// targets and waiting processes the rules no longer select (the `k8s`
    /// rule's annotation removed, the pod gone) let go of: a last snapshot
    /// (trigger `stop`), then detach.
    fn recheck_pods(&mut self) {
        let Some(generation) = self.pods.as_ref().map(|p| p.generation()) else {
            return;
        };
        if generation == self.pods_seen {
            return;
        }
        self.pods_seen = generation;
        self.release_unselected();
        // The labels of what is left (a pod's own may have changed).
        let labels: Vec<(u32, Option<crate::model::Kubernetes>)> = self
            .profiled
            .values()
            .map(|p| (p.pid, self.labels(p)))
            .collect();
        if let Some(engine) = &mut self.engine {
            for (pid, labels) in labels {
                engine.set_labels(pid, labels);
            }
        }
    }

    /// With the `k8s` rule: the targets the rules no longer select get a
    /// last snapshot (with their labels as they were) and are let go of;
    /// waiting processes are dropped.
    fn release_unselected(&mut self) {
        if !self.cfg.rules.iter().any(|r| matches!(r, Rule::K8s)) {
            return;
        }
        let unselected: Vec<Process> = self
            .profiled
            .values()
            .filter(|p| !self.selects(p))
            .cloned()
            .collect();
        for process in unselected {
            let why = match self.container(&process) {
                Some(_) => {
                    "its pod is no longer annotated heapbpf.io/profile: \"true\" for this container"
                }
                None => "its pod is gone from this node",
            };
            say(&lines::released(process.pid, &process.comm, why));
            let started = Instant::now();
            if let Some(engine) = &mut self.engine {
                engine.release(process.pid, Trigger::Stop);
            }
            self.shared
                .snapshot_seconds
                .observe(started.elapsed().as_secs_f64());
            self.profiled.remove(&process.pid);
            self.due.retain(|&pid| pid != process.pid);
        }
        let idle = std::mem::take(&mut self.idle);
        self.idle = idle
            .into_iter()
            .filter(|i| self.selects(&i.process))
            .collect();
    }

    /// Hands the snapshots the engine wrote since the last call (any
    /// trigger) to the pusher, labelled.
    fn push_written(&mut self) {
        let written = match self.engine.as_mut() {
            Some(engine) => engine.take_written(),
            None => return,
        };
        let Some(pusher) = &self.pusher else { return };
        for snapshot in written {
            let container = self
                .profiled
                .get(&snapshot.pid)
                .and_then(|p| p.container.as_deref());
            // The pod labels the snapshot was taken with: a target let go
            // of (annotation removed, pod gone) is no longer known here.
            let meta = snapshot
                .kubernetes
                .as_ref()
                .map(|k| PodMeta {
                    namespace: k.namespace.clone(),
                    pod: k.pod.clone(),
                    container: k.container.clone(),
                    service_name: k.service_name.clone(),
                })
                .or_else(|| self.meta(snapshot.pid));
            let labels = push::labels(
                snapshot.pid,
                &snapshot.comm,
                container,
                meta.as_ref(),
                &self.cfg.node,
            );
            pusher.push_snapshot(snapshot, labels);
        }
    }

    /// The pids profiled now.
    fn pids(&self) -> Vec<u32> {
        self.engine.as_ref().map(Engine::pids).unwrap_or_default()
    }

    /// The engine, loaded if it is not.
    fn engine(&mut self) -> Result<&mut Engine> {
        self.idle_since = None;
        let engine = match self.engine.take() {
            Some(engine) => engine,
            None => {
                let out = self
                    .out
                    .try_clone()
                    .map_err(|e| Error::runtime("cannot open the data directory again", e))?;
                let started = Instant::now();
                let engine = Engine::new(self.cfg.engine.clone(), out)?;
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "eBPF programs loaded"
                );
                engine
            }
        };
        Ok(self.engine.insert(engine))
    }

    /// Unloads the engine once it has had no target for [`UNLOAD_AFTER`].
    fn unload_when_idle(&mut self, now: Instant) {
        let Some(engine) = &self.engine else { return };
        if !engine.is_idle() {
            self.idle_since = None;
            return;
        }
        let since = *self.idle_since.get_or_insert(now);
        if now.duration_since(since) >= UNLOAD_AFTER {
            self.unload();
        }
    }

    /// Detaches every target and unloads the programs and maps.
    fn unload(&mut self) {
        self.push_written();
        if let Some(mut engine) = self.engine.take() {
            engine.detach_all();
            self.failed_snapshots += engine.failed_snapshots();
            tracing::info!("eBPF programs unloaded: no target left");
        }
        self.idle_since = None;
        self.profiled.clear();
        self.due.clear();
    }

    /// A snapshot of every target now.
    fn snapshot_all(&mut self, trigger: Trigger) {
        for pid in self.pids() {
            self.snapshot(pid, trigger);
        }
        self.due.clear();
    }

    fn snapshot(&mut self, pid: u32, trigger: Trigger) -> Option<Vec<PathBuf>> {
        let engine = self.engine.as_mut()?;
        let started = Instant::now();
        let paths = engine.snapshot_pid(pid, trigger).ok();
        self.push_written();
        self.shared
            .snapshot_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Some(max) = self.cfg.max_disk {
            let keep: Vec<String> = paths
                .iter()
                .flatten()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .collect();
            crate::output::writer::trim_to_disk(&self.out, max, &keep);
        }
        paths
    }

    fn answer(&mut self, request: Request) {
        // A client that gave up (timeout, gone) costs no snapshot.
        let abandoned = match &request {
            Request::Heap { reply, .. } => reply.is_closed(),
            Request::Snapshot { reply, .. } => reply.is_closed(),
        };
        if abandoned {
            return;
        }
        match request {
            Request::Heap { pid, reply } => {
                let result = if let Some(engine) = self
                    .engine
                    .as_mut()
                    .filter(|_| self.profiled.contains_key(&pid))
                {
                    let started = Instant::now();
                    let r = engine.heap_profile(pid).map_err(|e| {
                        ApiError::new(500, format!("cannot read the heap of pid {pid}: {e}"))
                    });
                    self.shared
                        .snapshot_seconds
                        .observe(started.elapsed().as_secs_f64());
                    r
                } else {
                    Err(self.not_profiled(pid))
                };
                let _ = reply.send(result);
            }
            Request::Snapshot { pid, reply } => {
                let result = if self.profiled.contains_key(&pid) {
                    self.snapshot(pid, Trigger::Request)
                        .map(|paths| {
                            paths
                                .iter()
                                .filter_map(|p| p.file_name())
                                .map(|n| n.to_string_lossy().into_owned())
                                .collect()
                        })
                        .ok_or_else(|| {
                            ApiError::new(
                                500,
                                format!("the snapshot of pid {pid} failed (see the agent's log)"),
                            )
                        })
                } else {
                    Err(self.not_profiled(pid))
                };
                let _ = reply.send(result);
            }
        }
        self.publish();
    }

    fn not_profiled(&self, pid: u32) -> ApiError {
        match self.idle.iter().find(|i| i.process.pid == pid) {
            Some(i) => ApiError::new(
                409,
                format!(
                    "pid {pid} is {}{}",
                    i.state.as_str(),
                    i.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
            ),
            None => ApiError::new(404, format!("pid {pid} is not a target (see /targets)")),
        }
    }

    /// Drops what the engine no longer profiles (exited, pid reused), so
    /// that their slots go to waiting processes.
    fn forget_finished(&mut self) {
        let live = self.pids();
        self.profiled.retain(|pid, _| live.contains(pid));
        self.due.retain(|pid| live.contains(pid));
    }

    /// Looks at every process: new ones that match get a slot or wait;
    /// waiting ones get the slots that freed.
    fn discover(&mut self) {
        // The processes that left, and pids given to another process.
        self.idle.retain(|i| {
            procfs::read_stat(i.process.pid).is_some_and(|s| s.start_ticks == i.process.start_ticks)
        });
        // One that failed is tried again once it runs another program.
        for idle in self.idle.iter_mut().filter(|i| i.state == State::Failed) {
            if let Some(p) = select::read_process(idle.process.pid) {
                if p.start_ticks == idle.process.start_ticks
                    && (p.exe != idle.process.exe || p.comm != idle.process.comm)
                {
                    *idle = Idle {
                        process: p,
                        state: State::Waiting,
                        reason: None,
                    };
                }
            }
        }
        let own = std::process::id();
        for pid in select::pids() {
            if pid == own
                || self.profiled.contains_key(&pid)
                || self.idle.iter().any(|i| i.process.pid == pid)
            {
                continue;
            }
            let Some(process) = select::read_process(pid) else {
                continue;
            };
            if !self.selects(&process) {
                continue;
            }
            self.idle.push(Idle {
                process,
                state: State::Waiting,
                reason: None,
            });
        }
        // Slots to the waiting, in the order they were found.
        let mut i = 0;
        while i < self.idle.len() {
            if self.idle[i].state != State::Waiting {
                i += 1;
                continue;
            }
            if self.profiled.len() >= self.cfg.max_targets {
                self.idle[i].reason = Some(format!(
                    "--max-targets {} are profiled; it gets the next free slot",
                    self.cfg.max_targets
                ));
                i += 1;
                continue;
            }
            // It may have waited long: still the same process, still selected?
            let before = &self.idle[i].process;
            let now = select::read_process(before.pid)
                .filter(|p| p.start_ticks == before.start_ticks)
                .filter(|p| self.selects(p));
            let Some(process) = now else {
                self.idle.remove(i);
                continue;
            };
            // The programs are the agent's, not the process's: when they
            // cannot be loaded, everything selected keeps waiting.
            if let Err(e) = self.engine() {
                let why = e.to_string().replace('\n', "; ");
                if self.engine_error.as_deref() != Some(why.as_str()) {
                    say(&format!("cannot load the eBPF programs: {why}"));
                    self.engine_error = Some(why.clone());
                }
                for idle in self.idle.iter_mut().filter(|w| w.state == State::Waiting) {
                    idle.reason = Some(format!("the eBPF programs cannot be loaded: {why}"));
                }
                break;
            }
            self.engine_error = None;
            // Its pod as it was when selected: the watch may change it
            // while the probes go in.
            let labels = self.labels(&process);
            let attached = procfs::process_info(process.pid).and_then(|info| {
                self.engine
                    .as_mut()
                    .ok_or_else(|| Error::Runtime("no engine".into()))
                    .and_then(|engine| engine.attach(info))
            });
            match attached {
                Ok(()) => {
                    self.idle.remove(i);
                    if let Some(engine) = &mut self.engine {
                        engine.set_labels(process.pid, labels);
                    }
                    self.profiled.insert(process.pid, process);
                }
                Err(Error::Exited { .. } | Error::NoSuchProcess { .. }) => {
                    self.idle.remove(i);
                }
                Err(e) => {
                    let why = e.to_string().replace('\n', "; ");
                    say(&format!(
                        "cannot profile pid {} ({}): {why}",
                        process.pid, process.comm
                    ));
                    self.idle[i] = Idle {
                        process,
                        state: State::Failed,
                        reason: Some(why),
                    };
                    i += 1;
                }
            }
        }
    }

    /// What `/targets` and `/metrics` show, as of now.
    fn publish(&self) {
        let mut views: Vec<TargetView> = self
            .engine
            .as_ref()
            .map(Engine::statuses)
            .unwrap_or_default()
            .into_iter()
            .map(|s| {
                let p = self.profiled.get(&s.pid);
                let meta = self.meta(s.pid);
                TargetView {
                    pid: s.pid,
                    comm: s.comm,
                    exe: s.exe,
                    container: p.and_then(|p| p.container.clone()),
                    container_name: meta.as_ref().map(|m| m.container.clone()),
                    pod: meta.as_ref().map(|m| m.pod.clone()),
                    namespace: meta.as_ref().map(|m| m.namespace.clone()),
                    service_name: meta.map(|m| m.service_name),
                    state: if s.windowed {
                        State::Windowed
                    } else {
                        State::Attached
                    },
                    reason: s.windows,
                    attached_at: Some(s.attached_at),
                    live_bytes: s.totals.live_bytes,
                    live_allocations: s.totals.live_allocations,
                    allocated_bytes: s.totals.allocated_bytes,
                    dropped_events: s.totals.dropped_events,
                    overhead: s.overhead,
                    coverage: s.coverage,
                    last_snapshot: s.last_snapshot,
                }
            })
            .collect();
        views.extend(self.idle.iter().map(|i| {
            let meta = self.meta(i.process.pid);
            TargetView {
                pid: i.process.pid,
                comm: i.process.comm.clone(),
                exe: i.process.exe.clone(),
                container: i.process.container.clone(),
                container_name: meta.as_ref().map(|m| m.container.clone()),
                pod: meta.as_ref().map(|m| m.pod.clone()),
                namespace: meta.as_ref().map(|m| m.namespace.clone()),
                service_name: meta.map(|m| m.service_name),
                state: i.state,
                reason: i.reason.clone(),
                attached_at: None,
                live_bytes: 0,
                live_allocations: 0,
                allocated_bytes: 0,
                dropped_events: 0,
                overhead: 0.0,
                coverage: 0.0,
                last_snapshot: None,
            }
        }));
        self.shared.publish(views);
    }
}
