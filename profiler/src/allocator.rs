//! Every allocator fact and decision, in one place: which allocators heapbpf
//! knows, how a target's allocator is found from its memory map (or, for
//! `heapbpf run`, from the command's ELF before it runs), which entry points
//! are hooked and what shape of call each is, and which calls are leaves.
//!
//! Discovery ends in an [`AttachPlan`]: plain data that [`crate::ebpf`]
//! applies. Nothing here names aya or the kernel; symbol tables are read
//! through [`crate::elf`].
//!
//! Besides the allocator serving `malloc`, a target may carry allocator
//! families under a prefix (found by their shape: [`families`]) and, in a
//! Rust program, Rust's allocator shims ([`rust_shims`]); all are hooked,
//! and a call nested in another hooked call counts once, at the outermost.
//!
//! Adding an allocator: a [`Choice`] (with its file-name test), its entry
//! points in [`ENTRY_POINTS`], and whether its `malloc`/`calloc` are leaves
//! ([`probe_cookie`]).
use std::path::{Path, PathBuf};

use crate::{
    elf::{self, placement::Image},
    error::{Error, Result},
    lines::escape,
    procfs::{self, Mapping, ProcessInfo},
};

/// The shape of an allocator call: where its arguments are and what its
/// result means. The kernel side has one entry program per shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    /// `malloc(size)`: the size in the first argument.
    Malloc,
    /// `calloc(n, size)`.
    Calloc,
    /// `realloc(ptr, size)`.
    Realloc,
    /// `reallocarray(ptr, n, size)`.
    ReallocArray,
    /// Rust's `__rust_realloc(ptr, old_size, align, new_size)`: the new
    /// size in the fourth argument.
    RustRealloc,
    /// `posix_memalign(&out, align, size)`: the block is stored at `out`.
    PosixMemalign,
    /// Any other allocation with its size in the first argument (`valloc`,
    /// `operator new`).
    Size0,
    /// An allocation with its size in the second argument (`memalign`,
    /// `aligned_alloc`).
    Size1,
    /// A free of the pointer in the first argument.
    Free,
}

impl Call {
    /// Whether the call makes a block (and so needs its return seen).
    pub fn allocates(self) -> bool {
        self != Call::Free
    }

    /// The arguments (bit i: argument i) its entry program reads: a probe
    /// may only move past instructions that leave them alone.
    pub fn arguments_read(self) -> u8 {
        match self {
            Call::Malloc | Call::Size0 | Call::Free => 0b001,
            Call::Size1 => 0b010,
            Call::Calloc | Call::Realloc => 0b011,
            Call::PosixMemalign => 0b101,
            Call::ReallocArray => 0b111,
            Call::RustRealloc => 0b1001,
        }
    }

    /// Whether, in an allocator that does not build one public function on
    /// another, this call reaches no other hooked function (see
    /// [`probe_cookie`]).
    fn may_be_leaf(self) -> bool {
        matches!(self, Call::Malloc | Call::Calloc)
    }
}

/// One allocator entry point: a symbol and the shape of its calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    pub symbol: &'static str,
    pub call: Call,
}

const fn entry(symbol: &'static str, call: Call) -> EntryPoint {
    EntryPoint { symbol, call }
}

/// Every entry point heapbpf hooks where the allocator defines it: the C /
/// POSIX surface, jemalloc's own API (redis uses it), C++ operator new /
/// delete (jemalloc, tcmalloc and mimalloc define their own, which do not
/// go through their malloc; libstdc++'s call malloc and free), gperftools'
/// `tc_*` and mimalloc's `mi_*` names (mostly aliases: one probe per
/// function, see [`crate::ebpf`]). Only `malloc` and `free` are required.
pub const ENTRY_POINTS: &[EntryPoint] = &[
    entry("malloc", Call::Malloc),
    entry("calloc", Call::Calloc),
    entry("realloc", Call::Realloc),
    entry("reallocarray", Call::ReallocArray),
    entry("posix_memalign", Call::PosixMemalign),
    entry("aligned_alloc", Call::Size1),
    entry("memalign", Call::Size1),
    entry("valloc", Call::Size0),
    entry("pvalloc", Call::Size0),
    entry("free", Call::Free),
    entry("mallocx", Call::Malloc),
    entry("rallocx", Call::Realloc),
    entry("dallocx", Call::Free),
    entry("sdallocx", Call::Free),
    entry("_Znwm", Call::Size0),
    entry("_Znam", Call::Size0),
    entry("_ZnwmRKSt9nothrow_t", Call::Size0),
    entry("_ZnamRKSt9nothrow_t", Call::Size0),
    entry("_ZnwmSt11align_val_t", Call::Size0),
    entry("_ZnamSt11align_val_t", Call::Size0),
    entry("_ZnwmSt11align_val_tRKSt9nothrow_t", Call::Size0),
    entry("_ZnamSt11align_val_tRKSt9nothrow_t", Call::Size0),
    entry("_ZdlPv", Call::Free),
    entry("_ZdaPv", Call::Free),
    entry("_ZdlPvm", Call::Free),
    entry("_ZdaPvm", Call::Free),
    entry("_ZdlPvRKSt9nothrow_t", Call::Free),
    entry("_ZdaPvRKSt9nothrow_t", Call::Free),
    entry("_ZdlPvSt11align_val_t", Call::Free),
    entry("_ZdaPvSt11align_val_t", Call::Free),
    entry("_ZdlPvmSt11align_val_t", Call::Free),
    entry("_ZdaPvmSt11align_val_t", Call::Free),
    entry("_ZdlPvSt11align_val_tRKSt9nothrow_t", Call::Free),
    entry("_ZdaPvSt11align_val_tRKSt9nothrow_t", Call::Free),
    entry("tc_malloc", Call::Malloc),
    entry("tc_malloc_skip_new_handler", Call::Size0),
    entry("tc_calloc", Call::Calloc),
    entry("tc_realloc", Call::Realloc),
    entry("tc_memalign", Call::Size1),
    entry("tc_posix_memalign", Call::PosixMemalign),
    entry("tc_valloc", Call::Size0),
    entry("tc_pvalloc", Call::Size0),
    entry("tc_new", Call::Size0),
    entry("tc_newarray", Call::Size0),
    entry("tc_new_nothrow", Call::Size0),
    entry("tc_newarray_nothrow", Call::Size0),
    entry("tc_free", Call::Free),
    entry("tc_cfree", Call::Free),
    entry("tc_free_sized", Call::Free),
    entry("tc_delete", Call::Free),
    entry("tc_deletearray", Call::Free),
    entry("tc_delete_sized", Call::Free),
    entry("tc_deletearray_sized", Call::Free),
    entry("tc_delete_nothrow", Call::Free),
    entry("tc_deletearray_nothrow", Call::Free),
    entry("mi_malloc", Call::Malloc),
    entry("mi_zalloc", Call::Size0),
    entry("mi_calloc", Call::Calloc),
    entry("mi_mallocn", Call::Calloc),
    entry("mi_realloc", Call::Realloc),
    entry("mi_reallocn", Call::ReallocArray),
    entry("mi_malloc_aligned", Call::Size0),
    entry("mi_zalloc_aligned", Call::Size0),
    entry("mi_realloc_aligned", Call::Realloc),
    entry("mi_new", Call::Size0),
    entry("mi_new_nothrow", Call::Size0),
    entry("mi_new_aligned", Call::Size0),
    entry("mi_free", Call::Free),
    entry("mi_free_size", Call::Free),
    entry("mi_free_aligned", Call::Free),
    entry("mi_free_size_aligned", Call::Free),
];

