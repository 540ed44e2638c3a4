//! Separate debug info: the file that holds a stripped module's symbols and
//! DWARF, found the way gdb, perf and eu-stack find it, and — with
//! `--debuginfod` — downloaded ([`debuginfod`]).
//!
//! Lookup for a module that has no DWARF of its own:
//! 1. by build id: `DIR/.build-id/xx/rest.debug` for each debug directory
//!    ([`DEBUG_DIRS`]), inside the target's root, then the host's;
//! 2. by `.gnu_debuglink` NAME: beside the module, in `.debug/` beside it,
//!    and `DIR/<module's directory>/NAME`, inside the target's root; then
//!    `DIR/<module's directory>/NAME` in the host's.
//!
//! Every file is opened with [`procfs::open_in_root`] (resolved inside that
//! root, no `/proc` magic link, regular files only) and used only when it
//! proves to be the module's: the same build id, or the debuglink's CRC32
//! (read in bounded chunks). This module reads ELF facts with `object`; it
//! never names blazesym.
pub mod debuginfod;

use std::{fs::File, io, io::Read, os::unix::fs::MetadataExt};

use crate::procfs;

/// Where distributions install debug info (`-dbgsym`, `-debuginfo`).
pub const DEBUG_DIRS: &[&str] = &["/usr/lib/debug"];

/// Larger files are not taken as debug info. blazesym maps them (nothing
/// is read into memory), but a debuglink's CRC is computed over all of it.
pub const MAX_DEBUG_FILE_BYTES: u64 = 8 << 30;

/// A loadable segment: `size` bytes of the file at `offset` are mapped at
/// `vaddr` (as linked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub size: u64,
    pub vaddr: u64,
}

/// What decides how a module is symbolized.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ElfFacts {
    /// The GNU build id, lowercase hex.
    pub build_id: Option<String>,
    /// `.gnu_debuglink`: the debug file's name and its CRC32.
    pub debuglink: Option<(String, u32)>,
    /// A `.symtab` (not only dynamic symbols).
    pub has_symtab: bool,
    /// DWARF of its own (`.debug_info` with contents).
    pub has_dwarf: bool,
    /// `PT_LOAD` segments.
    pub segments: Vec<Segment>,
}

impl ElfFacts {
    /// The facts of an ELF image; `None` when it is not one.
    pub fn parse(data: &[u8]) -> Option<ElfFacts> {
        use object::{Object, ObjectSection, ObjectSegment, SectionKind};
        let file = object::File::parse(data).ok()?;
        let build_id = file
            .build_id()
            .ok()
            .flatten()
            .filter(|b| !b.is_empty())
            .map(hex);
        // A name with a `/` would lead out of the directories searched.
        let debuglink = file.gnu_debuglink().ok().flatten().and_then(|(name, crc)| {
            let name = std::str::from_utf8(name).ok()?;
            (!name.is_empty() && !name.contains('/') && name != "." && name != "..")
                .then(|| (name.to_string(), crc))
        });
        let with_contents = |name: &str| {
            file.section_by_name(name)
                .is_some_and(|s| s.size() > 0 && s.kind() != SectionKind::UninitializedData)
        };
        let segments = file
            .segments()
            .filter_map(|s| {
                let (offset, size) = s.file_range();
                (size > 0).then_some(Segment {
                    offset,
                    size,
                    vaddr: s.address(),
                })
            })
            .collect();
        Some(ElfFacts {
            build_id,
            debuglink,
            has_symtab: with_contents(".symtab"),
            has_dwarf: with_contents(".debug_info"),
            segments,
        })
    }

    /// The facts of an open file (mapped, never read into memory).
    pub fn read(file: &File) -> Option<ElfFacts> {
        // SAFETY: a read-only private mapping; a file changed under it
        // gives wrong facts at worst (object checks every bound).
        let map = unsafe { memmap2::Mmap::map(file) }.ok()?;
        ElfFacts::parse(&map)
    }

    /// The address, as linked, of a file offset: where a separate debug
    /// file's symbols and DWARF name that code.
    pub fn vaddr_of(&self, file_offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| s.offset <= file_offset && file_offset - s.offset < s.size)
            .map(|s| s.vaddr + (file_offset - s.offset))
    }

    /// Stripped: no symbol table beyond the dynamic one, no DWARF.
    pub fn stripped(&self) -> bool {
        !self.has_symtab && !self.has_dwarf
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What makes a candidate the module's debug file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proof {
    BuildId(String),
    Crc(u32),
}

/// A place a debug file may be, in the target's root or the host's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub path: String,
    pub in_target: bool,
    pub proof: Proof,
}

