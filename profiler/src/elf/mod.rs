//! Small facts read from ELF files (build ids), with the `object` crate.
pub mod placement;

use std::path::Path;

/// The GNU build id of an ELF file, as lowercase hex.
pub fn build_id(path: &Path) -> Option<String> {
    // Mapped, not read: a module can be gigabytes.
    crate::debuginfo::ElfFacts::read(&std::fs::File::open(path).ok()?)?.build_id
}

/// The defined symbols of an ELF file that `keep` accepts (by name, and
/// whether the symbol is global), with their addresses: its dynamic
/// symbols and, with `all`, its static symbol table too (an executable's
/// own functions are only there). An unreadable or non-ELF file has none.
/// The file may be a target's: `object` reads it within its bounds, and
/// only what `keep` accepts is copied out, at most `limit` symbols.
pub fn defined_symbols(
    path: &Path,
    all: bool,
    limit: usize,
    keep: impl Fn(&str, bool) -> bool,
) -> Vec<(String, u64)> {
    use object::{Object, ObjectSymbol};
    let Ok(file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    // SAFETY: a read-only private mapping of a file the target executes.
    let Ok(data) = (unsafe { memmap2::Mmap::map(&file) }) else {
        return Vec::new();
    };
    let Ok(elf) = object::File::parse(&*data) else {
        return Vec::new();
    };
    let statics = all.then(|| elf.symbols()).into_iter().flatten();
    elf.dynamic_symbols()
        .chain(statics)
        .filter(|s| s.is_definition() && s.address() != 0)
        .filter_map(|s| {
            let name = s.name().ok()?;
            keep(name, s.is_global()).then(|| (name.to_string(), s.address()))
        })
        .take(limit)
        .collect()
}

/// What an executable is, for finding its allocator when no allocator
/// library is mapped, and for saying why there is none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramFacts {
    /// An ELF file at all (not a script).
    pub elf: bool,
    /// No program interpreter (`PT_INTERP`): no library is mapped to run it.
    pub is_static: bool,
    /// It has symbols (`.symtab` or dynamic ones): not stripped.
    pub has_symbols: bool,
    /// A Go program: its `.go.buildinfo` section (kept by `-ldflags=-s -w`)
    /// or the Go runtime's symbols.
    pub go: bool,
}

pub fn program_facts(path: &Path) -> ProgramFacts {
    use object::{
        read::elf::{ElfFile64, FileHeader, ProgramHeader},
        Object, ObjectSymbol,
    };
    let Ok(file) = std::fs::File::open(path) else {
        return ProgramFacts::default();
    };
    // SAFETY: a read-only private mapping of a program file.
    let Ok(data) = (unsafe { memmap2::Mmap::map(&file) }) else {
        return ProgramFacts::default();
    };
    let Ok(elf) = ElfFile64::<object::Endianness>::parse(&*data) else {
        return ProgramFacts::default();
    };
    let endian = elf.endian();
    let interp = elf
        .elf_header()
        .program_headers(endian, &*data)
        .map(|phs| {
            phs.iter()
                .any(|ph| ph.p_type(endian) == object::elf::PT_INTERP)
        })
        .unwrap_or(false);
    let mut symbols = elf.symbols().chain(elf.dynamic_symbols()).peekable();
    let has_symbols = symbols.peek().is_some();
    let go_runtime = symbols.any(|s| s.name() == Ok("runtime.mallocgc"));
    ProgramFacts {
        elf: true,
        is_static: !interp,
        has_symbols,
        go: elf.section_by_name(".go.buildinfo").is_some() || go_runtime,
    }
}

/// The `DT_NEEDED` libraries of an ELF file, and the directories the
/// dynamic linker searches for them before the system ones, in its order:
/// `DT_RPATH` (only without `DT_RUNPATH`), `LD_LIBRARY_PATH`, `DT_RUNPATH`
/// (`$ORIGIN` resolved).
pub fn needed_libraries(path: &Path) -> (Vec<String>, Vec<String>) {
    use object::read::elf::{Dyn, ElfFile64, FileHeader};
    let Ok(data) = std::fs::read(path) else {
        return Default::default();
    };
    let Ok(elf) = ElfFile64::<object::Endianness>::parse(&*data) else {
        return Default::default();
    };
    let endian = elf.endian();
    let sections = match elf.elf_header().sections(endian, &*data) {
        Ok(s) => s,
        Err(_) => return Default::default(),
    };
    let Ok(Some((dyns, link))) = sections.dynamic(endian, &*data) else {
        return Default::default();
    };
    let Ok(strings) = sections.strings(endian, &*data, link) else {
        return Default::default();
    };
    let origin = path
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let (mut needed, mut rpath, mut runpath) = (Vec::new(), Vec::new(), Vec::new());
    for d in dyns {
        let tag = d.tag32(endian).map(i64::from);
        let Ok(value) = d.string(endian, strings) else {
            continue;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        let dirs = || -> Vec<String> {
            value
                .split(':')
                .map(|dir| {
                    dir.replace("$ORIGIN", &origin)
                        .replace("${ORIGIN}", &origin)
                })
                .collect()
        };
        match tag {
            Some(object::elf::DT_NEEDED) => needed.push(value.clone()),
            Some(object::elf::DT_RUNPATH) => runpath.extend(dirs()),
            Some(object::elf::DT_RPATH) => rpath.extend(dirs()),
            _ => {}
        }
    }
    let env: Vec<String> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect();
    let search = if runpath.is_empty() {
        rpath.into_iter().chain(env).collect()
    } else {
        env.into_iter().chain(runpath).collect()
    };
    (needed, search)
}

/// Where the dynamic linker would find `name`: in `search` (from
/// [`needed_libraries`]), then the system directories (the `ld.so.cache` of
/// a Debian-like system lists these).
pub fn resolve_library(name: &str, search: &[String]) -> Option<std::path::PathBuf> {
    if name.contains('/') {
        return Some(std::path::PathBuf::from(name));
    }
    const SYSTEM: &[&str] = &[
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/local/lib",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
    ];
    search
        .iter()
        .map(String::as_str)
        .chain(SYSTEM.iter().copied())
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}
