//! The lines of the contract on stderr (`attached`, `snapshot`, step and
//! warning lines): user-facing output, not logging. Every such line is made
//! here, so that their wording lives in one place.
//!
//! Text a target controls (its name, the paths it maps, its symbol names, and
//! whatever a snapshot file says) goes through [`escape`] wherever heapbpf
//! prints it for people — these lines, error lines, `report` and `diff` —
//! so that it can neither split a line nor drive the terminal. Data files
//! (JSON, pprof) keep the text as it is.
use std::{
    borrow::Cow,
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::{
    model::{Totals, Trigger},
    trigger::Crossing,
    units::{human_bytes, size_label},
};

/// What every line starts with.
pub const PREFIX: &str = "heapbpf: ";

/// `text` with every control character written out: C0 (`\n`, `\r`, `\t`,
/// else `\x1b` style), DEL (`\x7f`) and C1 (`\u{9b}` style). Nothing else
/// changes, so a plain name or path reads as it is.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Writes `heapbpf: LINE` to stderr, as one line whatever it contains (see
/// [`escape`]; the lines below escape what a target controls themselves).
pub fn say(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{PREFIX}{}", escape(line));
}

/// Once every probe of a target is live: exactly one such line per target.
pub fn attached(
    pid: u32,
    comm: &str,
    probes: usize,
    libraries: &[&str],
    sample_bytes: u64,
) -> String {
    let libraries: Vec<Cow<str>> = libraries.iter().map(|l| escape(l)).collect();
    format!(
        "attached to {pid} ({}): {probes} probes in {}; sampling {}; heapbpf pid {}",
        escape(comm),
        libraries.join(", "),
        if sample_bytes == 0 {
            "EXACT".to_string()
        } else {
            size_label(sample_bytes)
        },
        std::process::id()
    )
}

/// An allocator library a target mapped after attach, now hooked.
pub fn hooked_since(library: &str, pid: u32, comm: &str, probes: usize) -> String {
    format!(
        "hooked {} in {pid} ({}), mapped since: {probes} probes",
        escape(library),
        escape(comm)
    )
}

/// A target exec'd a program heapbpf cannot hook: it is no longer profiled.
pub fn exec_unhooked(pid: u32, comm: &str, exe: &str, why: &dyn std::fmt::Display) -> String {
    format!(
        "{pid} ({comm}) exec'd {exe}, which heapbpf cannot hook ({why}); no longer profiling {pid}"
    )
}

/// One snapshot written: its trigger, figures and files.
pub fn snapshot_written(
    trigger: Trigger,
    pid: u32,
    live_bytes: u64,
    live_allocations: u64,
    paths: &[PathBuf],
) -> String {
    let paths: Vec<String> = paths
        .iter()
        .map(|p| escape(&p.display().to_string()).into_owned())
        .collect();
    format!(
        "snapshot {} pid={pid} live={live_bytes} allocations={live_allocations} -> {}",
        trigger.as_str(),
        paths.join(", ")
    )
}

/// One snapshot that could not be written.
pub fn snapshot_failed(trigger: Trigger, pid: u32, why: &dyn std::fmt::Display) -> String {
    format!(
        "snapshot {} pid={pid} failed: {}",
        trigger.as_str(),
        escape(&why.to_string())
    )
}

/// The output directory is no longer at the path it was opened by.
pub fn output_dir_moved(opened_as: &Path, now: &Path) -> String {
    format!(
        "warning: the output directory {} was moved or replaced; snapshots still go to the directory opened at start, now {}",
        opened_as.display(),
        now.display()
    )
}

/// Temporary files of heapbpf processes no longer running, removed at start.
pub fn stale_temps_removed(dir: &Path, count: usize) -> String {
    format!(
        "removed {count} temporary file{} left in {} by heapbpf processes no longer running",
        if count == 1 { "" } else { "s" },
        dir.display(),
    )
}

/// `--kubernetes`: the API server cannot be reached (said once per outage).
pub fn pods_unreachable(why: &str) -> String {
    format!(
        "cannot watch this node's pods: {}; retrying (the k8s rule selects nothing until the first list)",
        escape(why)
    )
}

/// `--kubernetes`: the watch could not even start (no runtime): for good.
pub fn pods_not_watched(why: &str) -> String {
    format!(
        "cannot watch this node's pods: {}; the k8s rule selects nothing and targets carry no pod labels",
        escape(why)
    )
}

/// `--kubernetes`: the first list of this node's pods (and after an outage).
pub fn pods_watched(node: &str, server: &str, pods: usize) -> String {
    format!(
        "watching the pods of node {} on {}: {pods} pod{} listed",
        escape(node),
        escape(server),
        if pods == 1 { "" } else { "s" }
    )
}

/// The agent lets go of a target its rules no longer select (a pod's
/// `heapbpf.io/profile` annotation removed, or the pod gone).
pub fn released(pid: u32, comm: &str, why: &str) -> String {
    format!(
        "detaching from pid {pid} ({}): {}",
        escape(comm),
        escape(why)
    )
}

/// Why heapbpf exits 1 at the end: snapshots that could not be written.
pub fn snapshots_failed(count: usize) -> String {
    format!(
        "{count} snapshot{} could not be written (see the failed line{} above)",
        if count == 1 { "" } else { "s" },
        if count == 1 { "" } else { "s" }
    )
}

/// Before a step snapshot: which threshold, and whether several were jumped
/// at once.
pub fn step(trigger: Trigger, pid: u32, what: &str, value: u64, c: Crossing) -> String {
    let jumped = if c.skipped > 0 {
        format!(" (jumped over {} more)", c.skipped)
    } else {
        String::new()
    };
    format!(
        "{} pid={pid}: {what} {} reached threshold {}{jumped}",
        trigger.as_str(),
        human_bytes(value as i128),
        human_bytes(c.threshold as i128)
    )
}

/// What dropped events mean and what helps, reason by reason: which map
/// filled and the flag that sizes it (with the settings in force, when
/// known: `(max_live_blocks, max_stacks)`).
pub fn dropped_events(totals: &Totals, limits: Option<(u32, u32)>) -> String {
    let now = |i: usize| limits.map_or(String::new(), |l| format!(" (now {})", [l.0, l.1][i]));
    let mut parts = Vec::new();
    for (reason, n) in &totals.dropped {
        let why = match reason.as_str() {
            "allocs_full" => format!(
                "the live-block map (ALLOCS) was full, those allocations are not tracked: raise --max-live-blocks{}",
                now(0)
            ),
            "stacks_full" => format!(
                "the stack map (STACKS) was full, those allocations are tracked without their stack: raise --max-stacks{}",
                now(1)
            ),
            "stats_full" => format!(
                "the per-stack figures map (STACK_STATS) was full: raise --max-stacks{}",
                now(1)
            ),
            "stack_error" => "the kernel could not read the user stack".to_string(),
            "pending_full" => "too many allocator calls in flight at once (PENDING map)".to_string(),
            "read_error" => "posix_memalign's result could not be read".to_string(),
            other => other.to_string(),
        };
        parts.push(format!("{reason} {n} ({why})"));
    }
    if parts.is_empty() {
        parts.push(format!(
            "full maps or failed stack walks; raise --max-live-blocks{} if the live-block map filled",
            now(0)
        ));
    }
    format!(
        "{} events could not be recorded, figures are lower bounds: {}",
        totals.dropped_events,
        parts.join("; ")
    )
}

/// A windowed target whose probes cannot be attached again: it is let go.
pub fn probes_lost(pid: u32, comm: &str, e: &dyn std::fmt::Display) -> String {
    format!(
        "pid {pid} ({comm}): cannot attach its probes again after a window ({e}): final snapshot written, detached"
    )
}

/// The agent's first line, once its API is listening: the address it
/// really listens on (`--listen 127.0.0.1:0` picks a free port). Without
/// the prefix, as every line [`say`] prints (which adds it and escapes).
pub fn agent_listening(addr: std::net::SocketAddr, data_dir: &Path) -> String {
    format!(
        "agent listening on http://{addr}; snapshots in {}",
        escape(&data_dir.display().to_string())
    )
}

/// The agent pushes each snapshot to a profile store (`--push`, `--push-parca`).
pub fn push_to(store: &str, url: &str) -> String {
    format!("pushing profiles to {store} at {}", escape(url))
}

/// A push to a store failed; said once until one succeeds again.
pub fn push_failing(store: &str, url: &str, why: &str) -> String {
    format!(
        "cannot push to {store} at {}: {why}; profiles are queued (the oldest dropped past the bound) and retried",
        escape(url)
    )
}

/// Pushes to a store work again after `failed` failed attempts.
pub fn push_recovered(store: &str, url: &str, failed: u64) -> String {
    format!(
        "pushing to {store} at {} works again (after {failed} failed attempt{})",
        escape(url),
        if failed == 1 { "" } else { "s" }
    )
}

/// At exit, profiles that could not be pushed.
pub fn push_left_unsent(store: &str, url: &str, left: usize) -> String {
    format!(
        "{left} profile{} not pushed to {store} at {} before exit",
        if left == 1 { "" } else { "s" },
        escape(url)
    )
}

/// An [`agent_listening`] line read back as stderr shows it: the address.
pub fn parse_agent_listening(line: &str) -> Option<std::net::SocketAddr> {
    let rest = line
        .strip_prefix(PREFIX)?
        .strip_prefix("agent listening on http://")?;
    rest.split_once(';')?.0.parse().ok()
}

/// A share as people read it: `14.2%`, `0.5%`, `2%`.
pub fn percent(share: f64) -> String {
    let p = share * 100.0;
    let text = if p >= 10.0 {
        format!("{p:.1}")
    } else {
        format!("{p:.2}")
    };
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}%")
}

