//! Where snapshot files go and how: the contract's names; a snapshot is all
//! of its formats or none (everything rendered and written to unnamed or
//! temporary files first, then linked into place under one `<seq>`, which
//! never replaces an existing file, so a reader never sees half a file and
//! nothing is overwritten); and `--max-snapshots` retention of the files
//! this run wrote. Files go through [`OutputDir`], never through a path.
use std::{collections::VecDeque, io, path::PathBuf};

use super::{
    dir::{plain, FileId, OutputDir, TempFile},
    json, Format,
};
use crate::{
    error::{Error, Result},
    model::Snapshot,
};

/// How many `<seq>` numbers a snapshot tries before giving up.
const MAX_SEQ_TRIES: u32 = 10_000;

/// What one file of a snapshot is made of.
enum Body<'a> {
    /// Rendered before any file is written (a format that cannot be drawn
    /// fails the snapshot before it touches the directory).
    Bytes(Vec<u8>),
    /// Streamed into its file: by far the largest format, never held in
    /// memory whole.
    Json(&'a Snapshot),
}

impl Body<'_> {
    fn write_to(&self, w: &mut dyn io::Write) -> io::Result<()> {
        match self {
            Body::Bytes(b) => w.write_all(b),
            Body::Json(s) => json::to_writer(s, w),
        }
    }
}

/// Deletes the oldest snapshots in `dir` (all files of a snapshot
/// together, by the time in their names) until what heapbpf's snapshots
/// take there is at most `max_bytes`. Returns the names removed.
// INTERFACE: filled in by the data-directory work.
pub fn trim_to_disk(dir: &OutputDir, max_bytes: u64) -> Vec<String> {
    let _ = (dir, max_bytes);
    Vec::new()
}

/// One file this run published.
#[derive(Clone, Debug)]
struct Published {
    name: String,
    id: FileId,
}

/// The snapshots of one target in this run: their numbering and the files
/// written, oldest first.
#[derive(Debug, Default)]
pub struct Series {
    pid: u32,
    /// The `<seq>` of the last snapshot written.
    seq: u32,
    written: VecDeque<Vec<Published>>,
}

impl Series {
    pub fn new(pid: u32) -> Self {
        Series {
            pid,
            ..Default::default()
        }
    }

    /// Writes `snapshot` in every format of `formats` into `dir`, all or
    /// none, then deletes this series' oldest snapshots beyond
    /// `max_snapshots`. Returns the paths written, one per format.
    pub fn write(
        &mut self,
        dir: &OutputDir,
        formats: &[Format],
        max_snapshots: Option<usize>,
        snapshot: &Snapshot,
    ) -> Result<Vec<PathBuf>> {
        let parts = formats
            .iter()
            .map(|&f| {
                let body = match f {
                    Format::Json => Body::Json(snapshot),
                    f => Body::Bytes(f.render(snapshot)?),
                };
                Ok((f.ext(), body))
            })
            .collect::<Result<Vec<_>>>()?;
        let published = self.write_parts(dir, &snapshot.taken_at, &parts)?;
        let paths = published.iter().map(|p| dir.path().join(&p.name)).collect();
        self.written.push_back(published);
        if let Some(max) = max_snapshots {
            while self.written.len() > max {
                for p in self.written.pop_front().unwrap_or_default() {
                    if let Err(e) = dir.remove_own(&p.name, p.id) {
                        tracing::warn!(path = %dir.path().join(&p.name).display(), error = %e, "cannot delete old snapshot");
                    }
                }
            }
        }
        Ok(paths)
    }

    /// Writes every part to a file of its own, then publishes them all
    /// under the first `<seq>` free for every one of them. On failure
    /// nothing of this snapshot is left in the directory.
    fn write_parts(
        &mut self,
        dir: &OutputDir,
        taken_at: &str,
        parts: &[(&str, Body)],
    ) -> Result<Vec<Published>> {
        let mut temps = Vec::with_capacity(parts.len());
        let result = self.write_temps(dir, taken_at, parts, &mut temps);
        let result = result.and_then(|()| self.link_all(dir, taken_at, parts, &mut temps));
        for t in temps {
            dir.discard(t);
        }
        result
    }

    fn write_temps(
        &self,
        dir: &OutputDir,
        taken_at: &str,
        parts: &[(&str, Body)],
        temps: &mut Vec<TempFile>,
    ) -> Result<()> {
        for (ext, body) in parts {
            let name = file_name(self.pid, taken_at, self.seq + 1, ext);
            let mut t = dir.create_temp().map_err(|e| failure(dir, &name, &e))?;
            let written = t.write_with(|w| body.write_to(w));
            temps.push(t);
            written.map_err(|e| failure(dir, &name, &e))?;
        }
        Ok(())
    }

    fn link_all(
        &mut self,
        dir: &OutputDir,
        taken_at: &str,
        parts: &[(&str, Body)],
        temps: &mut [TempFile],
    ) -> Result<Vec<Published>> {
        let unlink = |done: &[Published]| {
            for p in done {
                let _ = dir.remove_own(&p.name, p.id);
            }
        };
        let first = self.seq + 1;
        for seq in first..first.saturating_add(MAX_SEQ_TRIES) {
            let mut done = Vec::with_capacity(parts.len());
            let mut taken = false;
            for ((ext, _), t) in parts.iter().zip(temps.iter_mut()) {
                let name = file_name(self.pid, taken_at, seq, ext);
                match dir.link(t, &name).and_then(|()| t.id()) {
                    Ok(id) => done.push(Published { name, id }),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        taken = true;
                        break;
                    }
                    Err(e) => {
                        unlink(&done);
                        return Err(failure(dir, &name, &e));
                    }
                }
            }
            if !taken {
                self.seq = seq;
                return Ok(done);
            }
            // A set shares its <seq>: the next one free for every format.
            unlink(&done);
        }
        Err(Error::Runtime(format!(
            "no free snapshot name in {} (tried {MAX_SEQ_TRIES} numbers); nothing of this snapshot was kept",
            dir.path().display()
        )))
    }
}

