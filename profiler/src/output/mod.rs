//! Writing snapshots to files, one module per format. Files are written under
//! a temporary name and published with a hard link (which never replaces an
//! existing file), so a reader never sees half a file and nothing is
//! overwritten.
pub mod collapsed;
pub mod json;
pub mod pprof;
pub mod svg;

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

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

/// `heapbpf-<pid>-<UTC yyyymmddThhmmssZ>-<seq>.<ext>`
pub fn file_name(pid: u32, taken_at_rfc3339: &str, seq: u32, ext: &str) -> String {
    let compact: String = taken_at_rfc3339
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    format!("heapbpf-{pid}-{compact}-{seq:04}.{ext}")
}

/// Checks, before attaching, that snapshots can be written to `dir`.
pub fn check_output_dir(dir: &Path) -> Result<()> {
    let err = |why: String| Error::OutputDir {
        path: dir.to_path_buf(),
        why,
    };
    let meta = fs::metadata(dir).map_err(|e| {
        err(match e.kind() {
            std::io::ErrorKind::NotFound => {
                "no such directory (create it or pick another with -o)".into()
            }
            _ => e.to_string(),
        })
    })?;
    if !meta.is_dir() {
        return Err(err("not a directory".into()));
    }
    // Root passes every permission check; only a real write tells.
    let probe = dir.join(format!(".heapbpf-write-check-{}", std::process::id()));
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(err(format!("{e} (pick a writable directory with -o)"))),
    }
}

/// Writes `bytes` to `dir/name` atomically; if the name is taken, calls
/// `next_name` for another. Returns the path written.
pub fn publish(
    dir: &Path,
    mut name: String,
    bytes: &[u8],
    mut next_name: impl FnMut() -> String,
) -> Result<PathBuf> {
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::runtime(format!("cannot write {}", tmp.display()), e));
    }
    for _ in 0..10_000 {
        let path = dir.join(&name);
        match fs::hard_link(&tmp, &path) {
            Ok(()) => {
                let _ = fs::remove_file(&tmp);
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => name = next_name(),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(Error::runtime(
                    format!("cannot publish {}", path.display()),
                    e,
                ));
            }
        }
    }
    let _ = fs::remove_file(&tmp);
    Err(Error::Runtime(format!(
        "no free snapshot name in {}",
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(
            file_name(1234, "2026-11-24T19:00:00Z", 1, "json"),
            "heapbpf-1234-20261124T190000Z-0001.json"
        );
        assert_eq!(
            file_name(7, "2026-11-24T19:00:00Z", 12345, "pb.gz"),
            "heapbpf-7-20261124T190000Z-12345.pb.gz"
        );
    }

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

    #[test]
    fn publish_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("heapbpf-publish-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut n = 1;
        let mut next = || {
            n += 1;
            format!("f-{n}")
        };
        let a = publish(&dir, "f-1".into(), b"one", &mut next).unwrap();
        let b = publish(&dir, "f-1".into(), b"two", &mut next).unwrap();
        assert_ne!(a, b);
        assert_eq!(fs::read(&a).unwrap(), b"one");
        assert_eq!(fs::read(&b).unwrap(), b"two");
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        assert!(check_output_dir(&dir).is_ok());
        assert!(check_output_dir(&dir.join("missing")).is_err());
        assert!(check_output_dir(&a).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
