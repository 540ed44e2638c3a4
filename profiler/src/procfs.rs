//! What heapbpf reads from `/proc`: process identity, memory maps, RSS.
//! Parsing is pure (unit-tested on text); the readers are thin.
use std::{fs, io, path::PathBuf};

use crate::error::{Error, Result};

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub dev: String,
    pub inode: u64,
    /// The path as the target sees it (its own mount namespace and root);
    /// `[heap]`, `[vdso]`, ... for special mappings, empty for anonymous ones.
    pub path: String,
}

impl Mapping {
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }
    pub fn is_exec(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }
    /// `/proc/PID/map_files/START-END`: a link to the very file the target
    /// mapped, valid whatever mount namespace or chroot the target lives in.
    pub fn map_file(&self, pid: u32) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            self.start, self.end
        ))
    }
    /// File name of the path, without a ` (deleted)` suffix.
    pub fn file_name(&self) -> &str {
        let p = self.path.strip_suffix(" (deleted)").unwrap_or(&self.path);
        crate::model::basename(p)
    }
}

/// Parses the text of `/proc/PID/maps`; malformed lines are skipped.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.to_string();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let dev = it.next()?.to_string();
    let inode = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    Some(Mapping {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        perms,
        offset,
        dev,
        inode,
        path,
    })
}

/// The value of `Key:` in a `/proc/PID/status` text, trimmed.
pub fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.trim())
    })
}

/// `/proc/PID/status` (`self` for heapbpf itself). Its `Name` is whatever
/// bytes the process named itself with: not necessarily UTF-8.
pub fn read_status(pid: &str) -> io::Result<String> {
    let bytes = fs::read(format!("/proc/{pid}/status"))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Identity of a target, read once at attach.
#[derive(Clone, Debug)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    /// The executable as the target sees it (first mapping of the exe).
    pub exe: String,
}

fn proc_err(pid: u32, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::NotFound => Error::NoSuchProcess { pid },
        io::ErrorKind::PermissionDenied => Error::NotTraceable {
            pid,
            why: access_denied(pid, &read_status("self").unwrap_or_default()),
        },
        _ => Error::NotTraceable {
            pid,
            why: e.to_string(),
        },
    }
}

/// Why the kernel refused heapbpf a process's `/proc/PID/maps` (and `exe`,
/// `map_files`): its ptrace access check (`PTRACE_MODE_READ`), which root
/// passes through `CAP_SYS_PTRACE` unless something stronger protects the
/// process — as pid 1 on the machine this was written on, the init of a
/// VM: root in the same user namespace, with `CAP_SYS_PTRACE`, reads its
/// `status` but not its `maps`, `exe` or `root` (other root processes, with
/// or without `CAP_SYS_PTRACE`, are readable). Worded from heapbpf's own
/// `status`.
pub fn access_denied(pid: u32, own_status: &str) -> String {
    const CAP_SYS_PTRACE: u32 = 19;
    let caps = |status: &str, key: &str| {
        status_field(status, key).and_then(|v| u64::from_str_radix(v, 16).ok())
    };
    let euid = |status: &str| {
        status_field(status, "Uid").and_then(|v| v.split_whitespace().nth(1)?.parse::<u32>().ok())
    };
    let own = caps(own_status, "CapEff").unwrap_or(0);
    let uid = euid(own_status);
    if own & (1 << CAP_SYS_PTRACE) == 0 {
        return format!(
            "permission denied reading /proc/{pid}/maps: heapbpf (uid {}) lacks CAP_SYS_PTRACE; \
             run it as root or grant it CAP_SYS_PTRACE",
            uid.map_or("?".into(), |u| u.to_string())
        );
    }
    let who = if uid == Some(0) {
        "runs as root with CAP_SYS_PTRACE"
    } else {
        "has CAP_SYS_PTRACE"
    };
    let mut why = format!(
        "the kernel refuses heapbpf its memory map (/proc/{pid}/maps: the ptrace access check) \
         although heapbpf {who}"
    );
    if pid == 1 {
        why.push_str(
            "; pid 1 is the init of this machine or container, protected from inspection: \
             heapbpf cannot profile it from here",
        );
    } else {
        why.push_str(
            "; a security policy (Landlock, Yama, SELinux, AppArmor) protects the process \
             from inspection",
        );
    }
    why
}

