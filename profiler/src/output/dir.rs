//! The output directory, opened once at start and kept open: every file is
//! created, linked and removed relative to that descriptor, so renaming the
//! directory or putting a symlink in its place does not send later
//! snapshots elsewhere, and no name in it is ever followed.
//!
//! Files are written unnamed (`O_TMPFILE`) where the file system allows it,
//! so that a heapbpf killed while writing leaves nothing, else under a
//! temporary name created with `O_CREAT|O_EXCL|O_NOFOLLOW`
//! (`.heapbpf-N.<heapbpf pid>.tmp`), mode 0600. Once written, an unnamed
//! file gets such a temporary name too (it could be linked only once, and
//! publishing may have to try several names), and is made visible with
//! `linkat`, which never replaces an existing name. This module knows
//! nothing of snapshots: [`super::writer`] names and publishes them.
use std::{
    cell::Cell,
    ffi::{CStr, CString},
    fs::{self, File},
    io::{self, Write as _},
    os::{
        fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd},
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// Snapshot files are readable by their owner only: they hold addresses,
/// paths and symbol names of the target.
pub const FILE_MODE: libc::mode_t = 0o600;

/// What every temporary file's name starts with (this version's and
/// earlier ones', whose names were `.heapbpf-<snapshot name>.<pid>.tmp`).
const TEMP_PREFIX: &str = ".heapbpf-";
const TEMP_SUFFIX: &str = ".tmp";

/// A file's identity: what a name referred to when this run wrote it.
/// Size and modification time tell a file that reuses the inode number of
/// one deleted since from the one this run wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

impl FileId {
    fn of(meta: &fs::Metadata) -> Self {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }

    fn from_stat(st: &libc::stat) -> Self {
        FileId {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec),
        }
    }
}

/// A regular file found in the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirFile {
    pub name: String,
    pub size_bytes: u64,
    /// What the name referred to when listed, for [`OutputDir::remove_own`].
    pub id: FileId,
}

/// A file being written that no snapshot name refers to yet.
#[derive(Debug)]
pub struct TempFile {
    file: File,
    /// Its temporary name; `None` while it has none (`O_TMPFILE`).
    name: Option<CString>,
}

impl TempFile {
    /// What it is now, to recognise it later under the names it is
    /// published as.
    pub fn id(&self) -> io::Result<FileId> {
        Ok(FileId::of(&self.file.metadata()?))
    }

    /// Writes all of `bytes` and flushes them to the device, so that a
    /// published snapshot is complete even after a crash.
    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_with(|w| w.write_all(bytes))
    }

    /// Lets `write` write the contents through a buffer, then flushes
    /// them to the device.
    pub fn write_with(
        &mut self,
        write: impl FnOnce(&mut dyn io::Write) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut w = io::BufWriter::with_capacity(1 << 16, &mut self.file);
        write(&mut w)?;
        w.flush()?;
        drop(w);
        self.file.sync_all()
    }
}

/// The directory snapshots go to, pinned by a descriptor.
#[derive(Debug)]
pub struct OutputDir {
    dir: File,
    /// Device and inode of the directory.
    id: (u64, u64),
    /// The path it was opened by.
    opened_as: PathBuf,
    /// Where it is now, as far as heapbpf knows: `opened_as`, unless the
    /// directory was moved since. Paths printed are under this one.
    shown: PathBuf,
    /// Whether files can be created unnamed here.
    tmpfile: bool,
    next_temp: Cell<u64>,
}

