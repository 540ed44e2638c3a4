//! `heapbpf agent` finding its targets: the `--select` rules against real
//! processes started before and after the agent, real cgroups the tests
//! create (a cgroup v2 kubepods path, a v1 docker one); a target's exit,
//! exec and pid reuse; `--max-targets`. Seen through the agent's stderr
//! lines and its snapshot files only.
//!
//! Other tests on the machine may run the same fixtures at the same time:
//! each test runs its fixtures under a name of its own (a symlink, which
//! `comm` follows) and its cgroups carry fresh random ids, so that a rule
//! never picks another test's processes.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use heapbpf_integration_tests::*;

/// Several discovery rounds of the agent (`--discover-every 200ms`).
const ROUNDS: Duration = Duration::from_millis(1200);
/// How soon a process started after the agent must be attached: a round
/// of discovery and an attach, with room for a loaded machine.
const PICKED_UP_WITHIN: Duration = Duration::from_secs(10);

/// A name of 15 bytes at most (what `comm` holds), unique to this test run.
fn unique_comm(tag: &str) -> String {
    assert!(tag.len() <= 8);
    format!("{tag}{}", std::process::id() % 10_000_000)
}

/// `fixture` run through a symlink called `comm` in `dir`: its comm is that
/// name, its executable the fixture's.
fn link_as(dir: &Path, fixture: &str, comm: &str) -> PathBuf {
    let link = dir.join(comm);
    if !link.exists() {
        std::os::unix::fs::symlink(fixture_path(fixture), &link).unwrap();
    }
    link
}

