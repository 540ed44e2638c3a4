//! Where snapshot files go and how: the contract's names; a snapshot is all
//! of its formats or none (everything rendered and written to unnamed or
//! temporary files first, then linked into place under one `<seq>`, which
//! never replaces an existing file, so a reader never sees half a file and
//! nothing is overwritten); and `--max-snapshots` retention of the files
//! this run wrote. Files go through [`OutputDir`], never through a path.
use std::{collections::VecDeque, io, path::PathBuf};

use super::{
    dir::{plain, DirFile, FileId, OutputDir, TempFile},
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
/// together, by the time in their names, then their `<seq>`) until what
/// heapbpf's snapshots take there is at most `max_bytes`. Only regular
/// files named exactly as heapbpf names snapshots count or go; nothing is
/// followed, and a file replaced since it was listed is left alone.
/// Returns the names removed.
pub fn trim_to_disk(dir: &OutputDir, max_bytes: u64, keep: &[String]) -> Vec<String> {
    let files = match dir.regular_files(|n| SnapshotName::parse(n).is_some()) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(dir = %dir.path().display(), error = %e, "cannot list the snapshots to bound their size");
            return Vec::new();
        }
    };
    let mut total: u64 = files.iter().map(|f| f.size_bytes).sum();
    if total <= max_bytes {
        return Vec::new();
    }
    // Snapshots (one per stem), oldest first.
    let mut sets: std::collections::BTreeMap<(String, u32, u32), Vec<DirFile>> =
        std::collections::BTreeMap::new();
    for f in files {
        if let Some(n) = SnapshotName::parse(&f.name) {
            sets.entry((n.stamp, n.seq, n.pid)).or_default().push(f);
        }
    }
    let mut removed = Vec::new();
    for set in sets.into_values() {
        if total <= max_bytes {
            break;
        }
        // The snapshot just written stays, even alone over the limit.
        if set.iter().any(|f| keep.contains(&f.name)) {
            continue;
        }
        for f in set {
            match dir.remove_own(&f.name, f.id) {
                Ok(()) => {
                    total = total.saturating_sub(f.size_bytes);
                    removed.push(f.name);
                }
                Err(e) => {
                    tracing::warn!(path = %dir.path().join(&f.name).display(), error = %e, "cannot delete old snapshot")
                }
            }
        }
    }
    removed
}

/// A snapshot file name read back: `heapbpf-<pid>-<yyyymmddThhmmssZ>-<seq>.<ext>`,
/// exactly as [`file_name`] writes it (nothing else parses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotName {
    pub pid: u32,
    /// `yyyymmddThhmmssZ`, UTC.
    pub stamp: String,
    pub seq: u32,
    /// One of the formats' extensions (`json`, `pb.gz`, `collapsed`, `svg`).
    pub ext: &'static str,
}

impl SnapshotName {
    pub fn parse(name: &str) -> Option<SnapshotName> {
        let rest = name.strip_prefix("heapbpf-")?;
        let (pid, rest) = rest.split_once('-')?;
        let (stamp, rest) = rest.split_once('-')?;
        let (seq, ext) = rest.split_once('.')?;
        let digits = |s: &str, max: usize| {
            !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
        };
        if !digits(pid, 10) || !digits(seq, 10) {
            return None;
        }
        let b = stamp.as_bytes();
        if b.len() != 16
            || b[8] != b'T'
            || b[15] != b'Z'
            || !digits(&stamp[..8], 8)
            || !digits(&stamp[9..15], 6)
        {
            return None;
        }
        let ext = [Format::Json, Format::Pprof, Format::Collapsed, Format::Svg]
            .into_iter()
            .map(Format::ext)
            .find(|e| *e == ext)?;
        let parsed = SnapshotName {
            pid: pid.parse().ok().filter(|&p| p > 0)?,
            stamp: stamp.to_string(),
            seq: seq.parse().ok().filter(|&s| s > 0)?,
            ext,
        };
        // No other spelling of the same figures (leading zeros, ...).
        (file_name(parsed.pid, &parsed.taken_at(), parsed.seq, ext) == name).then_some(parsed)
    }

    /// When it was taken, as RFC 3339 (`2026-11-24T19:00:00Z`).
    pub fn taken_at(&self) -> String {
        let s = &self.stamp;
        format!(
            "{}-{}-{}T{}:{}:{}Z",
            &s[0..4],
            &s[4..6],
            &s[6..8],
            &s[9..11],
            &s[11..13],
            &s[13..15]
        )
    }

