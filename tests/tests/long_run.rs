//! Long runs: a target that allocates through ever new call paths (about a
//! million: two functions choosing between each other 20 calls deep) and
//! frees every block at once must not fill heapbpf's stack maps for good.
//! Stacks no live block uses are retired; recording goes on; the blocks
//! that stay live are exact; drops name the map that filled and its flag.
use std::collections::HashSet;

use heapbpf_integration_tests::*;

/// The churned stacks of a snapshot, by their addresses.
fn churn_stacks(snapshot: &Value) -> HashSet<Vec<String>> {
    snapshot["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .map(|s| s["frames"].as_array().expect("frames"))
        .filter(|frames| {
            frames
                .iter()
                .any(|f| matches!(f["function"].as_str(), Some("left" | "right")))
        })
        .map(|frames| {
            frames
                .iter()
                .map(|f| f["address"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn idle_stacks_are_retired_and_recording_goes_on() {
    require_root();
    let dir = TempDir::new("long-run");
    let mut fx = Fixture::spawn("paths");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--format", "json"]);
    fx.command("keep 100");
    // Phases of churn, a snapshot after each (the fixture waits meanwhile).
    let mut snapshots = Vec::new();
    let mut rounds = 0u64;
    for _ in 0..5 {
        rounds += fx.ask("churn 2").trim().parse::<u64>().expect("rounds");
        hb.signal(libc::SIGUSR2);
        snapshots.push(read_json(&hb.wait_snapshot("signal", fx.pid)[0]));
    }
    assert!(rounds > 100_000, "the fixture churned only {rounds} rounds");
    hb.signal(libc::SIGINT);
    assert!(hb.wait_exit().success());
    let last = snapshots.last().unwrap();

    // The blocks that stay live are exact.
    assert_eq!(
        site(last, "site_keep"),
        Site {
            live_bytes: 100_000,
            live_allocations: 100,
            allocated_bytes: 100_000,
            allocations: 100,
        }
    );
    // Recording goes on: every snapshot has churned stacks the one before
    // it did not (a full stack map would freeze the set once filled).
    let sets: Vec<_> = snapshots.iter().map(churn_stacks).collect();
    for (i, pair) in sets.windows(2).enumerate() {
        let fresh = pair[1].difference(&pair[0]).count();
        assert!(
            fresh > 0,
            "snapshot {} has no churned stack the one before lacked ({} stacks)",
            i + 1,
            pair[1].len()
        );
    }
    // Whatever was dropped is said by reason, with the flag that helps.
    let dropped = last["totals"]["dropped"].as_object();
    if last["totals"]["dropped_events"].as_u64().unwrap() > 0 {
        let dropped = dropped.expect("totals.dropped by reason");
        for reason in dropped.keys() {
            assert!(
                reason == "stacks_full" || reason == "stats_full",
                "unexpected drop reason {reason}: {dropped:?}"
            );
        }
        assert!(
            hb.stderr.iter().any(|l| l.contains("raise --max-stacks")),
            "{}",
            hb.stderr.join("\n")
        );
    }
}
