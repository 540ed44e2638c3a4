//! heapbpf attached to real fixture programs through real uprobes: exact
//! figures per call site, signals, target exit, containers, bad input.
use std::{path::Path, process::Command};

use heapbpf_integration_tests::*;

/// Per-thread figures of each call site of `fixtures/allocs.c`:
/// (function, live bytes, live allocations, allocated bytes, allocations).
const EXPECTED: &[(&str, u64, u64, u64, u64)] = &[
    ("site_malloc", 10_000, 10, 10_000, 10),
    ("site_malloc_freed", 0, 0, 1_280, 20),
    ("site_calloc", 5_000, 5, 5_000, 5),
    // Moved by realloc: freed at the seed site, allocated at the realloc.
    ("site_realloc_seed", 0, 0, 400, 4),
    ("site_realloc_grow", 20_000, 4, 20_000, 4),
    // realloc(NULL, n) counts once, at the realloc, not also as glibc's
    // inner malloc.
    ("site_realloc_null", 9_000, 3, 9_000, 3),
    // realloc(p, 0) frees p and (with glibc) allocates nothing.
    ("site_realloc_zero_seed", 0, 0, 1_400, 2),
    ("site_realloc_zero", 0, 0, 0, 0),
    // A failed realloc leaves the block live where it was allocated.
    ("site_realloc_fail_seed", 1_600, 2, 1_600, 2),
    ("site_realloc_fail", 0, 0, 0, 0),
    // reallocarray calls realloc inside glibc: counted once.
    ("site_reallocarray", 900, 3, 900, 3),
    ("site_malloc_fail", 0, 0, 0, 0),
    ("site_free_null", 0, 0, 0, 0),
    ("site_posix_memalign", 4_000, 4, 4_000, 4),
    ("site_aligned_alloc", 3_072, 3, 3_072, 3),
    // memalign with a small alignment calls malloc inside glibc: counted once.
    ("site_memalign_small", 400, 2, 400, 2),
    ("site_memalign", 600, 2, 600, 2),
    ("site_valloc", 10_000, 2, 10_000, 2),
    // pvalloc rounds up to a page; the figure is the size asked for.
    ("site_pvalloc", 200, 2, 200, 2),
    ("site_calloc_overflow", 0, 0, 0, 0),
    // Allocated before attach, freed after: never negative, never counted.
    ("site_pre", 0, 0, 0, 0),
];
const THREADS: u64 = 4;
/// Frees of tracked blocks per thread: 20 malloc/free, 4 moved by realloc,
/// 2 freed by realloc(p, 0).
const FREES_PER_THREAD: u64 = 26;

fn assert_exact(snapshot: &Value, fixture_module: &str) {
    assert_exact_with(snapshot, fixture_module, 0)
}

