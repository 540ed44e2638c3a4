//! The files heapbpf writes, as root, into a directory others may write to:
//! nothing is followed through a planted symlink, the directory opened at
//! start is the one written to however it is renamed, files are 0600, a
//! snapshot is all of its formats or none (a full disk, a deleted
//! directory) and makes heapbpf exit 1, temporary files of killed heapbpf
//! processes are cleared at start, and a flamegraph's size follows the
//! picture, not the target's stack count.
use std::{
    fs,
    os::unix::fs::{symlink, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use heapbpf_integration_tests::*;

/// `yyyymmddThhmmssZ` of a time, as snapshot names have it.
fn compact_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The names of the files in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// A published snapshot file: a regular file (not a link), mode 0600.
fn assert_private_regular_file(p: &Path) {
    let meta = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        meta.file_type().is_file(),
        "{} is not a regular file: {:?}",
        p.display(),
        meta.file_type()
    );
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o600,
        "{} has mode {:o}",
        p.display(),
        meta.permissions().mode() & 0o7777
    );
    assert_eq!(meta.nlink(), 1, "{} has other names", p.display());
}

fn failed_lines<'a>(stderr: &'a [String], trigger: &str, pid: u32) -> Vec<&'a String> {
    let head = format!("heapbpf: snapshot {trigger} pid={pid} failed: ");
    stderr.iter().filter(|l| l.starts_with(&head)).collect()
}

#[test]
fn symlinks_planted_at_temporary_names_are_not_followed() {
    require_root();
    let dir = TempDir::new("plant");
    let victims = TempDir::new("plant-victims");
    let victim = victims.path().join("victim");
    fs::write(&victim, b"precious\n").unwrap();
    let absent = victims.path().join("absent");
    let mut fx = Fixture::spawn("allocs");
    fx.command("run");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &[]);
    let hpid = hb.child.id();
    // Every temporary name this heapbpf could use for the next half
    // minute: eb5edfa's `.<snapshot name>.<heapbpf pid>.tmp` for the first
    // snapshot numbers and both formats, and the numbered ones of the
    // named fallback; half of them link to a file that does not exist.
    let now = SystemTime::now();
    let mut planted = 0;
    for s in -2..30i64 {
        let t = if s < 0 {
            now - Duration::from_secs(s.unsigned_abs())
        } else {
            now + Duration::from_secs(s as u64)
        };
        let ts = compact_utc(t);
        for seq in 1..=3 {
            for ext in ["json", "pb.gz"] {
                let name = format!("heapbpf-{}-{ts}-{seq:04}.{ext}", fx.pid);
                let target = if seq == 2 { &absent } else { &victim };
                symlink(target, dir.path().join(format!(".{name}.{hpid}.tmp"))).unwrap();
                planted += 1;
                // The final names of the first snapshot number are links too.
                if seq == 1 {
                    symlink(&victim, dir.path().join(&name)).unwrap();
                }
            }
        }
    }
    for n in 1..=64 {
        symlink(&victim, dir.path().join(format!(".heapbpf-{n}.{hpid}.tmp"))).unwrap();
        planted += 1;
    }
    hb.signal(libc::SIGUSR2);
    let paths = hb.wait_snapshot("signal", fx.pid);
    hb.signal(libc::SIGINT);
    let stop = hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0), "{}", hb.stderr.join("\n"));

    let now = fs::read(&victim).unwrap();
    assert!(
        now == b"precious\n",
        "the victim file was written through a planted link: now {} bytes",
        now.len()
    );
    assert!(
        fs::symlink_metadata(&absent).is_err(),
        "a file was created through a planted link"
    );
    for p in paths.iter().chain(&stop) {
        assert_private_regular_file(p);
        assert!(
            !file_name(p).contains("-0001."),
            "{} took a planted name",
            p.display()
        );
    }
    let json = read_json(&paths[0]);
    assert_eq!(json["trigger"], "signal");
    assert_eq!(json["pid"], fx.pid);
    // The links are still there, untouched, and nothing else was left.
    let links = names(dir.path())
        .into_iter()
        .filter(|n| {
            fs::symlink_metadata(dir.path().join(n))
                .unwrap()
                .file_type()
                .is_symlink()
        })
        .count();
    assert_eq!(links, planted + 32 * 2);
}

#[test]
fn snapshots_are_readable_by_their_owner_only() {
    require_root();
    let dir = TempDir::new("mode");
    let mut fx = Fixture::spawn("allocs");
    fx.command("run");
    let mut hb = Heapbpf::attach(
        &[fx.pid],
        dir.path(),
        &["--format", "json,pprof,collapsed,svg"],
    );
    hb.signal(libc::SIGINT);
    let paths = hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));
    assert_eq!(paths.len(), 4, "{paths:?}");
    for p in &paths {
        assert_private_regular_file(p);
    }
}

