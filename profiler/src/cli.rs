//! The command line (clap types only), converted into plain config structs.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    allocator, commands, ebpf,
    engine::Config,
    error::{Error, Result},
    output::Format,
    units::{parse_duration, parse_size},
};

#[derive(Debug, Parser)]
#[command(
    name = "heapbpf",
    version,
    about = "eBPF heap profiler: which code holds how much memory in a running process"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Profile running processes: no restart, no code change.
    Attach(AttachArgs),
    /// Start a command under the profiler, tracked from its first allocation.
    Run(RunArgs),
    /// Show the top allocation sites of a snapshot.
    Report(ReportArgs),
    /// What grew between two snapshots.
    Diff(DiffArgs),
    /// Node agent: profile the selected processes continuously, serve them over HTTP.
    Agent(AgentArgs),
}

/// `heapbpf agent`. The flags a deployment tunes also read `HEAPBPF_*`
/// environment variables (a flag on the command line wins; an empty one is
/// unset): the DaemonSet's ConfigMap sets them, as a `FROM scratch` image has
/// no shell to build a command line (deploy/kubernetes/configmap.yaml).
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Which processes: pid=N, comm=REGEX, exe=GLOB, cgroup=GLOB, container=ID, k8s (repeatable; any rule selects).
    #[arg(
        long = "select",
        value_name = "RULE",
        required = true,
        env = "HEAPBPF_SELECT"
    )]
    pub select: Vec<String>,
    /// How often new processes are looked for.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "5s")]
    pub discover_every: Duration,
    /// Read pod metadata (and the k8s rule's annotations) from the API server; NODE_NAME names the node.
    #[arg(long, env = "HEAPBPF_KUBERNETES")]
    pub kubernetes: bool,
    /// Address of the HTTP API; a non-loopback one needs --token-file.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7077")]
    pub listen: String,
    /// A file holding the bearer token every endpoint but /healthz requires.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A snapshot per target every DUR.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "60s", env = "HEAPBPF_INTERVAL")]
    pub interval: Duration,
    /// CPU time the probes may add to a target, as a share of its own (2%, 0.5%).
    #[arg(
        long,
        value_name = "PCT",
        default_value = "2%",
        env = "HEAPBPF_MAX_OVERHEAD"
    )]
    pub max_overhead: String,
    /// At most N targets at once; the rest wait.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 16,
        env = "HEAPBPF_MAX_TARGETS"
    )]
    pub max_targets: usize,
    /// Where snapshots are kept.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/heapbpf")]
    pub data_dir: PathBuf,
    /// Keep the newest N snapshots per target.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100,
        env = "HEAPBPF_MAX_SNAPSHOTS"
    )]
    pub max_snapshots: usize,
    /// Keep at most SIZE of snapshots in the data directory (the oldest go first).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "1GiB", env = "HEAPBPF_MAX_DISK")]
    pub max_disk: u64,
    /// Comma list of snapshot formats: json, pprof, collapsed, svg [default: json,pprof].
    #[arg(long, value_name = "LIST")]
    pub format: Option<String>,
    /// Write a snapshot each time a target's RSS passes the next multiple of SIZE above its value at attach.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub rss_step: Option<u64>,
    /// The same for the live heap heapbpf tracks.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub heap_step: Option<u64>,
    /// Mean bytes between sampled allocations (Poisson by bytes); 0 tracks every allocation exactly.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = DEFAULT_SAMPLE_BYTES, env = "HEAPBPF_SAMPLE_BYTES")]
    pub sample_bytes: u64,
    /// Keep only allocations at least DUR old in snapshots (leak suspects).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub min_age: Option<Duration>,
    /// How call stacks are recovered.
    #[arg(long, value_enum, default_value = "auto")]
    pub unwind: Unwind,
    /// Which allocator to hook.
    #[arg(long, value_name = "ALLOCATOR", default_value = "auto")]
    pub allocator: String,
    /// Live blocks the kernel maps can hold at once, all targets together
    /// [default: 512Ki when sampling, 2Mi in exact mode].
    #[arg(long, value_name = "N")]
    pub max_live_blocks: Option<u32>,
    /// Distinct call stacks the kernel maps can hold at once (all targets together).
    #[arg(long, value_name = "N", default_value_t = crate::ebpf::DEFAULT_MAX_STACKS)]
    pub max_stacks: u32,
    /// Download the debug info of stripped modules that have none installed from this debuginfod server (repeatable) [default: $DEBUGINFOD_URLS].
    #[arg(long, value_name = "URL")]
    pub debuginfod: Vec<String>,
    /// Push each snapshot to a Grafana Pyroscope server at URL (URL/push.v1.PusherService/Push).
    #[arg(long, value_name = "URL", env = "HEAPBPF_PUSH")]
    pub push: Option<String>,
    /// Push each snapshot to a Parca server at URL (URL/profiles/writeraw).
    #[arg(long, value_name = "URL", env = "HEAPBPF_PUSH_PARCA")]
    pub push_parca: Option<String>,
    /// An HTTP header sent with every push, as NAME:VALUE (repeatable).
    #[arg(long, value_name = "K:V")]
    pub push_header: Vec<String>,
    /// A file whose first line is user:password, sent as HTTP basic auth with every push.
    #[arg(long, value_name = "FILE", env = "HEAPBPF_PUSH_BASIC_AUTH")]
    pub push_basic_auth: Option<PathBuf>,
    /// The tenant pushed profiles belong to (the X-Scope-OrgID header).
    #[arg(long, value_name = "ID", env = "HEAPBPF_PUSH_TENANT")]
    pub push_tenant: Option<String>,
    /// More on stderr.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less on stderr.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
}