/// `zero_blocks`: per thread, how many 0-byte blocks `realloc(p, 0)`
/// returned (glibc, jemalloc, tcmalloc: none; mimalloc: one per call). Such
/// a realloc is a free of `p` and an allocation of 0 bytes, which the
/// fixture then frees.
fn assert_exact_with(snapshot: &Value, fixture_module: &str, zero_blocks: u64) {
    for &(function, live_bytes, live_allocations, allocated_bytes, allocations) in EXPECTED {
        let allocations = if function == "site_realloc_zero" {
            zero_blocks
        } else {
            allocations
        };
        let want = Site {
            live_bytes: live_bytes * THREADS,
            live_allocations: live_allocations * THREADS,
            allocated_bytes: allocated_bytes * THREADS,
            allocations: allocations * THREADS,
        };
        assert_eq!(site(snapshot, function), want, "figures of {function}");
    }
    assert_eq!(
        snapshot["totals"]["frees"],
        (FREES_PER_THREAD + zero_blocks) * THREADS
    );
    assert_eq!(snapshot["totals"]["dropped_events"], 0);
    // The caller of the allocator is frames[0], with file, line and module.
    let st = snapshot["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["frames"][0]["function"] == "site_malloc")
        .expect("site_malloc stack");
    let f0 = &st["frames"][0];
    assert!(f0["file"].as_str().unwrap().ends_with("allocs.c"), "{f0}");
    assert!(f0["line"].as_u64().unwrap() > 0, "{f0}");
    assert_eq!(f0["module"], fixture_module, "{f0}");
    assert_eq!(f0["inlined"], false);
    assert!(f0["address"].as_str().unwrap().starts_with("0x"));
    assert_eq!(st["frames"][1]["function"], "scenario", "{st}");
    // Sorted by live bytes, largest first.
    let live: Vec<u64> = snapshot["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["live_bytes"].as_u64().unwrap())
        .collect();
    assert!(live.windows(2).all(|w| w[0] >= w[1]), "{live:?}");
}

#[test]
fn exact_figures_per_call_site_in_four_threads() {
    require_root();
    let dir = TempDir::new("exact");
    let mut fx = Fixture::spawn("allocs");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &[]);
    fx.command("run");
    fx.command("free-pre");
    hb.signal(libc::SIGUSR2);
    let paths = hb.wait_snapshot("signal", fx.pid);
    // The default formats: json and pprof.
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(
        paths[1].to_string_lossy().ends_with("-0001.pb.gz"),
        "{paths:?}"
    );
    let name = paths[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("heapbpf-{}-", fx.pid)) && name.ends_with("-0001.json"),
        "{name}"
    );
    let snap = read_json(&paths[0]);
    assert_eq!(snap["format"], "heapbpf-snapshot");
    assert_eq!(snap["version"], 1);
    assert_eq!(snap["pid"], fx.pid);
    assert_eq!(snap["comm"], "allocs");
    assert_eq!(snap["trigger"], "signal");
    assert_eq!(snap["sample_bytes"], 0);
    assert!(snap["totals"]["rss_bytes"].as_u64().unwrap() > 0);
    let module = fixture_path("allocs").to_string_lossy().into_owned();
    assert_exact(&snap, &module);
    assert_eq!(snap["exe"], module);

    // A second snapshot gets the next sequence number; nothing half-written
    // is left behind.
    hb.signal(libc::SIGUSR2);
    let second = hb.wait_snapshot("signal", fx.pid);
    assert!(second[0].to_string_lossy().ends_with("-0002.json"));
    hb.signal(libc::SIGINT);
    let stop = hb.wait_snapshot("stop", fx.pid);
    assert_exact(&read_json(&stop[0]), &module);
    assert_eq!(hb.wait_exit().code(), Some(0));
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 6, "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| f.starts_with("heapbpf-") && (f.ends_with(".json") || f.ends_with(".pb.gz"))),
        "{files:?}"
    );

    // Detached: the target runs on unharmed.
    fx.command("run");
}

/// The figures do not depend on how stacks are walked; with the call-frame
/// walk every stack of the fixture's threads reaches the thread's start.
#[test]
fn exact_figures_are_the_same_under_each_unwinding_mode() {
    require_root();
    for mode in ["dwarf", "fp"] {
        let dir = TempDir::new("exact-unwind");
        let mut fx = Fixture::spawn("allocs");
        let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--unwind", mode]);
        fx.command("run");
        fx.command("free-pre");
        hb.signal(libc::SIGINT);
        let snap = read_json(&hb.wait_snapshot("stop", fx.pid)[0]);
        assert_eq!(hb.wait_exit().code(), Some(0));
        let module = fixture_path("allocs").to_string_lossy().into_owned();
        assert_exact(&snap, &module);
        if mode == "dwarf" {
            for st in snap["stacks"].as_array().unwrap() {
                let last = st["frames"].as_array().unwrap().last().unwrap();
                assert_eq!(st["truncated"], false, "{st}");
                assert!(
                    ["clone3", "_start"].contains(&last["function"].as_str().unwrap_or("?")),
                    "{st}"
                );
            }
            assert_eq!(snap["totals"]["truncated_stacks"], 0);
        }
    }
}