/// What to hook in one target: the allocator serving `malloc`, the library
/// that serves the entry points it lacks (the C library: jemalloc and
/// tcmalloc have no `reallocarray`, ...), and allocators the program carries
/// beside it (a `je_`-prefixed jemalloc).
#[derive(Clone, Debug)]
pub struct AttachPlan {
    pub main: Library,
    pub fallback: Option<Library>,
    pub extra: Vec<Library>,
}

impl AttachPlan {
    /// Every library of the plan, main first.
    pub fn libraries(&self) -> impl Iterator<Item = &Library> {
        std::iter::once(&self.main)
            .chain(&self.fallback)
            .chain(&self.extra)
    }
}

/// The plan for a running process, from its memory map and `--allocator`.
pub fn plan(info: &ProcessInfo, maps: &[Mapping], choice: &Choice) -> Result<AttachPlan> {
    let pid = info.pid;
    let chosen = find(pid, maps, choice).ok_or_else(|| Error::NotTraceable {
        pid,
        why: match choice {
            Choice::Custom { path, .. } => format!(
                "{path} is not mapped into {} (--allocator names a file the process has mapped: its path as in /proc/{pid}/maps, or its file name)",
                escape(&info.comm)
            ),
            _ => {
                let facts = maps
                    .iter()
                    .find(|m| m.is_file() && m.is_exec())
                    .map(|m| elf::program_facts(&m.map_file(pid)))
                    .unwrap_or_default();
                no_allocator(&escape(&info.comm), choice, facts)
            }
        },
    })?;
    let libc = find(pid, maps, &Choice::Libc).filter(|l| l.path != chosen.path);
    if !chosen.prefix.is_empty() {
        // A prefixed allocator lives beside the program's malloc (glibc's,
        // or one that interposes it), which the rest of the program keeps
        // using: hook both.
        return Ok(match find(pid, maps, &Choice::Auto) {
            Some(main) => AttachPlan {
                fallback: libc.filter(|l| l.path != main.path),
                main,
                extra: vec![chosen],
            },
            None => AttachPlan {
                main: chosen,
                fallback: None,
                extra: Vec::new(),
            },
        });
    }
    let extra = if *choice == Choice::Auto {
        let hooked: Vec<&str> = std::iter::once(chosen.path.as_str())
            .chain(libc.as_ref().map(|l| l.path.as_str()))
            .collect();
        prefixed(pid, maps, &hooked)
    } else {
        Vec::new()
    };
    Ok(AttachPlan {
        main: chosen,
        fallback: if *choice == Choice::Libc { None } else { libc },
        extra,
    })
}

/// Why nothing serves `malloc` in `comm`, from the facts of its executable:
/// a Go program (its heap is the Go runtime's, not a C allocator's), a
/// stripped static program, or one whose executable defines no `malloc`.
pub fn no_allocator(comm: &str, choice: &Choice, exe: elf::ProgramFacts) -> String {
    if exe.go && matches!(choice, Choice::Auto | Choice::Libc) {
        return format!(
            "{comm} is a Go program without a C allocator: its heap is managed by the Go runtime, \
             which heapbpf does not hook; use Go's own heap profile (runtime/pprof's \
             WriteHeapProfile, or net/http/pprof: go tool pprof http://HOST/debug/pprof/heap)"
        );
    }
    if *choice != Choice::Auto {
        return format!("no {} library is mapped into {comm}", choice.as_str());
    }
    let why = if !exe.elf {
        "its executable cannot be read"
    } else if !exe.has_symbols {
        "its executable has no symbol table (a stripped static program)"
    } else {
        "its executable defines no malloc"
    };
    format!(
        "nothing in {comm} serves malloc: no allocator library is mapped and {why}; \
         heapbpf hooks the allocator of a shared library or of an executable with a symbol table"
    )
}