    /// The name of its format, as `--format` says it.
    pub fn format(&self) -> &'static str {
        match self.ext {
            "pb.gz" => "pprof",
            other => other,
        }
    }
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

    #[test]
    fn names_read_back_exactly() {
        let n = SnapshotName::parse("heapbpf-1234-20261124T190000Z-0001.json").unwrap();
        assert_eq!(n.pid, 1234);
        assert_eq!(n.seq, 1);
        assert_eq!(n.ext, "json");
        assert_eq!(n.taken_at(), "2026-11-24T19:00:00Z");
        assert_eq!(n.format(), "json");
        let n = SnapshotName::parse("heapbpf-7-20261124T190000Z-12345.pb.gz").unwrap();
        assert_eq!((n.seq, n.format()), (12345, "pprof"));
        for ok in ["collapsed", "svg"] {
            assert!(
                SnapshotName::parse(&format!("heapbpf-7-20261124T190000Z-0002.{ok}")).is_some()
            );
        }
        for bad in [
            "",
            "heapbpf-",
            "heapbpf-1234-20261124T190000Z-0001",
            "heapbpf-1234-20261124T190000Z-0001.txt",
            "heapbpf-1234-20261124T190000Z-0001.json.tmp",
            "heapbpf-1234-20261124T190000Z-0001.pb",
            "heapbpf-1234-20261124T190000Z-001.json",
            "heapbpf-1234-20261124T190000Z-00001.json",
            "heapbpf-1234-20261124T190000Z-0000.json",
            "heapbpf-01234-20261124T190000Z-0001.json",
            "heapbpf-0-20261124T190000Z-0001.json",
            "heapbpf-x-20261124T190000Z-0001.json",
            "heapbpf-99999999999-20261124T190000Z-0001.json",
            "heapbpf-1234-20261124190000Z-0001.json",
            "heapbpf-1234-2026112aT190000Z-0001.json",
            "heapbpf-1234-20261124T190000-0001.json",
            "heapbpf-1234-20261124T190000Z-0001.json/",
            "heapbpf-1234-20261124T190000Z-0001.json/..",
            "../heapbpf-1234-20261124T190000Z-0001.json",
            "heapbpf-1234-20261124T190000Z-0001..json",
            "heapbpf-1234-20261124T190000Z-0001.json\0",
            ".heapbpf-1234-20261124T190000Z-0001.json",
            "heapbpf-+1234-20261124T190000Z-0001.json",
            "heapbpf-1234-20261124T190000Z-+001.json",
            "heapbpf-1234-20261124T190000Z-0001.JSON",
            "heapbpf-1234-20261124T190000Z-0001.json ",
        ] {
            assert_eq!(SnapshotName::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn trim_deletes_whole_snapshots_oldest_first_and_nothing_else() {
        let path = scratch("trim");
        let dir = OutputDir::open(&path).unwrap();
        let put = |name: &str, size: usize| fs::write(path.join(name), vec![b'x'; size]).unwrap();
        // Oldest by the time in the name, then seq; pids interleaved.
        let t1 = "2026-11-24T19:00:00Z";
        let t2 = "2026-11-24T19:00:05Z";
        let t3 = "2026-11-25T01:00:00Z";
        let a = [file_name(5, t1, 2, "json"), file_name(5, t1, 2, "pb.gz")];
        let b = [file_name(42, t2, 1, "json"), file_name(42, t2, 1, "svg")];
        let c = [file_name(5, t2, 3, "json")];
        let d = [
            file_name(42, t3, 2, "json"),
            file_name(42, t3, 2, "collapsed"),
        ];
        for n in a.iter().chain(&b).chain(&c).chain(&d) {
            put(n, 100);
        }
        // Not heapbpf's snapshots: big, never counted, never deleted.
        put("notes.json", 10_000);
        put("heapbpf-5-20261124T190000Z-0001.json.bak", 10_000);
        put(".heapbpf-1.99.tmp", 10_000);
        let victim = scratch("trim-victim").join(file_name(9, t1, 1, "json"));
        fs::write(&victim, vec![b'v'; 10_000]).unwrap();
        std::os::unix::fs::symlink(&victim, path.join(file_name(9, t1, 1, "json"))).unwrap();
        fs::create_dir(path.join(file_name(9, t1, 1, "svg"))).unwrap();

        // 700 bytes of snapshots: within 700, nothing goes.
        assert!(trim_to_disk(&dir, 700, &[]).is_empty());
        // 450: a (200) and b (200) go, together, oldest first.
        let mut removed = trim_to_disk(&dir, 450, &[]);
        removed.sort();
        let mut want: Vec<String> = a.iter().chain(&b).cloned().collect();
        want.sort();
        assert_eq!(removed, want);
        // 250: c goes; d alone is 200.
        assert_eq!(trim_to_disk(&dir, 250, &[]), c.to_vec());
        assert!(trim_to_disk(&dir, 200, &[]).is_empty());
        // The snapshot just written stays, even alone over the limit.
        assert!(trim_to_disk(&dir, 0, &[d[0].clone()]).is_empty());
        // 0: everything of heapbpf's goes, nothing else.
        assert_eq!(trim_to_disk(&dir, 0, &[]).len(), 2);
        let mut left = names(&path);
        left.sort();
        let mut want = vec![
            ".heapbpf-1.99.tmp".to_string(),
            "heapbpf-5-20261124T190000Z-0001.json.bak".to_string(),
            file_name(9, t1, 1, "json"),
            file_name(9, t1, 1, "svg"),
            "notes.json".to_string(),
        ];
        want.sort();
        assert_eq!(left, want);
        assert_eq!(fs::read(&victim).unwrap().len(), 10_000);
        fs::remove_dir_all(victim.parent().unwrap()).unwrap();
        fs::remove_dir_all(&path).unwrap();
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
