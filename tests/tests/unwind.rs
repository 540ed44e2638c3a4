//! The stack walk on code built without frame pointers (`fixtures/deep.c`,
//! `-O2 -fomit-frame-pointer`) and through Debian's libc, which has none
//! either: complete stacks under `--unwind auto|dwarf`, truncated ones
//! marked as such under `--unwind fp`.
use heapbpf_integration_tests::*;

fn stacks_from<'a>(snapshot: &'a Value, function: &str) -> Vec<&'a Value> {
    snapshot["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["frames"][0]["function"] == function && s["frames"][0]["inlined"] == false)
        .collect()
}

const LEVELS: [&str; 5] = ["level5", "level4", "level3", "level2", "level1"];

/// Runs the deep fixture's scenario under `--unwind mode` and returns the
/// stop snapshot and the number of comparator calls of the sort.
fn deep_snapshot(mode: &str, dir: &TempDir) -> (Value, u64) {
    let mut fx = Fixture::spawn("deep");
    let mut hb = Heapbpf::attach(
        &[fx.pid],
        dir.path(),
        &["--unwind", mode, "--format", "json,collapsed"],
    );
    fx.command("deep 10");
    fx.command("thread 5");
    let compares: u64 = fx.ask("sort 40").parse().unwrap();
    hb.signal(libc::SIGINT);
    let paths = hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));
    (read_json(&paths[0]), compares)
}

fn assert_complete_stacks(snap: &Value, compares: u64) {
    // Five calls deep from main: every frame, in order, then glibc's start.
    let from_level5 = stacks_from(snap, "level5");
    let main_stack = from_level5
        .iter()
        .find(|s| functions(s).contains(&"main".to_string()))
        .unwrap_or_else(|| panic!("no level5 stack from main: {from_level5:#?}"));
    let f = functions(main_stack);
    assert_eq!(&f[..6], &[LEVELS.as_slice(), &["main"]].concat(), "{f:?}");
    assert_eq!(f.last().map(String::as_str), Some("_start"), "{f:?}");
    assert_eq!(main_stack["truncated"], false, "{main_stack}");
    assert_eq!(main_stack["live_bytes"], 10 * 1000);
    assert_eq!(main_stack["live_allocations"], 10);

    // From a thread: the same five, then the thread's start.
    let thread_stack = from_level5
        .iter()
        .find(|s| functions(s).contains(&"thread_main".to_string()))
        .unwrap_or_else(|| panic!("no level5 stack from the thread: {from_level5:#?}"));
    let f = functions(thread_stack);
    assert_eq!(
        &f[..6],
        &[LEVELS.as_slice(), &["thread_main"]].concat(),
        "{f:?}"
    );
    assert!(f.contains(&"start_thread".to_string()), "{f:?}");
    assert_eq!(thread_stack["truncated"], false, "{thread_stack}");
    assert_eq!(thread_stack["live_bytes"], 5 * 1000);
    assert_eq!(from_level5.len(), 2, "{from_level5:#?}");

    // A comparator called back from inside libc's qsort: the walk goes
    // through libc's frames and on into the caller.
    let callbacks = stacks_from(snap, "compare_alloc");
    assert!(!callbacks.is_empty());
    let live: u64 = callbacks
        .iter()
        .map(|s| s["live_bytes"].as_u64().unwrap())
        .sum();
    let count: u64 = callbacks
        .iter()
        .map(|s| s["live_allocations"].as_u64().unwrap())
        .sum();
    assert!(compares > 40, "{compares} comparisons");
    assert_eq!((live, count), (48 * compares, compares));
    for s in &callbacks {
        let f = functions(s);
        let libc_frames = s["frames"]
            .as_array()
            .unwrap()
            .iter()
            .skip(1)
            .take_while(|fr| fr["function"] != "sort_numbers")
            .filter(|fr| {
                fr["module"]
                    .as_str()
                    .is_some_and(|m| m.ends_with("libc.so.6"))
            })
            .count();
        assert!(
            libc_frames >= 1,
            "no libc frame between comparator and caller: {f:?}"
        );
        let at = f
            .iter()
            .position(|x| x == "sort_numbers")
            .unwrap_or_else(|| panic!("{f:?}"));
        assert_eq!(f[at + 1], "main", "{f:?}");
        assert_eq!(s["truncated"], false, "{s}");
    }
    assert_eq!(snap["totals"]["dropped_events"], 0);
}