/// On this kernel the allocating functions are hooked with uprobe sessions
/// (one program at entry, and at return only when the entry asks); the
/// uprobe + uretprobe pairs heapbpf uses where the kernel has no sessions
/// count exactly the same.
#[test]
fn exact_figures_with_uprobe_sessions_and_with_return_probes() {
    require_root();
    for (extra, placed) in [
        (&["-v"][..], "probe placed at malloc+0x0 (session"),
        (
            &["-v", "--no-uprobe-sessions"][..],
            "probe placed at malloc+0x0 (return)",
        ),
    ] {
        let dir = TempDir::new("exact-probes");
        let mut fx = Fixture::spawn("allocs");
        let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), extra);
        assert!(
            hb.stderr.iter().any(|l| l.contains(placed)),
            "{extra:?}: no {placed:?} in\n{}",
            hb.stderr.join("\n")
        );
        fx.command("run");
        fx.command("free-pre");
        hb.signal(libc::SIGINT);
        let snap = read_json(&hb.wait_snapshot("stop", fx.pid)[0]);
        assert_eq!(hb.wait_exit().code(), Some(0));
        assert_exact(&snap, &fixture_path("allocs").to_string_lossy());
    }
}

#[test]
fn target_exit_writes_a_symbolized_final_snapshot() {
    require_root();
    let dir = TempDir::new("exit");
    let mut fx = Fixture::spawn("allocs");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &[]);
    fx.command("run");
    fx.command("exit");
    assert!(fx.wait_exit().success());
    let paths = hb.wait_snapshot("exit", fx.pid);
    let snap = read_json(&paths[0]);
    assert_eq!(snap["trigger"], "exit");
    assert_exact(&snap, &fixture_path("allocs").to_string_lossy());
    assert_eq!(
        hb.wait_exit().code(),
        Some(0),
        "heapbpf exits 0 once no target is left"
    );
}

#[test]
fn duration_ends_with_a_final_snapshot() {
    require_root();
    let dir = TempDir::new("duration");
    let mut fx = Fixture::spawn("allocs");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--duration", "1s"]);
    fx.command("run");
    let paths = hb.wait_snapshot("duration", fx.pid);
    assert_eq!(
        site(&read_json(&paths[0]), "site_malloc").live_bytes,
        40_000
    );
    assert_eq!(hb.wait_exit().code(), Some(0));
    fx.command("run");
}

#[test]
fn several_targets_at_once() {
    require_root();
    let dir = TempDir::new("multi");
    let mut a = Fixture::spawn("allocs");
    let mut b = Fixture::spawn("allocs");
    let mut hb = Heapbpf::attach(&[a.pid, b.pid], dir.path(), &[]);
    a.command("run");
    b.command("run");
    b.command("run");
    hb.signal(libc::SIGUSR2);
    let pa = hb.wait_snapshot("signal", a.pid);
    let pb = hb.wait_snapshot("signal", b.pid);
    assert_eq!(site(&read_json(&pa[0]), "site_malloc").live_bytes, 40_000);
    assert_eq!(site(&read_json(&pb[0]), "site_malloc").live_bytes, 80_000);
    // One target leaves; heapbpf stays for the other.
    a.command("exit");
    hb.wait_snapshot("exit", a.pid);
    b.command("run");
    hb.signal(libc::SIGTERM);
    let last = hb.wait_snapshot("stop", b.pid);
    assert_eq!(
        site(&read_json(&last[0]), "site_malloc").live_bytes,
        120_000
    );
    assert_eq!(hb.wait_exit().code(), Some(0));
}

/// Copies the fixture and the libraries it needs (its own libc, a different
/// file from the host's) into `root`.
fn build_chroot(root: &Path) {
    let fixture = fixture_path("allocs");
    std::fs::copy(&fixture, root.join("allocs")).unwrap();
    copy_with_libraries(root, &fixture);
}