/// Checks that `pid` names a live user-space process heapbpf may trace.
pub fn process_info(pid: u32) -> Result<ProcessInfo> {
    if pid == 0 {
        return Err(Error::NoSuchProcess { pid });
    }
    if pid == std::process::id() {
        return Err(Error::NotTraceable {
            pid,
            why: "that is heapbpf itself".into(),
        });
    }
    let status = read_status(&pid.to_string()).map_err(|e| proc_err(pid, e))?;
    // A thread id is not a process: /proc/TID exists but Tgid differs.
    let tgid = status_field(&status, "Tgid").and_then(|v| v.parse::<u32>().ok());
    if let Some(tgid) = tgid {
        if tgid != pid {
            return Err(Error::NotTraceable {
                pid,
                why: format!("it is a thread of process {tgid}; attach to {tgid} instead"),
            });
        }
    }
    if status_field(&status, "State").is_some_and(|s| s.contains("zombie")) {
        return Err(Error::NotTraceable {
            pid,
            why: "the process has exited (zombie)".into(),
        });
    }
    // The name is whatever bytes the process gave itself (PR_SET_NAME):
    // not necessarily UTF-8, and printed only through lines::escape.
    let comm = fs::read(format!("/proc/{pid}/comm")).map_err(|e| proc_err(pid, e))?;
    let comm = String::from_utf8_lossy(comm.strip_suffix(b"\n").unwrap_or(&comm)).into_owned();
    let maps = read_maps(pid)?;
    if maps.is_empty() {
        return Err(Error::NotTraceable {
            pid,
            why: format!(
                "{} is a kernel thread, it has no user-space heap",
                crate::lines::escape(&comm)
            ),
        });
    }
    let exe_link = fs::read_link(format!("/proc/{pid}/exe")).ok();
    let exe = exe_link
        .as_ref()
        .and_then(|l| {
            let l = l.to_string_lossy();
            // Inside a chroot or container the link shows the host path; the
            // maps show the target's own. Prefer the target's view.
            let name = crate::model::basename(&l).to_string();
            maps.iter()
                .find(|m| m.is_file() && m.file_name() == name)
                .map(|m| m.path.clone())
        })
        .or_else(|| exe_link.map(|l| l.to_string_lossy().into_owned()))
        .unwrap_or_default();
    Ok(ProcessInfo { pid, comm, exe })
}

/// (device, inode) of the file a process runs: changes when it execs
/// another program. `None` once it is gone.
pub fn exe_id(pid: u32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(format!("/proc/{pid}/exe")).ok()?;
    Some((m.dev(), m.ino()))
}

pub fn read_maps(pid: u32) -> Result<Vec<Mapping>> {
    // Paths are bytes, not necessarily UTF-8 (files are opened through
    // map_files, never by these paths).
    let text = fs::read(format!("/proc/{pid}/maps")).map_err(|e| proc_err(pid, e))?;
    let mut maps = parse_maps(&String::from_utf8_lossy(&text));
    to_target_view(&mut maps, root_of(pid).as_deref());
    Ok(maps)
}

/// The target's root directory as heapbpf sees it (`/` unless chrooted).
pub fn root_of(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/root"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// `struct open_how` of openat2(2) (libc's is `non_exhaustive`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens a regular file at `path` as the process `pid` sees it, for
/// reading. The path is resolved inside the target's root
/// (`openat2(RESOLVE_IN_ROOT)` on `/proc/PID/root`): an absolute symlink or
/// `..` in it stays in the target's tree, and no `/proc` magic link is
/// followed, so a target can never make heapbpf read one of heapbpf's own
/// files. The file is opened `O_PATH` first and reopened for reading only
/// when it is a regular file: no device is ever opened, no FIFO waited on.
/// A file that is not regular is an `InvalidInput` error saying what it is.
pub fn open_in_root(pid: u32, path: &str) -> io::Result<fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::OpenOptionsExt;

    let root = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(format!("/proc/{pid}/root"))?;
    let c_path = std::ffi::CString::new(path)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2(2) with a directory fd we hold, a NUL-terminated path
    // and an `open_how` of the size passed; it only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c_path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor, owned by nobody else.
    let found = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    let kind = found.metadata()?.file_type();
    if !kind.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a regular file ({})", crate::output::file_kind(&kind)),
        ));
    }
    // The very inode found, now for reading (its magic link is heapbpf's own).
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", found.as_raw_fd()))
}