#[test]
fn dwarf_walk_completes_stacks_without_frame_pointers() {
    require_root();
    let dir = TempDir::new("unwind-dwarf");
    let (snap, compares) = deep_snapshot("dwarf", &dir);
    assert_complete_stacks(&snap, compares);
    assert_eq!(snap["totals"]["truncated_stacks"], 0, "{snap:#}");
}

#[test]
fn auto_walk_completes_stacks_without_frame_pointers() {
    require_root();
    let dir = TempDir::new("unwind-auto");
    let (snap, compares) = deep_snapshot("auto", &dir);
    assert_complete_stacks(&snap, compares);
    // Every module here lacks frame pointers: every stack is walked from
    // call-frame rows, up to its root (also those glibc starts in ld.so).
    assert_eq!(snap["totals"]["truncated_stacks"], 0, "{snap:#}");
}

/// The kernel's frame-pointer walk cannot get past level5: such stacks are
/// flagged, counted, and rooted at `[truncated]` in folded output.
#[test]
fn frame_pointer_walk_is_marked_truncated() {
    require_root();
    let dir = TempDir::new("unwind-fp");
    let (snap, _) = deep_snapshot("fp", &dir);
    let from_level5 = stacks_from(&snap, "level5");
    assert!(!from_level5.is_empty());
    for s in &from_level5 {
        assert_eq!(s["truncated"], true, "{s}");
        assert!(!functions(s).contains(&"level1".to_string()), "{s}");
    }
    let truncated = snap["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["truncated"] == true)
        .count() as u64;
    assert!(truncated >= from_level5.len() as u64);
    assert_eq!(snap["totals"]["truncated_stacks"], truncated);
    let folded_path = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "collapsed"))
        .expect("collapsed output");
    let folded = std::fs::read_to_string(folded_path).unwrap();
    let level5_lines: Vec<&str> = folded.lines().filter(|l| l.contains(";level5 ")).collect();
    assert!(!level5_lines.is_empty(), "{folded}");
    assert!(
        level5_lines.iter().all(|l| l.starts_with("[truncated];")),
        "{folded}"
    );
}

/// A library without frame pointers `dlopen`ed after attach: its frames are
/// walked from its call-frame rows once heapbpf has re-read the target's
/// maps, also for return addresses the walk met (and cached as unknown)
/// before it had.
#[test]
fn a_library_loaded_after_attach_is_walked_after_the_next_refresh() {
    require_root();
    let dir = TempDir::new("walklib");
    let mut fx = Fixture::spawn("plugin");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--format", "json"]);
    fx.command(&format!("walklib {}", fixture_path("libwalk.so").display()));
    // At once, most likely before heapbpf has seen the library.
    fx.command("walk 5");
    // Maps are re-read every 100 ms for 2 s after attach, then every 2 s.
    std::thread::sleep(std::time::Duration::from_secs(3));
    fx.command("walk 7");
    hb.signal(libc::SIGINT);
    let snap = read_json(&hb.wait_snapshot("stop", fx.pid)[0]);
    assert_eq!(hb.wait_exit().code(), Some(0));
    let chain = [
        "lib_level3",
        "lib_level2",
        "lib_level1",
        "walk_alloc",
        "main",
    ];
    let (mut total, mut complete) = (0, 0);
    for st in stacks_from(&snap, "lib_level3") {
        let n = st["live_allocations"].as_u64().unwrap();
        total += n;
        let f = functions(st);
        if f.len() > chain.len() && f[..chain.len()] == chain && st["truncated"] == false {
            complete += n;
        }
    }
    assert_eq!(total, 12, "{snap}");
    // The 7 after the refresh always; the first 5 too if a refresh came
    // between the dlopen and them.
    assert!(
        complete == 7 || complete == 12,
        "{complete} complete: {snap}"
    );
}