/// The most targets an agent profiles at once: each has a slot in the
/// kernel's per-target hit counters (`HIT_SLOTS`, slot 0 unused).
pub const MAX_AGENT_TARGETS: usize = heapbpf_common::HIT_SLOTS as usize - 1;

/// The agent's `--max-live-blocks` when sampling: the live-block map's
/// buckets take 16 bytes a block whether used or not (8 MiB here, against
/// 32 MiB for 2 Mi), and at the default 64 KiB a sampled block stands for
/// 64 KiB of heap on average: 512 Ki of them cover 32 GiB of live heap.
pub const AGENT_SAMPLED_LIVE_BLOCKS: u32 = 1 << 19;

/// `--max-overhead`: `2%`, `0.5%`, or a plain fraction `0.02` (at most 1).
/// Probes can cost a target more than its own work (an allocation-bound
/// program): with `%`, up to 1000%, so that a budget can let them run
/// continuously.
pub fn parse_overhead(text: &str) -> Result<f64> {
    let bad = || {
        Error::BadInput(format!(
            "--max-overhead {}: expected a share of the target's CPU time above 0, as 2% or 0.5% (at most 1000%)",
            crate::lines::escape(text)
        ))
    };
    let t = text.trim();
    let (v, max) = match t.strip_suffix('%') {
        Some(p) => (p.trim().parse::<f64>().map_err(|_| bad())? / 100.0, 10.0),
        None => (t.parse::<f64>().map_err(|_| bad())?, 1.0),
    };
    if !(v > 0.0 && v <= max) {
        return Err(bad());
    }
    Ok(v)
}

