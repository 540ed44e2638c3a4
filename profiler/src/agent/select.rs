//! Which processes the agent profiles: the `--select` rules (`pid=N`,
//! `comm=REGEX`, `exe=GLOB`, `cgroup=GLOB`, `container=ID`, `k8s`), what a
//! process offers them (read from `/proc`, every byte of it the process's
//! own: bounded reads, never trusted), and the container id a cgroup path
//! names (docker, containerd, cri-o, podman; cgroup v1 and v2).
//!
//! Pure but for [`read_process`] and [`pids`]; no engine, no kernel maps.
use std::{fs, io::Read};

use crate::{lines::escape, procfs};

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
    /// `container=ID`: a container id or a prefix of one (lowercase hex,
    /// [`MIN_CONTAINER_PREFIX`] to 64 digits).
    Container(String),
    /// Pods annotated `heapbpf.io/profile: "true"` (needs `--kubernetes`).
    K8s,
}

/// What every rule error ends with when the rule itself is unknown.
const EXPECTED: &str = "expected pid=N, comm=REGEX, exe=GLOB, cgroup=GLOB, container=ID or k8s";
/// The most memory a compiled `comm=` regex may take: a comm is 15 bytes,
/// no sane pattern for it comes near.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// The shortest container id prefix `container=` takes: shorter ones would
/// select containers by chance (docker prints 12 digits).
pub const MIN_CONTAINER_PREFIX: usize = 4;
/// A container id in full: 64 hex digits (docker, containerd, cri-o, podman).
const CONTAINER_ID_LEN: usize = 64;
/// The most bytes read of `/proc/PID/cgroup` (one line per v1 hierarchy
/// and v2; paths the process's container runtime chose).
const MAX_CGROUP_BYTES: u64 = 64 * 1024;
/// The most bytes read of `/proc/PID/stat` and `/proc/PID/comm`.
const MAX_STAT_BYTES: u64 = 4096;
const MAX_COMM_BYTES: u64 = 64;
/// `PF_KTHREAD` in the flags of `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

impl Rule {
    /// Parses `KEY=VALUE`; the error names the rule and says what is expected.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let bad = |why: &str| format!("--select {}: {why}", escape(text));
        let Some((key, value)) = text.split_once('=') else {
            return match text {
                "k8s" => Ok(Rule::K8s),
                "pid" | "comm" | "exe" | "cgroup" | "container" => {
                    Err(bad(&format!("expected {text}={}", placeholder(text))))
                }
                _ => Err(bad(&format!("unknown rule; {EXPECTED}"))),
            };
        };
        match key {
            "k8s" => return Err(bad("k8s takes no value; write --select k8s")),
            "pid" | "comm" | "exe" | "cgroup" | "container" if value.is_empty() => {
                return Err(bad(&format!(
                    "empty value; expected {key}={}",
                    placeholder(key)
                )))
            }
            _ => {}
        }
        match key {
            "pid" => match value.parse::<u32>() {
                Ok(pid) if pid > 0 => Ok(Rule::Pid(pid)),
                _ => Err(bad("expected pid=N, a process id (a number from 1)")),
            },
            "comm" => comm_regex(value).map(Rule::Comm).map_err(|why| bad(&why)),
            "exe" => path_glob(value).map(Rule::Exe).map_err(|why| bad(&why)),
            "cgroup" => path_glob(value).map(Rule::Cgroup).map_err(|why| bad(&why)),
            "container" => container_prefix(value)
                .map(Rule::Container)
                .map_err(|why| bad(&why)),
            _ => Err(bad(&format!("unknown rule; {EXPECTED}"))),
        }
    }

    /// Whether `p` matches.
    pub fn matches(&self, p: &Process) -> bool {
        match self {
            Rule::Pid(pid) => p.pid == *pid,
            Rule::Comm(re) => re.is_match(&p.comm),
            // A process without an executable (unreadable link) is never
            // selected by its path. A replaced binary reads "PATH (deleted)":
            // still the program that path named.
            Rule::Exe(glob) => {
                !p.exe.is_empty()
                    && (glob.is_match(&p.exe)
                        || p.exe
                            .strip_suffix(" (deleted)")
                            .is_some_and(|e| glob.is_match(e)))
            }
            Rule::Cgroup(glob) => p.cgroups.iter().any(|c| glob.is_match(c)),
            Rule::Container(prefix) => p
                .container
                .as_deref()
                .is_some_and(|id| id.starts_with(prefix.as_str())),
            // Decided with pod metadata, which a process does not carry.
            Rule::K8s => false,
        }
    }
}