/// The `allocs` fixture under another name.
fn allocs_as(dir: &Path, comm: &str) -> Fixture {
    let mut cmd = Command::new(link_as(dir, "allocs", comm));
    let fx = Fixture::from_command(&mut cmd, |child, _| child.id());
    assert_eq!(
        fs::read_to_string(format!("/proc/{}/comm", fx.pid)).unwrap(),
        format!("{comm}\n")
    );
    fx
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

/// `site_malloc_freed`: 4 threads of 20 blocks of 64 bytes, each freed.
fn site_malloc_freed(runs: u64) -> Site {
    Site {
        live_bytes: 0,
        live_allocations: 0,
        allocated_bytes: 5_120 * runs,
        allocations: 80 * runs,
    }
}

fn assert_allocs(snapshot: &Value, pid: u32, trigger: &str, runs: u64) {
    assert_eq!(snapshot["pid"], pid, "{snapshot:#}");
    assert_eq!(snapshot["trigger"], trigger);
    assert_eq!(site(snapshot, "site_malloc"), site_malloc(runs), "{pid}");
    assert_eq!(
        site(snapshot, "site_malloc_freed"),
        site_malloc_freed(runs),
        "{pid}"
    );
    assert_eq!(snapshot["totals"]["dropped_events"], 0);
}

fn stop_agent(h: &mut Heapbpf) {
    h.signal(libc::SIGTERM);
    let status = h.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", h.stderr.join("\n"));
}

/// A process matching `comm=` is picked up whether it was there before the
/// agent or started after it (within a few `--discover-every`); one whose
/// name only starts like it is left alone. SIGUSR2 snapshots every target,
/// SIGTERM ends with a `stop` snapshot of each and exit 0.
#[test]
fn comm_rule_selects_processes_started_before_and_after_the_agent() {
    require_root();
    let dir = TempDir::new("agent-comm");
    let comm = unique_comm("acomm");
    let mut before = allocs_as(dir.path(), &comm);
    // Anchored: a longer name is another one.
    let other = allocs_as(dir.path(), &format!("{comm}x"));
    let data = dir.path().join("data");
    let (mut h, _) = Heapbpf::agent(&data, &["--select", &format!("comm={comm}")]);
    let line = h.wait_attached(before.pid);
    assert_eq!(
        lines::parse_attached(&line),
        Some((before.pid, comm.as_str()))
    );
    let started = Instant::now();
    let mut after = allocs_as(dir.path(), &comm);
    h.wait_attached(after.pid);
    assert!(
        started.elapsed() < PICKED_UP_WITHIN,
        "picked up after {:?}",
        started.elapsed()
    );
    before.command("run");
    after.command("run");
    after.command("run");
    h.gather(ROUNDS);
    h.signal(libc::SIGUSR2);
    let b = h.wait_snapshot("signal", before.pid);
    let a = h.wait_snapshot("signal", after.pid);
    assert!(b[0].starts_with(&data), "snapshots go to --data-dir: {b:?}");
    assert_allocs(&read_json(&b[0]), before.pid, "signal", 1);
    assert_allocs(&read_json(&a[0]), after.pid, "signal", 2);
    after.command("run");
    h.signal(libc::SIGTERM);
    let b = h.wait_snapshot("stop", before.pid);
    let a = h.wait_snapshot("stop", after.pid);
    assert_allocs(&read_json(&b[0]), before.pid, "stop", 1);
    assert_allocs(&read_json(&a[0]), after.pid, "stop", 3);
    assert_eq!(h.wait_exit().code(), Some(0), "{}", h.stderr.join("\n"));
    assert_eq!(h.attached_count(other.pid), 0, "{}", h.stderr.join("\n"));
    assert_eq!(h.attached_count(before.pid), 1);
    assert_eq!(h.attached_count(after.pid), 1);
}

/// `exe=` selects by the executable's real path: a copy of the fixture in a
/// directory of the test's own is picked, the fixture itself is not.
#[test]
fn exe_rule_selects_by_the_executable_path() {
    require_root();
    let dir = TempDir::new("agent-exe");
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let copy = bin.join("allocs");
    fs::copy(fixture_path("allocs"), &copy).unwrap();
    let mut inside = Fixture::from_command(&mut Command::new(&copy), |c, _| c.id());
    // Same name, another executable.
    let outside = allocs_as(dir.path(), "allocs");
    let glob = format!("exe={}/*", bin.display());
    let (mut h, _) = Heapbpf::agent(&dir.path().join("data"), &["--select", &glob]);
    h.wait_attached(inside.pid);
    inside.command("run");
    h.gather(ROUNDS);
    h.signal(libc::SIGTERM);
    let s = h.wait_snapshot("stop", inside.pid);
    assert_allocs(&read_json(&s[0]), inside.pid, "stop", 1);
    assert_eq!(h.wait_exit().code(), Some(0), "{}", h.stderr.join("\n"));
    assert_eq!(h.attached_count(outside.pid), 0, "{}", h.stderr.join("\n"));
}

/// A target that exits gets its `exit` snapshot (exact figures); the agent,
/// with no target left, runs on and picks up the next matching process.
#[test]
fn a_target_that_exits_gets_its_snapshot_and_the_agent_runs_on() {
    require_root();
    let dir = TempDir::new("agent-exit");
    let comm = unique_comm("aexit");
    let mut fx = allocs_as(dir.path(), &comm);
    let (mut h, _) = Heapbpf::agent(
        &dir.path().join("data"),
        &["--select", &format!("comm={comm}")],
    );
    h.wait_attached(fx.pid);
    fx.command("run");
    fx.command("exit");
    assert!(fx.wait_exit().success());
    let s = h.wait_snapshot("exit", fx.pid);
    assert_allocs(&read_json(&s[0]), fx.pid, "exit", 1);
    h.gather(ROUNDS);
    assert!(
        h.child.try_wait().unwrap().is_none(),
        "the agent runs on without targets: {}",
        h.stderr.join("\n")
    );
    let mut next = allocs_as(dir.path(), &comm);
    h.wait_attached(next.pid);
    next.command("run");
    h.signal(libc::SIGTERM);
    let s = h.wait_snapshot("stop", next.pid);
    assert_allocs(&read_json(&s[0]), next.pid, "stop", 1);
    assert_eq!(h.wait_exit().code(), Some(0), "{}", h.stderr.join("\n"));
    assert_eq!(
        count_snapshot_lines(&h.stderr, Some("stop")),
        1,
        "no stop snapshot of the target that left: {}",
        h.stderr.join("\n")
    );
}

/// `--max-targets 1` with two matching processes: one is profiled, the
/// other waits through several discovery rounds and gets the slot once the
/// first exits.
#[test]
fn max_targets_makes_the_rest_wait_for_a_free_slot() {
    require_root();
    let dir = TempDir::new("agent-max");
    let comm = unique_comm("amax");
    let a = allocs_as(dir.path(), &comm);
    let b = allocs_as(dir.path(), &comm);
    let (mut h, _) = Heapbpf::agent(
        &dir.path().join("data"),
        &["--select", &format!("comm={comm}"), "--max-targets", "1"],
    );
    let line = h.wait_for("one attached line", |l| {
        lines::parse_attached(l).is_some_and(|(p, _)| p == a.pid || p == b.pid)
    });
    let (first_pid, _) = lines::parse_attached(&line).unwrap();
    let (mut first, mut second) = if first_pid == a.pid { (a, b) } else { (b, a) };
    h.gather(ROUNDS);
    assert_eq!(
        h.attached_count(second.pid),
        0,
        "one target at most: {}",
        h.stderr.join("\n")
    );
    first.command("run");
    first.command("exit");
    assert!(first.wait_exit().success());
    let s = h.wait_snapshot("exit", first.pid);
    assert_allocs(&read_json(&s[0]), first.pid, "exit", 1);
    h.wait_attached(second.pid);
    second.command("run");
    h.signal(libc::SIGTERM);
    let s = h.wait_snapshot("stop", second.pid);
    // Counted from its own attach: the run of the first is not in it.
    assert_allocs(&read_json(&s[0]), second.pid, "stop", 1);
    assert_eq!(h.wait_exit().code(), Some(0), "{}", h.stderr.join("\n"));
}

/// A selected target that execs: the old image's `exec` snapshot with its
/// exact figures, the new image hooked (an `attached` line naming it) and
/// profiled on under the same pid — though its new name no longer matches
/// the rule — and not attached a second time by discovery.
#[test]
fn a_target_that_execs_is_followed_into_its_new_image() {
    require_root();
    let dir = TempDir::new("agent-exec");
    let comm = unique_comm("aexec");
    let mut cmd = Command::new(link_as(dir.path(), "exec_a", &comm));
    cmd.arg("--wait").arg(fixture_path("exec_b"));
    let mut fx = Fixture::from_command(&mut cmd, |child, _| child.id());
    let pid = fx.pid;
    let (mut h, _) = Heapbpf::agent(
        &dir.path().join("data"),
        &["--select", &format!("comm={comm}"), "--format", "json"],
    );
    h.wait_attached(pid);
    fx.ask("go");
    fx.ask("exec");
    let old = read_json(&h.wait_snapshot("exec", pid)[0]);
    assert_eq!(old["trigger"], "exec");
    assert_eq!(old["comm"], comm.as_str());
    assert_eq!(
        site(&old, "a_keep"),
        Site {
            live_bytes: 10_000,
            live_allocations: 10,
            allocated_bytes: 10_000,
            allocations: 10
        }
    );
    assert_eq!(
        site(&old, "a_gone"),
        Site {
            live_bytes: 0,
            live_allocations: 0,
            allocated_bytes: 5_000,
            allocations: 5
        }
    );
    let line = h.wait_for("attached line of the new image", |l| {
        lines::parse_attached(l).is_some_and(|(p, c)| p == pid && c == "exec_b")
    });
    assert!(line.contains(" probes in "), "{line}");
    h.gather(ROUNDS);
    h.signal(libc::SIGUSR2);
    let new = read_json(&h.wait_snapshot("signal", pid)[0]);
    assert_eq!(new["comm"], "exec_b");
    let b_keep = Site {
        live_bytes: 21_000,
        live_allocations: 7,
        allocated_bytes: 21_000,
        allocations: 7,
    };
    assert_eq!(site(&new, "b_keep"), b_keep, "{new:#}");
    assert_eq!(
        site(&new, "a_keep"),
        Site::default(),
        "none of the old image"
    );
    fx.send("exit");
    assert_eq!(fx.wait_exit().code(), Some(4));
    let last = read_json(&h.wait_snapshot("exit", pid)[0]);
    assert_eq!(site(&last, "b_keep"), b_keep);
    stop_agent(&mut h);
    assert_eq!(
        h.attached_count(pid),
        2,
        "the first image and the new one, once each: {}",
        h.stderr.join("\n")
    );
}

/// A new process given the pid of a target that exited is a new target: a
/// second `attached` line for the pid, and figures of its own only. The pid
/// is handed out again through `ns_last_pid`; another process of the
/// machine may take it first, so the fork is tried a few times.
#[test]
fn a_reused_pid_is_a_new_target() {
    require_root();
    let dir = TempDir::new("agent-reuse");
    let comm = unique_comm("areuse");
    let mut old = allocs_as(dir.path(), &comm);
    let pid = old.pid;
    let (mut h, _) = Heapbpf::agent(
        &dir.path().join("data"),
        &["--select", &format!("comm={comm}")],
    );
    h.wait_attached(pid);
    old.command("run");
    old.command("exit");
    assert!(old.wait_exit().success());
    drop(old);
    let s = h.wait_snapshot("exit", pid);
    assert_allocs(&read_json(&s[0]), pid, "exit", 1);
    let mut new = allocs_with_pid(dir.path(), &comm, pid);
    h.wait_attached(pid);
    new.command("run");
    new.command("run");
    h.signal(libc::SIGUSR2);
    let s = h.wait_snapshot("signal", pid);
    assert_allocs(&read_json(&s[0]), pid, "signal", 2);
    new.command("exit");
    assert!(new.wait_exit().success());
    let s = h.wait_snapshot("exit", pid);
    assert_allocs(&read_json(&s[0]), pid, "exit", 2);
    stop_agent(&mut h);
    assert_eq!(h.attached_count(pid), 2, "{}", h.stderr.join("\n"));
}

/// `allocs` under `comm` with the pid `pid`, by setting the pid namespace's
/// last pid just before the fork.
fn allocs_with_pid(dir: &Path, comm: &str, pid: u32) -> Fixture {
    const ATTEMPTS: usize = 50;
    for _ in 0..ATTEMPTS {
        fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let fx = allocs_as(dir, comm);
        if fx.pid == pid {
            return fx;
        }
    }
    panic!("pid {pid} went to other processes {ATTEMPTS} times in a row");
}

const CGROUP_V2: &str = "/sys/fs/cgroup/unified";
/// A v1 hierarchy whose limits a test process never reaches.
const CGROUP_V1_PIDS: &str = "/sys/fs/cgroup/pids";

/// Cgroups a test made, under `root`: processes moved back to the root and
/// the directories removed when dropped, however the test ends.
struct Cgroups {
    root: PathBuf,
    /// The directories created, outermost first.
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

/// 64 fresh hex digits, as a container id.
fn random_container_id() -> String {
    let mut id = String::new();
    while id.len() < 64 {
        let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
        id.extend(uuid.trim().chars().filter(|c| *c != '-'));
    }
    id.truncate(64);
    id
}

fn random_uuid() -> String {
    fs::read_to_string("/proc/sys/kernel/random/uuid")
        .unwrap()
        .trim()
        .to_string()
}

/// One agent with `rule`: `inside` is attached and profiled (exact
/// figures of a run since the attach), `outside` is never attached.
fn selects_only(rule: &str, data: &Path, inside: &mut Fixture, outside: &Fixture) {
    let (mut h, _) = Heapbpf::agent(data, &["--select", rule]);
    h.wait_attached(inside.pid);
    inside.command("run");
    h.gather(ROUNDS);
    h.signal(libc::SIGTERM);
    let s = h.wait_snapshot("stop", inside.pid);
    assert_allocs(&read_json(&s[0]), inside.pid, "stop", 1);
    assert_eq!(h.wait_exit().code(), Some(0), "{}", h.stderr.join("\n"));
    assert_eq!(
        h.attached_count(outside.pid),
        0,
        "--select {rule}: {}",
        h.stderr.join("\n")
    );
    assert_eq!(count_snapshot_lines(&h.stderr, Some("stop")), 1);
}

/// A process in a cgroup v2 path as the kubelet's cgroupfs driver makes
/// them (`/kubepods/burstable/podUID/ID`) is selected by its container id's
/// first 12 digits, and by a cgroup glob; a process outside is not.
#[test]
fn container_and_cgroup_rules_on_a_cgroup_v2_kubepods_path() {
    require_root();
    let dir = TempDir::new("agent-cg2");
    let id = random_container_id();
    let path = format!("/kubepods/burstable/pod{}/{id}", random_uuid());
    let cgroups = Cgroups::create(CGROUP_V2, &path);
    let mut inside = Fixture::spawn("allocs");
    let outside = Fixture::spawn("allocs");
    cgroups.enter(inside.pid);
    let cgroup = fs::read_to_string(format!("/proc/{}/cgroup", inside.pid)).unwrap();
    assert!(
        cgroup.lines().any(|l| l == format!("0::{path}")),
        "{cgroup}"
    );
    selects_only(
        &format!("container={}", &id[..12]),
        &dir.path().join("a"),
        &mut inside,
        &outside,
    );
    selects_only(
        "cgroup=/kubepods/*/pod*/*",
        &dir.path().join("b"),
        &mut inside,
        &outside,
    );
    drop(inside);
    drop(cgroups);
}

/// The same on a cgroup v1 hierarchy (`pids`) with docker's cgroupfs path
/// `/docker/ID`: the full id in capitals selects it too.
#[test]
fn container_and_cgroup_rules_on_a_cgroup_v1_docker_path() {
    require_root();
    let dir = TempDir::new("agent-cg1");
    let id = random_container_id();
    let path = format!("/docker/{id}");
    let cgroups = Cgroups::create(CGROUP_V1_PIDS, &path);
    let mut inside = Fixture::spawn("allocs");
    let outside = Fixture::spawn("allocs");
    cgroups.enter(inside.pid);
    let cgroup = fs::read_to_string(format!("/proc/{}/cgroup", inside.pid)).unwrap();
    assert!(
        cgroup
            .lines()
            .any(|l| l.ends_with(&format!(":pids:{path}"))),
        "{cgroup}"
    );
    selects_only(
        &format!("container={}", id.to_ascii_uppercase()),
        &dir.path().join("a"),
        &mut inside,
        &outside,
    );
    selects_only(
        &format!("cgroup=/docker/{}*", &id[..8]),
        &dir.path().join("b"),
        &mut inside,
        &outside,
    );
    drop(inside);
    drop(cgroups);
}

#[test]
fn a_data_dir_others_can_write_is_refused() {
    require_root();
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("agent-open-data");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    // World-writable (as /tmp is): anyone could plant files the agent
    // would serve or count against --max-disk.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = data.to_str().unwrap();
    let (code, _, err) = run_heapbpf(&[
        "agent",
        "--select",
        "pid=1",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        d,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "cannot write snapshots to {d}: its mode 777 lets others write in it"
        )) && err.contains("--data-dir"),
        "{err}"
    );
    // Made private, the same directory is taken.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (mut h, _) = Heapbpf::agent(&data, &["--select", "pid=1"]);
    stop_agent(&mut h);
}