impl AgentArgs {
    /// The agent's configuration, every flag checked.
    pub fn into_config(self) -> Result<crate::agent::AgentConfig> {
        let listen: std::net::SocketAddr = self.listen.parse().map_err(|_| {
            Error::BadInput(format!(
                "--listen {}: expected IP:PORT, as 127.0.0.1:7077 or [::1]:7077",
                crate::lines::escape(&self.listen)
            ))
        })?;
        let max_overhead = parse_overhead(&self.max_overhead)?;
        if !(1..=MAX_AGENT_TARGETS).contains(&self.max_targets) {
            return Err(Error::BadInput(format!(
                "--max-targets {}: expected 1 to {MAX_AGENT_TARGETS}",
                self.max_targets
            )));
        }
        if self.discover_every.is_zero() {
            return Err(Error::BadInput(
                "--discover-every must be longer than 0".into(),
            ));
        }
        if self.max_disk == 0 {
            return Err(Error::BadInput("--max-disk must be larger than 0".into()));
        }
        let rules = self
            .select
            .iter()
            .map(|r| crate::agent::select::Rule::parse(r).map_err(Error::BadInput))
            .collect::<Result<Vec<_>>>()?;
        let push = self.push_config()?;
        check_kubernetes(self.kubernetes, &rules, std::env::var("NODE_NAME").ok())?;
        let mut engine = ProfileArgs {
            output_dir: self.data_dir,
            format: self.format,
            duration: None,
            interval: Some(self.interval),
            rss_step: self.rss_step,
            heap_step: self.heap_step,
            sample_bytes: self.sample_bytes,
            min_age: self.min_age,
            max_snapshots: Some(self.max_snapshots),
            unwind: self.unwind,
            allocator: self.allocator,
            max_live_blocks: self.max_live_blocks.unwrap_or(if self.sample_bytes == 0 {
                1 << 21
            } else {
                AGENT_SAMPLED_LIVE_BLOCKS
            }),
            max_stacks: self.max_stacks,
            probe_floor: None,
            no_uprobe_sessions: false,
            no_exec_tracepoint: false,
            debuginfod: self.debuginfod.clone(),
            verbose: self.verbose,
            quiet: self.quiet,
        }
        .into_config()?;
        engine.max_overhead = Some(max_overhead);
        // The agent keeps downloaded debug info beside its snapshots.
        if let Some(d) = &mut engine.debuginfod {
            d.cache_dir = engine.output_dir.join("debuginfod");
        }
        Ok(crate::agent::AgentConfig {
            engine,
            rules,
            listen,
            token_file: self.token_file,
            max_overhead,
            max_targets: self.max_targets,
            max_disk: Some(self.max_disk),
            discover_every: self.discover_every,
            node: node_name(),
            push,
            kubernetes: self.kubernetes,
        })
    }

    /// `--push*`, every value checked (the basic-auth file is read at start).
    fn push_config(&self) -> Result<crate::agent::push::PushConfig> {
        use crate::agent::push;
        let cfg = push::PushConfig {
            pyroscope: self
                .push
                .as_deref()
                .map(|u| push::parse_url("--push", u))
                .transpose()
                .map_err(Error::BadInput)?,
            parca: self
                .push_parca
                .as_deref()
                .map(|u| push::parse_url("--push-parca", u))
                .transpose()
                .map_err(Error::BadInput)?,
            headers: self
                .push_header
                .iter()
                .map(|h| push::parse_header(h))
                .collect::<std::result::Result<_, _>>()
                .map_err(Error::BadInput)?,
            basic_auth_file: self.push_basic_auth.clone(),
            tenant: self
                .push_tenant
                .as_deref()
                .map(push::parse_tenant)
                .transpose()
                .map_err(Error::BadInput)?,
        };
        let options =
            !cfg.headers.is_empty() || cfg.basic_auth_file.is_some() || cfg.tenant.is_some();
        if options && !cfg.enabled() {
            return Err(Error::BadInput(
                "--push-header, --push-basic-auth and --push-tenant go with --push URL or --push-parca URL (where to push)".into(),
            ));
        }
        Ok(cfg)
    }
}

/// `--select k8s` needs `--kubernetes`, which needs `NODE_NAME` (the pods
/// watched are this node's: a host name guessed wrong would watch none).
fn check_kubernetes(
    kubernetes: bool,
    rules: &[crate::agent::select::Rule],
    node_name: Option<String>,
) -> Result<()> {
    let k8s_rule = rules
        .iter()
        .any(|r| matches!(r, crate::agent::select::Rule::K8s));
    if k8s_rule && !kubernetes {
        return Err(Error::BadInput(
            "--select k8s needs --kubernetes (the pods' annotations come from the API server); add --kubernetes, or select by container=ID or cgroup=GLOB".into(),
        ));
    }
    if kubernetes && node_name.is_none_or(|n| n.trim().is_empty()) {
        return Err(Error::BadInput(
            "--kubernetes needs NODE_NAME, the name of this node (set it from spec.nodeName with the downward API, as deploy/kubernetes does)".into(),
        ));
    }
    Ok(())
}