fn placeholder(key: &str) -> &'static str {
    match key {
        "pid" => "N",
        "comm" => "REGEX",
        "exe" | "cgroup" => "GLOB",
        _ => "ID",
    }
}

/// `comm=REGEX`: the whole name must match. The pattern is compiled alone
/// first, so that `a)|(b` cannot escape the anchors it is then put between.
fn comm_regex(pattern: &str) -> Result<regex::Regex, String> {
    let build = |p: &str| {
        regex::RegexBuilder::new(p)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
    };
    build(pattern).map_err(|e| regex_error(&e))?;
    build(&format!("^(?:{pattern})$")).map_err(|e| regex_error(&e))
}

/// A regex error on one line: the crate's own is several, with the
/// pattern and a caret.
fn regex_error(e: &regex::Error) -> String {
    let why = match e {
        regex::Error::Syntax(text) => text
            .lines()
            .find_map(|l| l.strip_prefix("error: "))
            .unwrap_or_else(|| text.lines().last().unwrap_or("syntax error"))
            .to_string(),
        regex::Error::CompiledTooBig(limit) => {
            format!("it compiles to more than the {limit}-byte limit; simplify it")
        }
        other => other.to_string().replace('\n', " "),
    };
    format!(
        "not a valid regular expression ({}); expected comm=REGEX, matched against the whole name",
        escape(&why)
    )
}

/// `exe=GLOB`, `cgroup=GLOB`: on a whole absolute path, `*` within one
/// component, `**` across them.
fn path_glob(glob: &str) -> Result<globset::GlobMatcher, String> {
    // A glob starting with a plain name (`python3`) could never match an
    // absolute path: refused rather than selecting nothing, silently.
    if glob
        .chars()
        .next()
        .is_some_and(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '_' | '~'))
    {
        return Err(
            "the glob is matched against a whole path, which starts with / (e.g. /usr/bin/app or **/app)"
                .into(),
        );
    }
    globset::GlobBuilder::new(glob)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| {
            format!(
                "not a valid glob ({}); * stays within a path component, ** crosses them",
                escape(&e.kind().to_string())
            )
        })
}

/// `container=ID`: hex digits, lowercased; also as Kubernetes writes it
/// in a pod's status (`containerd://ID`, `docker://ID`, `cri-o://ID`).
fn container_prefix(value: &str) -> Result<String, String> {
    let id = value.split_once("://").map_or(value, |(_, id)| id);
    if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "expected container=ID, hex digits (a container id or its first {MIN_CONTAINER_PREFIX} or more)"
        ));
    }
    if id.len() < MIN_CONTAINER_PREFIX || id.len() > CONTAINER_ID_LEN {
        return Err(format!(
            "expected container=ID, {MIN_CONTAINER_PREFIX} to {CONTAINER_ID_LEN} hex digits (the id or a prefix of it; docker shows 12)"
        ));
    }
    Ok(id.to_ascii_lowercase())
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

/// At most `limit` bytes of a `/proc` file.
fn read_bounded(path: &str, limit: u64) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    fs::File::open(path)
        .ok()?
        .take(limit)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

