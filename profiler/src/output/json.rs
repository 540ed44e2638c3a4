//! The canonical JSON snapshot: written by `attach`, read by `report` (and
//! `diff`), with errors that say what is wrong with a file.
use std::{
    io::{self, Read},
    path::Path,
};

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
    from_reader(path, || Ok(bytes))
}

/// Parses a snapshot as a stream from what `open` gives (the figures are
/// built as they are read, never a document tree of the whole file). When
/// that fails, `open` is called once more to say what is wrong: a file that
/// is not a heapbpf snapshot, or of another version, is said to be so
/// before any complaint about its fields.
pub fn from_reader<R: Read>(
    path: &Path,
    mut open: impl FnMut() -> io::Result<R>,
) -> Result<Snapshot> {
    let bad = |why: String| Error::BadSnapshot {
        path: path.to_path_buf(),
        why: crate::lines::escape(&why).into_owned(),
    };
    let cannot_read = |e: io::Error| bad(format!("cannot read: {e}"));
    match serde_json::from_reader::<_, Snapshot>(open().map_err(cannot_read)?) {
        Ok(s) => {
            check_format(&serde_json::Value::from(s.format.clone()))
                .and_then(|()| check_version(&serde_json::Value::from(s.version)))
                .and_then(|()| super::check_figures(&s))
                .map_err(bad)?;
            Ok(s)
        }
        Err(e) => {
            let head = serde_json::from_reader::<_, Head>(open().map_err(cannot_read)?);
            Err(bad(one_line(&explain(e, head))))
        }
    }
}

/// What is read first of a snapshot that does not parse: its format and
/// version, whatever else it holds.
#[derive(serde::Deserialize)]
struct Head {
    #[serde(default)]
    format: Option<serde_json::Value>,
    #[serde(default)]
    version: Option<serde_json::Value>,
}

fn check_format(format: &serde_json::Value) -> Result<(), String> {
    match format {
        serde_json::Value::String(f) if f == SNAPSHOT_FORMAT => Ok(()),
        serde_json::Value::Null => Err(format!(
            "not a heapbpf snapshot: no \"format\": {SNAPSHOT_FORMAT:?} field"
        )),
        other => Err(format!(
            "not a heapbpf snapshot: format is {}, expected {SNAPSHOT_FORMAT:?}",
            short(other)
        )),
    }
}

fn check_version(version: &serde_json::Value) -> Result<(), String> {
    match version {
        serde_json::Value::Number(n) if n.as_u64() == Some(u64::from(SNAPSHOT_VERSION)) => Ok(()),
        serde_json::Value::Number(n) => Err(format!(
            "snapshot version {n} is not supported (this heapbpf reads version {SNAPSHOT_VERSION}); use a matching heapbpf"
        )),
        serde_json::Value::Null => Err("snapshot has no \"version\" field".into()),
        other => Err(format!(
            "snapshot version is {}, expected the number {SNAPSHOT_VERSION}",
            short(other)
        )),
    }
}

/// A message on one line, without control characters: serde's messages
/// quote the file's own text (an unknown field's name, say).
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A JSON value as it may appear in a one-line message.
fn short(v: &serde_json::Value) -> String {
    let text = v.to_string();
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// Why a snapshot did not parse (`full`), told with what its head says.
fn explain(full: serde_json::Error, head: serde_json::Result<Head>) -> String {
    use serde_json::error::Category;
    let syntax = |e: &serde_json::Error| match e.classify() {
        Category::Io => Some(format!("cannot read: {e}")),
        Category::Eof => Some(format!("truncated JSON ({e}); the file is incomplete")),
        Category::Syntax => Some(format!("not a heapbpf snapshot: invalid JSON ({e})")),
        Category::Data => None,
    };
    match head {
        Ok(head) => {
            let format = head.format.unwrap_or_default();
            let version = head.version.unwrap_or_default();
            if let Err(why) = check_format(&format).and_then(|()| check_version(&version)) {
                return why;
            }
            syntax(&full).unwrap_or_else(|| format!("malformed snapshot: {full}"))
        }
        // The document itself is broken: say how, as it was first seen.
        Err(e) => syntax(&full)
            .or_else(|| syntax(&e))
            .unwrap_or_else(|| {
                format!("not a heapbpf snapshot: expected a JSON object with \"format\": {SNAPSHOT_FORMAT:?}")
            }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{Address, Frame, Stack, Totals, Trigger};

    pub(crate) fn sample() -> Snapshot {
        Snapshot {
            mappings: Vec::new(),
            coverage: None,
            kubernetes: None,
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
    fn kubernetes_is_written_and_read_only_when_there_is_one() {
        let plain = to_bytes(&sample());
        assert!(!String::from_utf8_lossy(&plain).contains("kubernetes"));
        let mut s = sample();
        s.kubernetes = Some(crate::model::Kubernetes {
            namespace: "shop".into(),
            pod: "web-7d4b9c8f6d-x2kqp".into(),
            container: "web".into(),
            node: "node-a".into(),
            service_name: "storefront".into(),
        });
        let bytes = to_bytes(&s);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v["kubernetes"],
            serde_json::json!({"namespace": "shop", "pod": "web-7d4b9c8f6d-x2kqp",
                "container": "web", "node": "node-a", "service_name": "storefront"})
        );
        assert_eq!(from_bytes(Path::new("x"), &bytes).unwrap(), s);
    }

    #[test]
    fn coverage_is_written_and_read_only_when_there_is_one() {
        let plain = to_bytes(&sample());
        assert!(!String::from_utf8_lossy(&plain).contains("coverage"));
        let mut s = sample();
        s.coverage = Some(crate::model::Coverage {
            ratio: 0.125,
            follow_ms: 300,
            max_overhead: 0.02,
            overhead: 0.0175,
            windowed: true,
            windows: vec![crate::model::CoverageWindow {
                start: "2026-11-24T18:59:00.000Z".into(),
                end: "2026-11-24T18:59:00.400Z".into(),
            }],
        });
        let bytes = to_bytes(&s);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["coverage"]["ratio"], 0.125);
        assert_eq!(v["coverage"]["follow_ms"], 300);
        assert_eq!(
            v["coverage"]["windows"][0]["end"],
            "2026-11-24T18:59:00.400Z"
        );
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
        assert!(err(br#"{"format":"heapbpf-snapshot","version":"1"}"#)
            .contains(r#"snapshot version is "1", expected the number 1"#));
        assert!(err(br#"{"format":"heapbpf-snapshot"}"#).contains("no \"version\" field"));
        assert!(err(b"[]").contains("no \"format\""));
        assert!(err(b"5").contains("expected a JSON object"));
        assert!(err(br#"{"format":7}"#).contains("format is 7,"));
        let long = format!(r#"{{"format":"{}"}}"#, "x".repeat(1000));
        assert!(
            err(long.as_bytes()).len() < 200,
            "a long format is cut short"
        );
        // Fields that parse but are not this format: the format is named.
        let other = String::from_utf8(full.clone())
            .unwrap()
            .replace("heapbpf-snapshot", "other");
        assert!(err(other.as_bytes()).contains("format is \"other\""));
        let v2 = String::from_utf8(full.clone())
            .unwrap()
            .replace("\"version\":1", "\"version\":2");
        assert!(err(v2.as_bytes()).contains("version 2 is not supported"));
        // The file's own text, quoted in a message, stays on one line.
        let e = err(b"{\"format\":\"heapbpf-snapshot\",\"version\":1,\"a\\n\\u001b]0;x\":1}");
        assert!(e.contains(r"unknown field `a\n\u{1b}]0;x`"), "{e}");
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
