//! The standard outputs of a real profile, opened by the tools users have:
//! `go tool pprof` (installed by `cargo xtask bootstrap`), folded stacks,
//! the SVG flamegraph, and heapbpf's own report reading pprof back.
use std::process::Command;

use heapbpf_integration_tests::*;

const MIB: u64 = 1 << 20;

fn pprof(args: &[&str]) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .env("PPROF_TMPDIR", std::env::temp_dir())
        .output()
        .expect("go tool pprof (cargo xtask bootstrap installs golang-go)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "go tool pprof {args:?} failed:\n{stderr}\n{stdout}"
    );
    assert!(
        !stderr.to_lowercase().contains("warning"),
        "go tool pprof {args:?} warned:\n{stderr}"
    );
    stdout
}

fn by_ext<'a>(paths: &'a [std::path::PathBuf], ext: &str) -> &'a str {
    paths
        .iter()
        .find(|p| p.to_string_lossy().ends_with(ext))
        .unwrap_or_else(|| panic!("no {ext} in {paths:?}"))
        .to_str()
        .unwrap()
}

#[test]
fn every_format_of_a_real_profile_opens_in_the_users_tools() {
    require_root();
    let dir = TempDir::new("formats");
    let mut fx = Fixture::spawn("grow");
    let mut hb = Heapbpf::attach(
        &[fx.pid],
        dir.path(),
        &["--format", "json,pprof,collapsed,svg"],
    );
    fx.command("leak 10 1048576 0");
    fx.command("old 5");
    hb.signal(libc::SIGUSR2);
    let a = hb.wait_snapshot("signal", fx.pid);
    assert_eq!(a.len(), 4, "{a:?}");
    fx.command("leak 6 1048576 0");
    hb.signal(libc::SIGUSR2);
    let b = hb.wait_snapshot("signal", fx.pid);
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));

    let json = read_json(std::path::Path::new(by_ext(&a, ".json")));
    let pb = by_ext(&a, ".pb.gz");
    // inuse_space names the leaking function with the exact byte count.
    let top = pprof(&["-top", "-unit=B", "-sample_index=inuse_space", pb]);
    let row = top
        .lines()
        .find(|l| l.trim_end().ends_with(" grow_leak"))
        .unwrap_or_else(|| panic!("{top}"));
    assert!(
        row.trim_start().starts_with(&format!("{}B ", 10 * MIB)),
        "{row}"
    );
    assert!(
        top.contains(&format!("of {}B total", json["totals"]["live_bytes"])),
        "{top}"
    );
    // alloc_space gives the total allocated since attach.
    let top = pprof(&["-top", "-unit=B", "-sample_index=alloc_space", pb]);
    assert!(
        top.contains(&format!("of {}B total", json["totals"]["allocated_bytes"])),
        "{top}"
    );
    let objects = pprof(&["-top", "-sample_index=inuse_objects", pb]);
    assert!(
        objects
            .lines()
            .any(|l| l.trim_start().starts_with("10 ") && l.ends_with(" grow_leak")),
        "{objects}"
    );
    let traces = pprof(&["-traces", pb]);
    assert!(
        traces.contains("grow_leak") && traces.contains("main"),
        "{traces}"
    );
    let list = pprof(&["-list", "grow_leak", pb]);
    assert!(
        list.contains("ROUTINE") && list.contains("malloc(size)"),
        "{list}"
    );
    // -base: what grew between the two snapshots.
    let base = pprof(&[
        "-top",
        "-unit=B",
        "-sample_index=inuse_space",
        "-base",
        pb,
        by_ext(&b, ".pb.gz"),
    ]);
    let row = base
        .lines()
        .find(|l| l.trim_end().ends_with(" grow_leak"))
        .unwrap_or_else(|| panic!("{base}"));
    assert!(
        row.trim_start().starts_with(&format!("{}B ", 6 * MIB)),
        "{row}"
    );

    // Folded stacks and the flamegraph name the leak, root first.
    let folded = std::fs::read_to_string(by_ext(&a, ".collapsed")).unwrap();
    let line = folded
        .lines()
        .find(|l| l.contains("grow_leak"))
        .unwrap_or_else(|| panic!("{folded}"));
    assert!(
        line.ends_with(&format!(";main;grow_leak {}", 10 * MIB)),
        "{line}"
    );
    let svg = std::fs::read_to_string(by_ext(&a, ".svg")).unwrap();
    assert!(
        svg.starts_with("<?xml") && svg.contains("grow_leak") && svg.contains("(pid "),
        "not a heapbpf flamegraph"
    );

    // heapbpf reads its own pprof back and agrees with the JSON.
    let (code, from_pb, err) = run_heapbpf(&["report", pb, "--format", "json", "--top", "50"]);
    assert_eq!(code, 0, "{err}");
    let (_, from_json, _) = run_heapbpf(&[
        "report",
        by_ext(&a, ".json"),
        "--format",
        "json",
        "--top",
        "50",
    ]);
    assert_eq!(from_pb, from_json);
    // And diff reads pprof too; collapsed and svg give differential flamegraphs.
    let (code, out, err) =
        run_heapbpf(&["diff", pb, by_ext(&b, ".pb.gz"), "--format", "collapsed"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.ends_with(&format!("grow_leak {} {}", 10 * MIB, 16 * MIB))),
        "{out}"
    );
    let (code, out, _) = run_heapbpf(&[
        "diff",
        by_ext(&a, ".json"),
        by_ext(&b, ".json"),
        "--format",
        "svg",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("<svg") && out.contains("grow_leak"));
}