/// Reads what the rules need of a process; `None` when it is gone, is a
/// kernel thread, a zombie, or unreadable.
pub fn read_process(pid: u32) -> Option<Process> {
    let stat = read_bounded(&format!("/proc/{pid}/stat"), MAX_STAT_BYTES)?;
    let stat = String::from_utf8_lossy(&stat);
    let figures = procfs::parse_stat(&stat)?;
    if matches!(figures.state, 'Z' | 'X') || stat_flags(&stat)? & PF_KTHREAD != 0 {
        return None;
    }
    let comm = read_bounded(&format!("/proc/{pid}/comm"), MAX_COMM_BYTES)?;
    let comm = String::from_utf8_lossy(comm.strip_suffix(b"\n").unwrap_or(&comm)).into_owned();
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .map(|l| l.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cgroup = read_bounded(&format!("/proc/{pid}/cgroup"), MAX_CGROUP_BYTES).unwrap_or_default();
    let cgroups = parse_cgroup(&String::from_utf8_lossy(&cgroup));
    let container = cgroups.iter().find_map(|c| container_id(c));
    Some(Process {
        pid,
        start_ticks: figures.start_ticks,
        comm,
        exe,
        cgroups,
        container,
    })
}

/// `flags` of `/proc/PID/stat` (field 9 of proc(5)), counted from the last
/// `)` as the name may hold anything.
fn stat_flags(stat: &str) -> Option<u64> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(6)?
        .parse()
        .ok()
}

/// The paths of `/proc/PID/cgroup` (`ID:CONTROLLERS:PATH` lines; the path
/// may hold `:` itself). Malformed lines are skipped; a path seen twice
/// (v1 hierarchies often share one) is kept once.
pub fn parse_cgroup(text: &str) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if !path.starts_with('/') || paths.iter().any(|p| p == path) {
            continue;
        }
        paths.push(path.to_string());
    }
    paths
}

/// The processes of `/proc` now (numeric entries), in no particular order.
pub fn pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid > 0)
        .collect()
}

/// The container id in a cgroup path, if it names one: 64 hex digits,
/// lowercased, from the deepest path component that holds one as
/// - the whole component: cgroupfs drivers (`/docker/ID`,
///   `/kubepods/burstable/podUID/ID`, `/actions_job/ID`);
/// - a systemd scope `RUNTIME-ID.scope`, `RUNTIME` one of `docker`,
///   `cri-containerd`, `crio`, `libpod` (`/system.slice/docker-ID.scope`,
///   `.../kubepods-burstable-podUID.slice/cri-containerd-ID.scope`,
///   `/machine.slice/libpod-ID.scope`, podman's `.../libpod-ID.scope/container`),
///   or the same without `.scope` with the cgroupfs driver
///   (`/libpod_parent/PODID/libpod-ID`, `/kubepods/burstable/podUID/crio-ID`);
/// - containerd's systemd form `SLICE:cri-containerd:ID`.
///
/// The monitors of a container (`libpod-conmon-ID.scope`,
/// `crio-conmon-ID.scope`) name no container: they are not in it.
pub fn container_id(cgroup_path: &str) -> Option<String> {
    cgroup_path
        .split('/')
        .rev()
        .find_map(component_container_id)
}

/// Runtimes whose systemd scopes are `RUNTIME-ID.scope`.
const SCOPE_PREFIXES: [&str; 5] = [
    "docker-",
    "cri-containerd-",
    "crio-",
    "libpod-",
    "containerd-",
];

fn component_container_id(component: &str) -> Option<String> {
    if is_container_id(component) {
        return Some(component.to_ascii_lowercase());
    }
    // `RUNTIME-ID.scope` (systemd), or `RUNTIME-ID` as podman and CRI-O
    // name it with the cgroupfs driver.
    let scope = component.strip_suffix(".scope").unwrap_or(component);
    if let Some(id) = SCOPE_PREFIXES
        .iter()
        .filter_map(|p| scope.strip_prefix(p))
        .find(|id| is_container_id(id))
    {
        return Some(id.to_ascii_lowercase());
    }
    // SLICE:RUNTIME:ID, as containerd names a container's cgroup with the
    // systemd driver.
    let mut parts = component.rsplitn(3, ':');
    let (Some(id), Some(runtime), Some(slice)) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    (slice.ends_with(".slice")
        && matches!(runtime, "cri-containerd" | "docker" | "crio")
        && is_container_id(id))
    .then(|| id.to_ascii_lowercase())
}

