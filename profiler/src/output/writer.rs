//! Where snapshot files go and how: the contract's names, a write under a
//! temporary name published with a hard link (which never replaces an
//! existing file, so a reader never sees half a file and nothing is
//! overwritten), and `--max-snapshots` retention of the files this run wrote.
use std::{
    collections::VecDeque,
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use super::Format;
use crate::{
    error::{Error, Result},
    model::Snapshot,
};

/// The snapshots of one target in this run: their numbering and the files
/// written, oldest first.
#[derive(Debug, Default)]
pub struct Series {
    pid: u32,
    seq: u32,
    written: VecDeque<Vec<PathBuf>>,
}

impl Series {
    pub fn new(pid: u32) -> Self {
        Series {
            pid,
            ..Default::default()
        }
    }

    /// Writes `snapshot` in every format of `formats` into `dir`, then
    /// deletes this series' oldest snapshots beyond `max_snapshots`.
    /// Returns the paths written, one per format.
    pub fn write(
        &mut self,
        dir: &Path,
        formats: &[Format],
        max_snapshots: Option<usize>,
        snapshot: &Snapshot,
    ) -> Result<Vec<PathBuf>> {
        let pid = self.pid;
        let taken_at = &snapshot.taken_at;
        self.seq += 1;
        let mut paths = Vec::new();
        for format in formats {
            let bytes = format.render(snapshot)?;
            let ext = format.ext();
            let seq = &mut self.seq;
            let name = file_name(pid, taken_at, *seq, ext);
            let path = publish(dir, name, &bytes, || {
                *seq += 1;
                file_name(pid, taken_at, *seq, ext)
            })?;
            paths.push(path);
        }
        self.written.push_back(paths.clone());
        if let Some(max) = max_snapshots {
            while self.written.len() > max {
                for p in self.written.pop_front().unwrap_or_default() {
                    if let Err(e) = fs::remove_file(&p) {
                        tracing::warn!(path = %p.display(), error = %e, "cannot delete old snapshot");
                    }
                }
            }
        }
        Ok(paths)
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