/// The one-line reason a snapshot file could not be written.
fn failure(dir: &OutputDir, name: &str, e: &io::Error) -> Error {
    if dir.is_deleted() {
        return Error::Runtime(format!(
            "the output directory {} was deleted (no snapshot can be written to it any more)",
            dir.path().display()
        ));
    }
    Error::Runtime(format!(
        "cannot write {}: {}; nothing of this snapshot was kept",
        dir.path().join(name).display(),
        plain(e)
    ))
}

/// `heapbpf-<pid>-<UTC yyyymmddThhmmssZ>-<seq>.<ext>`
pub fn file_name(pid: u32, taken_at_rfc3339: &str, seq: u32, ext: &str) -> String {
    let compact: String = taken_at_rfc3339
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    format!("heapbpf-{pid}-{compact}-{seq:04}.{ext}")
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path};

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

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("heapbpf-writer-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    const T: &str = "2026-11-24T19:00:00Z";

    #[test]
    fn a_set_shares_one_free_seq_and_never_overwrites() {
        let path = scratch("seq");
        let dir = OutputDir::open(&path).unwrap();
        // Someone holds the pb.gz of 0001 (a link) and the json of 0002.
        std::os::unix::fs::symlink("/etc/hostname", path.join(file_name(9, T, 1, "pb.gz")))
            .unwrap();
        fs::write(path.join(file_name(9, T, 2, "json")), b"theirs").unwrap();
        let mut s = Series::new(9);
        let parts = [
            ("json", Body::Bytes(b"one".to_vec())),
            ("pb.gz", Body::Bytes(b"two".to_vec())),
        ];
        let a = s.write_parts(&dir, T, &parts).unwrap();
        let a: Vec<&str> = a.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(a, [file_name(9, T, 3, "json"), file_name(9, T, 3, "pb.gz")]);
        assert_eq!(fs::read(path.join(a[0])).unwrap(), b"one");
        assert_eq!(fs::read(path.join(a[1])).unwrap(), b"two");
        assert_eq!(
            fs::read(path.join(file_name(9, T, 2, "json"))).unwrap(),
            b"theirs"
        );
        // What the tries linked and took back is gone; no temporary left.
        assert_eq!(
            names(&path),
            [
                file_name(9, T, 1, "pb.gz"),
                file_name(9, T, 2, "json"),
                a[0].to_string(),
                a[1].to_string()
            ]
        );
        let b = s.write_parts(&dir, T, &parts).unwrap();
        assert_eq!(b[0].name, file_name(9, T, 4, "json"));
        fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn a_failed_snapshot_leaves_nothing() {
        let path = scratch("fail");
        let dir = OutputDir::open(&path).unwrap();
        let mut s = Series::new(9);
        fs::remove_dir_all(&path).unwrap();
        let parts = [("json", Body::Bytes(b"one".to_vec()))];
        let e = s.write_parts(&dir, T, &parts).unwrap_err().to_string();
        assert!(e.contains("was deleted") && !e.contains('\n'), "{e}");
        // A name this series cannot publish under, for a reason other than
        // the name being taken: a directory that is not empty at 0001 is
        // EEXIST too, so take a name too long for the file system instead.
        let path = scratch("fail2");
        let dir = OutputDir::open(&path).unwrap();
        let long = "x".repeat(300);
        let parts = [
            ("json", Body::Bytes(b"one".to_vec())),
            (long.as_str(), Body::Bytes(b"two".to_vec())),
        ];
        let e = s.write_parts(&dir, T, &parts).unwrap_err().to_string();
        assert!(
            e.contains("cannot write") && e.contains("nothing of this snapshot was kept"),
            "{e}"
        );
        assert!(names(&path).is_empty(), "{:?}", names(&path));
        // The next snapshot still works, with the number the failed one
        // did not take.
        let ok = s.write_parts(&dir, T, &parts[..1]).unwrap();
        assert_eq!(ok[0].name, file_name(9, T, 1, "json"));
        fs::remove_dir_all(&path).unwrap();
    }

    #[test]
    fn retention_deletes_only_this_runs_files() {
        let path = scratch("keep");
        let dir = OutputDir::open(&path).unwrap();
        let snapshot = crate::output::json::tests::sample();
        let mut s = Series::new(snapshot.pid);
        let mut all = Vec::new();
        for _ in 0..3 {
            all.push(s.write(&dir, &[Format::Json], Some(2), &snapshot).unwrap());
        }
        assert!(!all[0][0].exists());
        assert!(all[1][0].exists() && all[2][0].exists());
        // A file someone else put at an old name of ours survives.
        fs::remove_file(&all[1][0]).unwrap();
        fs::write(&all[1][0], b"theirs").unwrap();
        s.write(&dir, &[Format::Json], Some(2), &snapshot).unwrap();
        assert_eq!(fs::read(&all[1][0]).unwrap(), b"theirs");
        fs::remove_dir_all(&path).unwrap();
    }
}
