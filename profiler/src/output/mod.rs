//! Snapshot files: one module per format (plain functions over
//! [`crate::model`] data), [`dir`], the output directory held open, and
//! [`writer`], which owns naming, safe publishing and retention.
pub mod collapsed;
pub mod dir;
pub mod json;
pub mod pprof;
pub mod svg;
pub mod writer;

use std::{fs, path::Path};

use crate::error::{Error, Result};

/// The output formats of `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Pprof,
    Collapsed,
    Svg,
}

/// `--format` when none is given.
pub const DEFAULT_FORMATS: &str = "json,pprof";

impl Format {
    pub fn ext(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Pprof => "pb.gz",
            Format::Collapsed => "collapsed",
            Format::Svg => "svg",
        }
    }

    /// The file contents of a snapshot in this format.
    pub fn render(self, s: &crate::model::Snapshot) -> Result<Vec<u8>> {
        Ok(match self {
            Format::Json => json::to_bytes(s),
            Format::Pprof => pprof::to_bytes(s),
            Format::Collapsed => collapsed::to_string(s).into_bytes(),
            Format::Svg => svg::to_bytes(s)?,
        })
    }

    /// Parses a `--format` list. Formats of the contract that do not exist
    /// yet are refused by name.
    pub fn parse_list(text: &str) -> Result<Vec<Format>, String> {
        let mut out = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let f = match item {
                "json" => Format::Json,
                "pprof" => Format::Pprof,
                "collapsed" => Format::Collapsed,
                "svg" => Format::Svg,
                other => {
                    return Err(format!(
                        "unknown format {other:?}: expected a comma list of json, pprof, collapsed, svg"
                    ))
                }
            };
            if !out.contains(&f) {
                out.push(f);
            }
        }
        if out.is_empty() {
            return Err("--format needs at least one format, e.g. json".into());
        }
        Ok(out)
    }
}

/// Reads a snapshot file written by heapbpf, JSON or (gzipped) pprof, told
/// apart by content rather than by name. Every failure is a
/// [`Error::BadSnapshot`] naming the file (exit 2).
pub fn read_snapshot(path: &Path) -> Result<crate::model::Snapshot> {
    let bytes = fs::read(path).map_err(|e| Error::BadSnapshot {
        path: path.to_path_buf(),
        why: format!("cannot read: {e}"),
    })?;
    if pprof::looks_like_pprof(&bytes) {
        pprof::from_bytes(path, &bytes)
    } else {
        json::from_bytes(path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_lists() {
        assert_eq!(Format::parse_list("json"), Ok(vec![Format::Json]));
        assert_eq!(Format::parse_list("json,json"), Ok(vec![Format::Json]));
        assert_eq!(
            Format::parse_list("json,pprof,collapsed,svg"),
            Ok(vec![
                Format::Json,
                Format::Pprof,
                Format::Collapsed,
                Format::Svg
            ])
        );
        assert!(Format::parse_list("xml")
            .unwrap_err()
            .contains("unknown format"));
        assert!(Format::parse_list("").is_err());
    }

    #[test]
    fn one_reader_for_json_and_pprof() {
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/new.json");
        let s = read_snapshot(&golden).unwrap();
        let dir = std::env::temp_dir().join(format!("heapbpf-read-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let pb = dir.join("s.pb.gz");
        fs::write(&pb, pprof::to_bytes(&s)).unwrap();
        assert_eq!(read_snapshot(&pb).unwrap(), s);
        // Told apart by content: a JSON snapshot named like pprof still reads.
        let js = dir.join("s-json.pb.gz");
        fs::write(&js, json::to_bytes(&s)).unwrap();
        assert_eq!(read_snapshot(&js).unwrap(), s);
        let cut = dir.join("cut.pb.gz");
        let bytes = pprof::to_bytes(&s);
        fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        for bad in [cut, dir.join("missing.json")] {
            let e = read_snapshot(&bad).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains(&*bad.to_string_lossy()), "{e}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