/// Copies the shared libraries `elf` needs (and `elf` itself, if it is a
/// library path) into `root` at the same paths.
fn copy_with_libraries(root: &Path, elf: &Path) {
    let ldd = Command::new("ldd").arg(elf).output().unwrap();
    assert!(ldd.status.success());
    let own = elf
        .to_str()
        .filter(|p| p.contains(".so"))
        .map(str::to_string);
    let listed = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(str::to_string)
        })
        .collect::<Vec<_>>();
    for path in own.into_iter().chain(listed) {
        let dst = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&path, &dst).unwrap();
    }
}

#[test]
fn a_target_in_its_own_mount_and_pid_namespace_with_its_own_libc() {
    require_root();
    let root = TempDir::new("chroot");
    build_chroot(root.path());
    let dir = TempDir::new("chroot-out");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--pid", "--fork", "chroot"])
        .arg(root.path())
        .arg("/allocs");
    let mut fx = Fixture::from_command(&mut cmd, |unshare, own_pid| {
        assert_eq!(own_pid, 1, "the fixture should be pid 1 of its namespace");
        // unshare --fork: the fixture is unshare's only child.
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id())).unwrap();
        children
            .split_whitespace()
            .next()
            .expect("unshare has a child")
            .parse()
            .unwrap()
    });
    // Its libc is a copy: hooking the host's libc would see nothing.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", fx.pid)).unwrap();
    assert!(maps.contains("/allocs"), "{maps}");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &[]);
    fx.command("run");
    fx.command("free-pre");
    hb.signal(libc::SIGUSR2);
    let snap = read_json(&hb.wait_snapshot("signal", fx.pid)[0]);
    assert_eq!(snap["pid"], fx.pid, "the host pid");
    assert_exact(&snap, "/allocs");
    assert_eq!(snap["exe"], "/allocs");
    fx.command("exit");
    let last = read_json(&hb.wait_snapshot("exit", fx.pid)[0]);
    assert_exact(&last, "/allocs");
    assert_eq!(hb.wait_exit().code(), Some(0));
}

#[test]
fn a_containerised_target_with_its_own_tcmalloc() {
    require_root();
    let root = TempDir::new("chroot-tc");
    build_chroot(root.path());
    let tcmalloc = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4";
    copy_with_libraries(root.path(), Path::new(tcmalloc));
    let dir = TempDir::new("chroot-tc-out");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--pid", "--fork", "chroot"])
        .arg(root.path())
        .arg("/allocs")
        .env("LD_PRELOAD", tcmalloc);
    let mut fx = Fixture::from_command(&mut cmd, |unshare, _| {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id())).unwrap();
        children
            .split_whitespace()
            .next()
            .expect("unshare has a child")
            .parse()
            .unwrap()
    });
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--format", "json"]);
    let attached = hb
        .stderr
        .iter()
        .find(|l| l.contains(" attached to "))
        .unwrap()
        .clone();
    assert!(
        attached.contains(&format!("probes in {tcmalloc}")),
        "the container's own tcmalloc copy: {attached}"
    );
    fx.command("run");
    fx.command("free-pre");
    hb.signal(libc::SIGUSR2);
    let snap = read_json(&hb.wait_snapshot("signal", fx.pid)[0]);
    assert_exact(&snap, "/allocs");
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));
}