/// `/proc/PID/maps` shows paths as seen from the reader's root; rewrites
/// them as the target sees them when it lives under another root (chroot).
pub fn to_target_view(maps: &mut [Mapping], root: Option<&str>) {
    let Some(root) = root
        .map(|r| r.trim_end_matches('/'))
        .filter(|r| !r.is_empty())
    else {
        return;
    };
    for m in maps {
        if let Some(rest) = m.path.strip_prefix(root) {
            if rest.starts_with('/') {
                m.path = rest.to_string();
            }
        }
    }
}

/// Resident set size in bytes, `None` once the process is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    parse_statm_rss(&statm, page_size())
}

pub fn parse_statm_rss(statm: &str, page_size: u64) -> Option<u64> {
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

/// True while `/proc/PID` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    // Not read as UTF-8: the name in it is the process's own bytes.
    match fs::read(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            parse_stat_state(&String::from_utf8_lossy(&stat)).is_some_and(|s| s != 'Z' && s != 'X')
        }
        Err(_) => false,
    }
}

pub fn parse_stat_state(stat: &str) -> Option<char> {
    // "pid (comm with spaces) S ..." — the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The figures of `/proc/PID/stat` heapbpf uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    /// CPU time in user and kernel mode, in clock ticks (`utime`, `stime`).
    pub utime_ticks: u64,
    pub stime_ticks: u64,
    /// When the process started, in clock ticks after boot: with the pid,
    /// what tells a process from a later one given the same pid.
    pub start_ticks: u64,
}

impl Stat {
    /// CPU time, user and kernel, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        self.utime_ticks + self.stime_ticks
    }
}

/// Parses `/proc/PID/stat`: the fields after the name (which may hold
/// spaces and parentheses) are counted from the last `)`.
pub fn parse_stat(stat: &str) -> Option<Stat> {
    let mut f = stat.rsplit_once(')')?.1.split_whitespace();
    // After ')': state is field 3 of proc(5); utime 14, stime 15, starttime 22.
    let state = f.next()?.chars().next()?;
    let mut f = f.skip(10);
    let utime_ticks = f.next()?.parse().ok()?;
    let stime_ticks = f.next()?.parse().ok()?;
    let start_ticks = f.nth(6)?.parse().ok()?;
    Some(Stat {
        state,
        utime_ticks,
        stime_ticks,
        start_ticks,
    })
}