/// This node's name: `NODE_NAME` (the DaemonSet sets it from
/// `spec.nodeName`), else the host name.
fn node_name() -> String {
    if let Some(name) = std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
    {
        return name.trim().to_string();
    }
    // SAFETY: uname fills the struct it is given; all-zero is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return String::new();
    }
    // SAFETY: the kernel NUL-terminates nodename.
    let name = unsafe { std::ffi::CStr::from_ptr(uts.nodename.as_ptr()) };
    name.to_string_lossy().into_owned()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiffFormat {
    Text,
    Json,
    Collapsed,
    Svg,
}

impl From<DiffFormat> for commands::DiffFormat {
    fn from(f: DiffFormat) -> Self {
        match f {
            DiffFormat::Text => commands::DiffFormat::Text,
            DiffFormat::Json => commands::DiffFormat::Json,
            DiffFormat::Collapsed => commands::DiffFormat::Collapsed,
            DiffFormat::Svg => commands::DiffFormat::Svg,
        }
    }
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The earlier snapshot (the baseline).
    #[arg(value_name = "OLD")]
    pub old: PathBuf,
    /// The later snapshot.
    #[arg(value_name = "NEW")]
    pub new: PathBuf,
    /// How many entries to show.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    #[arg(long, value_enum, default_value = "text")]
    pub format: DiffFormat,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Process ids to profile.
    #[arg(required = true, value_name = "PID")]
    pub pids: Vec<u32>,
    #[command(flatten)]
    pub profile: ProfileArgs,
}

