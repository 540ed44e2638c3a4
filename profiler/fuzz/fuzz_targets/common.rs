//! What every snapshot reader promises, checked on each fuzzed input.
use std::path::Path;

use heapbpf::{model::Snapshot, output, report, Error};

/// The file name the readers are given.
pub const PATH: &str = "fuzzed.snapshot";

/// A reader's failure is the contract's bad-input error (exit 2): one plain
/// line that names the file.
pub fn check_error(e: &Error) {
    assert!(matches!(e, Error::BadSnapshot { .. }), "{e:?}");
    assert_eq!(e.exit_code(), 2, "{e}");
    let msg = e.to_string();
    assert!(msg.starts_with(PATH), "{msg}");
    assert!(!msg.chars().any(char::is_control), "{msg:?}");
}

/// A snapshot that reads is one every front end renders, whose figures
/// add up, and that reads back the same from JSON and whole from pprof.
pub fn check_snapshot(s: &Snapshot) {
    let live: u128 = s.stacks.iter().map(|st| u128::from(st.live_bytes)).sum();
    assert_eq!(live, u128::from(s.totals.live_bytes));
    let _ = report::text(s, 10, false);
    let _ = report::json(s, 10);
    let d = heapbpf::model::diff(s, s);
    assert!(d.entries.iter().all(|e| e.delta_bytes == 0), "{d:?}");
    assert_eq!(d.totals.delta_bytes, 0);
    let _ = report::diff_text(&d, 10, false);
    let _ = report::diff_json(&d, 10);
    let _ = output::collapsed::to_string(s);
    let path = Path::new(PATH);
    let again = output::json::from_bytes(path, &output::json::to_bytes(s))
        .unwrap_or_else(|e| panic!("written JSON does not read back: {e}"));
    assert_eq!(&again, s);
    let from_pprof = output::pprof::from_bytes(path, &output::pprof::to_bytes(s))
        .unwrap_or_else(|e| panic!("written pprof does not read back: {e}"));
    assert_eq!(from_pprof.totals, s.totals);
    assert_eq!(from_pprof.stacks.len(), s.stacks.len());
}
