//! The canonical snapshot (`"format": "heapbpf-snapshot", "version": 1`).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Address, RawSnapshot};

pub const SNAPSHOT_FORMAT: &str = "heapbpf-snapshot";
pub const SNAPSHOT_VERSION: u32 = 1;

/// Why a snapshot was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    Signal,
    Interval,
    RssStep,
    HeapStep,
    Oom,
    Duration,
    Stop,
    Exit,
    /// The last snapshot of an image that called `exec()`.
    Exec,
    Request,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::Interval => "interval",
            Trigger::RssStep => "rss-step",
            Trigger::HeapStep => "heap-step",
            Trigger::Oom => "oom",
            Trigger::Duration => "duration",
            Trigger::Stop => "stop",
            Trigger::Exit => "exit",
            Trigger::Exec => "exec",
            Trigger::Request => "request",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub format: String,
    pub version: u32,
    pub pid: u32,
    pub comm: String,
    pub exe: String,
    pub taken_at: String,
    pub attached_at: String,
    pub trigger: Trigger,
    pub sample_bytes: u64,
    pub totals: Totals,
    pub stacks: Vec<Stack>,
    /// The executable mappings of the target (for pprof's mapping table).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mappings: Vec<MappingInfo>,
    /// What the snapshot covers when the agent keeps a CPU budget
    /// (`--max-overhead`); absent for `attach` and `run`, which watch all
    /// the time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage: Option<Coverage>,
    /// Whose container the target is in, when the agent reads pod metadata
    /// (`--kubernetes`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<Kubernetes>,
}

/// The pod a target runs in, as the API server described it when the
/// snapshot was taken: the labels its profiles carry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kubernetes {
    pub namespace: String,
    pub pod: String,
    /// The container's name in the pod spec.
    pub container: String,
    /// The node the agent runs on.
    pub node: String,
    /// `heapbpf.io/service-name`, else the pod's `app.kubernetes.io/name`
    /// or `app` label, else the container name.
    pub service_name: String,
}

/// What a snapshot taken under a CPU budget covers.
///
/// A target whose probes cost more than its budget is profiled in windows:
/// allocation probes attached for a window (ON), then only the free probes
/// for `follow_ms` (FOLLOW), then nothing (OFF), cycle after cycle. Then:
///
/// - `allocated_bytes`, `allocations` (totals and per stack) count the
///   allocations made during windows only: about `ratio` of the target's
///   (divide by `ratio` for an estimate of all, if the target's rate is
///   steady). `frees` counts the frees seen, during windows and FOLLOWs.
/// - A live block is one allocated in a window and not seen freed since:
///   not during the rest of its window, nor the FOLLOW after it, nor any
///   later window or FOLLOW. So what a window allocated and freed within
///   `follow_ms` is not live; what stays live has lasted at least that long
///   — the leak signal. A block freed while probes were off stays counted
///   until its address is allocated again in a later window, which retires
///   it: live figures may lean high for blocks of medium lifetime, never
///   for short-lived ones.
/// - `oldest_age_ms` and `--min-age` hold for the blocks seen.
///
/// A target within its budget is attached all the time: `ratio` 1, one
/// window from attach to the snapshot, nothing dropped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coverage {
    /// Share of the time since attach that allocation probes were attached.
    pub ratio: f64,
    /// How long free probes stay after each window.
    pub follow_ms: u64,
    /// The budget: `--max-overhead` as a fraction of the target's CPU time.
    pub max_overhead: f64,
    /// What the probes cost the target lately, as a share of its own CPU
    /// time, whatever was attached.
    pub overhead: f64,
    /// Profiled in windows now (else attached all the time).
    pub windowed: bool,
    /// The most recent windows (allocation probes attached), oldest first;
    /// the one open at the snapshot ends at `taken_at`.
    pub windows: Vec<CoverageWindow>,
}

/// A window: RFC 3339 UTC, to the millisecond.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoverageWindow {
    pub start: String,
    pub end: String,
}