/// The plan for `heapbpf run`, before the command runs `exec`: the C library
/// heapbpf itself maps (same root), served by the dedicated allocator the
/// command preloads (`LD_PRELOAD`) or links (`DT_NEEDED`, found where its
/// dynamic linker will find it) when there is one. A static program maps
/// no library: its own `malloc`, or an error saying why there is none.
pub fn plan_for_command(exe: &Path, ld_preload: Option<&str>) -> Result<AttachPlan> {
    let facts = elf::program_facts(exe);
    if facts.elf && facts.is_static {
        let image = Image::open(exe);
        if !image.defines("malloc") {
            let name = exe.display().to_string();
            let comm = escape(crate::model::basename(&name));
            return Err(Error::BadInput(format!(
                "cannot profile {}: {}",
                escape(&name),
                no_allocator(&comm, &Choice::Auto, facts)
            )));
        }
        let main = Library {
            never_frees: !image.defines("free"),
            ..Library::new(exe.display().to_string(), exe.to_path_buf())
        };
        return Ok(AttachPlan {
            main,
            fallback: None,
            extra: carried(exe),
        });
    }
    let own_pid = std::process::id();
    let own = procfs::read_maps(own_pid)?;
    let libc = find(own_pid, &own, &Choice::Libc)
        .ok_or_else(|| Error::Runtime("heapbpf cannot find its own C library".into()))?;
    let preloaded = ld_preload
        .unwrap_or_default()
        .split([' ', ':'])
        .find_map(|lib| {
            is_dedicated(crate::model::basename(lib))
                .then(|| Library::new(lib.to_string(), lib.into()))
        });
    let linked = || {
        let (needed, search) = elf::needed_libraries(exe);
        needed
            .iter()
            .filter(|n| is_dedicated(n))
            .find_map(|n| elf::resolve_library(n, &search))
            .map(|p| Library::new(p.display().to_string(), p))
    };
    Ok(match preloaded.or_else(linked) {
        Some(main) => AttachPlan {
            main,
            fallback: Some(libc),
            extra: carried(exe),
        },
        None => AttachPlan {
            main: libc,
            fallback: None,
            extra: carried(exe),
        },
    })
}

/// What [`prefixed`] finds in a command's executable before it runs: its
/// allocator families and Rust's allocator shims.
fn carried(exe: &Path) -> Vec<Library> {
    let symbols = elf::defined_symbols(exe, true, MAX_MEMBERS, |n, global| {
        (global && is_family_member(n)) || is_rust_shim_symbol(n)
    });
    carried_in(&exe.display().to_string(), exe, &symbols)
}

/// The allocator families and Rust's allocator shims among the symbols of
/// the file at `path` (opened at `open_path`).
fn carried_in(path: &str, open_path: &Path, symbols: &[(String, u64)]) -> Vec<Library> {
    let lib = || Library::new(path.to_string(), open_path.to_path_buf());
    let mut found: Vec<Library> = families(symbols)
        .into_iter()
        .map(|prefix| Library { prefix, ..lib() })
        .collect();
    let rust_shims = rust_shims(symbols);
    if !rust_shims.is_empty() {
        found.push(Library {
            rust_shims,
            ..lib()
        });
    }
    found
}

/// The allocator library of a target, found through its memory map.
#[derive(Clone, Debug)]
pub struct Library {
    /// The path as the target sees it.
    pub path: String,
    /// `/proc/PID/map_files/...`: the very file the target mapped.
    pub open_path: PathBuf,
    /// Prefix of the allocator's function names (`je_` for a jemalloc
    /// built with `--with-jemalloc-prefix=je_`); empty for the standard names.
    pub prefix: String,
    /// It has `malloc` and no `free` (see [`own_never_freeing`]): its
    /// blocks live until the process exits.
    pub never_frees: bool,
    /// Rust's allocator shims of this executable (see [`rust_shims`]), by
    /// their symbol names: hooked instead of [`ENTRY_POINTS`].
    pub rust_shims: Vec<(String, Call)>,
}

impl Library {
    pub fn new(path: String, open_path: PathBuf) -> Self {
        Library {
            path,
            open_path,
            prefix: String::new(),
            never_frees: false,
            rust_shims: Vec::new(),
        }
    }

    /// Whether this stands for Rust's allocator shims of an executable
    /// (hooked by their own names), not an allocator's entry points.
    pub fn is_rust_shims(&self) -> bool {
        !self.rust_shims.is_empty()
    }

    /// The name of `symbol` in this library.
    pub fn name(&self, symbol: &str) -> String {
        format!("{}{symbol}", self.prefix)
    }

    /// The file name, as in the target's map.
    pub fn file_name(&self) -> &str {
        crate::model::basename(&self.path)
    }

    /// An allocator whose public functions are known not to call each other
    /// (`malloc` and `calloc` are leaves): jemalloc, tcmalloc, mimalloc and
    /// glibc — not any C library (musl's `calloc` calls its `malloc`).
    fn is_known_allocator(&self) -> bool {
        let name = self.file_name();
        let glibc =
            name.starts_with("libc.so.6") || (name.starts_with("libc-2.") && name.ends_with(".so"));
        glibc || is_dedicated(name)
    }

    /// What tells libraries apart: the real path of the file
    /// (`/proc/PID/map_files/` links and preloaded names resolve to it) and
    /// the prefix.
    pub fn identity(&self) -> String {
        let path = std::fs::canonicalize(&self.open_path)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| self.path.clone());
        let shims = if self.is_rust_shims() {
            ":__rust_alloc"
        } else {
            ""
        };
        format!("{path}:{}{shims}", self.prefix)
    }

    /// How the `attached` line names it.
    pub fn label(&self) -> String {
        if self.is_rust_shims() {
            format!("{} (__rust_alloc & co)", self.path)
        } else if self.prefix.is_empty() {
            self.path.clone()
        } else {
            format!("{} ({}*)", self.path, self.prefix)
        }
    }
}

/// Which allocator to hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The first of jemalloc, tcmalloc, mimalloc mapped into the target, else
    /// the executable when it defines malloc and free, else libc.
    Auto,
    Libc,
    Jemalloc,
    Tcmalloc,
    Mimalloc,
    /// `--allocator PATH[:PREFIX]`: the mapped file at PATH (as the target
    /// sees it, or just its file name), with function names prefixed.
    Custom {
        path: String,
        prefix: String,
    },
}