/// A window or cycle length: `400ms`, `2.8s`.
fn span(d: std::time::Duration) -> String {
    if d < std::time::Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        let s = format!("{:.1}", d.as_secs_f64());
        format!("{}s", s.trim_end_matches(".0"))
    }
}

/// A target's probes cost more than `--max-overhead` (`overhead` with all
/// of them attached): it is profiled in windows of `on` every `cycle`.
pub fn budget_windowed(
    pid: u32,
    comm: &str,
    overhead: f64,
    budget: f64,
    on: std::time::Duration,
    cycle: std::time::Duration,
) -> String {
    format!(
        "pid {pid} ({}): probes cost {} of its CPU time, over --max-overhead {}: profiled in windows (on {} of every {})",
        escape(comm),
        percent(overhead),
        percent(budget),
        span(on),
        span(cycle)
    )
}

/// ... and back: all of its probes fit again.
pub fn budget_continuous(pid: u32, comm: &str, overhead: f64, budget: f64) -> String {
    format!(
        "pid {pid} ({}): probes cost {} of its CPU time, within --max-overhead {}: attached continuously again",
        escape(comm),
        percent(overhead),
        percent(budget)
    )
}

/// A [`budget_windowed`] or [`budget_continuous`] line read back.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetLine {
    pub pid: u32,
    /// What the probes cost with all of them attached (a fraction).
    pub overhead: f64,
    pub windowed: bool,
}

