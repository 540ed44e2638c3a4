//! Bad input: one or two plain lines naming the problem, the contract's exit
//! code, no panic, nothing left behind.
use std::process::Command;

use heapbpf_integration_tests::*;

fn assert_clean_error(code: i32, err: &str, want_code: i32, needle: &str) {
    assert_eq!(code, want_code, "exit code; stderr:\n{err}");
    assert!(
        err.contains(needle),
        "stderr should mention {needle:?}:\n{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    assert!(err.lines().count() <= 3, "one or two plain lines:\n{err}");
}

#[test]
fn no_such_pid() {
    require_root();
    // pid_max is at most 2^22: this pid cannot exist.
    let (code, _, err) = run_heapbpf(&["attach", "4999999"]);
    assert_clean_error(code, &err, 2, "no such process: 4999999");
}

#[test]
fn pids_that_are_not_ours_to_trace() {
    require_root();
    let (code, _, err) = run_heapbpf(&["attach", "2"]);
    assert_clean_error(code, &err, 2, "kernel thread");
}

#[test]
fn output_dir_is_checked_before_attaching() {
    require_root();
    let fx = Fixture::spawn("allocs");
    let pid = fx.pid.to_string();
    let (code, _, err) = run_heapbpf(&["attach", &pid, "-o", "/nonexistent-dir"]);
    assert_clean_error(code, &err, 2, "no such directory");
    let file = TempDir::new("notadir");
    let f = file.path().join("f");
    std::fs::write(&f, b"x").unwrap();
    let (code, _, err) = run_heapbpf(&["attach", &pid, "-o", f.to_str().unwrap()]);
    assert_clean_error(code, &err, 2, "not a directory");
    // Not writable even for root.
    let (code, _, err) = run_heapbpf(&["attach", &pid, "-o", "/proc/self"]);
    assert_clean_error(code, &err, 2, "cannot write snapshots to /proc/self");
}

#[test]
fn bad_flags() {
    let (code, _, err) = run_heapbpf(&["attach", "1", "--duration", "soon"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid duration"), "{err}");
    let (code, _, err) = run_heapbpf(&["attach", "1", "--sample-bytes", "1GiB"]);
    assert_clean_error(code, &err, 2, "--sample-bytes");
    let (code, _, err) = run_heapbpf(&["attach", "1", "--format", "png"]);
    assert_clean_error(code, &err, 2, "png");
    let (code, _, err) = run_heapbpf(&["attach", "notapid"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn malformed_and_truncated_snapshots() {
    let dir = TempDir::new("badsnap");
    let write = |name: &str, body: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.to_string_lossy().into_owned()
    };
    let good = br#"{"format":"heapbpf-snapshot","version":1,"pid":1,"comm":"x","exe":"/x","taken_at":"2026-11-24T19:00:00Z","attached_at":"2026-11-24T19:00:00Z","trigger":"signal","sample_bytes":0,"totals":{"live_bytes":0,"live_allocations":0,"allocated_bytes":0,"allocations":0,"frees":0,"rss_bytes":0,"dropped_events":0},"stacks":[]}"#;
    let (code, out, err) = run_heapbpf(&["report", &write("good.json", good)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no live allocations"), "{out}");
    let (code, _, err) = run_heapbpf(&["report", &write("trunc.json", &good[..good.len() / 2])]);
    assert_clean_error(code, &err, 2, "truncated");
    let (code, _, err) = run_heapbpf(&["report", &write("junk.json", b"\x7fELF junk")]);
    assert_clean_error(code, &err, 2, "not a heapbpf snapshot");
    let (code, _, err) = run_heapbpf(&[
        "report",
        &write("other.json", br#"{"format":"something-else","version":1}"#),
    ]);
    assert_clean_error(code, &err, 2, "not a heapbpf snapshot");
    let (code, _, err) = run_heapbpf(&[
        "report",
        &write("v9.json", br#"{"format":"heapbpf-snapshot","version":9}"#),
    ]);
    assert_clean_error(code, &err, 2, "version 9");
    let (code, _, err) =
        run_heapbpf(&["report", dir.path().join("missing.json").to_str().unwrap()]);
    assert_clean_error(code, &err, 2, "cannot read");
}

#[test]
fn missing_privileges_are_named() {
    require_root();
    let fx = Fixture::spawn("allocs");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(heapbpf_bin())
        .args(["attach", &fx.pid.to_string(), "-o", "/tmp"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_clean_error(out.status.code().unwrap(), &err, 1, "CAP_BPF");
    assert!(err.contains("root"), "{err}");
}

#[test]
fn diff_refuses_bad_inputs_by_name() {
    let dir = TempDir::new("baddiff");
    let write = |name: &str, body: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.to_string_lossy().into_owned()
    };
    let good = write("good.json", br#"{"format":"heapbpf-snapshot","version":1,"pid":1,"comm":"x","exe":"/x","taken_at":"2026-11-24T19:00:00Z","attached_at":"2026-11-24T19:00:00Z","trigger":"signal","sample_bytes":0,"totals":{"live_bytes":0,"live_allocations":0,"allocated_bytes":0,"allocations":0,"frees":0,"rss_bytes":0,"dropped_events":0},"stacks":[]}"#);
    let other = write("other.json", br#"{"format":"heapbpf-snapshot","version":1,"pid":2,"comm":"y","exe":"/y","taken_at":"2026-11-24T19:00:00Z","attached_at":"2026-11-24T19:00:00Z","trigger":"signal","sample_bytes":0,"totals":{"live_bytes":0,"live_allocations":0,"allocated_bytes":0,"allocations":0,"frees":0,"rss_bytes":0,"dropped_events":0},"stacks":[]}"#);
    let (code, out, err) = run_heapbpf(&["diff", &good, &good]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no change"), "{out}");
    // Different executables: compared all the same, with a warning.
    let (code, _, err) = run_heapbpf(&["diff", &good, &other]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning") && err.contains("/y"), "{err}");
    let trunc = write("trunc.json", &std::fs::read(&good).unwrap()[..40]);
    let (code, _, err) = run_heapbpf(&["diff", &good, &trunc]);
    assert_clean_error(code, &err, 2, "truncated");
    let junk = write("junk.json", b"not json");
    let (code, _, err) = run_heapbpf(&["diff", &junk, &good]);
    assert_clean_error(code, &err, 2, "junk.json");
    let v2 = write("v2.json", br#"{"format":"heapbpf-snapshot","version":2}"#);
    let (code, _, err) = run_heapbpf(&["diff", &good, &v2]);
    assert_clean_error(code, &err, 2, "version 2");
    let (code, _, err) = run_heapbpf(&["diff", &good, &good, "--format", "png"]);
    assert_eq!(code, 2, "{err}");
}