impl Choice {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "auto" => Choice::Auto,
            "libc" => Choice::Libc,
            "jemalloc" => Choice::Jemalloc,
            "tcmalloc" => Choice::Tcmalloc,
            "mimalloc" => Choice::Mimalloc,
            custom if custom.contains('/') || custom.contains(':') || custom.contains(".so") => {
                let (path, prefix) = custom.split_once(':').unwrap_or((custom, ""));
                if path.is_empty()
                    || !prefix
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    return None;
                }
                Choice::Custom {
                    path: path.to_string(),
                    prefix: prefix.to_string(),
                }
            }
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &str {
        match self {
            Choice::Custom { path, .. } => path,
            Choice::Auto => "allocator",
            Choice::Libc => "libc",
            Choice::Jemalloc => "jemalloc",
            Choice::Tcmalloc => "tcmalloc",
            Choice::Mimalloc => "mimalloc",
        }
    }

    fn matches(&self, file_name: &str) -> bool {
        let lib = |prefix: &str| file_name.starts_with(prefix) && file_name.contains(".so");
        match self {
            Choice::Auto | Choice::Custom { .. } => false,
            Choice::Libc => {
                file_name.starts_with("libc.so")
                    || (file_name.starts_with("libc-") && file_name.ends_with(".so"))
            }
            Choice::Jemalloc => lib("libjemalloc"),
            // gperftools: libtcmalloc.so, libtcmalloc_minimal.so, ...
            Choice::Tcmalloc => lib("libtcmalloc"),
            Choice::Mimalloc => lib("libmimalloc"),
        }
    }
}

/// The dedicated allocator libraries (jemalloc, tcmalloc, mimalloc) mapped
/// into a target, each once.
pub fn dedicated(pid: u32, maps: &[Mapping]) -> Vec<Library> {
    let mut found: Vec<Library> = Vec::new();
    for m in maps.iter().filter(|m| m.is_file()) {
        if is_dedicated(m.file_name()) && !found.iter().any(|l| l.path == m.path) {
            found.push(Library::new(m.path.clone(), m.map_file(pid)));
        }
    }
    found
}

/// The allocators that interpose malloc for the whole process, in the order
/// `--allocator auto` prefers them.
const DEDICATED: [Choice; 3] = [Choice::Jemalloc, Choice::Tcmalloc, Choice::Mimalloc];

/// Whether a library file name is a dedicated allocator's.
pub fn is_dedicated(file_name: &str) -> bool {
    DEDICATED.iter().any(|c| c.matches(file_name))
}

/// Finds the allocator library in a target's memory map: a dedicated
/// allocator library when one is mapped (it interposes libc's malloc for the
/// whole process), else the executable when it defines `malloc` and `free`
/// itself (a static program, or one that carries its own allocator), else
/// the C library.
pub fn find(pid: u32, maps: &[Mapping], choice: &Choice) -> Option<Library> {
    let files = || maps.iter().filter(|m| m.is_file());
    if let Choice::Custom { path, prefix } = choice {
        let host = std::fs::canonicalize(path).ok();
        let m = files().find(|m| {
            m.path == *path
                || (!path.contains('/') && m.file_name() == path)
                || (host.is_some() && std::fs::canonicalize(m.map_file(pid)).ok() == host)
        })?;
        return Some(Library {
            prefix: prefix.clone(),
            ..Library::new(m.path.clone(), m.map_file(pid))
        });
    }
    let mapped = |c: &Choice| {
        files()
            .find(|m| c.matches(m.file_name()))
            .map(|m| Library::new(m.path.clone(), m.map_file(pid)))
    };
    if *choice != Choice::Auto {
        return mapped(choice);
    }
    DEDICATED
        .iter()
        .find_map(mapped)
        .or_else(|| own(pid, maps, ""))
        .or_else(|| mapped(&Choice::Libc))
        .or_else(|| own_never_freeing(pid, maps))
}

/// The executable, when its symbol table defines `PREFIXmalloc` and
/// `PREFIXfree`.
fn own(pid: u32, maps: &[Mapping], prefix: &str) -> Option<Library> {
    let exe = maps.iter().find(|m| m.is_file() && m.is_exec())?;
    let lib = Library {
        prefix: prefix.to_string(),
        ..Library::new(exe.path.clone(), exe.map_file(pid))
    };
    let image = Image::open(&lib.open_path);
    (image.defines(&lib.name("malloc")) && image.defines(&lib.name("free"))).then_some(lib)
}

/// A program with no C library mapped (a static one) whose `malloc` has no
/// `free`: musl links its bump allocator (`__simple_malloc`, which never
/// gives memory back) into a static program that never calls `free`. Every
/// block it hands out lives until exit, so `malloc` alone accounts for them.
fn own_never_freeing(pid: u32, maps: &[Mapping]) -> Option<Library> {
    let exe = maps.iter().find(|m| m.is_file() && m.is_exec())?;
    let lib = Library {
        never_frees: true,
        ..Library::new(exe.path.clone(), exe.map_file(pid))
    };
    let image = Image::open(&lib.open_path);
    (image.defines("malloc") && !image.defines("free")).then_some(lib)
}

