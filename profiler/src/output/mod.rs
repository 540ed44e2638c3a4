//! Snapshot files: one module per format (plain functions over
//! [`crate::model`] data), [`dir`], the output directory held open, and
//! [`writer`], which owns naming, safe publishing and retention.
pub mod collapsed;
pub mod dir;
pub mod json;
pub mod pprof;
pub mod svg;
pub mod writer;

use std::{
    fs::{File, OpenOptions},
    io::{BufReader, Read, Seek, SeekFrom},
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::Path,
};

use crate::{
    error::{Error, Result},
    model::Snapshot,
};

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
    pub fn render(self, s: &Snapshot) -> Result<Vec<u8>> {
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

/// How much reading one snapshot may take. No real snapshot comes near
/// these: the kernel keeps at most 65,536 stacks of at most 127 frames, and
/// such a snapshot is a few hundred MB of JSON and tens of MB of pprof. They
/// are there so that a hostile or mistaken file (a device, a gzip bomb)
/// ends in an error, not in an exhausted machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Size of the file as stored.
    pub file_bytes: u64,
    /// Size of a gzipped pprof profile once decompressed.
    pub pprof_bytes: u64,
    /// Memory the decoded pprof profile and its frames may take (pprof
    /// refers to locations and strings by id, so a small file can stand
    /// for very many frames).
    pub pprof_memory_bytes: u64,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        file_bytes: 2 << 30,
        pprof_bytes: 1 << 30,
        pprof_memory_bytes: 2 << 30,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// Reads a snapshot file written by heapbpf, JSON or (gzipped) pprof, told
/// apart by content rather than by name. Every failure is a
/// [`Error::BadSnapshot`] naming the file (exit 2).
pub fn read_snapshot(path: &Path) -> Result<Snapshot> {
    read_snapshot_with(path, &Limits::DEFAULT)
}

/// [`read_snapshot`] with other limits. Only regular files are read
/// (checked on the opened file, which is opened without blocking: a FIFO
/// with no writer is refused, not waited on), and only up to `limits`;
/// both formats are parsed as a stream.
pub fn read_snapshot_with(path: &Path, limits: &Limits) -> Result<Snapshot> {
    let bad = |why: String| Error::BadSnapshot {
        path: path.to_path_buf(),
        why,
    };
    let mut file = open_regular(path, limits.file_bytes).map_err(bad)?;
    let mut head = [0u8; 2];
    let n = read_head(&mut file, &mut head).map_err(|e| bad(format!("cannot read: {e}")))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    if pprof::looks_like_pprof(&head[..n]) {
        pprof::from_reader(path, BufReader::new(file.take(limits.file_bytes)), limits)
    } else {
        json::from_reader(path, || {
            (&file).seek(SeekFrom::Start(0))?;
            Ok(BufReader::new((&file).take(limits.file_bytes)))
        })
    }
}

/// Opens `path` for reading if it is a regular file of at most `max_bytes`.
fn open_regular(path: &Path, max_bytes: u64) -> Result<File, String> {
    // O_NONBLOCK: opening a FIFO must not wait for a writer. It changes
    // nothing for the regular files that are read.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot read: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!(
            "not a regular file ({}); a snapshot is a file heapbpf wrote",
            file_kind(&meta.file_type())
        ));
    }
    if meta.len() > max_bytes {
        return Err(too_big("the file", meta.len(), max_bytes));
    }
    Ok(file)
}