#[test]
fn the_directory_opened_at_start_keeps_the_snapshots_when_replaced_by_a_symlink() {
    require_root();
    let root = TempDir::new("swap");
    let out = root.path().join("out");
    let moved = root.path().join("out.moved");
    let elsewhere = root.path().join("elsewhere");
    fs::create_dir(&out).unwrap();
    fs::create_dir(&elsewhere).unwrap();
    let mut fx = Fixture::spawn("allocs");
    fx.command("run");
    let mut hb = Heapbpf::attach(&[fx.pid], &out, &[]);
    hb.signal(libc::SIGUSR2);
    let first = hb.wait_snapshot("signal", fx.pid);
    assert!(first.iter().all(|p| p.starts_with(&out)), "{first:?}");

    fs::rename(&out, &moved).unwrap();
    symlink(&elsewhere, &out).unwrap();
    hb.signal(libc::SIGUSR2);
    let second = hb.wait_snapshot("signal", fx.pid);
    hb.signal(libc::SIGINT);
    let stop = hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0), "{}", hb.stderr.join("\n"));

    assert!(
        names(&elsewhere).is_empty(),
        "snapshots followed the symlink: {:?}",
        names(&elsewhere)
    );
    let kept = names(&moved);
    assert_eq!(kept.len(), 6, "{kept:?}");
    for p in second.iter().chain(&stop) {
        // The lines name where the files are.
        assert!(
            p.starts_with(&moved),
            "{} is not in {}",
            p.display(),
            moved.display()
        );
        assert_private_regular_file(p);
    }
    assert!(
        hb.stderr
            .iter()
            .any(|l| l.starts_with("heapbpf: warning: the output directory ")
                && l.contains("moved or replaced")),
        "{}",
        hb.stderr.join("\n")
    );
}

/// A tmpfs mounted for a test, unmounted when dropped (also on failure).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "heapbpf-test",
            ])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount a tmpfs at {}", at.display());
        Tmpfs(at.to_path_buf())
    }

    /// Bytes that can still be written.
    fn available(&self) -> u64 {
        let path = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: a NUL-terminated path and room for a struct statvfs.
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) }, 0);
        // SAFETY: statvfs succeeded and filled it.
        let st = unsafe { st.assume_init() };
        st.f_bavail * st.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Snapshot files in `dir` by their name without extension.
fn sets(dir: &Path) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut m = std::collections::BTreeMap::<String, Vec<String>>::new();
    for n in names(dir) {
        if let Some(stem) = n.strip_suffix(".json").or_else(|| n.strip_suffix(".pb.gz")) {
            m.entry(stem.to_string()).or_default().push(n.clone());
        }
    }
    m
}

const PAGE: u64 = 4096;

fn pages(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE)
}

#[test]
fn a_snapshot_that_does_not_fit_is_written_whole_or_not_at_all_and_heapbpf_exits_1() {
    require_root();
    let root = TempDir::new("full");
    let disk = Tmpfs::mount(&root.path().join("disk"), "32m");
    let mut fx = Fixture::spawn("stacks");
    // pprof first, then the large JSON: with room for the first and not
    // both, eb5edfa published the pprof alone.
    let mut hb = Heapbpf::attach(&[fx.pid], &disk.0, &["--format", "pprof,json"]);
    // 2048 distinct stacks: a JSON snapshot of megabytes.
    fx.command("spread 11 64");
    hb.signal(libc::SIGUSR2);
    let first = hb.wait_snapshot("signal", fx.pid);
    let size = |p: &PathBuf| fs::metadata(p).unwrap().len();
    let (pb, json) = (size(&first[0]), size(&first[1]));
    assert!(pages(json) >= 16, "the JSON snapshot is only {json} bytes");
    // Room for the pprof and half the JSON.
    let room = (pages(pb) + pages(json) / 2) * PAGE;
    let filler = disk.0.join("filler");
    fs::write(&filler, vec![0u8; (disk.available() - room) as usize]).unwrap();
    assert_eq!(disk.available(), room);

    hb.signal(libc::SIGUSR2);
    let line = hb.wait_for("the failed snapshot", |l| l.contains(" failed: "));
    let left = sets(&disk.0);
    assert_eq!(left.len(), 1, "half a snapshot was left: {left:?}");
    assert!(
        !names(&disk.0).iter().any(|n| n.ends_with(".tmp")),
        "{:?}",
        names(&disk.0)
    );
    assert_eq!(
        disk.available(),
        room,
        "space of the failed snapshot not freed"
    );
    assert_eq!(
        failed_lines(&hb.stderr, "signal", fx.pid).len(),
        1,
        "{line}"
    );
    assert!(line.contains("No space left on device"), "{line}");

    // Later triggers still work.
    fs::remove_file(&filler).unwrap();
    hb.signal(libc::SIGUSR2);
    let third = hb.wait_snapshot("signal", fx.pid);
    assert_eq!(read_json(&third[1])["trigger"], "signal");
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
    let code = hb.wait_exit().code();
    let err = hb.stderr.join("\n");
    assert_eq!(code, Some(1), "a snapshot failed, yet:\n{err}");
    assert!(
        err.lines()
            .last()
            .unwrap()
            .contains("1 snapshot could not be written"),
        "{err}"
    );
    for (stem, files) in sets(&disk.0) {
        assert_eq!(files.len(), 2, "{stem}: {files:?}");
    }
    assert_eq!(sets(&disk.0).len(), 3);
}

