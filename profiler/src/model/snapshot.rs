//! The canonical snapshot (`"format": "heapbpf-snapshot", "version": 1`).
use serde::{Deserialize, Serialize};

use super::Address;

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
            Trigger::Request => "request",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
/// `operator new` where it calls the hooked `malloc` (libstdc++'s), so that
/// `frames[0]` is the code that asked for memory. A stack made only of such
/// frames is left alone.
pub fn strip_allocator_frames(frames: &mut Vec<Frame>) {
    let front = frames
        .iter()
        .take_while(|f| {
            f.function
                .as_deref()
                .is_some_and(|name| name.starts_with("operator new"))
        })
        .count();
    if front < frames.len() {
        frames.drain(..front);
    }
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
        let module_name = self
            .module
            .as_deref()
            .map(|m| m.rsplit('/').next().unwrap_or(m));
        match (&self.function, &self.file, self.line) {
            (Some(f), Some(file), Some(line)) => {
                let file = file.rsplit('/').next().unwrap_or(file);
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