impl AttachArgs {
    /// The pids, each once, in the order given (`attach 1 2 1` is 1 and 2).
    pub fn unique_pids(&self) -> Vec<u32> {
        let mut seen = std::collections::HashSet::new();
        self.pids
            .iter()
            .copied()
            .filter(|p| seen.insert(*p))
            .collect()
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// The command to start and profile from its first allocation.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// The options `attach` and `run` share.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// Where snapshots go.
    #[arg(short = 'o', long, value_name = "DIR", default_value = ".")]
    pub output_dir: PathBuf,
    /// Comma list of snapshot formats: json, pprof, collapsed, svg [default: json,pprof].
    #[arg(long, value_name = "LIST")]
    pub format: Option<String>,
    /// Stop after DUR (30s, 5m, 1h), writing a final snapshot.
    #[arg(short = 'd', long, value_name = "DUR", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Write a snapshot every DUR.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Write a snapshot each time RSS passes the next multiple of SIZE above its value at attach.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub rss_step: Option<u64>,
    /// The same for the live heap heapbpf tracks.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub heap_step: Option<u64>,
    /// Mean bytes between sampled allocations (Poisson by bytes); 0 tracks every allocation exactly.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = DEFAULT_SAMPLE_BYTES)]
    pub sample_bytes: u64,
    /// Keep only allocations at least DUR old in snapshots (leak suspects).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub min_age: Option<Duration>,
    /// Keep only the newest N snapshots per target in the output directory.
    #[arg(long, value_name = "N")]
    pub max_snapshots: Option<usize>,
    /// How call stacks are recovered.
    #[arg(long, value_enum, default_value = "auto")]
    pub unwind: Unwind,
    /// Which allocator to hook.
    #[arg(long, value_name = "ALLOCATOR", default_value = "auto")]
    pub allocator: String,
    /// Live blocks the kernel maps can hold at once (all targets together).
    #[arg(long, value_name = "N", default_value_t = 1 << 21)]
    pub max_live_blocks: u32,
    /// Distinct call stacks the kernel maps can hold at once (all targets
    /// together); stacks no live block uses are retired when they fill.
    #[arg(long, value_name = "N", default_value_t = crate::ebpf::DEFAULT_MAX_STACKS)]
    pub max_stacks: u32,
    /// Benchmark floor: empty programs at the same probe points (entry or return).
    #[arg(long, value_enum, hide = true)]
    pub probe_floor: Option<ProbeFloor>,
    /// Hook allocating functions with a uprobe and a uretprobe each even
    /// where the kernel has uprobe sessions (for comparison).
    #[arg(long, hide = true)]
    pub no_uprobe_sessions: bool,
    /// Notice execs by the executable changing, as without the exec
    /// tracepoint (for the tests of that fallback).
    #[arg(long, hide = true)]
    pub no_exec_tracepoint: bool,
    /// Download the debug info of stripped modules that have none installed from this debuginfod server (repeatable) [default: $DEBUGINFOD_URLS].
    #[arg(long, value_name = "URL")]
    pub debuginfod: Vec<String>,
    /// More on stderr: where each probe went, per-snapshot statistics.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less on stderr.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProbeFloor {
    Entry,
    Return,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Unwind {
    Auto,
    Fp,
    Dwarf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
}

impl From<ReportFormat> for commands::ReportFormat {
    fn from(f: ReportFormat) -> Self {
        match f {
            ReportFormat::Text => commands::ReportFormat::Text,
            ReportFormat::Json => commands::ReportFormat::Json,
        }
    }
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A snapshot written by heapbpf (.json).
    #[arg(value_name = "SNAPSHOT")]
    pub snapshot: PathBuf,
    /// How many allocation sites to show.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    #[arg(long, value_enum, default_value = "text")]
    pub format: ReportFormat,
}

/// The range of `--max-stacks`: a map of a few thousand stacks is the least
/// that makes sense; 4 Mi stacks of up to 1 KiB each is as much kernel
/// memory as heapbpf should ever ask for.
const MIN_STACKS: u32 = 1024;
const MAX_STACKS: u32 = 1 << 22;

/// `report --top N` and `diff --top N`: at least one entry (totals alone
/// are what `--format json` is for).
pub fn checked_top(top: usize) -> Result<usize> {
    if top == 0 {
        return Err(Error::BadInput("--top must be at least 1".into()));
    }
    Ok(top)
}

/// The debuginfod servers of `--debuginfod` (else `DEBUGINFOD_URLS`) and
/// the user's cache for their files; `None` without servers.
fn debuginfod_config(flags: &[String]) -> Result<Option<crate::debuginfo::debuginfod::Config>> {
    use crate::debuginfo::debuginfod;
    let env = |k: &str| std::env::var(k).ok();
    let urls = debuginfod::urls(flags, env("DEBUGINFOD_URLS").as_deref())?;
    Ok((!urls.is_empty()).then(|| debuginfod::Config {
        urls,
        cache_dir: debuginfod::user_cache_dir(
            env("XDG_CACHE_HOME").as_deref(),
            env("HOME").as_deref(),
        ),
    }))
}

/// `--sample-bytes` when none is given; chosen by measurement (README,
/// "Sampling").
pub const DEFAULT_SAMPLE_BYTES: &str = "64KiB";

impl ProfileArgs {
    /// The engine's configuration, every flag checked.
    pub fn into_config(self) -> Result<Config> {
        let formats = Format::parse_list(
            self.format
                .as_deref()
                .unwrap_or(crate::output::DEFAULT_FORMATS),
        )
        .map_err(Error::BadInput)?;
        if self.sample_bytes > heapbpf_common::MAX_SAMPLE_BYTES {
            return Err(Error::BadInput(format!(
                "--sample-bytes {}: at most {} (64MiB); use 0 for exact mode",
                self.sample_bytes,
                heapbpf_common::MAX_SAMPLE_BYTES
            )));
        }
        let allocator = allocator::Choice::parse(&self.allocator).ok_or_else(|| {
            Error::BadInput(format!(
                "--allocator {}: expected auto, libc, jemalloc, tcmalloc, mimalloc, or PATH[:PREFIX] (a mapped file, e.g. /usr/lib/libjemalloc.so.2 or ./app:je_)",
                self.allocator
            ))
        })?;
        for (flag, v) in [
            ("--rss-step", self.rss_step),
            ("--heap-step", self.heap_step),
        ] {
            if v == Some(0) {
                return Err(Error::BadInput(format!("{flag} must be larger than 0")));
            }
        }
        if self.interval == Some(Duration::ZERO) {
            return Err(Error::BadInput("--interval must be longer than 0".into()));
        }
        if !(MIN_STACKS..=MAX_STACKS).contains(&self.max_stacks) {
            return Err(Error::BadInput(format!(
                "--max-stacks {}: expected {MIN_STACKS} to {MAX_STACKS}",
                self.max_stacks
            )));
        }
        if self.max_snapshots == Some(0) {
            return Err(Error::BadInput("--max-snapshots must be at least 1".into()));
        }
        if !(1..=ebpf::MAX_LIVE_BLOCKS).contains(&self.max_live_blocks) {
            return Err(Error::BadInput(format!(
                "--max-live-blocks {}: expected 1 to {} (64Mi; the kernel reserves 16 bytes a block when heapbpf starts)",
                self.max_live_blocks,
                ebpf::MAX_LIVE_BLOCKS
            )));
        }
        Ok(Config {
            output_dir: self.output_dir,
            formats,
            duration: self.duration,
            interval: self.interval,
            rss_step: self.rss_step,
            heap_step: self.heap_step,
            sample_bytes: self.sample_bytes,
            unwind: match self.unwind {
                Unwind::Auto => crate::unwind::Mode::Auto,
                Unwind::Fp => crate::unwind::Mode::Fp,
                Unwind::Dwarf => crate::unwind::Mode::Dwarf,
            },
            min_age: self.min_age.unwrap_or_default(),
            max_snapshots: self.max_snapshots,
            max_live_blocks: self.max_live_blocks,
            max_stacks: self.max_stacks,
            floor: self.probe_floor.map(|f| match f {
                ProbeFloor::Entry => ebpf::Floor::Entry,
                ProbeFloor::Return => ebpf::Floor::Return,
            }),
            allocator,
            sessions: !self.no_uprobe_sessions,
            exec_tracepoint: !self.no_exec_tracepoint,
            keep_written: false,
            max_overhead: None,
            debuginfod: debuginfod_config(&self.debuginfod)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach_args(args: &[&str]) -> Result<AttachArgs> {
        let cli = Cli::try_parse_from(["heapbpf", "attach"].iter().chain(args))
            .map_err(|e| Error::BadInput(e.to_string()))?;
        match cli.command {
            Command::Attach(a) => Ok(a),
            _ => unreachable!(),
        }
    }

    fn attach(args: &[&str]) -> Result<Config> {
        attach_args(args)?.profile.into_config()
    }

    #[test]
    fn parses_the_contract_options() {
        let c = attach(&[
            "12",
            "34",
            "-o",
            "/tmp",
            "-d",
            "30s",
            "--interval",
            "5m",
            "--heap-step",
            "16MiB",
            "--min-age",
            "500ms",
            "--max-snapshots",
            "3",
        ])
        .unwrap();
        assert_eq!(c.duration, Some(Duration::from_secs(30)));
        assert_eq!(c.interval, Some(Duration::from_secs(300)));
        assert_eq!(c.heap_step, Some(16 << 20));
        assert_eq!(c.min_age, Duration::from_millis(500));
        assert_eq!(c.max_snapshots, Some(3));
        assert_eq!(
            c.sample_bytes,
            crate::units::parse_size(DEFAULT_SAMPLE_BYTES).unwrap()
        );
        assert_eq!(
            c.formats,
            vec![Format::Json, Format::Pprof],
            "default json,pprof"
        );
    }

    #[test]
    fn a_pid_given_twice_is_one_target() {
        assert_eq!(
            attach_args(&["12", "34"]).unwrap().unique_pids(),
            vec![12, 34]
        );
        assert_eq!(
            attach_args(&["1", "2", "1"]).unwrap().unique_pids(),
            vec![1, 2]
        );
    }

    #[test]
    fn refuses_what_does_not_exist_yet_by_name() {
        assert!(attach(&["1", "--sample-bytes", "1GiB"])
            .unwrap_err()
            .to_string()
            .contains("--sample-bytes"));
        assert_eq!(
            attach(&["1", "--sample-bytes", "64KiB"])
                .unwrap()
                .sample_bytes,
            64 << 10
        );
        assert!(attach(&["1", "--format", "png"])
            .unwrap_err()
            .to_string()
            .contains("png"));
        assert_eq!(
            attach(&["1", "--unwind", "dwarf"]).unwrap().unwind,
            crate::unwind::Mode::Dwarf
        );
        assert!(attach(&["1", "--unwind", "lbr"])
            .unwrap_err()
            .to_string()
            .contains("lbr"));
        assert!(attach(&["1", "--allocator", "hoard"])
            .unwrap_err()
            .to_string()
            .contains("hoard"));
        assert_eq!(
            attach(&["1", "--allocator", "jemalloc"]).unwrap().allocator,
            allocator::Choice::Jemalloc
        );
        assert!(attach(&["1", "--heap-step", "0"]).is_err());
        for n in ["0", "67108865", "1073741824", "4294967295"] {
            let e = attach(&["1", "--max-live-blocks", n]).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{n}");
            assert!(
                e.to_string()
                    .starts_with(&format!("--max-live-blocks {n}: expected 1 to 67108864")),
                "{e}"
            );
        }
        assert!(attach(&["1", "--max-live-blocks", "4294967296"]).is_err());
        for n in ["1", "67108864"] {
            let c = attach(&["1", "--max-live-blocks", n]).unwrap();
            assert_eq!(c.max_live_blocks.to_string(), n);
        }
        assert_eq!(
            checked_top(0).unwrap_err().to_string(),
            "--top must be at least 1"
        );
        assert_eq!(checked_top(0).unwrap_err().exit_code(), 2);
        assert_eq!(checked_top(3).unwrap(), 3);
        assert!(attach(&["1", "--interval", "soon"]).is_err());
        assert!(attach(&[]).is_err());
    }

    fn agent(args: &[&str]) -> Result<AgentArgs> {
        let cli = Cli::try_parse_from(["heapbpf", "agent"].iter().chain(args))
            .map_err(|e| Error::BadInput(e.to_string()))?;
        match cli.command {
            Command::Agent(a) => Ok(a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn agent_overhead_and_defaults() {
        assert_eq!(parse_overhead("2%").unwrap(), 0.02);
        assert_eq!(parse_overhead(" 0.5% ").unwrap(), 0.005);
        assert_eq!(parse_overhead("0.1").unwrap(), 0.1);
        assert_eq!(parse_overhead("100%").unwrap(), 1.0);
        assert_eq!(parse_overhead("300%").unwrap(), 3.0);
        for bad in ["0%", "-1%", "1001%", "2", "x%", "", "NaN", "inf", "inf%"] {
            let e = parse_overhead(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().starts_with("--max-overhead "), "{e}");
        }
        let a = agent(&["--select", "pid=1"]).unwrap();
        assert_eq!(a.listen, "127.0.0.1:7077");
        assert_eq!(a.interval, Duration::from_secs(60));
        assert_eq!(a.discover_every, Duration::from_secs(5));
        assert_eq!(a.max_targets, 16);
        assert_eq!(a.data_dir, PathBuf::from("/var/lib/heapbpf"));
        assert_eq!(a.max_overhead, "2%");
        // The selection is required: an agent profiles nothing by surprise.
        assert!(agent(&[]).is_err());
    }

    #[test]
    fn debuginfod_servers_are_checked_and_cached_where_each_front_end_keeps_files() {
        let c = attach(&["1", "--debuginfod", "http://127.0.0.1:8002/"]).unwrap();
        let d = c.debuginfod.expect("a debuginfod config");
        assert_eq!(d.urls, vec!["http://127.0.0.1:8002"]);
        assert!(d.cache_dir.ends_with("heapbpf/debuginfod"), "{d:?}");
        let e = attach(&["1", "--debuginfod", "ftp://x"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().starts_with("--debuginfod ftp://x"), "{e}");
        let a = agent(&[
            "--select",
            "pid=1",
            "--data-dir",
            "/srv/hb",
            "--debuginfod",
            "https://debuginfod.debian.net",
        ])
        .and_then(AgentArgs::into_config)
        .unwrap();
        let d = a.engine.debuginfod.expect("the agent's debuginfod config");
        assert_eq!(d.urls, vec!["https://debuginfod.debian.net"]);
        assert_eq!(d.cache_dir, PathBuf::from("/srv/hb/debuginfod"));
    }

    #[test]
    fn agent_push_flags_are_checked() {
        let cfg = |args: &[&str]| {
            let mut all = vec!["--select", "pid=1"];
            all.extend(args);
            agent(&all).and_then(AgentArgs::into_config)
        };
        let c = cfg(&[
            "--push",
            "http://127.0.0.1:4040/",
            "--push-parca",
            "https://parca.example:7070",
            "--push-header",
            "X-Extra: one",
            "--push-header",
            "X-Other:two",
            "--push-tenant",
            "team-a",
        ])
        .unwrap();
        assert_eq!(c.push.pyroscope.as_deref(), Some("http://127.0.0.1:4040"));
        assert_eq!(c.push.parca.as_deref(), Some("https://parca.example:7070"));
        assert_eq!(
            c.push.headers,
            [
                ("X-Extra".to_string(), "one".to_string()),
                ("X-Other".to_string(), "two".to_string())
            ]
        );
        assert_eq!(c.push.tenant.as_deref(), Some("team-a"));
        assert!(!cfg(&[]).unwrap().push.enabled());
        for (args, starts) in [
            (&["--push", "localhost:4040"][..], "--push localhost:4040"),
            (&["--push-parca", "ftp://x"][..], "--push-parca ftp://x"),
            (
                &["--push", "http://a", "--push-header", "bad"][..],
                "--push-header bad",
            ),
            (
                &["--push", "http://a", "--push-header", "X:\u{1}"][..],
                "--push-header",
            ),
            (
                &["--push", "http://a", "--push-tenant", ""][..],
                "--push-tenant",
            ),
            (
                &["--push-tenant", "t"][..],
                "--push-header, --push-basic-auth and --push-tenant",
            ),
        ] {
            let e = cfg(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(e.to_string().starts_with(starts), "{args:?}: {e}");
        }
    }

    #[test]
    fn the_k8s_rule_needs_kubernetes_which_needs_node_name() {
        use crate::agent::select::Rule;
        let k8s = [Rule::K8s];
        let pid = [Rule::Pid(1)];
        let node = || Some("node-a".to_string());
        assert!(check_kubernetes(false, &pid, None).is_ok());
        assert!(check_kubernetes(true, &k8s, node()).is_ok());
        assert!(check_kubernetes(true, &pid, node()).is_ok(), "labels only");
        let e = check_kubernetes(false, &k8s, node()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().starts_with("--select k8s needs --kubernetes"),
            "{e}"
        );
        for missing in [None, Some(String::new()), Some(" ".into())] {
            let e = check_kubernetes(true, &pid, missing).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(
                e.to_string().starts_with("--kubernetes needs NODE_NAME"),
                "{e}"
            );
        }
        assert!(
            agent(&["--select", "k8s", "--kubernetes"])
                .unwrap()
                .kubernetes
        );
    }

    #[test]
    fn agent_sizes_the_live_block_map_to_sampling() {
        let cfg = |args: &[&str]| {
            let a = agent(args).unwrap();
            // Rules are checked by agent::select; only the sizes matter here.
            (a.sample_bytes, a.max_live_blocks)
        };
        assert_eq!(cfg(&["--select", "pid=1"]).1, None);
        assert_eq!(
            cfg(&["--select", "pid=1", "--max-live-blocks", "4096"]).1,
            Some(4096)
        );
        for (args, bad) in [
            (&["--max-targets", "0"][..], "--max-targets"),
            (&["--listen", "localhost"][..], "--listen localhost"),
            (&["--max-disk", "0"][..], "--max-disk"),
            (&["--discover-every", "0s"][..], "--discover-every"),
            (&["--max-overhead", "0%"][..], "--max-overhead"),
        ] {
            let mut all = vec!["--select", "pid=1"];
            all.extend_from_slice(args);
            let e = agent(&all).unwrap().into_config().unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