/// Allocators a program carries besides the one that serves `malloc`
/// (found by their shape, see [`families`]: a jemalloc vendored with its
/// `je_` prefix, tikv-jemallocator's `_rjem_*`, mimalloc's `mi_*`, a
/// project's own prefix), in its executable or in a library `plan` does
/// not hook already (`hooked`: paths), then Rust's allocator shims of the
/// executable ([`rust_shims`]). Nested hooked calls count once, at the
/// outermost: a Rust allocation at its shim, not again in the
/// `_rjem_mallocx` or `malloc` the shim calls; the family is hooked all
/// the same, for its callers the shims do not see (shims inlined by LTO,
/// C code).
pub fn prefixed(pid: u32, maps: &[Mapping], hooked: &[&str]) -> Vec<Library> {
    let mut found = Vec::new();
    let exe = maps.iter().find(|m| m.is_file() && m.is_exec());
    let mut seen: Vec<&str> = Vec::new();
    for m in maps.iter().filter(|m| m.is_file() && m.is_exec()) {
        let is_exe = exe.is_some_and(|e| e.path == m.path);
        if seen.contains(&m.path.as_str()) || (!is_exe && hooked.contains(&m.path.as_str())) {
            continue;
        }
        seen.push(&m.path);
        let open_path = m.map_file(pid);
        // A library's families are in its dynamic symbols; the executable's
        // may be in its static table only. Families are global functions
        // (static glibc's local `_int_malloc(arena, size)` is not one); the
        // shims are local once LTO has inlined them.
        let symbols = elf::defined_symbols(&open_path, is_exe, MAX_MEMBERS, |n, global| {
            (global && is_family_member(n)) || (is_exe && is_rust_shim_symbol(n))
        });
        found.extend(carried_in(&m.path, &open_path, &symbols));
    }
    found
}

/// At most this many candidate names are read from one file: a target's
/// file is not trusted to be small (a large C program has thousands of
/// `*_free`s).
const MAX_MEMBERS: usize = 1 << 16;

/// The members of an allocator family, each `PREFIX` + one of these.
const MEMBERS: [&str; 11] = [
    "malloc",
    "free",
    "sdallocx",
    "dallocx",
    "calloc",
    "realloc",
    "mallocx",
    "rallocx",
    "posix_memalign",
    "memalign",
    "aligned_alloc",
];

/// How a family frees: `free`, or jemalloc's `sdallocx`/`dallocx` (a Rust
/// program links only what its global allocator calls: tikv-jemallocator
/// frees with `_rjem_sdallocx`, and has no `_rjem_free`).
const FREES: [&str; 3] = ["free", "sdallocx", "dallocx"];

/// Members only an allocator has, not a wrapper around one (redis's
/// `zmalloc`, `zcalloc(size)`, `zfree`; glib's `g_malloc`): a family under a
/// prefix heapbpf does not know needs one of them, so that a wrapper whose
/// `calloc` or `realloc` takes other arguments is never read as one.
const ALLOCATOR_ONLY: [&str; 6] = [
    "posix_memalign",
    "memalign",
    "mallocx",
    "rallocx",
    "sdallocx",
    "dallocx",
];

/// The prefixes allocators are linked under: jemalloc's `je_` (as vendored),
/// tikv-jemallocator's `_rjem_`, mimalloc's `mi_`, gperftools' `tc_`.
const KNOWN_PREFIXES: [&str; 4] = ["je_", "_rjem_", "mi_", "tc_"];