/// Where to look for the debug file of `module` (its path as the target
/// sees it), in order. `host_too`: the target lives under another root than
/// heapbpf, whose own debug directories come second.
pub fn candidates(
    facts: &ElfFacts,
    module: &str,
    dirs: &[String],
    host_too: bool,
) -> Vec<Candidate> {
    let module = module.strip_suffix(" (deleted)").unwrap_or(module);
    let roots: &[bool] = if host_too { &[true, false] } else { &[true] };
    let mut out = Vec::new();
    if let Some(id) = facts.build_id.as_deref().filter(|id| id.len() > 2) {
        for &in_target in roots {
            for dir in dirs {
                out.push(Candidate {
                    path: format!("{dir}/.build-id/{}/{}.debug", &id[..2], &id[2..]),
                    in_target,
                    proof: Proof::BuildId(id.to_string()),
                });
            }
        }
    }
    if let Some((name, crc)) = &facts.debuglink {
        let dir = module.rsplit_once('/').map_or("", |(d, _)| d);
        for &in_target in roots {
            let mut paths = Vec::new();
            if in_target {
                paths.push(format!("{dir}/{name}"));
                paths.push(format!("{dir}/.debug/{name}"));
            }
            paths.extend(dirs.iter().map(|d| format!("{d}{dir}/{name}")));
            out.extend(
                paths
                    .into_iter()
                    .filter(|p| p != module)
                    .map(|path| Candidate {
                        path,
                        in_target,
                        proof: Proof::Crc(*crc),
                    }),
            );
        }
    }
    out
}

/// A debug file found for a module.
#[derive(Debug)]
pub struct Found {
    pub file: File,
    /// Where, for people: the path, and whose root it is in.
    pub shown: String,
}

/// The local debug file of a module of `pid`, if there is one (see the
/// module docs for where it is looked for).
pub fn find_local(pid: u32, facts: &ElfFacts, module: &str, dirs: &[String]) -> Option<Found> {
    let host_too = !same_root(pid);
    for c in candidates(facts, module, dirs, host_too) {
        let opener = if c.in_target { pid } else { std::process::id() };
        let file = match procfs::open_in_root(opener, &c.path) {
            Ok(f) => f,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::debug!(pid, path = %c.path, error = %e, "debug file candidate refused");
                }
                continue;
            }
        };
        match proves(&file, &c.proof) {
            Ok(()) => {
                let whose = match (c.in_target, host_too) {
                    (true, true) => " (in the target's root)",
                    (false, _) => " (on the host)",
                    (true, false) => "",
                };
                return Some(Found {
                    file,
                    shown: format!("{}{whose}", c.path),
                });
            }
            Err(why) => {
                tracing::debug!(pid, path = %c.path, why, "not the module's debug file")
            }
        }
    }
    None
}

/// Whether `file` is the debug file `proof` asks for.
pub fn proves(file: &File, proof: &Proof) -> std::result::Result<(), String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len == 0 || len > MAX_DEBUG_FILE_BYTES {
        return Err(format!("{len} bytes"));
    }
    let facts = ElfFacts::read(file).ok_or("not an ELF file")?;
    match proof {
        Proof::BuildId(id) => match facts.build_id {
            Some(b) if b == *id => Ok(()),
            b => Err(format!("build id {b:?}, not {id}")),
        },
        Proof::Crc(want) => {
            let mut f = file.try_clone().map_err(|e| e.to_string())?;
            use std::io::Seek;
            f.seek(io::SeekFrom::Start(0)).map_err(|e| e.to_string())?;
            let crc = crc32(f.take(MAX_DEBUG_FILE_BYTES)).map_err(|e| e.to_string())?;
            if crc == *want {
                Ok(())
            } else {
                Err(format!("CRC {crc:08x}, not {want:08x}"))
            }
        }
    }
}