impl OutputDir {
    /// Opens `path` and checks that files can be written in it; every
    /// failure is [`Error::OutputDir`] (bad input, exit 2).
    pub fn open(path: &Path) -> Result<Self> {
        let err = |why: String| Error::OutputDir {
            path: path.to_path_buf(),
            why,
        };
        // O_DIRECTORY: a path that is not a directory fails here, on the
        // descriptor, not on a separate check a rename could race with.
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(path)
            .map_err(|e| {
                err(match e.raw_os_error() {
                    Some(libc::ENOENT) => {
                        "no such directory (create it or pick another with -o)".into()
                    }
                    Some(libc::ENOTDIR) => "not a directory".into(),
                    _ => format!("{} (pick another with -o)", plain(&e)),
                })
            })?;
        let meta = dir.metadata().map_err(|e| err(plain(&e)))?;
        let id = (meta.dev(), meta.ino());
        let mut out = OutputDir {
            dir,
            id,
            opened_as: path.to_path_buf(),
            shown: path.to_path_buf(),
            tmpfile: true,
            next_temp: Cell::new(1),
        };
        // Root passes every permission check; only a real write tells.
        let probe = match out.create_unnamed() {
            Ok(f) => Ok(f),
            Err(e) if tmpfile_unsupported(&e) => {
                out.tmpfile = false;
                out.create_temp()
            }
            Err(e) => Err(e),
        };
        match probe {
            Ok(t) => {
                out.discard(t);
                Ok(out)
            }
            Err(e) => Err(err(format!(
                "{} (pick a writable directory with -o)",
                plain(&e)
            ))),
        }
    }