/// `/proc/PID/stat`, `None` once the process is gone. Read to at most 4 KiB
/// (the name in it is the process's own bytes, at most 16 of them).
pub fn read_stat(pid: u32) -> Option<Stat> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(512);
    fs::File::open(format!("/proc/{pid}/stat"))
        .ok()?
        .take(4096)
        .read_to_end(&mut buf)
        .ok()?;
    parse_stat(&String::from_utf8_lossy(&buf))
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), for [`Stat`]'s figures.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234                       /usr/local/bin/app
55d0c0a01000-55d0c0a02000 r-xp 00001000 fe:01 1234                       /usr/local/bin/app
55d0c1c00000-55d0c1c21000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000028000 r--p 00000000 fe:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000028000-7f000019d000 r-xp 00028000 fe:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
7f00001a0000-7f00001a1000 rw-p 00000000 00:00 0 
7f00002a0000-7f00002a1000 r-xp 00000000 fe:01 77                         /tmp/x/libfoo.so (deleted)
7ffd1e5f2000-7ffd1e5f4000 r-xp 00000000 00:00 0                          [vdso]
";

    #[test]
    fn parses_maps() {
        let maps = parse_maps(MAPS);
        assert_eq!(maps.len(), 8);
        let libc = &maps[4];
        assert_eq!(libc.start, 0x7f0000028000);
        assert_eq!(libc.end, 0x7f000019d000);
        assert_eq!(libc.offset, 0x28000);
        assert_eq!(libc.inode, 99);
        assert!(libc.is_file() && libc.is_exec());
        assert_eq!(libc.file_name(), "libc.so.6");
        assert_eq!(
            libc.map_file(42),
            PathBuf::from("/proc/42/map_files/7f0000028000-7f000019d000")
        );
        assert!(!maps[2].is_file());
        assert_eq!(maps[5].path, "");
        assert_eq!(maps[6].file_name(), "libfoo.so");
        assert!(!maps[7].is_file());
    }

    #[test]
    fn paths_as_the_target_sees_them() {
        let mut maps = parse_maps("1000-2000 r-xp 00000000 fe:01 5 /srv/jail/bin/app\n1000-2000 r-xp 00000000 fe:01 6 /srv/jailbreak/x\n");
        to_target_view(&mut maps, Some("/srv/jail"));
        assert_eq!(maps[0].path, "/bin/app");
        assert_eq!(maps[1].path, "/srv/jailbreak/x");
        to_target_view(&mut maps, Some("/"));
        assert_eq!(maps[0].path, "/bin/app");
    }

    #[test]
    fn status_fields() {
        let status =
            "Name:\tapp\nState:\tZ (zombie)\nTgid:\t42\nNSpid:\t42\t7\nCapEff:\t000001ffffffffff\n";
        assert_eq!(status_field(status, "Tgid"), Some("42"));
        assert_eq!(status_field(status, "NSpid"), Some("42\t7"));
        assert_eq!(status_field(status, "State"), Some("Z (zombie)"));
        assert_eq!(status_field(status, "Cap"), None);
        assert_eq!(status_field(status, "CapEff"), Some("000001ffffffffff"));
    }

    #[test]
    fn access_denied_says_what_the_kernel_refused() {
        let root = "Uid:\t0\t0\t0\t0\nCapEff:\t000001fffeffffff\n";
        let why = access_denied(1, root);
        assert!(!why.contains("run heapbpf as root"), "{why}");
        assert!(
            why.starts_with("the kernel refuses heapbpf its memory map (/proc/1/maps")
                && why.contains("although heapbpf runs as root with CAP_SYS_PTRACE")
                && why.ends_with("heapbpf cannot profile it from here"),
            "{why}"
        );
        assert!(access_denied(42, root).contains("a security policy"));
        // Without CAP_SYS_PTRACE, that is the cause.
        let nobody = "Uid:\t65534\t65534\t65534\t65534\nCapEff:\t000000c000000000\n";
        let why = access_denied(42, nobody);
        assert!(
            why.contains("(uid 65534) lacks CAP_SYS_PTRACE") && why.contains("run it as root"),
            "{why}"
        );
    }

    #[test]
    fn parses_statm_and_stat() {
        assert_eq!(
            parse_statm_rss("1000 250 100 1 0 300 0\n", 4096),
            Some(250 * 4096)
        );
        assert_eq!(parse_statm_rss("", 4096), None);
        assert_eq!(parse_stat_state("42 (my (odd) prog) S 1 2 3"), Some('S'));
        assert_eq!(parse_stat_state("42 (x) Z 1"), Some('Z'));
        let stat = "7 (a) b) c) S 1 7 7 0 -1 4194560 100 0 0 0 25 13 0 0 20 0 1 0 123456 1000 10 0";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                state: 'S',
                utime_ticks: 25,
                stime_ticks: 13,
                start_ticks: 123456
            })
        );
        assert_eq!(parse_stat("7 (a) S 1"), None);
        let me = read_stat(std::process::id()).unwrap();
        assert!(me.start_ticks > 0 && me.state != 'Z', "{me:?}");
    }
}