/// What a snapshot says about its target and moment besides the kernel's
/// figures: the plain inputs of [`Snapshot::from_raw`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetMeta {
    pub comm: String,
    pub exe: String,
    /// RFC 3339, UTC.
    pub attached_at: String,
    /// RFC 3339, UTC. Passed in rather than read from the clock, so that
    /// building a snapshot is a pure function.
    pub taken_at: String,
    pub trigger: Trigger,
    pub sample_bytes: u64,
    pub rss_bytes: u64,
}

impl Snapshot {
    /// The canonical snapshot of a raw one. `symbolize` turns a stack's
    /// return addresses (innermost first) into frames; the allocator's own
    /// front frames are then stripped. A stack is truncated when the walk
    /// said so, or, when it could not tell, when its last frame is not a root
    /// function. Stacks keep the raw order; live totals are their sums, the
    /// other counters the kernel's. `pid` is the raw snapshot's; `mappings`
    /// is left empty for the caller to fill.
    pub fn from_raw(
        raw: &RawSnapshot,
        meta: TargetMeta,
        mut symbolize: impl FnMut(&[u64]) -> Vec<Frame>,
    ) -> Snapshot {
        let stacks: Vec<Stack> = raw
            .stacks
            .iter()
            .map(|r| {
                let mut frames = symbolize(&r.ips);
                strip_allocator_frames(&mut frames);
                Stack {
                    live_bytes: r.live_bytes,
                    live_allocations: r.live_allocations,
                    allocated_bytes: r.allocated_bytes,
                    allocations: r.allocations,
                    oldest_age_ms: r.oldest_age_ms,
                    truncated: r.truncated.unwrap_or_else(|| !reaches_root(&frames)),
                    frames,
                }
            })
            .collect();
        Snapshot {
            format: SNAPSHOT_FORMAT.into(),
            version: SNAPSHOT_VERSION,
            pid: raw.pid,
            comm: meta.comm,
            exe: meta.exe,
            taken_at: meta.taken_at,
            attached_at: meta.attached_at,
            trigger: meta.trigger,
            sample_bytes: meta.sample_bytes,
            totals: Totals {
                live_bytes: stacks.iter().map(|s| s.live_bytes).sum(),
                live_allocations: stacks.iter().map(|s| s.live_allocations).sum(),
                allocated_bytes: raw.allocated_bytes,
                allocations: raw.allocations,
                frees: raw.frees,
                rss_bytes: meta.rss_bytes,
                dropped_events: raw.dropped_events,
                dropped: raw.dropped.clone(),
                truncated_stacks: stacks.iter().filter(|s| s.truncated).count() as u64,
            },
            stacks,
            mappings: Vec::new(),
            coverage: None,
            kubernetes: None,
        }
    }
}

/// One executable file mapping of the target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingInfo {
    /// Written as `0x`-prefixed hex, like frame addresses.
    pub start: Address,
    pub limit: Address,
    /// Offset in the file of `start`.
    pub offset: Address,
    /// The path as the target sees it.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    /// Where the module's symbols came from when not from itself:
    /// [`SYMBOLS_DEBUG_FILE`] (a separate debug file, `debug_file`),
    /// [`SYMBOLS_NONE`] (stripped, no debug info found: its frames have no
    /// function unless it exports one; `symbols_note` says what was
    /// tried), [`SYMBOLS_PENDING`] (its debug info was still downloading:
    /// frames unresolved, never guessed). Absent: its own symbols.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbols: Option<String>,
    /// The separate debug file used, and where it was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug_file: Option<String>,
    /// Why the module has no symbols (or not yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbols_note: Option<String>,
}

/// [`MappingInfo::symbols`]: from a separate debug file.
pub const SYMBOLS_DEBUG_FILE: &str = "debug-file";
/// [`MappingInfo::symbols`]: stripped, and no debug info found.
pub const SYMBOLS_NONE: &str = "none";
/// [`MappingInfo::symbols`]: debug info still downloading from debuginfod.
pub const SYMBOLS_PENDING: &str = "pending";