    /// Why others could plant files here (the agent serves and deletes
    /// what it finds in its data directory): `None` when only heapbpf's own
    /// user can write it.
    pub fn writable_by_others(&self) -> Option<String> {
        let meta = self.dir.metadata().ok()?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Some(format!(
                "it belongs to uid {}, not to heapbpf's ({me})",
                meta.uid()
            ));
        }
        let mode = meta.mode();
        (mode & 0o022 != 0).then(|| format!("its mode {:o} lets others write in it", mode & 0o7777))
    }

    /// Another handle on the same directory (its own descriptor), for a
    /// reader on another thread.
    pub fn try_clone(&self) -> io::Result<OutputDir> {
        Ok(OutputDir {
            dir: self.dir.try_clone()?,
            id: self.id,
            opened_as: self.opened_as.clone(),
            shown: self.shown.clone(),
            tmpfile: self.tmpfile,
            next_temp: Cell::new(1),
        })
    }

    /// Where the directory is, for paths shown to the user.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// Whether the directory was deleted since it was opened.
    pub fn is_deleted(&self) -> bool {
        self.dir.metadata().is_ok_and(|m| m.nlink() == 0)
    }

    /// Notices that the directory is no longer at the path it was opened
    /// by (renamed, or replaced by another directory or a symlink). Files
    /// still go to the directory opened at start; returns where it is now,
    /// once per move, so the caller can say so.
    pub fn relocate(&mut self) -> Option<PathBuf> {
        let here = fs::metadata(&self.opened_as).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        let now = if here {
            self.opened_as.clone()
        } else {
            // The kernel's name for the directory the descriptor holds.
            let link = fs::read_link(format!("/proc/self/fd/{}", self.dir.as_raw_fd())).ok()?;
            if !link.is_absolute() || link.to_string_lossy().ends_with(" (deleted)") {
                return None;
            }
            link
        };
        if now == self.shown {
            return None;
        }
        self.shown = now;
        (!here).then(|| self.shown.clone())
    }

    /// A new empty file, mode 0600, that no name refers to yet (or only
    /// a temporary one).
    pub fn create_temp(&self) -> io::Result<TempFile> {
        if self.tmpfile {
            match self.create_unnamed() {
                Err(e) if tmpfile_unsupported(&e) => {}
                other => return other,
            }
        }
        // O_EXCL fails on any existing name, a symlink included; O_NOFOLLOW
        // says it twice.
        let mut file = None;
        let name = self.free_temp_name(|name| {
            file = Some(self.openat(
                name,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            )?);
            Ok(())
        })?;
        let file = file.ok_or_else(|| io::Error::other("no temporary file"))?;
        Ok(TempFile {
            file,
            name: Some(name),
        })
    }

    fn create_unnamed(&self) -> io::Result<TempFile> {
        let file = self.openat(c".", libc::O_WRONLY | libc::O_TMPFILE)?;
        Ok(TempFile { file, name: None })
    }

    /// Calls `create` with temporary names until one is free (a taken
    /// name, planted or not, is skipped); returns that name.
    fn free_temp_name(
        &self,
        mut create: impl FnMut(&CStr) -> io::Result<()>,
    ) -> io::Result<CString> {
        for _ in 0..1000 {
            let n = self.next_temp.get();
            self.next_temp.set(n + 1);
            let name = cstring(&format!(
                "{TEMP_PREFIX}{n}.{}{TEMP_SUFFIX}",
                std::process::id()
            ))?;
            match create(&name) {
                Ok(()) => return Ok(name),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        // Not AlreadyExists: that would read as a taken snapshot name.
        Err(io::Error::other("no free temporary file name"))
    }

    fn openat(&self, name: &CStr, flags: libc::c_int) -> io::Result<File> {
        // SAFETY: the directory descriptor is open for as long as `self`,
        // `name` is NUL-terminated, and the mode argument is what openat
        // reads for O_CREAT and O_TMPFILE.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                libc::c_uint::from(FILE_MODE),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by openat and belongs to nothing else.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes `temp` visible as `name` in the directory. Never replaces an
    /// existing name (a symlink included): that is `AlreadyExists`.
    pub fn link(&self, temp: &mut TempFile, name: &str) -> io::Result<()> {
        let new = cstring(name)?;
        let dirfd = self.dir.as_raw_fd();
        let old = match &temp.name {
            Some(old) => old,
            None => {
                // An unnamed file can be linked once only; it gets a
                // temporary name first, which later links start from.
                let file = &temp.file;
                temp.name = Some(self.free_temp_name(|tmp| link_unnamed(file, dirfd, tmp))?);
                temp.name.as_ref().unwrap_or_else(|| unreachable!())
            }
        };
        // SAFETY: both names are NUL-terminated and relative to the
        // directory descriptor, open for as long as `self`; flags 0 links
        // the name itself, following nothing.
        if unsafe { libc::linkat(dirfd, old.as_ptr(), dirfd, new.as_ptr(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Closes `temp` and removes its temporary name, if it has one.
    pub fn discard(&self, temp: TempFile) {
        if let Some(name) = &temp.name {
            let _ = self.unlinkat(name);
        }
    }

    /// Removes `name` if it is still the file `id` this run wrote: a file
    /// someone else put at that name since is left alone. A name already
    /// gone is not an error.
    pub fn remove_own(&self, name: &str, id: FileId) -> io::Result<()> {
        let name = cstring(name)?;
        match self.stat_nofollow(&name) {
            Ok(st) if FileId::from_stat(&st) == id => self.unlinkat(&name),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes the temporary files that heapbpf processes which are no
    /// longer running left here (killed while writing a snapshot): only
    /// regular files whose name is heapbpf's temporary pattern, never
    /// through a link. Returns their names.
    pub fn remove_stale_temps(&self) -> Vec<String> {
        let mut removed = Vec::new();
        let Ok(names) = self.names() else {
            return removed;
        };
        for name in names {
            let Ok(text) = name.to_str() else { continue };
            let Some(owner) = temp_owner(text) else {
                continue;
            };
            if owner == std::process::id() || crate::procfs::is_alive(owner) {
                continue;
            }
            let regular = self
                .stat_nofollow(&name)
                .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
            if regular && self.unlinkat(&name).is_ok() {
                tracing::info!(name = ?text, pid = owner, "removed a stale temporary file");
                removed.push(text.to_string());
            }
        }
        removed
    }

    /// The regular files in the directory whose names `wanted` accepts,
    /// with their sizes and identities (what a symlink, directory or other
    /// special file is named never counts, and nothing is followed).
    pub fn regular_files(&self, wanted: impl Fn(&str) -> bool) -> io::Result<Vec<DirFile>> {
        let mut files = Vec::new();
        for name in self.names()? {
            let Ok(text) = name.to_str() else { continue };
            if !wanted(text) {
                continue;
            }
            // Gone since readdir, or unreadable: not listed.
            let Ok(st) = self.stat_nofollow(&name) else {
                continue;
            };
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                continue;
            }
            files.push(DirFile {
                name: text.to_string(),
                size_bytes: st.st_size as u64,
                id: FileId::from_stat(&st),
            });
        }
        Ok(files)
    }

    /// Opens the regular file `name` in the directory for reading: never
    /// through a symlink (`O_NOFOLLOW`), never blocking on a FIFO or a
    /// device (`O_NONBLOCK`, then refused as not a regular file). A name
    /// with a `/` is refused: only the directory's own entries are read.
    pub fn open_regular(&self, name: &str) -> io::Result<File> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a file name of this directory",
            ));
        }
        let file = self.openat(
            &cstring(name)?,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
        )?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        // heapbpf links each file it writes once: a second name is someone
        // else's doing (a hard link to a file heapbpf must not serve).
        if meta.nlink() != 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a file with other names (hard links)",
            ));
        }
        Ok(file)
    }

    /// The names in the directory, read through a descriptor of its own.
    fn names(&self) -> io::Result<Vec<CString>> {
        let fd = self
            .openat(c".", libc::O_RDONLY | libc::O_DIRECTORY)?
            .into_raw_fd();
        // SAFETY: `fd` is an open directory descriptor that we own; on
        // success fdopendir takes it over (closedir closes it).
        let d = unsafe { libc::fdopendir(fd) };
        if d.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: fdopendir failed, so `fd` is still ours to close.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        let mut names = Vec::new();
        loop {
            // SAFETY: `d` is a valid DIR stream until closedir below.
            let entry = unsafe { libc::readdir(d) };
            if entry.is_null() {
                break;
            }
            // SAFETY: readdir returned a valid entry whose d_name is
            // NUL-terminated; it is copied before the next readdir.
            let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
            names.push(name.to_owned());
        }
        // SAFETY: `d` came from fdopendir and is closed once.
        unsafe { libc::closedir(d) };
        Ok(names)
    }

    fn stat_nofollow(&self, name: &CStr) -> io::Result<libc::stat> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `name` is NUL-terminated, the directory descriptor is
        // open, and `st` has room for a struct stat.
        let r = unsafe {
            libc::fstatat(
                self.dir.as_raw_fd(),
                name.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstatat succeeded, so it filled `st`.
        Ok(unsafe { st.assume_init() })
    }

    fn unlinkat(&self, name: &CStr) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated and relative to the open
        // directory descriptor; flags 0 removes a non-directory only.
        if unsafe { libc::unlinkat(self.dir.as_raw_fd(), name.as_ptr(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Links an unnamed (`O_TMPFILE`) file as `name` in `dirfd`, through its
/// /proc/self/fd link (AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH).
fn link_unnamed(file: &File, dirfd: libc::c_int, name: &CStr) -> io::Result<()> {
    let old = cstring(&format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    // SAFETY: `old` is an absolute NUL-terminated path (the first dirfd is
    // ignored for it), `name` is NUL-terminated and relative to `dirfd`,
    // an open directory descriptor.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            old.as_ptr(),
            dirfd,
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The pid of the heapbpf process a temporary file name belongs to:
/// `.heapbpf-<letters, digits, '.', '-'>.<pid>.tmp`.
pub fn temp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(TEMP_PREFIX)?.strip_suffix(TEMP_SUFFIX)?;
    let (tag, pid) = rest.rsplit_once('.')?;
    if tag.is_empty()
        || !tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        return None;
    }
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|&p| p > 0)
}

/// File systems without `O_TMPFILE` say so in one of these ways.
fn tmpfile_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
    )
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a file name"))
}

/// An I/O error as a person reads it: without Rust's "(os error N)".
pub fn plain(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    struct Scratch(PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("heapbpf-dir-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn temp_names_are_recognised_with_their_owner() {
        assert_eq!(temp_owner(".heapbpf-7.4242.tmp"), Some(4242));
        // The names of earlier versions.
        assert_eq!(
            temp_owner(".heapbpf-12-20261124T190000Z-0001.pb.gz.999.tmp"),
            Some(999)
        );
        for not in [
            "heapbpf-1.2.tmp",
            ".heapbpf-1.tmp",
            ".heapbpf-1.x2.tmp",
            ".heapbpf-1.2.tmpx",
            ".heapbpf-1..tmp",
            ".heapbpf-1.0.tmp",
            ".heapbpf-write-check-12",
            ".heapbpf-1.99999999999.tmp",
            ".heapbpf-\x1b[2J\n.12.tmp",
            ".heapbpf-.12.tmp",
        ] {
            assert_eq!(temp_owner(not), None, "{not}");
        }
    }

    #[test]
    fn files_are_private_and_never_replace_a_name() {
        for tmpfile in [true, false] {
            let s = Scratch::new(if tmpfile { "unnamed" } else { "named" });
            let mut d = OutputDir::open(&s.0).unwrap();
            d.tmpfile = tmpfile && d.tmpfile;
            let victim = s.0.join("victim");
            fs::write(&victim, b"victim").unwrap();
            std::os::unix::fs::symlink(&victim, s.0.join("taken")).unwrap();
            // The names the named scheme tries first are links to the victim.
            for n in 1..=3 {
                std::os::unix::fs::symlink(
                    &victim,
                    s.0.join(format!(".heapbpf-{n}.{}.tmp", std::process::id())),
                )
                .unwrap();
            }
            let mut t = d.create_temp().unwrap();
            t.write_all(b"data").unwrap();
            let e = d.link(&mut t, "taken").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
            d.link(&mut t, "free").unwrap();
            // Linked, taken back, and linked again under another name.
            fs::remove_file(s.0.join("free")).unwrap();
            d.link(&mut t, "free").unwrap();
            d.discard(t);
            let meta = fs::symlink_metadata(s.0.join("free")).unwrap();
            assert!(meta.is_file());
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            assert_eq!(fs::read(s.0.join("free")).unwrap(), b"data");
            assert_eq!(fs::read(&victim).unwrap(), b"victim");
            // Only the planted links remain besides what was published.
            let left: Vec<String> = entries(&s.0)
                .into_iter()
                .filter(|n| n.ends_with(".tmp"))
                .collect();
            assert_eq!(left.len(), 3, "{left:?}");
        }
    }

    #[test]
    fn the_directory_is_pinned() {
        let s = Scratch::new("pinned");
        let a = s.0.join("a");
        let moved = s.0.join("moved");
        let other = s.0.join("other");
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&other).unwrap();
        // Opened through a symlink, written to: still where it was.
        let via = s.0.join("via");
        std::os::unix::fs::symlink(&a, &via).unwrap();
        let mut d = OutputDir::open(&via).unwrap();
        let mut t = d.create_temp().unwrap();
        d.link(&mut t, "first").unwrap();
        assert_eq!(d.relocate(), None);
        assert_eq!(d.path(), via);
        drop(d);
        let mut d = OutputDir::open(&a).unwrap();
        assert_eq!(d.relocate(), None);
        fs::rename(&a, &moved).unwrap();
        std::os::unix::fs::symlink(&other, &a).unwrap();
        assert_eq!(d.relocate(), Some(moved.clone()));
        assert_eq!(d.relocate(), None, "said once");
        assert_eq!(d.path(), moved);
        let mut t = d.create_temp().unwrap();
        d.link(&mut t, "f").unwrap();
        assert!(moved.join("f").is_file());
        assert!(entries(&other).is_empty());
        // Deleted: writes fail, and the directory says why.
        fs::remove_file(&a).unwrap();
        fs::remove_dir_all(&moved).unwrap();
        assert!(d.is_deleted());
        assert!(d.create_temp().is_err());
        assert_eq!(d.relocate(), None);
    }

    #[test]
    fn removes_only_its_own_files() {
        let s = Scratch::new("own");
        let d = OutputDir::open(&s.0).unwrap();
        let mut t = d.create_temp().unwrap();
        t.write_all(b"mine").unwrap();
        d.link(&mut t, "mine").unwrap();
        let id = t.id().unwrap();
        d.discard(t);
        // Replaced by someone else's file (which may well reuse the inode
        // number of the one deleted): left alone.
        fs::remove_file(s.0.join("mine")).unwrap();
        fs::write(s.0.join("mine"), b"theirs").unwrap();
        d.remove_own("mine", id).unwrap();
        assert_eq!(fs::read(s.0.join("mine")).unwrap(), b"theirs");
        let mut t = d.create_temp().unwrap();
        d.link(&mut t, "mine2").unwrap();
        let id = t.id().unwrap();
        d.discard(t);
        d.remove_own("mine2", id).unwrap();
        assert!(!s.0.join("mine2").exists());
        d.remove_own("mine2", id).unwrap();
    }

    #[test]
    fn stale_temps_of_dead_processes_go() {
        let s = Scratch::new("stale");
        let dead = {
            let mut c = std::process::Command::new("true").spawn().unwrap();
            let pid = c.id();
            c.wait().unwrap();
            pid
        };
        let me = std::process::id();
        let victim = s.0.join("victim");
        fs::write(&victim, b"victim").unwrap();
        let stale = format!(".heapbpf-1-20261124T190000Z-0001.json.{dead}.tmp");
        let stale_new = format!(".heapbpf-3.{dead}.tmp");
        let live = format!(".heapbpf-3.{me}.tmp");
        let link = format!(".heapbpf-4.{dead}.tmp");
        let other = format!("notes.{dead}.tmp");
        for n in [&stale, &stale_new, &live, &other] {
            fs::write(s.0.join(n), b"x").unwrap();
        }
        std::os::unix::fs::symlink(&victim, s.0.join(&link)).unwrap();
        fs::create_dir(s.0.join(format!(".heapbpf-5.{dead}.tmp"))).unwrap();
        let d = OutputDir::open(&s.0).unwrap();
        let mut removed = d.remove_stale_temps();
        removed.sort();
        let mut want = vec![stale.clone(), stale_new.clone()];
        want.sort();
        assert_eq!(removed, want);
        let left = entries(&s.0);
        assert!(!left.contains(&stale) && !left.contains(&stale_new));
        for n in [&live, &other, &link] {
            assert!(left.contains(n), "{n} removed: {left:?}");
        }
        assert_eq!(fs::read(&victim).unwrap(), b"victim");
    }

    #[test]
    fn lists_and_opens_regular_files_only() {
        let s = Scratch::new("list");
        let d = OutputDir::open(&s.0).unwrap();
        let victim = s.0.join("victim");
        fs::write(&victim, b"secret").unwrap();
        fs::write(s.0.join("a.txt"), b"hello").unwrap();
        fs::write(s.0.join("skip.txt"), b"x").unwrap();
        std::os::unix::fs::symlink(&victim, s.0.join("link.txt")).unwrap();
        fs::create_dir(s.0.join("dir.txt")).unwrap();
        let fifo = CString::new(s.0.join("fifo.txt").to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let files = d
            .regular_files(|n| n.ends_with(".txt") && n != "skip.txt")
            .unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!(files[0].name, "a.txt");
        assert_eq!(files[0].size_bytes, 5);
        let mut text = String::new();
        io::Read::read_to_string(&mut d.open_regular("a.txt").unwrap(), &mut text).unwrap();
        assert_eq!(text, "hello");
        // A symlink is not followed, a FIFO does not block, a directory
        // and names outside it are refused.
        assert_eq!(
            d.open_regular("link.txt").unwrap_err().raw_os_error(),
            Some(libc::ELOOP)
        );
        for bad in [
            "fifo.txt",
            "dir.txt",
            "..",
            ".",
            "",
            "../victim",
            "/etc/passwd",
        ] {
            assert!(d.open_regular(bad).is_err(), "{bad}");
        }
        assert_eq!(
            d.open_regular("missing").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn unusable_directories_are_bad_input() {
        let s = Scratch::new("bad");
        let f = s.0.join("file");
        fs::write(&f, b"x").unwrap();
        for (p, want) in [
            (s.0.join("missing"), "no such directory"),
            (f, "not a directory"),
            (PathBuf::from("/proc/self"), "pick a writable directory"),
        ] {
            let e = OutputDir::open(&p).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            let msg = e.to_string();
            assert!(msg.contains(want), "{msg}");
            assert!(!msg.contains("os error"), "{msg}");
        }
        // The write check leaves nothing behind.
        OutputDir::open(&s.0).unwrap();
        assert_eq!(entries(&s.0), vec!["file".to_string()]);
    }
}
