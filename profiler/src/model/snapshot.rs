//! The canonical snapshot (`"format": "heapbpf-snapshot", "version": 1`).
use serde::{Deserialize, Serialize};

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
    /// `0x`-prefixed hex, like frame addresses.
    pub start: String,
    pub limit: String,
    /// Offset in the file of `start`.
    pub offset: String,
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
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stack {
    pub live_bytes: u64,
    pub live_allocations: u64,
    pub allocated_bytes: u64,
    pub allocations: u64,
    pub oldest_age_ms: u64,
    pub frames: Vec<Frame>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frame {
    /// Runtime virtual address, `0x`-prefixed hex: the return address for
    /// every frame of a call stack (symbolized at `address - 1`).
    pub address: String,
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    pub inlined: bool,
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