/// Reads up to `buf.len()` bytes from the start of the file.
fn read_head(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What a file that is not a regular file is, in words.
pub fn file_kind(t: &std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// The error of a size over a limit: `what` is over `limit`.
pub(crate) fn too_big(what: &str, size: u64, limit: u64) -> String {
    format!(
        "{what} is {} ({size} bytes), over the {} heapbpf reads as a snapshot; no snapshot is that large",
        crate::units::human_bytes(size as i128),
        crate::units::size_label(limit),
    )
}

/// A snapshot's figures must be real ones: its stacks add up to its live
/// totals, and no figure is beyond what a signed 64-bit number holds (pprof
/// stores them so, and no process comes near). A file that breaks this is
/// malformed, whatever its format.
pub(crate) fn check_figures(s: &Snapshot) -> Result<(), String> {
    let sum = |f: fn(&crate::model::Stack) -> u64| -> u128 {
        s.stacks.iter().map(|st| u128::from(f(st))).sum()
    };
    for (name, stacks, total) in [
        ("live_bytes", sum(|st| st.live_bytes), s.totals.live_bytes),
        (
            "live_allocations",
            sum(|st| st.live_allocations),
            s.totals.live_allocations,
        ),
    ] {
        if stacks != u128::from(total) {
            return Err(format!(
                "malformed snapshot: its stacks' {name} add up to {stacks}, but totals.{name} is {total}"
            ));
        }
    }
    let limit = i64::MAX as u64;
    let t = &s.totals;
    for (name, v) in [
        ("live_bytes", t.live_bytes),
        ("live_allocations", t.live_allocations),
        ("allocated_bytes", t.allocated_bytes),
        ("allocations", t.allocations),
        ("frees", t.frees),
        ("rss_bytes", t.rss_bytes),
        ("dropped_events", t.dropped_events),
    ] {
        if v > limit {
            return Err(format!(
                "malformed snapshot: totals.{name} is {v}, beyond any real figure (over 2^63-1)"
            ));
        }
    }
    for (i, st) in s.stacks.iter().enumerate() {
        for (name, v) in [
            ("live_bytes", st.live_bytes),
            ("live_allocations", st.live_allocations),
            ("allocated_bytes", st.allocated_bytes),
            ("allocations", st.allocations),
        ] {
            if v > limit {
                return Err(format!(
                    "malformed snapshot: stacks[{i}].{name} is {v}, beyond any real figure (over 2^63-1)"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

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

    fn golden() -> Snapshot {
        read_snapshot(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/new.json")).unwrap()
    }

    /// A fresh directory for one test, removed at the end.
    struct Scratch(std::path::PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let d = std::env::temp_dir().join(format!("heapbpf-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            Scratch(d)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn refused(path: &Path, limits: &Limits) -> String {
        let e = read_snapshot_with(path, limits).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        let msg = e.to_string();
        assert!(msg.starts_with(&*path.to_string_lossy()), "{msg}");
        assert_eq!(msg.lines().count(), 1, "{msg}");
        msg
    }

    #[test]
    fn only_regular_files_are_read() {
        let dir = Scratch::new("read-kinds");
        let fifo = dir.0.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No writer: opening it must not wait for one.
        assert!(refused(&fifo, &Limits::DEFAULT).contains("not a regular file (a FIFO)"));
        assert!(refused(Path::new("/dev/zero"), &Limits::DEFAULT)
            .contains("not a regular file (a character device)"));
        assert!(refused(&dir.0, &Limits::DEFAULT).contains("not a regular file (a directory)"));
        // A symlink to a regular file is that file.
        let link = dir.0.join("link.json");
        std::os::unix::fs::symlink(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/new.json"),
            &link,
        )
        .unwrap();
        assert_eq!(read_snapshot(&link).unwrap(), golden());
    }

    #[test]
    fn files_over_the_size_limit_are_refused_unread() {
        let dir = Scratch::new("read-size");
        let s = golden();
        let js = dir.0.join("s.json");
        fs::write(&js, json::to_bytes(&s)).unwrap();
        let small = Limits {
            file_bytes: 1000,
            ..Limits::DEFAULT
        };
        let msg = refused(&js, &small);
        assert!(msg.contains("over the 1000 heapbpf reads"), "{msg}");
        // A sparse file far over the default limit is refused at once.
        let huge = dir.0.join("huge.json");
        fs::File::create(&huge)
            .unwrap()
            .set_len(Limits::DEFAULT.file_bytes + 1)
            .unwrap();
        let msg = refused(&huge, &Limits::DEFAULT);
        assert!(msg.contains("over the 2GiB heapbpf reads"), "{msg}");
        assert_eq!(Limits::default(), Limits::DEFAULT);
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn gzip_bombs_stop_at_their_first_bad_field_or_at_the_limit() {
        let dir = Scratch::new("read-bomb");
        // Zeros are no protobuf: refused at the first byte, whatever follows.
        let zeros = dir.0.join("zeros.pb.gz");
        fs::write(&zeros, gzip(&vec![0u8; 8 << 20])).unwrap();
        let msg = refused(&zeros, &Limits::DEFAULT);
        assert!(msg.contains("not a pprof profile"), "{msg}");
        // Valid fields that heapbpf skips (field 15, varint 0), over the
        // limit of decompressed data.
        let skipped = dir.0.join("skipped.pb.gz");
        fs::write(&skipped, gzip(&[0x78, 0x00].repeat(1 << 20))).unwrap();
        let limits = Limits {
            pprof_bytes: 1 << 20,
            ..Limits::DEFAULT
        };
        let msg = refused(&skipped, &limits);
        assert!(
            msg.contains("expands to more than 1MiB") && msg.contains("gzip bomb"),
            "{msg}"
        );
        // The same stream under the limit is a profile without the header.
        let msg = refused(&skipped, &Limits::DEFAULT);
        assert!(msg.contains("not one written by heapbpf"), "{msg}");
    }

    #[test]
    fn a_small_profile_that_stands_for_huge_stacks_is_refused() {
        use prost::Message as _;
        let dir = Scratch::new("read-refs");
        let mut p = pprof::to_profile(&golden());
        // One long function name, referred to by every frame of samples
        // that repeat their locations.
        let name = p.function[0].name as usize;
        p.string_table[name] = "f".repeat(64 << 10);
        for sample in &mut p.sample {
            sample.location_id = sample.location_id.repeat(2000);
        }
        let path = dir.0.join("refs.pb.gz");
        fs::write(&path, gzip(&p.encode_to_vec())).unwrap();
        let limits = Limits {
            pprof_memory_bytes: 64 << 20,
            ..Limits::DEFAULT
        };
        let msg = refused(&path, &limits);
        assert!(msg.contains("more than 64MiB of memory"), "{msg}");
    }

    fn crafted(stacks: &[(u64, u64)], totals: (u64, u64)) -> Snapshot {
        let mut s = golden();
        let template = s.stacks[0].clone();
        s.stacks = stacks
            .iter()
            .map(|&(b, n)| crate::model::Stack {
                live_bytes: b,
                live_allocations: n,
                ..template.clone()
            })
            .collect();
        (s.totals.live_bytes, s.totals.live_allocations) = totals;
        s
    }

    #[test]
    fn figures_that_do_not_add_up_are_malformed_in_both_formats() {
        let dir = Scratch::new("read-figures");
        let max = u64::MAX;
        let cases = [
            (
                crafted(&[(max, 1), (max, 1)], (max, 2)),
                "stacks' live_bytes add up to 36893488147419103230, but totals.live_bytes is 18446744073709551615",
            ),
            (
                crafted(&[(10, 1), (20, 1)], (30, 3)),
                "stacks' live_allocations add up to 2, but totals.live_allocations is 3",
            ),
            (
                crafted(&[(max, 1)], (max, 1)),
                "totals.live_bytes is 18446744073709551615, beyond any real figure",
            ),
        ];
        for (i, (s, why)) in cases.iter().enumerate() {
            let js = dir.0.join(format!("{i}.json"));
            fs::write(&js, json::to_bytes(s)).unwrap();
            let msg = refused(&js, &Limits::DEFAULT);
            assert!(
                msg.contains("malformed snapshot") && msg.contains(why),
                "{msg}"
            );
            // pprof carries figures as int64: what does not fit reads as
            // 0, which does not add up either.
            let pb = dir.0.join(format!("{i}.pb.gz"));
            fs::write(&pb, pprof::to_bytes(s)).unwrap();
            let msg = refused(&pb, &Limits::DEFAULT);
            assert!(msg.contains("malformed snapshot"), "{msg}");
        }
        let mut s = crafted(&[(10, 1)], (10, 1));
        s.stacks[0].allocations = max;
        assert!(check_figures(&s)
            .unwrap_err()
            .contains("stacks[0].allocations is 18446744073709551615"));
        assert_eq!(check_figures(&golden()), Ok(()));
    }

    #[test]
    fn times_beyond_what_pprof_holds_never_wrap_around() {
        // Found by the snapshot_pprof fuzz target: nanoseconds past 2262
        // do not fit pprof's int64.
        let mut s = golden();
        s.attached_at = "2262-04-12T00:00:00Z".into();
        s.taken_at = "2262-04-11T23:00:00Z".into();
        let p = pprof::to_profile(&s);
        assert_eq!(
            (p.time_nanos, p.duration_nanos),
            (9_223_369_200_000_000_000, 0)
        );
        let back = pprof::from_bytes(Path::new("x"), &pprof::to_bytes(&s)).unwrap();
        assert_eq!(back.attached_at, s.attached_at);
    }

    #[test]
    fn the_pod_is_a_pprof_comment() {
        let comments = |s: &Snapshot| {
            let p = pprof::to_profile(s);
            p.comment
                .iter()
                .map(|&i| p.string_table[i as usize].clone())
                .collect::<Vec<_>>()
        };
        let mut s = golden();
        assert_eq!(comments(&s).len(), 1);
        s.kubernetes = Some(crate::model::Kubernetes {
            namespace: "shop".into(),
            pod: "web-1".into(),
            container: "web".into(),
            node: "node-a".into(),
            service_name: "storefront".into(),
        });
        assert_eq!(
            comments(&s)[1],
            "kubernetes namespace=shop pod=web-1 container=web node=node-a service_name=storefront"
        );
    }
}