/// Reads a line of [`budget_windowed`] or [`budget_continuous`].
pub fn parse_budget(line: &str) -> Option<BudgetLine> {
    let rest = line.strip_prefix(PREFIX)?.strip_prefix("pid ")?;
    let (pid, rest) = rest.split_once(" (")?;
    let (_, rest) = rest.rsplit_once("): probes cost ")?;
    let (cost, rest) = rest.split_once("% of its CPU time, ")?;
    let windowed =
        if rest.starts_with("over --max-overhead ") && rest.contains(": profiled in windows") {
            true
        } else if rest.starts_with("within --max-overhead ")
            && rest.ends_with(": attached continuously again")
        {
            false
        } else {
            return None;
        };
    Some(BudgetLine {
        pid: pid.parse().ok()?,
        overhead: cost.parse::<f64>().ok()? / 100.0,
        windowed,
    })
}

/// An `attached` line read back: the pid and comm it names.
pub fn parse_attached(line: &str) -> Option<(u32, &str)> {
    let rest = line.strip_prefix(PREFIX)?.strip_prefix("attached to ")?;
    let (pid, rest) = rest.split_once(" (")?;
    let (comm, _) = rest.rsplit_once("): ")?;
    Some((pid.parse().ok()?, comm))
}

/// A `snapshot` line read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotLine {
    pub trigger: String,
    pub pid: u32,
    pub live_bytes: u64,
    pub live_allocations: u64,
    pub paths: Vec<PathBuf>,
}