fn is_container_id(s: &str) -> bool {
    s.len() == CONTAINER_ID_LEN && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f5c1b2a9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b";
    const UID: &str = "8d7c3e2a-1b4f-4c5d-9e6f-0a1b2c3d4e5f";
    const UID_: &str = "8d7c3e2a_1b4f_4c5d_9e6f_0a1b2c3d4e5f";
    /// A podman pod's id (its cgroup's parent, also 64 hex digits).
    const INFRA: &str = "e634d92658e6805d3774de8fc6399e1b1de834e276bfcbf7438efda6adedc15b";

    fn process() -> Process {
        Process {
            pid: 4242,
            start_ticks: 1000,
            comm: "redis-server".into(),
            exe: "/usr/bin/redis-server".into(),
            cgroups: vec![
                format!("/kubepods/burstable/pod{UID}/{ID}"),
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            ],
            container: Some(ID.into()),
        }
    }

    fn matches(rule: &str, p: &Process) -> bool {
        Rule::parse(rule)
            .unwrap_or_else(|e| panic!("{rule}: {e}"))
            .matches(p)
    }

    #[test]
    fn container_ids_of_every_runtime_and_driver() {
        let cases = [
            format!("/docker/{ID}"),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            format!("/kubepods/pod{UID}/{ID}"),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"),
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{ID}.scope"),
            format!("/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{ID}"),
            format!("/machine.slice/libpod-{ID}.scope"),
            format!("/libpod_parent/{INFRA}/libpod-{ID}"),
            format!("/kubepods/burstable/pod{UID}/crio-{ID}"),
            format!("/machine.slice/libpod-{ID}.scope/container"),
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"),
            format!("/actions_job/{ID}"),
            format!("/system.slice/containerd-{ID}.scope"),
        ];
        for path in &cases {
            assert_eq!(container_id(path).as_deref(), Some(ID), "{path}");
        }
    }

    #[test]
    fn container_ids_are_lowercased() {
        let upper = ID.to_ascii_uppercase();
        assert_eq!(
            container_id(&format!("/docker/{upper}")).as_deref(),
            Some(ID)
        );
    }

    #[test]
    fn the_innermost_container_wins() {
        let inner = "a".repeat(64);
        assert_eq!(
            container_id(&format!("/docker/{ID}/docker/{inner}")),
            Some(inner)
        );
    }

    #[test]
    fn paths_that_name_no_container() {
        let cases = [
            "/".to_string(),
            String::new(),
            "/user.slice/user-1000.slice/session-2.scope".into(),
            "/system.slice/ssh.service".into(),
            "/system.slice/docker.service".into(),
            "/init.scope".into(),
            format!("/kubepods/burstable/pod{UID}"),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"),
            format!("/machine.slice/libpod-conmon-{ID}.scope"),
            format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{ID}.scope"),
            "/lxc.payload.x".into(),
            "/lxc.payload.web/init.scope".into(),
            // One digit short, one too many, not hex.
            format!("/docker/{}", &ID[1..]),
            format!("/docker/{ID}0"),
            format!("/docker/{}g", &ID[1..]),
            format!("/system.slice/docker-{ID}.service"),
            format!("/system.slice/unknown-{ID}.scope"),
            format!("/a.slice:notaruntime:{ID}"),
            format!("/nota-slice:cri-containerd:{ID}"),
            // Junk a process cannot write but a test should survive.
            "::::".into(),
            "/\u{0}/é/.scope/:".into(),
        ];
        for path in &cases {
            assert_eq!(container_id(path), None, "{path:?}");
        }
    }

    #[test]
    fn cgroup_files_of_v1_and_v2() {
        let text = format!(
            "12:pids:/docker/{ID}\n\
             11:memory:/docker/{ID}\n\
             1:name=systemd:/docker/{ID}\n\
             0::/system.slice/containerd.service/kubepods-pod{UID_}.slice:cri-containerd:{ID}\n\
             junk\n\
             2:cpu\n\
             3:cpu:relative\n"
        );
        assert_eq!(
            parse_cgroup(&text),
            vec![
                format!("/docker/{ID}"),
                format!(
                    "/system.slice/containerd.service/kubepods-pod{UID_}.slice:cri-containerd:{ID}"
                ),
            ]
        );
        assert_eq!(parse_cgroup("0::/\n"), vec!["/".to_string()]);
        assert!(parse_cgroup("").is_empty());
    }

    #[test]
    fn stat_flags_after_a_hostile_name() {
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 9 0 0";
        assert_eq!(stat_flags(kthread).map(|f| f & PF_KTHREAD != 0), Some(true));
        let user = "77 (a) S 1 (b) R) S 1 77 77 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 9 0 0";
        assert_eq!(stat_flags(user).map(|f| f & PF_KTHREAD != 0), Some(false));
        assert_eq!(stat_flags("no parenthesis"), None);
        assert_eq!(stat_flags("1 (x) S 1 2"), None);
    }

    #[test]
    fn pid_rules() {
        let p = process();
        assert!(matches("pid=4242", &p));
        assert!(!matches("pid=4243", &p));
        for bad in ["pid=0", "pid=-1", "pid=x", "pid=4294967296", "pid= 1"] {
            let e = Rule::parse(bad).unwrap_err();
            assert!(e.starts_with(&format!("--select {bad}: ")), "{e}");
            assert!(e.contains("expected pid=N"), "{e}");
        }
    }

    #[test]
    fn comm_rules_match_the_whole_name() {
        let p = process();
        assert!(matches("comm=redis-server", &p));
        assert!(matches("comm=redis.*", &p));
        assert!(matches("comm=nginx|redis-server", &p));
        assert!(!matches("comm=redis", &p), "anchored at the end");
        assert!(!matches("comm=server", &p), "anchored at the start");
        assert!(
            !matches("comm=nginx|redis", &p),
            "alternatives anchored too"
        );
        assert!(matches("comm=(?i)REDIS-SERVER", &p));
    }

    #[test]
    fn comm_rules_cannot_escape_their_anchors() {
        // As `^(?:a)|(b)$` it would match any name starting with "a".
        let e = Rule::parse("comm=a)|(b").unwrap_err();
        assert!(
            e.starts_with("--select comm=a)|(b: not a valid regular expression ("),
            "{e}"
        );
    }

    #[test]
    fn comm_rule_errors_are_one_line() {
        let e = Rule::parse("comm=[").unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.starts_with(
                "--select comm=[: not a valid regular expression (unclosed character class)"
            ),
            "{e}"
        );
        let e = Rule::parse("comm=a{1000}{1000}{1000}").unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("limit"), "{e}");
        let e = Rule::parse("comm=\n[").unwrap_err();
        assert!(e.starts_with("--select comm=\\n[: "), "escaped: {e}");
    }

    #[test]
    fn exe_rules_on_the_whole_path() {
        let mut p = process();
        assert!(matches("exe=/usr/bin/redis-server", &p));
        assert!(matches("exe=/usr/bin/redis-*", &p));
        assert!(matches("exe=**/redis-server", &p));
        assert!(matches("exe=/usr/**", &p));
        assert!(matches("exe=/usr/bin/{nginx,redis-server}", &p));
        assert!(!matches("exe=/usr/*", &p), "* does not cross /");
        assert!(!matches("exe=/usr/bin/redis", &p));
        p.exe = "/usr/bin/redis-server (deleted)".into();
        assert!(
            matches("exe=/usr/bin/redis-server", &p),
            "a replaced binary"
        );
        p.exe = String::new();
        assert!(!matches("exe=**", &p), "no executable, no match");
        assert!(!matches("exe=*", &p));
    }

    #[test]
    fn cgroup_rules_on_any_path() {
        let p = process();
        assert!(matches("cgroup=/kubepods/*/pod*/*", &p));
        assert!(matches("cgroup=/kubepods.slice/**/*.scope", &p));
        assert!(!matches("cgroup=/kubepods/*", &p), "* does not cross /");
        assert!(!matches("cgroup=/docker/*", &p));
        let mut root = process();
        root.cgroups = vec!["/".into()];
        assert!(matches("cgroup=/", &root));
        root.cgroups.clear();
        assert!(!matches("cgroup=**", &root));
    }

    #[test]
    fn glob_errors() {
        let e = Rule::parse("exe=/usr/[").unwrap_err();
        assert!(
            e.starts_with("--select exe=/usr/[: not a valid glob ("),
            "{e}"
        );
        let e = Rule::parse("exe=python3").unwrap_err();
        assert!(e.contains("starts with /"), "{e}");
        let e = Rule::parse("cgroup=kubepods/*").unwrap_err();
        assert!(e.starts_with("--select cgroup=kubepods/*: "), "{e}");
    }

    #[test]
    fn container_rules_by_id_or_prefix() {
        let p = process();
        assert!(matches(&format!("container={ID}"), &p));
        assert!(matches(&format!("container={}", &ID[..12]), &p));
        assert!(matches(&format!("container={}", &ID[..4]), &p));
        assert!(matches(
            &format!("container={}", ID[..12].to_ascii_uppercase()),
            &p
        ));
        assert!(matches(&format!("container=containerd://{ID}"), &p));
        assert!(!matches("container=ffff", &p));
        let mut none = process();
        none.container = None;
        assert!(!matches(&format!("container={ID}"), &none));
        for bad in [
            "container=abc",
            "container=xyz123",
            &format!("container={ID}0"),
        ] {
            let e = Rule::parse(bad).unwrap_err();
            assert!(
                e.starts_with(&format!("--select {bad}: expected container=ID")),
                "{e}"
            );
        }
    }

    #[test]
    fn k8s_rule() {
        assert!(matches!(Rule::parse("k8s"), Ok(Rule::K8s)));
        assert!(!matches("k8s", &process()));
        let e = Rule::parse("k8s=true").unwrap_err();
        assert!(e.contains("takes no value"), "{e}");
    }

    #[test]
    fn unknown_and_incomplete_rules() {
        assert_eq!(
            Rule::parse("foo=1").unwrap_err(),
            "--select foo=1: unknown rule; expected pid=N, comm=REGEX, exe=GLOB, cgroup=GLOB, container=ID or k8s"
        );
        assert_eq!(
            Rule::parse("redis").unwrap_err(),
            "--select redis: unknown rule; expected pid=N, comm=REGEX, exe=GLOB, cgroup=GLOB, container=ID or k8s"
        );
        assert_eq!(
            Rule::parse("comm").unwrap_err(),
            "--select comm: expected comm=REGEX"
        );
        assert_eq!(
            Rule::parse("exe=").unwrap_err(),
            "--select exe=: empty value; expected exe=GLOB"
        );
        assert!(Rule::parse("PID=1").is_err(), "keys are lowercase");
        let e = Rule::parse("\u{1b}[2J=1").unwrap_err();
        assert!(e.starts_with("--select \\x1b[2J=1: "), "escaped: {e}");
    }

    #[test]
    fn reads_its_own_process() {
        let pid = std::process::id();
        let p = read_process(pid).expect("own process");
        assert_eq!(p.pid, pid);
        assert_eq!(
            Some(p.start_ticks),
            procfs::read_stat(pid).map(|s| s.start_ticks)
        );
        assert!(!p.comm.is_empty() && !p.comm.ends_with('\n'));
        assert_eq!(p.exe, std::env::current_exe().unwrap().to_string_lossy());
        assert!(!p.cgroups.is_empty(), "every process is in a cgroup");
        assert!(pids().contains(&pid));
    }

    #[test]
    fn no_process_behind_an_unused_pid() {
        // Above pid_max (at most 2^22): never a process.
        assert_eq!(read_process(u32::MAX), None);
    }
}
