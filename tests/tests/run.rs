//! `heapbpf run`: a command started under the profiler is tracked from its
//! first allocation, its final snapshot is written as it exits, and heapbpf
//! returns its exit status.
use heapbpf_integration_tests::*;

#[test]
fn run_tracks_a_command_from_its_first_allocation_and_returns_its_status() {
    require_root();
    let dir = TempDir::new("run");
    let fixture = fixture_path("startleak");
    let (code, _, err) = run_heapbpf(&[
        "run",
        "--sample-bytes",
        "0",
        "-o",
        dir.path().to_str().unwrap(),
        "--",
        fixture.to_str().unwrap(),
    ]);
    assert_eq!(code, 3, "heapbpf run returns the command's status:\n{err}");
    let attached = err.lines().filter(|l| l.contains(" attached to ")).count();
    assert_eq!(attached, 1, "{err}");
    let s = read_json(&snapshot_line(&err, "exit").paths[0]);
    assert_eq!(s["trigger"], "exit");
    assert_eq!(s["comm"], "startleak");
    assert_eq!(
        site(&s, "leak_at_start"),
        Site {
            live_bytes: 100_000,
            live_allocations: 100,
            allocated_bytes: 100_000,
            allocations: 100
        }
    );
    assert_eq!(
        site(&s, "transient"),
        Site {
            live_bytes: 0,
            live_allocations: 0,
            allocated_bytes: 20_000,
            allocations: 50
        }
    );
    assert_eq!(s["totals"]["frees"], 50);
    let st = s["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["frames"][0]["function"] == "leak_at_start")
        .unwrap();
    assert_eq!(
        st["frames"][1]["function"], "main",
        "symbolized after the command is gone"
    );
    // Its libraries were mapped after the stack walk's table was made (at
    // exec); the walk still reaches glibc's start.
    assert_eq!(st["truncated"], false, "{st}");
}

#[test]
fn run_refuses_a_missing_command() {
    require_root();
    let (code, _, err) = run_heapbpf(&["run", "--", "/nonexistent/program"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("/nonexistent/program: command not found"),
        "{err}"
    );
    let (code, _, err) = run_heapbpf(&["run"]);
    assert_eq!(code, 2, "{err}");
}

/// A command linked against tcmalloc (`DT_NEEDED`, not preloaded): its
/// allocator is found before exec, so its start-up allocations are seen.
#[test]
fn run_finds_the_allocator_a_command_links() {
    require_root();
    let dir = TempDir::new("run-linked");
    let fixture = fixture_path("startleak-tcmalloc");
    let (code, _, err) = run_heapbpf(&[
        "run",
        "--sample-bytes",
        "0",
        "--format",
        "json",
        "-o",
        dir.path().to_str().unwrap(),
        "--",
        fixture.to_str().unwrap(),
    ]);
    assert_eq!(code, 3, "{err}");
    let attached = err.lines().find(|l| l.contains(" attached to ")).unwrap();
    assert!(attached.contains("libtcmalloc_minimal.so.4"), "{attached}");
    // Hooked once: the library mapped after exec is the one hooked before.
    assert!(!err.contains("heapbpf: hooked "), "{err}");
    let s = read_json(&snapshot_line(&err, "exit").paths[0]);
    assert_eq!(
        site(&s, "leak_at_start"),
        Site {
            live_bytes: 100_000,
            live_allocations: 100,
            allocated_bytes: 100_000,
            allocations: 100
        }
    );
    // Freed at once: 50 blocks of 4 x 100 bytes (the C runtime's own
    // start-up blocks may add frees of their own).
    assert_eq!(
        site(&s, "transient"),
        Site {
            live_bytes: 0,
            live_allocations: 0,
            allocated_bytes: 20_000,
            allocations: 50
        }
    );
}

/// A command built without frame pointers, allocating five calls deep from
/// its first instructions: its stacks are complete although its libraries
/// were mapped after `exec` (heapbpf reads its map at the entry point).
#[test]
fn run_walks_stacks_of_a_command_from_its_start() {
    require_root();
    let dir = TempDir::new("run-deep");
    let fixture = fixture_path("deep");
    let (code, _, err) = run_heapbpf(&[
        "run",
        "--sample-bytes",
        "0",
        "--format",
        "json",
        "-o",
        dir.path().to_str().unwrap(),
        "--",
        fixture.to_str().unwrap(),
        "start",
        "50",
    ]);
    assert_eq!(code, 0, "{err}");
    let s = read_json(&snapshot_line(&err, "exit").paths[0]);
    let st = s["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["frames"][0]["function"] == "level5")
        .unwrap_or_else(|| panic!("{s:#}"));
    let functions = functions(st);
    assert_eq!(
        &functions[..6],
        &["level5", "level4", "level3", "level2", "level1", "main"],
        "{st}"
    );
    assert_eq!(functions.last().map(String::as_str), Some("_start"), "{st}");
    assert_eq!(st["truncated"], false, "{st}");
    assert_eq!(st["live_bytes"], 50_000);
    assert_eq!(st["live_allocations"], 50);
}