/// Reads a line written by [`snapshot_written`] (not a failure line).
pub fn parse_snapshot(line: &str) -> Option<SnapshotLine> {
    let rest = line.strip_prefix(PREFIX)?.strip_prefix("snapshot ")?;
    let (head, paths) = rest.split_once(" -> ")?;
    let mut words = head.split(' ');
    let trigger = words.next()?.to_string();
    let mut field = |key: &str| words.next()?.strip_prefix(key)?.parse::<u64>().ok();
    let pid = u32::try_from(field("pid=")?).ok()?;
    let live_bytes = field("live=")?;
    let live_allocations = field("allocations=")?;
    Some(SnapshotLine {
        trigger,
        pid,
        live_bytes,
        live_allocations,
        paths: paths.split(", ").map(PathBuf::from).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_lines_read_back() {
        use std::time::Duration;
        let line = format!(
            "{PREFIX}{}",
            budget_windowed(
                42,
                "redis-server",
                0.1423,
                0.02,
                Duration::from_millis(400),
                Duration::from_millis(2800)
            )
        );
        assert_eq!(
            line,
            "heapbpf: pid 42 (redis-server): probes cost 14.2% of its CPU time, over --max-overhead 2%: profiled in windows (on 400ms of every 2.8s)"
        );
        let b = parse_budget(&line).unwrap();
        assert_eq!((b.pid, b.windowed), (42, true));
        assert!((b.overhead - 0.142).abs() < 1e-9);
        let line = format!(
            "{PREFIX}{}",
            budget_continuous(42, "a (b): c", 0.004, 0.005)
        );
        assert!(line.ends_with("probes cost 0.4% of its CPU time, within --max-overhead 0.5%: attached continuously again"), "{line}");
        let b = parse_budget(&line).unwrap();
        assert_eq!((b.pid, b.windowed), (42, false));
        assert_eq!(span(Duration::from_secs(3)), "3s");
        assert_eq!(percent(0.01), "1%");
    }

    #[test]
    fn agent_listening_reads_back() {
        let addr: std::net::SocketAddr = "127.0.0.1:41234".parse().unwrap();
        let line = format!(
            "{PREFIX}{}",
            agent_listening(addr, Path::new("/var/lib/heapbpf"))
        );
        assert_eq!(
            line,
            "heapbpf: agent listening on http://127.0.0.1:41234; snapshots in /var/lib/heapbpf"
        );
        assert_eq!(parse_agent_listening(&line), Some(addr));
        assert_eq!(parse_agent_listening("heapbpf: attached to 1 (x): "), None);
    }

    #[test]
    fn lines_read_as_the_contract_writes_them() {
        let a = attached(12, "app", 9, &["/lib/libc.so.6", "/x/libjemalloc.so.2"], 0);
        assert!(a.starts_with("attached to 12 (app): 9 probes in /lib/libc.so.6, /x/libjemalloc.so.2; sampling EXACT; heapbpf pid "), "{a}");
        assert!(attached(1, "a", 1, &["l"], 64 << 10).contains("; sampling 64KiB;"));
        let s = snapshot_written(
            Trigger::Signal,
            12,
            4096,
            2,
            &[PathBuf::from("/o/a.json"), PathBuf::from("/o/a.pb.gz")],
        );
        assert_eq!(
            s,
            "snapshot signal pid=12 live=4096 allocations=2 -> /o/a.json, /o/a.pb.gz"
        );
        let c = Crossing {
            k: 2,
            threshold: 2 << 20,
            skipped: 1,
        };
        assert_eq!(
            step(Trigger::RssStep, 5, "RSS", 3 << 20, c),
            "rss-step pid=5: RSS 3.0 MiB reached threshold 2.0 MiB (jumped over 1 more)"
        );
        // Read back as the integration tests read them.
        let line = format!("{PREFIX}{s}");
        let parsed = parse_snapshot(&line).unwrap();
        assert_eq!(parsed.trigger, "signal");
        assert_eq!(
            (parsed.pid, parsed.live_bytes, parsed.live_allocations),
            (12, 4096, 2)
        );
        assert_eq!(parsed.paths.len(), 2);
        assert_eq!(parse_attached(&format!("{PREFIX}{a}")), Some((12, "app")));
        assert_eq!(
            parse_attached(
                "heapbpf: attached to 9 (a (b)): 3 probes in x; sampling EXACT; heapbpf pid 1"
            ),
            Some((9, "a (b)"))
        );
        assert_eq!(
            parse_snapshot("heapbpf: snapshot exit pid=9 failed: disk full"),
            None
        );
    }

    #[test]
    fn dropped_events_name_the_map_and_the_flag() {
        let mut totals = Totals {
            dropped_events: 3,
            ..Default::default()
        };
        assert!(dropped_events(&totals, Some((8, 9))).contains("--max-live-blocks (now 8)"));
        assert!(dropped_events(&totals, None).contains("--max-live-blocks if"));
        totals.dropped.insert("stacks_full".into(), 2);
        totals.dropped.insert("allocs_full".into(), 1);
        let w = dropped_events(&totals, Some((8, 9)));
        assert!(w.starts_with("3 events could not be recorded"), "{w}");
        assert!(
            w.contains("stacks_full 2 (the stack map (STACKS) was full"),
            "{w}"
        );
        assert!(w.contains("raise --max-stacks (now 9)"), "{w}");
        assert!(
            w.contains("allocs_full 1 (the live-block map (ALLOCS) was full"),
            "{w}"
        );
    }

    #[test]
    fn control_characters_are_written_out() {
        assert!(matches!(
            escape("redis-server /usr/lib/ü"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            escape("\x1b]0;pwn\x07a\nb\r\tc\x7f\u{9b}d\u{85}\0"),
            "\\x1b]0;pwn\\x07a\\nb\\r\\tc\\x7f\\u{9b}d\\u{85}\\x00"
        );
        // Escaping escaped text changes nothing.
        let once = escape("a\x1bb").into_owned();
        assert_eq!(escape(&once), once);
        // A target naming itself with escapes and a newline: still one line,
        // the escapes visible, and read back as written.
        let a = attached(7, "\x1b[31mX\nY", 2, &["/tmp/\x1bz/libc.so.6"], 0);
        assert!(!a.contains(['\n', '\x1b']), "{a}");
        assert!(
            a.starts_with("attached to 7 (\\x1b[31mX\\nY): 2 probes in /tmp/\\x1bz/libc.so.6;"),
            "{a}"
        );
        assert_eq!(
            parse_attached(&format!("{PREFIX}{a}")),
            Some((7, "\\x1b[31mX\\nY"))
        );
        let h = hooked_since("/x/\x1b.so", 7, "a\nb", 3);
        assert!(!h.contains(['\n', '\x1b']), "{h}");
        let f = snapshot_failed(Trigger::Stop, 7, &"disk\nfull");
        assert!(f.ends_with("failed: disk\\nfull"), "{f}");
    }
}