impl MappingInfo {
    /// Its frames lack names for want of debug info (none, or not yet).
    pub fn lacks_symbols(&self) -> bool {
        matches!(
            self.symbols.as_deref(),
            Some(SYMBOLS_NONE) | Some(SYMBOLS_PENDING)
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Totals {
    pub live_bytes: u64,
    pub live_allocations: u64,
    pub allocated_bytes: u64,
    pub allocations: u64,
    pub frees: u64,
    pub rss_bytes: u64,
    pub dropped_events: u64,
    /// `dropped_events` by reason (`allocs_full`, `stacks_full`,
    /// `stats_full`, `stack_error`, `pending_full`, `read_error`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dropped: BTreeMap<String, u64>,
    /// Stacks in `stacks` whose walk stopped short of the program's or the
    /// thread's start (their `truncated` is true).
    #[serde(default)]
    pub truncated_stacks: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stack {
    pub live_bytes: u64,
    pub live_allocations: u64,
    pub allocated_bytes: u64,
    pub allocations: u64,
    pub oldest_age_ms: u64,
    /// The walk stopped short of the program's or the thread's start: the
    /// callers beyond the last frame are missing.
    #[serde(default)]
    pub truncated: bool,
    pub frames: Vec<Frame>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frame {
    /// Runtime virtual address, written as `0x`-prefixed hex: the return
    /// address for every frame of a call stack (symbolized at `address - 1`).
    pub address: Address,
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    pub inlined: bool,
}

/// Name of the root frame that stands for the callers a truncated stack is
/// missing, in pprof, folded, flame graph and diff output.
pub const TRUNCATED_FRAME: &str = "[truncated]";

/// The file name of a path as a target names it (`/usr/lib/libc.so.6` →
/// `libc.so.6`).
pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The root frame of a truncated stack (address 0, no module).
pub fn truncated_frame() -> Frame {
    Frame {
        address: Address(0),
        function: Some(TRUNCATED_FRAME.into()),
        ..Default::default()
    }
}

pub fn is_truncated_frame(f: &Frame) -> bool {
    f.address == Address(0) && f.module.is_none() && f.function.as_deref() == Some(TRUNCATED_FRAME)
}

impl Stack {
    /// The frames, with a [`TRUNCATED_FRAME`] root when the stack is truncated.
    pub fn frames_with_root(&self) -> std::borrow::Cow<'_, [Frame]> {
        if self.truncated {
            let mut f = self.frames.clone();
            f.push(truncated_frame());
            std::borrow::Cow::Owned(f)
        } else {
            std::borrow::Cow::Borrowed(&self.frames)
        }
    }
}

/// Drops leading frames that are the allocator's own front door: C++
/// `operator new` where it calls the hooked `malloc` (libstdc++'s), and
/// Rust's allocation API between a caller and the shim or allocator it
/// reaches (see [`is_rust_allocator_front`]), so that `frames[0]` is the
/// code that asked for memory. A stack made only of such frames is left
/// alone.
pub fn strip_allocator_frames(frames: &mut Vec<Frame>) {
    let front = frames
        .iter()
        .take_while(|f| {
            f.function.as_deref().is_some_and(|name| {
                name.starts_with("operator new") || is_rust_allocator_front(name)
            })
        })
        .count();
    if front < frames.len() {
        frames.drain(..front);
    }
}

/// Rust's allocation API, which only passes a call on to the global
/// allocator (mostly inlined into its caller): `alloc::alloc::alloc` & co,
/// `Global`'s `Allocator` methods, the shims and the System allocator's
/// functions (`__rustc::__rust_alloc`, `__rustc::__rdl_alloc`,
/// `std::sys::alloc::...`), and any `GlobalAlloc` implementation
/// (`<tikv_jemallocator::Jemalloc as core::alloc::global::GlobalAlloc>::alloc`),
/// seen when the shims are inlined (LTO) and the allocator underneath is the
/// hooked call. Collections (`RawVec`, `Box::new`) are the caller's code and
/// stay.
pub fn is_rust_allocator_front(function: &str) -> bool {
    [
        "alloc::alloc::",
        "<alloc::alloc::Global",
        "__rustc::",
        "std::sys::alloc::",
    ]
    .iter()
    .any(|p| function.starts_with(p))
        || (function.starts_with('<')
            && function.contains(" as core::alloc::global::GlobalAlloc>::"))
}

/// Functions where a stack legitimately ends: the program's and the
/// threads' entry points (glibc, musl, Go's cgo, Rust's std).
pub const ROOT_FUNCTIONS: &[&str] = &[
    "_start",
    "__libc_start_main",
    "__libc_start_main_impl",
    "__libc_start_call_main",
    "start_thread",
    "clone",
    "clone3",
    "__clone",
    "__clone3",
    "__GI___clone3",
    "__GI___clone",
    "thread_start",
];

/// Whether a stack (innermost first) reaches a root function, as a
/// frame-pointer walk that got all the way does.
pub fn reaches_root(frames: &[Frame]) -> bool {
    frames
        .last()
        .and_then(|f| f.function.as_deref())
        .is_some_and(|f| ROOT_FUNCTIONS.contains(&f))
}

impl Frame {
    /// `leak_malloc (leak.c:12)`, or `[unknown] libfoo.so+0x1234`-style text
    /// for unresolved frames.
    pub fn label(&self) -> String {
        let module_name = self.module.as_deref().map(basename);
        match (&self.function, &self.file, self.line) {
            (Some(f), Some(file), Some(line)) => {
                let file = basename(file);
                format!("{f} ({file}:{line})")
            }
            (Some(f), _, _) => match module_name {
                Some(m) => format!("{f} ({m})"),
                None => f.clone(),
            },
            (None, _, _) => format!("[unknown] {} {}", module_name.unwrap_or("?"), self.address),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_are_written_as_the_contract_names_them() {
        for t in [
            Trigger::Signal,
            Trigger::Interval,
            Trigger::RssStep,
            Trigger::HeapStep,
            Trigger::Oom,
            Trigger::Duration,
            Trigger::Stop,
            Trigger::Exit,
            Trigger::Exec,
            Trigger::Request,
        ] {
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
            assert_eq!(serde_json::from_str::<Trigger>(&json).unwrap(), t);
        }
        assert_eq!(Trigger::Exec.as_str(), "exec");
    }

    fn f(name: &str) -> Frame {
        Frame {
            address: Address(1),
            function: Some(name.into()),
            ..Default::default()
        }
    }

    #[test]
    fn operator_new_is_not_the_allocation_site() {
        let mut frames = vec![
            f("operator new[](unsigned long)"),
            f("Cache::remember(unsigned long)"),
            f("main"),
        ];
        strip_allocator_frames(&mut frames);
        assert_eq!(
            frames[0].function.as_deref(),
            Some("Cache::remember(unsigned long)")
        );
        let mut only = vec![f("operator new(unsigned long)")];
        strip_allocator_frames(&mut only);
        assert_eq!(only.len(), 1);
        let mut plain = vec![f("leak"), f("operator new(unsigned long)")];
        strip_allocator_frames(&mut plain);
        assert_eq!(plain.len(), 2);
    }

    #[test]
    fn rusts_allocation_api_is_not_the_allocation_site() {
        // `std::alloc::alloc` inlined into the caller of `__rust_alloc`.
        let mut frames = vec![
            f("alloc::alloc::alloc"),
            f("<alloc::alloc::Global>::alloc_impl"),
            f("<alloc::alloc::Global as core::alloc::Allocator>::allocate"),
            f("alloc::raw_vec::RawVecInner<A>::try_allocate_in"),
            f("app::handle"),
        ];
        strip_allocator_frames(&mut frames);
        assert_eq!(
            frames[0].function.as_deref(),
            Some("alloc::raw_vec::RawVecInner<A>::try_allocate_in")
        );
        // Shims inlined by LTO: the global allocator calls the hooked
        // `_rjem_mallocx` from the caller's code.
        let mut lto = vec![
            f("<tikv_jemallocator::Jemalloc as core::alloc::global::GlobalAlloc>::alloc"),
            f("__rustc::__rg_alloc"),
            f("alloc::alloc::alloc"),
            f("app::leak"),
        ];
        strip_allocator_frames(&mut lto);
        assert_eq!(lto[0].function.as_deref(), Some("app::leak"));
        // Nothing but the API: left alone; the API further out: kept.
        let mut only = vec![f("alloc::alloc::alloc")];
        strip_allocator_frames(&mut only);
        assert_eq!(only.len(), 1);
        let mut plain = vec![f("app::leak"), f("alloc::alloc::alloc")];
        strip_allocator_frames(&mut plain);
        assert_eq!(plain.len(), 2);
        assert!(!is_rust_allocator_front("alloc::boxed::Box<T>::new"));
        assert!(!is_rust_allocator_front("allocate_session"));
    }

    #[test]
    fn truncated_root_and_unknown_labels() {
        assert!(is_truncated_frame(&truncated_frame()));
        let mut other = truncated_frame();
        other.address = Address(0x10);
        assert!(!is_truncated_frame(&other));
        let unknown = Frame {
            address: Address(0x7f00dead0001),
            module: Some("/lib/libx.so".into()),
            ..Default::default()
        };
        assert_eq!(unknown.label(), "[unknown] libx.so 0x7f00dead0001");
    }

    /// A raw stack of `ips` with `live_bytes`, and the kernel's verdict.
    fn raw_stack(ips: &[u64], live_bytes: u64, truncated: Option<bool>) -> crate::model::RawStack {
        crate::model::RawStack {
            stack_id: ips[0],
            ips: ips.to_vec(),
            truncated,
            live_bytes,
            live_allocations: live_bytes / 8,
            allocated_bytes: live_bytes * 2,
            allocations: live_bytes / 4,
            oldest_age_ms: 100 + live_bytes,
        }
    }

    fn meta() -> TargetMeta {
        TargetMeta {
            comm: "app".into(),
            exe: "/usr/bin/app".into(),
            attached_at: "2026-11-24T18:59:00Z".into(),
            taken_at: "2026-11-24T19:00:00Z".into(),
            trigger: Trigger::Interval,
            sample_bytes: 4096,
            rss_bytes: 1 << 20,
        }
    }

    /// A symbolizer over a fixed table: one frame per address.
    fn fake_symbolize(ips: &[u64]) -> Vec<Frame> {
        ips.iter()
            .map(|&ip| Frame {
                address: Address(ip),
                function: Some(
                    match ip {
                        1 => "operator new(unsigned long)",
                        2 => "leak",
                        3 => "main",
                        4 => "__libc_start_call_main",
                        5 => "worker",
                        6 => "start_thread",
                        _ => "helper",
                    }
                    .into(),
                ),
                module: Some("/usr/bin/app".into()),
                ..Default::default()
            })
            .collect()
    }

    fn names(s: &Stack) -> Vec<&str> {
        s.frames
            .iter()
            .map(|f| f.function.as_deref().unwrap_or("?"))
            .collect()
    }

    #[test]
    fn from_raw_totals_add_up() {
        let raw = RawSnapshot {
            pid: 77,
            stacks: vec![
                raw_stack(&[2, 3, 4], 800, Some(false)),
                raw_stack(&[5, 6], 160, Some(true)),
                raw_stack(&[7], 40, None),
            ],
            // Since attach, so not the sums of the stacks.
            allocated_bytes: 123_456,
            allocations: 789,
            frees: 321,
            dropped_events: 5,
            dropped: Default::default(),
        };
        let s = Snapshot::from_raw(&raw, meta(), fake_symbolize);
        assert_eq!(
            (s.format.as_str(), s.version, s.pid),
            (SNAPSHOT_FORMAT, SNAPSHOT_VERSION, 77)
        );
        assert_eq!((s.comm.as_str(), s.exe.as_str()), ("app", "/usr/bin/app"));
        assert_eq!(s.taken_at, "2026-11-24T19:00:00Z");
        assert_eq!(s.attached_at, "2026-11-24T18:59:00Z");
        assert_eq!((s.trigger, s.sample_bytes), (Trigger::Interval, 4096));
        assert_eq!(
            s.totals,
            Totals {
                live_bytes: 1000,
                live_allocations: 100 + 20 + 5,
                allocated_bytes: 123_456,
                allocations: 789,
                frees: 321,
                rss_bytes: 1 << 20,
                dropped_events: 5,
                dropped: Default::default(),
                truncated_stacks: 2,
            }
        );
        assert_eq!(
            s.stacks[1],
            Stack {
                live_bytes: 160,
                live_allocations: 20,
                allocated_bytes: 320,
                allocations: 40,
                oldest_age_ms: 260,
                truncated: true,
                frames: fake_symbolize(&[5, 6]),
            }
        );
        assert!(s.mappings.is_empty());
    }

    #[test]
    fn from_raw_strips_allocator_frames() {
        let raw = RawSnapshot {
            pid: 1,
            stacks: vec![raw_stack(&[1, 2, 3, 4], 64, None)],
            ..Default::default()
        };
        let s = Snapshot::from_raw(&raw, meta(), fake_symbolize);
        assert_eq!(
            names(&s.stacks[0]),
            ["leak", "main", "__libc_start_call_main"]
        );
        assert_eq!(s.stacks[0].frames[0].address, Address(2));
        assert!(!s.stacks[0].truncated);
    }

    #[test]
    fn from_raw_truncated_verdict() {
        let raw = RawSnapshot {
            pid: 1,
            stacks: vec![
                // The walk's verdict wins over the symbols, both ways.
                raw_stack(&[2, 3, 4], 50, Some(true)),
                raw_stack(&[2, 3], 40, Some(false)),
                // No verdict: decided by whether the stack ends in a root.
                raw_stack(&[5, 6], 30, None),
                raw_stack(&[2, 3], 20, None),
                raw_stack(&[1], 10, None),
            ],
            ..Default::default()
        };
        let s = Snapshot::from_raw(&raw, meta(), fake_symbolize);
        let got: Vec<bool> = s.stacks.iter().map(|s| s.truncated).collect();
        assert_eq!(got, [true, false, false, true, true]);
        assert_eq!(s.totals.truncated_stacks, 3);
    }

    #[test]
    fn from_raw_keeps_the_order() {
        // Not sorted by size: the order is the raw snapshot's, and each
        // stack's addresses go to the symbolizer as they are.
        let raw = RawSnapshot {
            pid: 1,
            stacks: vec![
                raw_stack(&[7, 3], 8, None),
                raw_stack(&[2, 3, 4], 800, None),
                raw_stack(&[5, 6], 80, None),
            ],
            ..Default::default()
        };
        let mut seen = Vec::new();
        let s = Snapshot::from_raw(&raw, meta(), |ips| {
            seen.push(ips.to_vec());
            fake_symbolize(ips)
        });
        assert_eq!(seen, [vec![7, 3], vec![2, 3, 4], vec![5, 6]]);
        let sizes: Vec<u64> = s.stacks.iter().map(|s| s.live_bytes).collect();
        assert_eq!(sizes, [8, 800, 80]);
        assert_eq!(names(&s.stacks[0]), ["helper", "main"]);
    }

    #[test]
    fn roots_end_stacks() {
        assert!(reaches_root(&[
            f("leak"),
            f("main"),
            f("__libc_start_call_main")
        ]));
        assert!(reaches_root(&[f("work"), f("start_thread"), f("clone3")]));
        assert!(!reaches_root(&[f("leak"), f("main")]));
        assert!(!reaches_root(&[]));
    }
}