#[test]
fn report_reads_a_real_snapshot() {
    require_root();
    let dir = TempDir::new("report");
    let mut fx = Fixture::spawn("allocs");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &[]);
    fx.command("run");
    hb.signal(libc::SIGINT);
    let path = hb.wait_snapshot("stop", fx.pid)[0].clone();
    let (code, out, err) = run_heapbpf(&["report", path.to_str().unwrap(), "--top", "3"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    // The three largest sites, in order: realloc_grow 80000, then valloc and
    // malloc with 40000 each.
    let rank = |f: &str| {
        lines
            .iter()
            .position(|l| l.contains(f))
            .unwrap_or_else(|| panic!("{f} missing:\n{out}"))
    };
    assert!(
        rank("site_realloc_grow (allocs.c:") < rank("site_valloc (allocs.c:"),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("78.1 KiB") && l.contains("site_realloc_grow")),
        "{out}"
    );
    assert!(
        !out.contains("site_calloc"),
        "--top 3 shows three sites:\n{out}"
    );
    let (code, out, _) = run_heapbpf(&["report", path.to_str().unwrap(), "--format", "json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["stacks"][0]["live_bytes"], 80_000);
    assert_eq!(v["stacks"][0]["frames"][0]["function"], "site_realloc_grow");
}

#[test]
fn a_burst_of_signals_never_writes_half_files() {
    require_root();
    let dir = TempDir::new("burst");
    let mut fx = Fixture::spawn("allocs");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--format", "json"]);
    fx.command("run");
    for _ in 0..20 {
        hb.signal(libc::SIGUSR2);
    }
    hb.wait_snapshot("signal", fx.pid);
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let lines = count_snapshot_lines(&hb.stderr, None);
    assert_eq!(names.len(), lines, "one file per snapshot line: {names:?}");
    for (i, name) in names.iter().enumerate() {
        assert!(
            name.ends_with(&format!("-{:04}.json", i + 1)),
            "sequence numbers in order: {names:?}"
        );
        let snap = read_json(&dir.path().join(name));
        assert_eq!(site(&snap, "site_malloc").live_bytes, 40_000, "{name}");
    }
}

/// The same exact figures with another allocator serving the fixture:
/// heapbpf hooks the allocator library, and the C library for what it does
/// not export (reallocarray, pvalloc), which glibc then serves.
fn exact_with_preloaded(library: &str, name: &str, zero_blocks: u64) {
    require_root();
    let fx = Fixture::spawn_preloaded("allocs", library);
    exact_under(fx, "allocs", name, zero_blocks, "run");
}

/// Attaches to `fx` (the allocs fixture built as `fixture`), checks that the
/// `attached` line names `name`, runs the scenario with `run`, and asserts
/// every site's figures.
fn exact_under(mut fx: Fixture, fixture: &str, name: &str, zero_blocks: u64, run: &str) {
    let dir = TempDir::new("exact-under");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--format", "json"]);
    let attached = hb
        .stderr
        .iter()
        .find(|l| l.contains(" attached to "))
        .unwrap()
        .clone();
    assert!(attached.contains(name), "{attached}");
    fx.command(run);
    fx.command("free-pre");
    hb.signal(libc::SIGINT);
    let snap = read_json(&hb.wait_snapshot("stop", fx.pid)[0]);
    assert_exact_with(&snap, &fixture_path(fixture).to_string_lossy(), zero_blocks);
    assert_eq!(hb.wait_exit().code(), Some(0));
}

// No preloaded-jemalloc variant: with jemalloc preloaded, the fixture's own
// threads sometimes abort in glibc ("malloc assertion failure in
// __malloc_arena_thread_freeres: a->attached_threads > 0"), without heapbpf
// too, once its threads overlap (glibc then serves the pvalloc and
// reallocarray jemalloc lacks). jemalloc is covered by the linked tests
// below (threads one after another) and the redis test.

#[test]
fn exact_figures_with_tcmalloc() {
    exact_with_preloaded(
        "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
        "libtcmalloc",
        0,
    );
}

#[test]
fn exact_figures_in_a_statically_linked_program() {
    require_root();
    let dir = TempDir::new("static");
    let mut fx = Fixture::spawn("allocs-static");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--format", "json"]);
    let module = fixture_path("allocs-static").to_string_lossy().into_owned();
    let attached = hb
        .stderr
        .iter()
        .find(|l| l.contains(" attached to "))
        .unwrap()
        .clone();
    assert!(
        attached.contains(&format!("probes in {module};")),
        "malloc lives in the executable: {attached}"
    );
    fx.command("run");
    fx.command("free-pre");
    hb.signal(libc::SIGUSR2);
    let snap = read_json(&hb.wait_snapshot("signal", fx.pid)[0]);
    assert_exact(&snap, &module);
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));
}

#[test]
fn exact_figures_with_mimalloc() {
    exact_with_preloaded(
        "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2.0",
        "libmimalloc",
        2,
    );
}

