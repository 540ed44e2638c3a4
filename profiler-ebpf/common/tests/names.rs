//! `heapbpf_common::names` against the eBPF object the last build of
//! `heapbpf` made (its build script compiles `profiler-ebpf` with
//! aya-build): every map and every program of the object has its constant,
//! and every constant names one.
//!
//! The object is `$HEAPBPF_EBPF_OBJECT` when set, else the newest
//! `target/*/build/heapbpf-*/out/heapbpf`; build `heapbpf` first
//! (`cargo test` of the workspace or `cargo xtask test` does).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::SystemTime,
};

use heapbpf_common::names;

const EM_BPF: u16 = 247;
const SHF_EXECINSTR: u64 = 0x4;
const STT_OBJECT: u8 = 1;
const STT_FUNC: u8 = 2;
const STB_GLOBAL: u8 = 1;

fn find_object() -> PathBuf {
    if let Some(path) = std::env::var_os("HEAPBPF_EBPF_OBJECT") {
        return PathBuf::from(path);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for profile in std::fs::read_dir(&target).into_iter().flatten().flatten() {
        let build = profile.path().join("build");
        for dir in std::fs::read_dir(&build).into_iter().flatten().flatten() {
            if !dir.file_name().to_string_lossy().starts_with("heapbpf-") {
                continue;
            }
            let object = dir.path().join("out/heapbpf");
            let Ok(modified) = object.metadata().and_then(|m| m.modified()) else {
                continue;
            };
            if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                newest = Some((modified, object));
            }
        }
    }
    newest.map(|(_, path)| path).unwrap_or_else(|| {
        panic!(
            "no eBPF object under {}/*/build/heapbpf-*/out/: build heapbpf first \
                 (cargo build -p heapbpf) or set HEAPBPF_EBPF_OBJECT",
            target.display()
        )
    })
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn c_str(b: &[u8], at: usize) -> String {
    let end = b[at..].iter().position(|&c| c == 0).unwrap();
    String::from_utf8(b[at..at + end].to_vec()).unwrap()
}

struct Section {
    name: String,
    kind: u32,
    flags: u64,
    offset: usize,
    size: usize,
    link: usize,
}

/// The programs and maps of a little-endian ELF64 BPF object, as aya finds
/// them: global functions in executable sections other than `.text`, and
/// the symbols of the `maps` section.
fn programs_and_maps(elf: &[u8]) -> (BTreeSet<String>, BTreeSet<String>) {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not ELF64");
    assert_eq!(elf[5], 1, "not little-endian");
    assert_eq!(u16_at(elf, 0x12), EM_BPF, "not a BPF object");
    let shoff = u64_at(elf, 0x28) as usize;
    let shentsize = u16_at(elf, 0x3a) as usize;
    let shnum = u16_at(elf, 0x3c) as usize;
    let shstrndx = u16_at(elf, 0x3e) as usize;
    let header = |i: usize| &elf[shoff + i * shentsize..][..shentsize];
    let names_at = u64_at(header(shstrndx), 0x18) as usize;
    let sections: Vec<Section> = (0..shnum)
        .map(|i| {
            let h = header(i);
            Section {
                name: c_str(elf, names_at + u32_at(h, 0) as usize),
                kind: u32_at(h, 4),
                flags: u64_at(h, 8),
                offset: u64_at(h, 0x18) as usize,
                size: u64_at(h, 0x20) as usize,
                link: u32_at(h, 0x28) as usize,
            }
        })
        .collect();
    const SHT_SYMTAB: u32 = 2;
    let symtab = sections
        .iter()
        .find(|s| s.kind == SHT_SYMTAB)
        .expect("no symbol table");
    let strings = sections[symtab.link].offset;
    let (mut programs, mut maps) = (BTreeSet::new(), BTreeSet::new());
    for sym in elf[symtab.offset..symtab.offset + symtab.size].chunks_exact(24) {
        let (info, shndx) = (sym[4], u16_at(sym, 6) as usize);
        let Some(section) = sections.get(shndx).filter(|_| shndx != 0) else {
            continue;
        };
        let name = c_str(elf, strings + u32_at(sym, 0) as usize);
        let (kind, binding) = (info & 0xf, info >> 4);
        if kind == STT_FUNC
            && binding == STB_GLOBAL
            && section.flags & SHF_EXECINSTR != 0
            && section.name != ".text"
        {
            programs.insert(name);
        } else if kind == STT_OBJECT && (section.name == "maps" || section.name == ".maps") {
            maps.insert(name);
        }
    }
    (programs, maps)
}

/// Fails with what the object has that `names` lacks, and the reverse.
fn check(what: &str, names: &[&str], object: &BTreeSet<String>, path: &Path) {
    let listed: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
    assert_eq!(
        listed.len(),
        names.len(),
        "names::{what}: a name is listed twice"
    );
    let unnamed: Vec<_> = object.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(object).collect();
    assert!(
        unnamed.is_empty() && stale.is_empty(),
        "names::{what} against {}: no constant for {unnamed:?}; not in the object: {stale:?}",
        path.display()
    );
}

#[test]
fn names_match_the_object() {
    let path = find_object();
    let elf = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (programs, maps) = programs_and_maps(&elf);
    check("programs", names::programs::ALL, &programs, &path);
    check("maps", names::maps::ALL, &maps, &path);
}
