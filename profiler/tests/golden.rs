//! Golden tests of every output format on fixed snapshots. A difference
//! fails; `cargo xtask bless` (HEAPBPF_BLESS=1) rewrites the expected files,
//! never silently.
use std::path::{Path, PathBuf};

use heapbpf::{
    model::diff,
    output::{collapsed, json, pprof, svg},
    report,
};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn check(name: &str, actual: &[u8]) {
    let path = dir().join(name);
    if std::env::var_os("HEAPBPF_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run `cargo xtask bless` to create it)",
            path.display()
        )
    });
    if expected != actual {
        let got = dir().join(format!("{name}.actual"));
        std::fs::write(&got, actual).unwrap();
        panic!("{name} differs from its golden file; see {} (bless with `cargo xtask bless` if intended)", got.display());
    }
}

fn load(name: &str) -> heapbpf::model::Snapshot {
    heapbpf::output::read_snapshot(&dir().join(name)).unwrap()
}

#[test]
fn snapshot_formats() {
    let s = load("new.json");
    check("new.collapsed", collapsed::to_string(&s).as_bytes());
    check("new.svg", &svg::to_bytes(&s).unwrap());
    check(
        "new.pprof.txt",
        format!("{:#?}\n", pprof::to_profile(&s)).as_bytes(),
    );
    check("new.report.txt", report::text(&s, 10, false).as_bytes());
    check("new.report.json", report::json(&s, 10).as_bytes());
    check("new.json.out", &json::to_bytes(&s));
}

#[test]
fn diff_formats() {
    let d = diff(&load("old.json"), &load("new.json"));
    check("diff.txt", report::diff_text(&d, 10, false).as_bytes());
    check("diff.json", report::diff_json(&d, 10).as_bytes());
    check("diff.collapsed", collapsed::diff_to_string(&d).as_bytes());
    check("diff.svg", &svg::diff_to_bytes(&d).unwrap());
}

#[test]
fn pprof_reads_back_as_the_same_snapshot() {
    let s = load("new.json");
    let bytes = pprof::to_bytes(&s);
    let back = pprof::from_bytes(Path::new("new.pb.gz"), &bytes).unwrap();
    assert_eq!(back, s);
    // Truncated gzip is a clear error, not a panic.
    let err = pprof::from_bytes(Path::new("t.pb.gz"), &bytes[..bytes.len() / 2]).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("t.pb.gz"), "{err}");
}
