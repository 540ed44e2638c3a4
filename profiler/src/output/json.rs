//! The canonical JSON snapshot: written by `attach`, read by `report` (and
//! `diff`), with errors that say what is wrong with a file.
use std::path::Path;

use crate::{
    error::{Error, Result},
    model::{Snapshot, SNAPSHOT_FORMAT, SNAPSHOT_VERSION},
};

/// Compact: a snapshot is data for programs (`report`, `diff`; `jq .` to
/// read one by eye), and indentation was 30% of a large one (207 MB pretty,
/// 146 MB compact with 32,768 stacks of 20 frames).
pub fn to_bytes(snapshot: &Snapshot) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = to_writer(snapshot, &mut v);
    v
}

/// Writes what [`to_bytes`] returns, without holding it in memory.
pub fn to_writer(
    snapshot: &Snapshot,
    w: &mut (impl std::io::Write + ?Sized),
) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, snapshot)?;
    w.write_all(b"\n")
}

/// Parses a snapshot, checking format and version before the fields so that
/// the error names the real problem.
pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Snapshot> {
    // Parse errors quote the file: nothing of it reaches a terminal raw.
    let bad = |why: String| Error::BadSnapshot {
        path: path.to_path_buf(),
        why: crate::lines::escape(&why).into_owned(),
    };
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_eof() {
            bad(format!("truncated JSON ({e}); the file is incomplete"))
        } else {
            bad(format!("not a heapbpf snapshot: invalid JSON ({e})"))
        }
    })?;
    match value.get("format").and_then(|f| f.as_str()) {
        Some(SNAPSHOT_FORMAT) => {}
        Some(other) => {
            return Err(bad(format!(
                "not a heapbpf snapshot: format is {other:?}, expected {SNAPSHOT_FORMAT:?}"
            )))
        }
        None => {
            return Err(bad(format!(
                "not a heapbpf snapshot: no \"format\": {SNAPSHOT_FORMAT:?} field"
            )))
        }
    }
    let version = value.get("version");
    match version.map(|v| (v, v.as_u64())) {
        Some((_, Some(v))) if v == SNAPSHOT_VERSION as u64 => {}
        Some((_, Some(v))) => {
            return Err(bad(format!(
                "snapshot version {v} is not supported (this heapbpf reads version {SNAPSHOT_VERSION}); use a matching heapbpf"
            )))
        }
        Some((v, None)) => {
            let what = match v {
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "not a whole number",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Null => "null",
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::Object(_) => "an object",
            };
            let mut shown = v.to_string();
            if shown.len() > 40 {
                shown = format!("{}...", shown.chars().take(40).collect::<String>());
            }
            return Err(bad(format!(
                "malformed snapshot: \"version\" is {what} ({shown}), expected the number {SNAPSHOT_VERSION}"
            )));
        }
        None => return Err(bad("malformed snapshot: no \"version\" field".into())),
    }
    serde_json::from_value(value).map_err(|e| bad(format!("malformed snapshot: {e}")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Address, Frame, Stack, Totals, Trigger};

    pub(crate) fn sample() -> Snapshot {
        Snapshot {
            mappings: Vec::new(),
            format: SNAPSHOT_FORMAT.into(),
            version: SNAPSHOT_VERSION,
            pid: 1234,
            comm: "app".into(),
            exe: "/usr/local/bin/app".into(),
            taken_at: "2026-11-24T19:00:00Z".into(),
            attached_at: "2026-11-24T18:59:00Z".into(),
            trigger: Trigger::Signal,
            sample_bytes: 0,
            totals: Totals {
                live_bytes: 4096000,
                live_allocations: 1000,
                allocated_bytes: 4096000,
                allocations: 1000,
                frees: 0,
                rss_bytes: 8 << 20,
                dropped_events: 0,
                dropped: Default::default(),
                truncated_stacks: 0,
            },
            stacks: vec![Stack {
                live_bytes: 4096000,
                live_allocations: 1000,
                allocated_bytes: 4096000,
                allocations: 1000,
                oldest_age_ms: 5120,
                truncated: false,
                frames: vec![Frame {
                    address: Address(0x401136),
                    function: Some("leak_malloc".into()),
                    file: Some("leak.c".into()),
                    line: Some(12),
                    module: Some("/usr/local/bin/app".into()),
                    inlined: false,
                }],
            }],
        }
    }

    #[test]
    fn round_trips_and_matches_the_contract_field_names() {
        let s = sample();
        let bytes = to_bytes(&s);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["format"], "heapbpf-snapshot");
        assert_eq!(v["trigger"], "signal");
        assert_eq!(v["stacks"][0]["frames"][0]["address"], "0x401136");
        assert_eq!(v["totals"]["dropped_events"], 0);
        assert_eq!(from_bytes(Path::new("x"), &bytes).unwrap(), s);
    }

    #[test]
    fn refuses_bad_files_by_name() {
        let p = Path::new("snap.json");
        let full = to_bytes(&sample());
        let err = |b: &[u8]| from_bytes(p, b).unwrap_err().to_string();
        assert!(err(&full[..full.len() / 2]).contains("truncated"));
        assert!(err(b"hello").contains("invalid JSON"));
        assert!(err(br#"{"format":"pprof"}"#).contains("format is \"pprof\""));
        assert!(err(br#"{"a":1}"#).contains("no \"format\""));
        assert!(err(br#"{"format":"heapbpf-snapshot","version":9}"#)
            .contains("version 9 is not supported"));
        assert!(
            err(br#"{"format":"heapbpf-snapshot","version":1,"pid":"x"}"#).contains("malformed")
        );
        // A version of the wrong type is said to be one.
        let e = err(br#"{"format":"heapbpf-snapshot","version":"1"}"#);
        assert!(
            e.contains(r#""version" is a string ("1"), expected the number 1"#),
            "{e}"
        );
        for (v, what) in [
            ("1.5", "not a whole number"),
            ("-1", "not a whole number"),
            ("null", "null"),
            ("[1]", "an array"),
        ] {
            let text = format!(r#"{{"format":"heapbpf-snapshot","version":{v}}}"#);
            let e = err(text.as_bytes());
            assert!(e.contains(&format!("is {what} ({v})")), "{e}");
        }
        assert!(err(br#"{"format":"heapbpf-snapshot"}"#).contains(r#"no "version" field"#));
        // What the parser quotes of the file is escaped.
        let mut v: serde_json::Value = serde_json::from_slice(&full).unwrap();
        v["trigger"] = "\x1b]0;x\x07\n".into();
        let e = err(&serde_json::to_vec(&v).unwrap());
        assert!(e.contains("unknown variant"), "{e}");
        assert!(
            !e.contains(['\x1b', '\x07', '\n']) && e.contains("\\x1b]0;x\\x07\\n"),
            "{e}"
        );
        assert_eq!(from_bytes(p, b"").unwrap_err().exit_code(), 2);
    }

    #[test]
    fn addresses_must_be_hex_strings() {
        let p = Path::new("snap.json");
        let good = String::from_utf8(to_bytes(&sample())).unwrap();
        for bad in [r#""0xzz""#, r#""12""#, "4198710"] {
            let text = good.replace(r#""0x401136""#, bad);
            assert_ne!(text, good);
            let e = from_bytes(p, text.as_bytes()).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
            let msg = e.to_string();
            assert!(msg.contains("malformed") && msg.contains("hex"), "{msg}");
        }
    }
}