/// The allocs fixture linked against an allocator (not preloaded): found
/// through the target's maps, exact on every site.
fn exact_linked(fixture: &str, name: &str, zero_blocks: u64) {
    exact_linked_with(fixture, name, zero_blocks, "run")
}

fn exact_linked_with(fixture: &str, name: &str, zero_blocks: u64, run: &str) {
    require_root();
    exact_under(Fixture::spawn(fixture), fixture, name, zero_blocks, run);
}

/// Its threads run one after another: see `run-serial` in the fixture.
/// jemalloc's `malloc` starts with `cmp $0x1000,%rdi` (single-stepped) and
/// `ja`: its probe, which also takes the return, sits on the `ja`, as a
/// uprobe session and as a uprobe + uretprobe pair; the figures stay exact.
#[test]
fn exact_figures_linked_against_jemalloc_with_moved_probes() {
    require_root();
    for extra in [&["-v"][..], &["-v", "--no-uprobe-sessions"]] {
        let dir = TempDir::new("exact-jemalloc");
        let mut fx = Fixture::spawn("allocs-jemalloc");
        let args = [&["--format", "json"][..], extra].concat();
        let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &args);
        let placed = hb
            .stderr
            .iter()
            .find(|l| l.contains("probe placed at malloc+") && l.contains("libjemalloc"))
            .unwrap_or_else(|| panic!("{extra:?}: {}", hb.stderr.join("\n")))
            .clone();
        assert!(!placed.contains("malloc+0x0 "), "{extra:?}: {placed}");
        fx.command("run-serial");
        fx.command("free-pre");
        hb.signal(libc::SIGINT);
        let snap = read_json(&hb.wait_snapshot("stop", fx.pid)[0]);
        assert_exact_with(&snap, &fixture_path("allocs-jemalloc").to_string_lossy(), 0);
        assert_eq!(hb.wait_exit().code(), Some(0));
    }
}

/// jemalloc linked into the executable itself (`libjemalloc.a`, no
/// prefix): the executable's malloc family is hooked.
#[test]
fn exact_figures_with_jemalloc_linked_in() {
    let exe = fixture_path("allocs-jemalloc-static")
        .to_string_lossy()
        .into_owned();
    exact_linked_with(
        "allocs-jemalloc-static",
        &format!("probes in {exe}"),
        0,
        "run-serial",
    );
}

#[test]
fn exact_figures_linked_against_tcmalloc() {
    exact_linked("allocs-tcmalloc", "libtcmalloc", 0);
}

#[test]
fn exact_figures_linked_against_mimalloc() {
    exact_linked("allocs-mimalloc", "libmimalloc", 2);
}

/// An allocator a target loads after attach (`dlopen`) is hooked within a
/// maps refresh; the C library stays hooked.
#[test]
fn an_allocator_loaded_after_attach_is_picked_up() {
    require_root();
    let dir = TempDir::new("dlopen");
    let mut fx = Fixture::spawn("plugin");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--format", "json"]);
    fx.command("load");
    let line = hb.wait_for("mimalloc hooked", |l| {
        l.starts_with("heapbpf: hooked ") && l.contains("libmimalloc")
    });
    assert!(
        line.contains(&format!(" in {} (plugin), mapped since: ", fx.pid)),
        "{line}"
    );
    fx.command("alloc 20");
    fx.command("libc 30");
    hb.signal(libc::SIGINT);
    let snap = read_json(&hb.wait_snapshot("stop", fx.pid)[0]);
    assert_eq!(hb.wait_exit().code(), Some(0));
    assert_eq!(
        site(&snap, "plugin_alloc"),
        Site {
            live_bytes: 20_000,
            live_allocations: 20,
            allocated_bytes: 20_000,
            allocations: 20
        }
    );
    assert_eq!(
        site(&snap, "libc_alloc"),
        Site {
            live_bytes: 21_000,
            live_allocations: 30,
            allocated_bytes: 21_000,
            allocations: 30
        }
    );
    assert!(
        hb.stderr
            .iter()
            .filter(|l| l.contains("libmimalloc"))
            .count()
            == 1,
        "{:?}",
        hb.stderr
    );
}

