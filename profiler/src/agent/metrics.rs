//! `/metrics`: what the agent publishes ([`Shared`]) and its own process
//! figures in the Prometheus text format (prometheus-client's OpenMetrics
//! encoder), with the contract's names and labels. Label values come from
//! the targets (a process names itself): escaped here, never pasted.
use std::fmt::Write as _;

use prometheus_client::{
    encoding::{EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::view::{Shared, State as TargetState, TargetView};

/// The exposition of `shared` now, with the agent's own process figures.
pub fn encode(shared: &Shared) -> Result<String, std::fmt::Error> {
    encode_metrics(&shared.targets(), shared, &own_process())
}

/// A label value as the exposition format needs it: `\`, `"` and line
/// feeds escaped (prometheus-client writes label values as they are).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Escaped(String);

impl EncodeLabelValue for Escaped {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::result::Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

type TargetLabels = Vec<(&'static str, Escaped)>;

fn target_labels(t: &TargetView) -> TargetLabels {
    let or_empty = |v: &Option<String>| Escaped(v.clone().unwrap_or_default());
    vec![
        ("pid", Escaped(t.pid.to_string())),
        ("comm", Escaped(t.comm.clone())),
        // The container's name in its pod when the agent knows it (as the
        // kubelet's and kube-state-metrics' `container` label), else its id.
        (
            "container",
            Escaped(
                t.container_name
                    .clone()
                    .or_else(|| t.container.clone())
                    .unwrap_or_default(),
            ),
        ),
        ("pod", or_empty(&t.pod)),
        ("namespace", or_empty(&t.namespace)),
        ("service_name", or_empty(&t.service_name)),
    ]
}

/// The agent's own figures, as the Prometheus client libraries name them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct OwnProcess {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    open_fds: u64,
    max_fds: u64,
    start_time_seconds: f64,
}

/// Reads [`OwnProcess`] from `/proc/self` (what cannot be read is 0).
fn own_process() -> OwnProcess {
    let mut p = OwnProcess::default();
    let ticks = crate::procfs::clock_ticks_per_second() as f64;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the name, counted from the last ')': state is
        // field 3 of proc(5); utime 14, stime 15, starttime 22, vsize 23,
        // rss 24 (pages).
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| {
                f.get(n - 3)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            p.cpu_seconds = (field(14) + field(15)) as f64 / ticks;
            p.virtual_bytes = field(23);
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
            p.resident_bytes = field(24) * page;
            let boot = std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("btime "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .unwrap_or(0);
            p.start_time_seconds = boot as f64 + field(22) as f64 / ticks;
        }
    }
    // The listing's own descriptor is one of them.
    p.open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(1) as u64)
        .unwrap_or(0);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct rlimit, which `limit` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        p.max_fds = limit.rlim_cur;
    }
    p
}

/// `/metrics` in the OpenMetrics text format.
fn encode_metrics(
    targets: &[TargetView],
    shared: &Shared,
    own: &OwnProcess,
) -> std::result::Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    let live_bytes = Family::<TargetLabels, Gauge>::default();
    let live_allocations = Family::<TargetLabels, Gauge>::default();
    let allocated = Family::<TargetLabels, Counter>::default();
    let dropped = Family::<TargetLabels, Counter>::default();
    let overhead = Family::<TargetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let coverage = Family::<TargetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let states = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
    for s in TargetState::ALL {
        let _ = states.get_or_create(&vec![("state", s.as_str())]);
    }
    let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for t in targets {
        states
            .get_or_create(&vec![("state", t.state.as_str())])
            .inc();
        if !matches!(t.state, TargetState::Attached | TargetState::Windowed) {
            continue;
        }
        let l = target_labels(t);
        live_bytes.get_or_create(&l).set(gauge(t.live_bytes));
        live_allocations
            .get_or_create(&l)
            .set(gauge(t.live_allocations));
        allocated.get_or_create(&l).inc_by(t.allocated_bytes);
        dropped.get_or_create(&l).inc_by(t.dropped_events);
        overhead.get_or_create(&l).set(t.overhead);
        coverage.get_or_create(&l).set(t.coverage);
    }
    registry.register(
        "heapbpf_target_live_bytes",
        "Bytes the target has allocated and not freed (tracked by heapbpf)",
        live_bytes,
    );
    registry.register(
        "heapbpf_target_live_allocations",
        "Blocks the target has allocated and not freed",
        live_allocations,
    );
    registry.register(
        "heapbpf_target_allocated_bytes",
        "Bytes the target allocated since heapbpf attached",
        allocated,
    );
    registry.register(
        "heapbpf_target_dropped_events",
        "Allocation events heapbpf could not record (full map, lost event)",
        dropped,
    );
    registry.register(
        "heapbpf_target_overhead_ratio",
        "CPU time heapbpf's probes added to the target, as a share of its own",
        overhead,
    );
    registry.register(
        "heapbpf_target_coverage_ratio",
        "Share of the time the allocation probes were attached (1 unless windowed)",
        coverage,
    );
    registry.register(
        "heapbpf_targets",
        "Selected processes by state (attached, windowed, waiting, failed)",
        states,
    );
    registry.register(
        "heapbpf_snapshot_seconds",
        "Time a snapshot took (kernel read, symbolization, files)",
        shared.snapshot_seconds.clone(),
    );
    registry.register(
        "heapbpf_push_failures",
        "Pushes to a profile store that failed",
        shared.push_failures.clone(),
    );
    registry.register(
        "heapbpf_push_queue_profiles",
        "Profiles waiting to be pushed",
        shared.push_queue.clone(),
    );
    registry.register(
        "heapbpf_push_dropped",
        "Profiles dropped from a full push queue",
        shared.push_dropped.clone(),
    );
    let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
    cpu.inc_by(own.cpu_seconds);
    registry.register(
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds",
        cpu,
    );
    let own_gauge = |v: u64| {
        let g = Gauge::<i64>::default();
        g.set(gauge(v));
        g
    };
    registry.register(
        "process_resident_memory_bytes",
        "Resident memory size in bytes",
        own_gauge(own.resident_bytes),
    );
    registry.register(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes",
        own_gauge(own.virtual_bytes),
    );
    registry.register(
        "process_open_fds",
        "Number of open file descriptors",
        own_gauge(own.open_fds),
    );
    registry.register(
        "process_max_fds",
        "Maximum number of open file descriptors",
        own_gauge(own.max_fds),
    );
    let start = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    start.set(own.start_time_seconds);
    registry.register(
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds",
        start,
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::view::sample_target as target;

    #[test]
    fn metrics_escape_what_targets_call_themselves() {
        let shared = Shared::default();
        shared.snapshot_seconds.observe(0.2);
        let targets = [
            target(7, "a\"b\\c\nd", TargetState::Attached),
            target(8, "w", TargetState::Waiting),
        ];
        let text = encode_metrics(&targets, &shared, &OwnProcess::default()).unwrap();
        let want = r#"heapbpf_target_live_bytes{pid="7",comm="a\"b\\c\nd",container="0123456789abcdef",pod="",namespace="",service_name=""} 4096"#;
        assert!(text.contains(want), "{text}");
        assert!(
            text.contains(r#"heapbpf_target_allocated_bytes_total{pid="7",comm="a\"b\\c\nd""#),
            "{text}"
        );
        assert!(
            text.contains(r#"heapbpf_target_overhead_ratio{pid="7""#),
            "{text}"
        );
        // Only profiled targets have figures; every state is counted.
        assert!(!text.contains(r#"pid="8""#), "{text}");
        for (state, n) in [
            ("attached", 1),
            ("windowed", 0),
            ("waiting", 1),
            ("failed", 0),
        ] {
            assert!(
                text.contains(&format!("heapbpf_targets{{state=\"{state}\"}} {n}\n")),
                "{state}: {text}"
            );
        }
        for name in [
            "heapbpf_snapshot_seconds_count 1",
            "heapbpf_push_failures_total 0",
            "heapbpf_push_queue_profiles 0",
            "heapbpf_push_dropped_total 0",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{name}: {text}");
        }
        // Every sample is one line: no raw line feed made it through.
        for line in text.lines() {
            assert!(
                line.starts_with('#')
                    || line.starts_with("heapbpf_")
                    || line.starts_with("process_"),
                "{line:?}"
            );
        }
    }

    #[test]
    fn pod_labels_with_the_container_name() {
        let mut t = target(7, "web", TargetState::Attached);
        t.container_name = Some("web".into());
        t.pod = Some("web-1".into());
        t.namespace = Some("shop".into());
        t.service_name = Some("store\"front".into());
        let text = encode_metrics(&[t], &Shared::default(), &OwnProcess::default()).unwrap();
        let want = r#"heapbpf_target_live_bytes{pid="7",comm="web",container="web",pod="web-1",namespace="shop",service_name="store\"front"} 4096"#;
        assert!(text.contains(want), "{text}");
    }

    #[test]
    fn own_process_figures_are_read() {
        let p = own_process();
        assert!(p.cpu_seconds >= 0.0);
        assert!(p.resident_bytes > 0 && p.virtual_bytes >= p.resident_bytes);
        assert!(p.open_fds > 0 && p.max_fds >= p.open_fds);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(p.start_time_seconds > now - 3600.0 && p.start_time_seconds <= now + 1.0);
    }
}