#[test]
fn a_deleted_output_directory_fails_each_snapshot_and_heapbpf_exits_1() {
    require_root();
    let root = TempDir::new("gone");
    let out = root.path().join("out");
    fs::create_dir(&out).unwrap();
    let mut fx = Fixture::spawn("allocs");
    fx.command("run");
    let mut hb = Heapbpf::attach(&[fx.pid], &out, &[]);
    fs::remove_dir_all(&out).unwrap();
    hb.signal(libc::SIGUSR2);
    let line = hb.wait_for("the failed snapshot", |l| l.contains(" failed: "));
    hb.signal(libc::SIGINT);
    let code = hb.wait_exit().code();
    let err = hb.stderr.join("\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(line.contains("was deleted"), "{line}");
    assert_eq!(failed_lines(&hb.stderr, "signal", fx.pid).len(), 1, "{err}");
    assert_eq!(failed_lines(&hb.stderr, "stop", fx.pid).len(), 1, "{err}");
    assert_eq!(count_snapshot_lines(&hb.stderr, None), 0, "{err}");
    // One plain line per failure, no log noise.
    assert!(!err.contains("ERROR") && !err.contains('\x1b'), "{err}");
    assert!(!out.exists());
}

#[test]
fn run_exits_1_instead_of_the_commands_status_when_its_snapshot_fails() {
    require_root();
    let root = TempDir::new("run-gone");
    let out = root.path().join("out");
    fs::create_dir(&out).unwrap();
    let script = format!("rmdir {}; exit 3", out.display());
    let (code, _, err) = run_heapbpf(&[
        "run",
        "--sample-bytes",
        "0",
        "-o",
        out.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        &script,
    ]);
    assert!(!out.exists(), "{err}");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("heapbpf: snapshot exit pid="), "{err}");
    assert!(err.contains(" failed: the output directory "), "{err}");
}

#[test]
fn temporary_files_of_dead_heapbpf_processes_are_removed_at_start() {
    require_root();
    let dir = TempDir::new("stale");
    let victims = TempDir::new("stale-victims");
    let victim = victims.path().join("victim");
    fs::write(&victim, b"precious\n").unwrap();
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let me = std::process::id();
    // A heapbpf killed while writing (eb5edfa's name), and one of this
    // version's named fallback.
    let stale = format!(".heapbpf-4242-20261124T190000Z-0001.json.{dead}.tmp");
    let stale_new = format!(".heapbpf-7.{dead}.tmp");
    fs::write(dir.path().join(&stale), vec![b'x'; 1 << 20]).unwrap();
    fs::write(dir.path().join(&stale_new), b"x").unwrap();
    // Not heapbpf's to remove: a live process's, a link, a directory,
    // another name.
    let live = format!(".heapbpf-4242-20261124T190000Z-0001.json.{me}.tmp");
    let link = format!(".heapbpf-8.{dead}.tmp");
    let subdir = format!(".heapbpf-9.{dead}.tmp");
    let other = format!("notes.{dead}.tmp");
    fs::write(dir.path().join(&live), b"x").unwrap();
    fs::write(dir.path().join(&other), b"x").unwrap();
    symlink(&victim, dir.path().join(&link)).unwrap();
    fs::create_dir(dir.path().join(&subdir)).unwrap();

    let mut fx = Fixture::spawn("allocs");
    fx.command("run");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &[]);
    let left = names(dir.path());
    assert!(!left.contains(&stale), "{left:?}");
    assert!(!left.contains(&stale_new), "{left:?}");
    for n in [&live, &link, &subdir, &other] {
        assert!(left.contains(n), "{n} was removed: {left:?}");
    }
    assert_eq!(fs::read(&victim).unwrap(), b"precious\n");
    assert!(
        hb.stderr
            .iter()
            .any(|l| l.contains("removed 2 temporary files left in")),
        "{}",
        hb.stderr.join("\n")
    );
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));
}

#[test]
fn the_flamegraph_of_32k_stacks_is_bounded_by_the_picture() {
    require_root();
    let dir = TempDir::new("svg");
    let mut fx = Fixture::spawn("stacks");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--format", "svg"]);
    // 32,768 distinct stacks of equal size: each far narrower than a pixel.
    fx.command("spread 15 64");
    hb.signal(libc::SIGINT);
    let paths = hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));
    let svg = fs::read_to_string(&paths[0]).unwrap();
    // eb5edfa drew every frame wider than 0.1 pixel: 3 MB.
    assert!(svg.len() < 1 << 20, "{} bytes", svg.len());
    assert!(svg.contains("[other]"), "no [other] frame");
    assert!(
        svg.contains("stacks narrower than a pixel are merged into [other]"),
        "the subtitle does not say so"
    );
}
