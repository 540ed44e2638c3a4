//! The lines of the contract on stderr (`attached`, `snapshot`, step and
//! warning lines): user-facing output, not logging. Every such line is made
//! here, so that their wording lives in one place.
use std::{io::Write as _, path::PathBuf};

use crate::{
    model::Trigger,
    trigger::Crossing,
    units::{human_bytes, size_label},
};

/// What every line starts with.
pub const PREFIX: &str = "heapbpf: ";

/// Writes `heapbpf: LINE` to stderr.
pub fn say(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{PREFIX}{line}");
}

/// Once every probe of a target is live: exactly one such line per target.
pub fn attached(
    pid: u32,
    comm: &str,
    probes: usize,
    libraries: &[&str],
    sample_bytes: u64,
) -> String {
    format!(
        "attached to {pid} ({comm}): {probes} probes in {}; sampling {}; heapbpf pid {}",
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
    format!("hooked {library} in {pid} ({comm}), mapped since: {probes} probes")
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
    let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    format!(
        "snapshot {} pid={pid} live={live_bytes} allocations={live_allocations} -> {}",
        trigger.as_str(),
        paths.join(", ")
    )
}

/// One snapshot that could not be written.
pub fn snapshot_failed(trigger: Trigger, pid: u32, why: &dyn std::fmt::Display) -> String {
    format!("snapshot {} pid={pid} failed: {why}", trigger.as_str())
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

/// What dropped events mean and what helps; `max_live_blocks` when the
/// setting in force is known.
pub fn dropped_events(dropped: u64, max_live_blocks: Option<u32>) -> String {
    let now = max_live_blocks.map_or(String::new(), |n| format!(" (now {n})"));
    format!(
        "{dropped} events could not be recorded (full maps or failed stack walks); \
         figures are lower bounds; raise --max-live-blocks{now} if the live-block map filled"
    )
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
        assert!(dropped_events(3, Some(8)).contains("--max-live-blocks (now 8)"));
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
        assert!(dropped_events(3, None).contains("--max-live-blocks if"));
    }
}