fn is_family_member(name: &str) -> bool {
    MEMBERS.iter().any(|m| name.ends_with(m)) || KNOWN_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The allocator families among the defined symbols of one file (name,
/// address), by their shape: a `PREFIXmalloc` with one of its frees
/// ([`FREES`]) under the same non-empty prefix, and, unless the prefix is a
/// known one, a member only an allocator has ([`ALLOCATOR_ONLY`]). Under a
/// known prefix, any allocating entry point of [`ENTRY_POINTS`] stands for
/// `malloc`: the `mimalloc` crate calls `mi_malloc_aligned`, and the linker
/// keeps no `mi_malloc` in a Rust program. A family whose `malloc` is the
/// file's plain `malloc` (glibc's `__libc_malloc`) is that allocator under
/// another name, not another one. Sorted.
pub fn families(symbols: &[(String, u64)]) -> Vec<String> {
    let by_name: std::collections::HashMap<&str, u64> =
        symbols.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    let defined = |name: &str| by_name.get(name).copied();
    let plain_malloc = defined("malloc");
    let has = |prefix: &str, member: &str| defined(&format!("{prefix}{member}")).is_some();
    let frees = |prefix: &str| FREES.iter().any(|&f| has(prefix, f));
    let mut found: Vec<String> = symbols
        .iter()
        .filter_map(|(name, addr)| {
            let prefix = name.strip_suffix("malloc")?;
            // A C identifier's characters only: the prefix comes from a
            // target's file and ends up in probe names and `-v` lines.
            let shaped = !prefix.is_empty()
                && prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
                && frees(prefix)
                && (KNOWN_PREFIXES.contains(&prefix)
                    || ALLOCATOR_ONLY.iter().any(|&m| has(prefix, m)))
                && plain_malloc != Some(*addr);
            shaped.then(|| prefix.to_string())
        })
        .collect();
    for prefix in KNOWN_PREFIXES {
        let allocates = || {
            ENTRY_POINTS.iter().any(|p| {
                p.call.allocates()
                    && p.symbol.starts_with(prefix)
                    && defined(p.symbol).is_some_and(|a| plain_malloc != Some(a))
            })
        };
        if frees(prefix) && allocates() {
            found.push(prefix.to_string());
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Rust's allocator shims: every Rust executable's allocations and frees
/// go through them to its global allocator (`__rdl_*`, the System
/// allocator's, by default; `__rg_*`, a `#[global_allocator]`'s).
const RUST_SHIMS: [(&str, Call); 4] = [
    ("__rust_alloc", Call::Size0),
    ("__rust_alloc_zeroed", Call::Size0),
    ("__rust_realloc", Call::RustRealloc),
    ("__rust_dealloc", Call::Free),
];

/// Which of Rust's allocator shims `symbol` names, and its call: the plain
/// name (rustc before 1.8x), or v0-mangled as an item of the `__rustc`
/// crate (`_RNvCsfLfy6EI15iL_7___rustc12___rust_alloc`; the hash changes
/// with the compiler).
pub fn rust_shim(symbol: &str) -> Option<Call> {
    RUST_SHIMS
        .iter()
        .find_map(|&(shim, call)| is_rustc_item(symbol, shim).then_some(call))
}

/// Whether `symbol` is the compiler-made item `item` (`__rust_alloc`,
/// `__rdl_dealloc`): plain, or v0-mangled under the `__rustc` crate.
fn is_rustc_item(symbol: &str, item: &str) -> bool {
    // v0 names are made of `[A-Za-z0-9_]` (and what heapbpf prints of a
    // target's symbols stays so).
    let mangled = || {
        symbol
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            && symbol.starts_with("_RNvC")
            && symbol.ends_with(&format!("7___rustc{}_{item}", item.len()))
    };
    symbol == item || mangled()
}

/// Whether `symbol` is one [`rust_shims`] looks at.
fn is_rust_shim_symbol(symbol: &str) -> bool {
    rust_shim(symbol).is_some() || is_rustc_item(symbol, SYSTEM_DEALLOC)
}

/// The System allocator's dealloc, which the shim calls when the program
/// sets no `#[global_allocator]` (and the linker keeps only then): it ends
/// in the C library's `free`, which is hooked in every plan.
const SYSTEM_DEALLOC: &str = "__rdl_dealloc";

/// Rust's allocator shims among an executable's symbols (name, address),
/// by their own names: all of them when it has `__rust_alloc` and
/// `__rust_dealloc`, else none (not a Rust program, or stripped: the shims
/// are in the static symbol table only). On the System allocator
/// (`__rdl_dealloc` present) `__rust_dealloc` is left out: the `free` it
/// calls sees each free, one trap instead of two.
pub fn rust_shims(symbols: &[(String, u64)]) -> Vec<(String, Call)> {
    let mut shims: Vec<(String, Call)> = Vec::new();
    for &(shim, call) in &RUST_SHIMS {
        if let Some((name, _)) = symbols.iter().find(|(n, _)| is_rustc_item(n, shim)) {
            shims.push((name.clone(), call));
        }
    }
    let has = |call: Call| shims.iter().any(|&(_, c)| c == call);
    if !has(Call::Size0) || !has(Call::Free) {
        return Vec::new();
    }
    if symbols
        .iter()
        .any(|(n, _)| is_rustc_item(n, SYSTEM_DEALLOC))
    {
        shims.retain(|&(_, c)| c != Call::Free);
    }
    shims
}

/// Whether Rust's frees are hooked at `__rust_dealloc` (else in the `free`
/// the System allocator calls).
pub fn hooks_rust_dealloc(lib: &Library) -> bool {
    lib.rust_shims.iter().any(|&(_, c)| c == Call::Free)
}

/// What `-v` says of a plan: which library serves which calls, and how
/// nested calls are counted.
pub fn describe(plan: &AttachPlan) -> Vec<String> {
    let mut lines = vec![format!(
        "allocator: malloc & co hooked in {}",
        escape(&plan.main.label())
    )];
    if let Some(f) = &plan.fallback {
        lines.push(format!(
            "allocator: what {} lacks hooked in {}",
            escape(plan.main.file_name()),
            escape(&f.label())
        ));
    }
    for lib in &plan.extra {
        if lib.is_rust_shims() {
            let frees = if hooks_rust_dealloc(lib) {
                "Rust frees at __rust_dealloc"
            } else {
                "Rust frees in the C library's free (the System allocator's)"
            };
            lines.push(format!(
                "allocator: Rust allocator shims hooked in {}: Rust allocations are counted \
                 there, with the Rust caller as frames[0]; the allocator calls a shim makes \
                 are nested and not counted again; {frees}; other code's calls count in the \
                 allocators above",
                escape(&lib.path)
            ));
        } else {
            lines.push(format!(
                "allocator: the {}* family hooked in {} (calls nested in another hooked \
                 call count once, at the outermost)",
                escape(&lib.prefix),
                escape(&lib.path)
            ));
        }
    }
    lines
}

/// The attach cookie of a probe on a `call` of `lib`: `malloc` and `calloc`
/// are leaves (call no other hooked function) in the allocators known not to
/// build one on another; elsewhere (musl's `calloc` calls `malloc`, a
/// program's own allocator may do anything) they mark their nesting.
pub fn probe_cookie(call: Call, lib: &Library) -> u64 {
    if call.may_be_leaf() && lib.is_known_allocator() {
        heapbpf_common::probe_cookie::LEAF
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malloc_and_calloc_are_leaves_only_in_known_allocators() {
        let spec = |sym: &str| ENTRY_POINTS.iter().find(|p| p.symbol == sym).unwrap().call;
        let lib = |path: &str| Library::new(path.into(), path.into());
        let leaf = heapbpf_common::probe_cookie::LEAF;
        let glibc = lib("/usr/lib/x86_64-linux-gnu/libc.so.6");
        let jemalloc = lib("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2");
        let musl = lib("/lib/ld-musl-x86_64.so.1");
        let own = lib("/srv/app");
        assert_eq!(probe_cookie(spec("malloc"), &glibc), leaf);
        assert_eq!(probe_cookie(spec("calloc"), &glibc), leaf);
        assert_eq!(probe_cookie(spec("calloc"), &jemalloc), leaf);
        assert_eq!(
            probe_cookie(spec("mi_calloc"), &lib("libmimalloc.so.2.0")),
            leaf
        );
        // musl's calloc calls its malloc; a program's own allocator may.
        assert_eq!(probe_cookie(spec("calloc"), &musl), 0);
        assert_eq!(probe_cookie(spec("malloc"), &own), 0);
        assert_eq!(probe_cookie(spec("malloc"), &lib("/lib/libc.so")), 0);
        assert_eq!(
            probe_cookie(spec("malloc"), &lib("/lib/x86_64-linux-gnu/libc-2.31.so")),
            leaf
        );
        // Functions built on others are never leaves.
        assert_eq!(probe_cookie(spec("realloc"), &glibc), 0);
        assert_eq!(probe_cookie(spec("_Znwm"), &jemalloc), 0);
    }

    #[test]
    fn allocator_paths_and_prefixes() {
        assert_eq!(
            Choice::parse("/opt/app/bin/app:je_"),
            Some(Choice::Custom {
                path: "/opt/app/bin/app".into(),
                prefix: "je_".into()
            })
        );
        assert_eq!(
            Choice::parse("libhoard.so"),
            Some(Choice::Custom {
                path: "libhoard.so".into(),
                prefix: String::new()
            })
        );
        assert_eq!(Choice::parse("jemaloc"), None);
        assert_eq!(Choice::parse(":je_"), None);
        assert_eq!(Choice::parse("/x:je-"), None);
    }

    #[test]
    fn the_table_covers_the_allocator_surface_once() {
        let mut symbols: Vec<_> = ENTRY_POINTS.iter().map(|p| p.symbol).collect();
        symbols.sort_unstable();
        let n = symbols.len();
        symbols.dedup();
        assert_eq!(symbols.len(), n, "a symbol is listed twice");
        for s in [
            "malloc",
            "calloc",
            "realloc",
            "reallocarray",
            "free",
            "posix_memalign",
            "aligned_alloc",
            "memalign",
            "valloc",
            "pvalloc",
        ] {
            assert!(symbols.contains(&s), "{s} missing");
        }
    }

    fn maps(files: &[&str]) -> Vec<Mapping> {
        let text: String = files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                format!(
                    "7f{i:02}00000000-7f{i:02}00001000 r-xp 00000000 fe:01 {} {f}\n",
                    100 + i
                )
            })
            .collect();
        procfs::parse_maps(&text)
    }

    fn info() -> ProcessInfo {
        ProcessInfo {
            pid: 4242,
            comm: "app".into(),
            exe: "/nonexistent/app".into(),
        }
    }

    #[test]
    fn plans_prefer_a_dedicated_allocator_with_libc_beside_it() {
        let m = maps(&[
            "/nonexistent/app",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
        ]);
        let p = plan(&info(), &m, &Choice::Auto).unwrap();
        assert_eq!(p.main.file_name(), "libjemalloc.so.2");
        assert_eq!(
            p.fallback.as_ref().map(Library::file_name),
            Some("libc.so.6")
        );
        assert!(p.extra.is_empty());
        // --allocator libc: libc alone, even with jemalloc mapped.
        let p = plan(&info(), &m, &Choice::Libc).unwrap();
        assert_eq!(p.main.file_name(), "libc.so.6");
        assert!(p.fallback.is_none());
        // Only libc: libc, no fallback.
        let m = maps(&["/nonexistent/app", "/usr/lib/x86_64-linux-gnu/libc.so.6"]);
        let p = plan(&info(), &m, &Choice::Auto).unwrap();
        assert_eq!(p.main.file_name(), "libc.so.6");
        assert!(p.fallback.is_none());
        assert_eq!(p.libraries().count(), 1);
    }

    #[test]
    fn plans_name_what_is_missing() {
        let m = maps(&["/nonexistent/app", "/usr/lib/x86_64-linux-gnu/libc.so.6"]);
        let e = plan(&info(), &m, &Choice::Tcmalloc)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no tcmalloc library is mapped into app"), "{e}");
        let custom = Choice::parse("/opt/libhoard.so").unwrap();
        let e = plan(&info(), &m, &custom).unwrap_err().to_string();
        assert!(e.contains("/opt/libhoard.so is not mapped into app"), "{e}");
        // Nothing mapped: why, from the executable's facts.
        let facts = |go, has_symbols| elf::ProgramFacts {
            elf: true,
            is_static: true,
            has_symbols,
            go,
        };
        let go = no_allocator("gofx", &Choice::Auto, facts(true, true));
        assert!(
            go.starts_with(
                "gofx is a Go program without a C allocator: its heap is managed by the Go runtime"
            ) && go.contains("runtime/pprof")
                && go.contains("net/http/pprof"),
            "{go}"
        );
        assert!(!go.contains("stripped"), "{go}");
        // Stripped with -s -w: still recognised by .go.buildinfo.
        assert!(no_allocator("g", &Choice::Auto, facts(true, false)).contains("Go runtime"));
        let stripped = no_allocator("st", &Choice::Auto, facts(false, false));
        assert!(
            stripped.contains("has no symbol table (a stripped static program)"),
            "{stripped}"
        );
        let plain = no_allocator("st", &Choice::Auto, facts(false, true));
        assert!(
            plain.contains("its executable defines no malloc"),
            "{plain}"
        );
        assert_eq!(
            no_allocator("g", &Choice::Jemalloc, facts(true, true)),
            "no jemalloc library is mapped into g"
        );
        // A file name is enough for a mapped file.
        let p = plan(&info(), &m, &Choice::parse("libc.so.6").unwrap()).unwrap();
        assert_eq!(p.main.path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
    }

    fn symbols(names: &[(&str, u64)]) -> Vec<(String, u64)> {
        names.iter().map(|&(n, a)| (n.to_string(), a)).collect()
    }

    #[test]
    fn families_are_found_by_their_shape() {
        // tikv-jemallocator's jemalloc in a Rust executable: what its global
        // allocator calls survives the linker, no `_rjem_free`.
        let rjem = symbols(&[
            ("_rjem_malloc", 1),
            ("_rjem_mallocx", 2),
            ("_rjem_calloc", 3),
            ("_rjem_rallocx", 4),
            ("_rjem_realloc", 5),
            ("_rjem_sdallocx", 6),
        ]);
        assert_eq!(families(&rjem), ["_rjem_"]);
        // A known prefix needs only malloc and a free (vendored.c's je_).
        assert_eq!(
            families(&symbols(&[("je_malloc", 1), ("je_free", 2)])),
            ["je_"]
        );
        // A project's own prefix: with a member only an allocator has.
        let own = symbols(&[
            ("acme_malloc", 1),
            ("acme_free", 2),
            ("acme_posix_memalign", 3),
            ("malloc", 9),
        ]);
        assert_eq!(families(&own), ["acme_"]);
        // Two families in one file, sorted, each once.
        let both = [rjem.clone(), own.clone()].concat();
        assert_eq!(families(&both), ["_rjem_", "acme_"]);
        // Wrappers are not allocators: redis's zcalloc takes one argument,
        // glib's g_malloc calls malloc.
        let redis = symbols(&[
            ("zmalloc", 1),
            ("zcalloc", 2),
            ("zrealloc", 3),
            ("zfree", 4),
        ]);
        assert!(families(&redis).is_empty());
        assert!(families(&symbols(&[("g_malloc", 1), ("g_free", 2)])).is_empty());
        // A target's file does not choose what heapbpf prints.
        let hostile = symbols(&[
            ("\x1b[2Jmalloc", 1),
            ("\x1b[2Jfree", 2),
            ("\x1b[2Jposix_memalign", 3),
        ]);
        assert!(families(&hostile).is_empty());
        // A malloc without a free is no family; the plain names are not one
        // (the prefix is empty).
        assert!(families(&symbols(&[("je_malloc", 1), ("je_calloc", 2)])).is_empty());
        // The `mimalloc` crate in a Rust program: no `mi_malloc` is linked.
        let mi = symbols(&[
            ("mi_malloc_aligned", 1),
            ("mi_zalloc_aligned", 2),
            ("mi_realloc_aligned", 3),
            ("mi_free", 4),
        ]);
        assert_eq!(families(&mi), ["mi_"]);
        // ... but a free alone is no family.
        assert!(families(&symbols(&[("mi_free", 4)])).is_empty());
        // libtcmalloc's tc_* are its malloc and free under other names.
        let tc = symbols(&[("malloc", 1), ("free", 2), ("tc_malloc", 1), ("tc_free", 2)]);
        assert!(families(&tc).is_empty());
        assert!(families(&symbols(&[("malloc", 1), ("free", 2), ("memalign", 3)])).is_empty());
        // glibc's own names for its malloc (aliases) are not another allocator.
        let glibc = symbols(&[
            ("malloc", 1),
            ("free", 2),
            ("__libc_malloc", 1),
            ("__libc_free", 2),
            ("__libc_memalign", 3),
        ]);
        assert!(families(&glibc).is_empty());
    }

    #[test]
    fn rust_shims_by_any_of_their_names() {
        // rustc 1.95: v0-mangled under its `__rustc` crate.
        let v0 = |shim: &str| format!("_RNvCsfLfy6EI15iL_7___rustc{}_{shim}", shim.len());
        assert_eq!(
            v0("__rust_alloc"),
            "_RNvCsfLfy6EI15iL_7___rustc12___rust_alloc"
        );
        assert_eq!(rust_shim(&v0("__rust_alloc")), Some(Call::Size0));
        assert_eq!(rust_shim(&v0("__rust_alloc_zeroed")), Some(Call::Size0));
        assert_eq!(rust_shim(&v0("__rust_realloc")), Some(Call::RustRealloc));
        assert_eq!(rust_shim(&v0("__rust_dealloc")), Some(Call::Free));
        // Older compilers: plain names.
        assert_eq!(rust_shim("__rust_realloc"), Some(Call::RustRealloc));
        // Not shims: the System allocator behind them, the error handler,
        // a look-alike outside the `__rustc` crate.
        assert_eq!(rust_shim(&v0("__rdl_alloc")), None);
        assert_eq!(rust_shim(&v0("__rust_alloc_error_handler")), None);
        assert_eq!(rust_shim("_RNvCs123_5mycrate12___rust_alloc"), None);
        assert_eq!(rust_shim("my__rust_alloc"), None);
        assert_eq!(rust_shim("_RNvCs\x1b[2J_7___rustc12___rust_alloc"), None);

        let exe = symbols(&[
            (&v0("__rust_alloc"), 0x10),
            (&v0("__rust_dealloc"), 0x20),
            (&v0("__rust_realloc"), 0x30),
            (&v0("__rust_alloc_zeroed"), 0x40),
            (&v0("__rdl_alloc"), 0x50),
        ]);
        let shims = rust_shims(&exe);
        assert_eq!(shims.len(), 4, "{shims:?}");
        assert!(shims.contains(&(v0("__rust_realloc"), Call::RustRealloc)));
        assert!(shims.contains(&(v0("__rust_dealloc"), Call::Free)));
        // On the System allocator its free is hooked, not __rust_dealloc.
        let system = [exe.clone(), symbols(&[(&v0("__rdl_dealloc"), 0x60)])].concat();
        let shims = rust_shims(&system);
        assert_eq!(shims.len(), 3, "{shims:?}");
        assert!(!shims.iter().any(|(_, c)| *c == Call::Free));
        // This test program is a Rust executable: its own shims are found.
        let me = std::env::current_exe().unwrap();
        let own = elf::defined_symbols(&me, true, MAX_MEMBERS, |n, _| is_rust_shim_symbol(n));
        assert_eq!(rust_shims(&own).len(), 3, "{own:?}");
        // Without its dealloc, no shim is hooked (its frees would be missed).
        assert!(rust_shims(&exe[..1]).is_empty());
        assert!(rust_shims(&[]).is_empty());
    }

    #[test]
    fn describe_says_what_serves_what() {
        let lib = |path: &str| Library::new(path.into(), path.into());
        let plan = AttachPlan {
            main: lib("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            fallback: None,
            extra: vec![
                Library {
                    prefix: "_rjem_".into(),
                    ..lib("/srv/app")
                },
                Library {
                    rust_shims: vec![("__rust_alloc".into(), Call::Size0)],
                    ..lib("/srv/app")
                },
            ],
        };
        let lines = describe(&plan);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].contains("hooked in /usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(
            lines[1].contains("the _rjem_* family hooked in /srv/app"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("Rust allocator shims hooked in /srv/app"),
            "{}",
            lines[2]
        );
        assert!(lines[2].contains("frames[0]"));
        // The shims are their own library to the attached line and to exec.
        assert_eq!(plan.extra[1].label(), "/srv/app (__rust_alloc & co)");
        assert_ne!(plan.extra[1].identity(), lib("/srv/app").identity());
    }
}
