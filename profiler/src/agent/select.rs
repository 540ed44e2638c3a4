//! Which processes the agent profiles: the `--select` rules (`pid=N`,
//! `comm=REGEX`, `exe=GLOB`, `cgroup=GLOB`, `container=ID`, `k8s`), what a
//! process offers them (read from `/proc`, every byte of it the process's
//! own: bounded reads, never trusted), and the container id a cgroup path
//! names (docker, containerd, cri-o, podman; cgroup v1 and v2).
//!
//! Pure but for [`read_process`] and [`pids`]; no engine, no kernel maps.
// INTERFACE (filled in by the selection work; the agent loop uses exactly this):

/// One `--select` rule.
#[derive(Clone, Debug)]
pub enum Rule {
    Pid(u32),
    /// `comm=REGEX`, matched against the whole name (anchored).
    Comm(regex::Regex),
    /// `exe=GLOB` on the executable's path; `*` does not cross `/`.
    Exe(globset::GlobMatcher),
    /// `cgroup=GLOB` on any of the process's cgroup paths (v1 or v2).
    Cgroup(globset::GlobMatcher),
    /// `container=ID`: a container id or a prefix of one.
    Container(String),
    /// Pods annotated `heapbpf.io/profile: "true"` (needs `--kubernetes`).
    K8s,
}

impl Rule {
    /// Parses `KEY=VALUE`; the error names the rule and says what is expected.
    pub fn parse(text: &str) -> Result<Rule, String> {
        // Only `pid=N` until the selection work lands (the budget's test
        // needs it).
        match text.split_once('=') {
            Some(("pid", n)) => n
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|&n| n > 0)
                .map(Rule::Pid)
                .ok_or_else(|| format!("--select {text}: expected pid=N, N a process id")),
            _ => Err(format!("--select {text}: only pid=N is implemented yet")),
        }
    }

    /// Whether `p` matches.
    pub fn matches(&self, p: &Process) -> bool {
        match self {
            Rule::Pid(pid) => p.pid == *pid,
            _ => false,
        }
    }
}

/// What the rules look at, read from `/proc/PID`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    /// `starttime` of `/proc/PID/stat`: a pid reused later is another process.
    pub start_ticks: u64,
    pub comm: String,
    /// The path `/proc/PID/exe` links to ("" when unreadable: kernel threads).
    pub exe: String,
    /// The paths of `/proc/PID/cgroup`, one per hierarchy (v2's `0::/...` included).
    pub cgroups: Vec<String>,
    /// The container id one of them names.
    pub container: Option<String>,
}

/// Reads what the rules need of a process; `None` when it is gone, is a
/// kernel thread, or unreadable.
pub fn read_process(pid: u32) -> Option<Process> {
    // Minimal until the selection work lands: what `pid=N` needs.
    let stat = crate::procfs::read_stat(pid)?;
    let info = crate::procfs::process_info(pid).ok()?;
    Some(Process {
        pid,
        start_ticks: stat.start_ticks,
        comm: info.comm,
        exe: info.exe,
        cgroups: Vec::new(),
        container: None,
    })
}

/// The processes of `/proc` now (numeric entries), in no particular order.
pub fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The container id in a cgroup path, if it names one.
pub fn container_id(cgroup_path: &str) -> Option<String> {
    let _ = cgroup_path;
    None
}