/// Figures of `fixtures/vendored.c`'s sites after `run`.
fn assert_vendored(snap: &Value, glibc_seen: bool) {
    let exact = |bytes: u64, n: u64| Site {
        live_bytes: bytes * n,
        live_allocations: n,
        allocated_bytes: bytes * n,
        allocations: n,
    };
    assert_eq!(site(snap, "vendored_site"), exact(500, 10), "{snap:#}");
    assert_eq!(
        site(snap, "vendored_freed"),
        Site {
            allocated_bytes: 1000,
            allocations: 5,
            ..Site::default()
        }
    );
    assert_eq!(site(snap, "vendored_calloc"), exact(300, 4));
    // Moved by realloc: freed at the seed, allocated at the realloc.
    assert_eq!(
        site(snap, "vendored_seed"),
        Site {
            allocated_bytes: 300,
            allocations: 3,
            ..Site::default()
        }
    );
    assert_eq!(site(snap, "vendored_grow"), exact(900, 3));
    assert_eq!(site(snap, "vendored_aligned"), exact(700, 2));
    if glibc_seen {
        assert_eq!(site(snap, "glibc_site"), exact(300, 6));
    }
    assert_eq!(snap["totals"]["dropped_events"], 0);
}

fn vendored_snapshot(fixture: &str, extra: &[&str]) -> (Value, String) {
    let dir = TempDir::new("vendored");
    let mut fx = Fixture::spawn(fixture);
    let mut args = vec!["--format", "json"];
    args.extend_from_slice(extra);
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &args);
    let attached = hb
        .stderr
        .iter()
        .find(|l| l.contains(" attached to "))
        .unwrap()
        .clone();
    fx.command("run");
    hb.signal(libc::SIGINT);
    let snap = read_json(&hb.wait_snapshot("stop", fx.pid)[0]);
    assert_eq!(hb.wait_exit().code(), Some(0));
    (snap, attached)
}

/// A program that links a jemalloc-style allocator with its `je_` prefix
/// beside glibc's malloc: both are found and hooked, exact on every site;
/// the same with `--allocator PATH:je_`.
#[test]
fn a_vendored_prefixed_allocator_beside_glibc() {
    require_root();
    let exe = fixture_path("vendored-je").to_string_lossy().into_owned();
    let (snap, attached) = vendored_snapshot("vendored-je", &[]);
    assert!(attached.contains(&format!("{exe} (je_*)")), "{attached}");
    assert!(attached.contains("libc.so.6"), "{attached}");
    assert_vendored(&snap, true);
    let flag = format!("{exe}:je_");
    let (snap, attached) = vendored_snapshot("vendored-je", &["--allocator", &flag]);
    assert!(attached.contains(&format!("{exe} (je_*)")), "{attached}");
    assert_vendored(&snap, true);
}

/// An allocator under a prefix heapbpf does not know (`acme_`), found by its
/// shape (`acme_malloc`, `acme_free`, `acme_posix_memalign`) without
/// `--allocator`, and hooked beside glibc's malloc.
#[test]
fn an_allocator_under_a_projects_own_prefix() {
    require_root();
    let exe = fixture_path("vendored-acme").to_string_lossy().into_owned();
    let (snap, attached) = vendored_snapshot("vendored-acme", &[]);
    assert!(attached.contains(&format!("{exe} (acme_*)")), "{attached}");
    assert!(attached.contains("libc.so.6"), "{attached}");
    assert_vendored(&snap, true);
}

/// A dynamically linked program that defines malloc and free itself: its
/// own functions are hooked, not glibc's it never calls.
#[test]
fn a_program_with_its_own_malloc() {
    require_root();
    let exe = fixture_path("vendored-plain")
        .to_string_lossy()
        .into_owned();
    let (snap, attached) = vendored_snapshot("vendored-plain", &[]);
    assert!(attached.contains(&format!("probes in {exe}")), "{attached}");
    assert_vendored(&snap, true);
}