/// The CRC32 of a debuglink (zlib's), read in 64 KiB chunks.
pub fn crc32(mut r: impl Read) -> io::Result<u32> {
    let mut crc = flate2::Crc::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(crc.sum()),
            Ok(n) => crc.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Whether `pid` sees the files heapbpf sees: the same root in the same
/// mount namespace (then the host's debug directories are the target's,
/// looked at once).
fn same_root(pid: u32) -> bool {
    let id = |p: &str| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let theirs = (
        id(&format!("/proc/{pid}/root")),
        id(&format!("/proc/{pid}/ns/mnt")),
    );
    theirs.0.is_some() && theirs == (id("/proc/self/root"), id("/proc/self/ns/mnt"))
}

/// The debug directories, as strings.
pub fn default_dirs() -> Vec<String> {
    DEBUG_DIRS.iter().map(|d| d.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(build_id: Option<&str>, link: Option<(&str, u32)>) -> ElfFacts {
        ElfFacts {
            build_id: build_id.map(str::to_string),
            debuglink: link.map(|(n, c)| (n.to_string(), c)),
            ..Default::default()
        }
    }

    #[test]
    fn candidates_go_by_build_id_then_debuglink_target_root_first() {
        let dirs = vec!["/usr/lib/debug".to_string()];
        let f = facts(Some("abcdef12"), Some(("app.debug", 7)));
        let got: Vec<(String, bool)> = candidates(&f, "/opt/app/bin/app (deleted)", &dirs, true)
            .into_iter()
            .map(|c| (c.path, c.in_target))
            .collect();
        let want = [
            ("/usr/lib/debug/.build-id/ab/cdef12.debug", true),
            ("/usr/lib/debug/.build-id/ab/cdef12.debug", false),
            ("/opt/app/bin/app.debug", true),
            ("/opt/app/bin/.debug/app.debug", true),
            ("/usr/lib/debug/opt/app/bin/app.debug", true),
            ("/usr/lib/debug/opt/app/bin/app.debug", false),
        ];
        assert_eq!(
            got,
            want.iter()
                .map(|(p, t)| (p.to_string(), *t))
                .collect::<Vec<_>>()
        );
        // Under heapbpf's own root: each place once.
        assert_eq!(candidates(&f, "/opt/app/bin/app", &dirs, false).len(), 4);
        // A debuglink naming the module itself is not a debug file.
        let own = facts(None, Some(("app", 7)));
        assert!(candidates(&own, "/bin/app", &[], false)
            .iter()
            .all(|c| c.path != "/bin/app"));
        assert!(candidates(&ElfFacts::default(), "/bin/app", &dirs, true).is_empty());
    }

    #[test]
    fn virtual_addresses_come_from_the_load_segments() {
        let f = ElfFacts {
            segments: vec![
                Segment {
                    offset: 0,
                    size: 0x500,
                    vaddr: 0,
                },
                Segment {
                    offset: 0x1000,
                    size: 0x200,
                    vaddr: 0x1000,
                },
                Segment {
                    offset: 0x2db0,
                    size: 0x260,
                    vaddr: 0x3db0,
                },
            ],
            ..Default::default()
        };
        assert_eq!(f.vaddr_of(0x1136), Some(0x1136));
        assert_eq!(f.vaddr_of(0x2dc0), Some(0x3dc0));
        assert_eq!(f.vaddr_of(0x1200), None, "past the segment's file bytes");
        assert_eq!(f.vaddr_of(0x800), None);
    }

    #[test]
    fn crc32_is_zlibs() {
        assert_eq!(crc32(&b"123456789"[..]).unwrap(), 0xcbf4_3926);
        assert_eq!(crc32(&b""[..]).unwrap(), 0);
        let big = vec![7u8; 200_000];
        let mut whole = flate2::Crc::new();
        whole.update(&big);
        assert_eq!(crc32(&big[..]).unwrap(), whole.sum());
    }

    /// This test process is the target; a small system program stands for
    /// a debug file (any ELF with a build id).
    #[test]
    fn a_debug_file_is_found_only_where_it_proves_to_be_the_modules() {
        let elf = ["/usr/bin/true", "/bin/true"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("a true(1) program");
        let bytes = std::fs::read(elf).unwrap();
        let real = ElfFacts::parse(&bytes).expect("an ELF file");
        let id = real.build_id.clone().expect("true(1) has a build id");
        assert!(ElfFacts::parse(b"\x7fELF not really").is_none());

        let me = std::process::id();
        let dir = std::env::temp_dir().join(format!("heapbpf-debugdirs-{me}"));
        let _ = std::fs::remove_dir_all(&dir);
        let debug = dir.join("debug");
        let bin = dir.join("bin");
        std::fs::create_dir_all(debug.join(".build-id").join(&id[..2])).unwrap();
        std::fs::create_dir_all(bin.join(".debug")).unwrap();
        let dirs = vec![debug.display().to_string()];
        let module = bin.join("app").display().to_string();

        // By build id: only a file with that build id.
        let by_id = debug
            .join(".build-id")
            .join(&id[..2])
            .join(format!("{}.debug", &id[2..]));
        std::fs::write(&by_id, b"not an ELF file").unwrap();
        let f = facts(Some(&id), None);
        assert!(find_local(me, &f, &module, &dirs).is_none());
        std::fs::write(&by_id, &bytes).unwrap();
        let found = find_local(me, &f, &module, &dirs).expect("found by build id");
        assert_eq!(found.shown, by_id.display().to_string());
        let other = facts(Some(&format!("{}00", &id[..id.len() - 2])), None);
        assert!(find_local(me, &other, &module, &dirs).is_none());
        std::fs::remove_file(&by_id).unwrap();

        // By debuglink: only with the right CRC; beside the module first.
        let crc = crc32(&bytes[..]).unwrap();
        let linked = facts(None, Some(("app.debug", crc)));
        std::fs::write(bin.join(".debug/app.debug"), &bytes).unwrap();
        let found = find_local(me, &linked, &module, &dirs).expect("found in .debug/");
        assert_eq!(
            found.shown,
            bin.join(".debug/app.debug").display().to_string()
        );
        let wrong = facts(None, Some(("app.debug", crc ^ 1)));
        assert!(find_local(me, &wrong, &module, &dirs).is_none());
        // A directory of that name beside the module is no debug file.
        std::fs::create_dir(bin.join("app.debug")).unwrap();
        let found = find_local(me, &linked, &module, &dirs).expect("still .debug/");
        assert!(found.shown.ends_with(".debug/app.debug"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
