//! What grew between two snapshots. Stacks are matched by their sequence of
//! (module file name, function), or address when unresolved, so snapshots
//! of different runs or versions of a program still compare.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{Frame, Snapshot};

pub const DIFF_FORMAT: &str = "heapbpf-diff";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Grew,
    Shrank,
    New,
    Gone,
    Same,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Grew => "grew",
            Status::Shrank => "shrank",
            Status::New => "new",
            Status::Gone => "gone",
            Status::Same => "same",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    pub pid: u32,
    pub exe: String,
    pub taken_at: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffTotals {
    pub delta_bytes: i64,
    pub delta_allocations: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffEntry {
    pub frames: Vec<Frame>,
    pub old_bytes: u64,
    pub new_bytes: u64,
    pub delta_bytes: i64,
    pub delta_allocations: i64,
    pub status: Status,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    pub format: String,
    pub version: u32,
    pub old: Side,
    pub new: Side,
    pub totals: DiffTotals,
    pub entries: Vec<DiffEntry>,
}

impl Diff {
    /// Whether the two snapshots come from different executables.
    pub fn different_executables(&self) -> bool {
        self.old.exe != self.new.exe
    }
}

fn frame_key(f: &Frame) -> String {
    let module = f.module.as_deref().map(super::basename).unwrap_or("?");
    match &f.function {
        Some(func) => format!("{module}!{func}"),
        None => format!("{module}@{}", f.address),
    }
}

#[derive(Default)]
struct Acc {
    frames: Vec<Frame>,
    live_bytes: u64,
    live_allocations: u64,
}

fn by_key(s: &Snapshot) -> HashMap<Vec<String>, Acc> {
    let mut m: HashMap<Vec<String>, Acc> = HashMap::new();
    for st in s
        .stacks
        .iter()
        .filter(|st| st.live_allocations > 0 || st.live_bytes > 0)
    {
        // A truncated stack keeps its `[truncated]` root: it is not the same
        // as a complete stack with the same frames.
        let frames = st.frames_with_root();
        let key: Vec<String> = frames.iter().map(frame_key).collect();
        let acc = m.entry(key).or_default();
        if acc.frames.is_empty() {
            acc.frames = frames.into_owned();
        }
        // Saturating: a snapshot read from a file has been checked to add
        // up (output::read_snapshot), so this never clips one.
        acc.live_bytes = acc.live_bytes.saturating_add(st.live_bytes);
        acc.live_allocations = acc.live_allocations.saturating_add(st.live_allocations);
    }
    m
}

/// `new - old` without wrapping around. Figures of snapshots read from files
/// are at most 2^63-1 (output::read_snapshot refuses others), so their
/// differences always fit; anything else is clipped to the nearest `i64`.
fn delta(new: u64, old: u64) -> i64 {
    let d = i128::from(new) - i128::from(old);
    d.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

pub fn diff(old: &Snapshot, new: &Snapshot) -> Diff {
    let mut olds = by_key(old);
    let news = by_key(new);
    let mut entries = Vec::new();
    for (key, n) in news {
        let o = olds.remove(&key);
        let (old_bytes, old_allocs) = o
            .as_ref()
            .map(|o| (o.live_bytes, o.live_allocations))
            .unwrap_or((0, 0));
        let delta_bytes = delta(n.live_bytes, old_bytes);
        let status = match (o.is_some(), delta_bytes.signum()) {
            (false, _) => Status::New,
            (true, 1) => Status::Grew,
            (true, -1) => Status::Shrank,
            _ => Status::Same,
        };
        entries.push(DiffEntry {
            frames: n.frames,
            old_bytes,
            new_bytes: n.live_bytes,
            delta_bytes,
            delta_allocations: delta(n.live_allocations, old_allocs),
            status,
        });
    }
    for (_, o) in olds {
        entries.push(DiffEntry {
            frames: o.frames,
            old_bytes: o.live_bytes,
            new_bytes: 0,
            delta_bytes: delta(0, o.live_bytes),
            delta_allocations: delta(0, o.live_allocations),
            status: Status::Gone,
        });
    }
    entries.sort_by(|a, b| {
        b.delta_bytes
            .cmp(&a.delta_bytes)
            .then(b.delta_allocations.cmp(&a.delta_allocations))
            .then_with(|| {
                a.frames
                    .iter()
                    .map(frame_key)
                    .cmp(b.frames.iter().map(frame_key))
            })
    });
    let side = |s: &Snapshot| Side {
        pid: s.pid,
        exe: s.exe.clone(),
        taken_at: s.taken_at.clone(),
    };
    Diff {
        format: DIFF_FORMAT.into(),
        version: 1,
        old: side(old),
        new: side(new),
        totals: DiffTotals {
            delta_bytes: delta(new.totals.live_bytes, old.totals.live_bytes),
            delta_allocations: delta(new.totals.live_allocations, old.totals.live_allocations),
        },
        entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Stack, Totals, Trigger, SNAPSHOT_FORMAT};

    fn frame(function: Option<&str>, address: &str, module: &str) -> Frame {
        Frame {
            address: address.parse().unwrap(),
            function: function.map(Into::into),
            module: Some(module.into()),
            ..Default::default()
        }
    }

    fn stack(live_bytes: u64, live_allocations: u64, frames: Vec<Frame>) -> Stack {
        Stack {
            live_bytes,
            live_allocations,
            allocated_bytes: live_bytes,
            allocations: live_allocations,
            oldest_age_ms: 0,
            truncated: false,
            frames,
        }
    }

    fn snap(exe: &str, stacks: Vec<Stack>) -> Snapshot {
        Snapshot {
            mappings: Vec::new(),
            coverage: None,
            kubernetes: None,
            format: SNAPSHOT_FORMAT.into(),
            version: 1,
            pid: 1,
            comm: "app".into(),
            exe: exe.into(),
            taken_at: "2026-11-24T19:00:00Z".into(),
            attached_at: "2026-11-24T18:00:00Z".into(),
            trigger: Trigger::Signal,
            sample_bytes: 0,
            totals: Totals {
                live_bytes: stacks
                    .iter()
                    .fold(0u64, |a, s| a.saturating_add(s.live_bytes)),
                live_allocations: stacks
                    .iter()
                    .fold(0u64, |a, s| a.saturating_add(s.live_allocations)),
                ..Default::default()
            },
            stacks,
        }
    }

    #[test]
    fn growth_first_then_new_same_shrank_gone() {
        let leak = |addr| {
            vec![
                frame(Some("leak"), addr, "/usr/bin/app"),
                frame(Some("main"), "0x10", "/usr/bin/app"),
            ]
        };
        let old = snap(
            "/usr/bin/app",
            vec![
                stack(1000, 10, leak("0x401000")),
                stack(500, 5, vec![frame(Some("cache"), "0x2", "/usr/bin/app")]),
                stack(300, 3, vec![frame(Some("stable"), "0x3", "/usr/bin/app")]),
                stack(200, 2, vec![frame(None, "0x7f00", "/lib/libx.so")]),
            ],
        );
        // Same code, other addresses (ASLR, another build): matched by name.
        let new = snap(
            "/usr/bin/app",
            vec![
                stack(9000, 90, leak("0x555000")),
                stack(100, 1, vec![frame(Some("cache"), "0x9", "/opt/app")]),
                stack(300, 3, vec![frame(Some("stable"), "0x3", "/usr/bin/app")]),
                stack(64, 1, vec![frame(Some("fresh"), "0x4", "/usr/bin/app")]),
            ],
        );
        let d = diff(&old, &new);
        let got: Vec<(String, i64, Status)> = d
            .entries
            .iter()
            .map(|e| {
                (
                    e.frames[0].function.clone().unwrap_or_default(),
                    e.delta_bytes,
                    e.status,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("leak".to_string(), 8000, Status::Grew),
                ("fresh".to_string(), 64, Status::New),
                ("stable".to_string(), 0, Status::Same),
                ("".to_string(), -200, Status::Gone),
                ("cache".to_string(), -400, Status::Shrank),
            ]
        );
        assert_eq!(d.entries[0].delta_allocations, 80);
        assert_eq!(
            (d.entries[0].old_bytes, d.entries[0].new_bytes),
            (1000, 9000)
        );
        assert_eq!(
            d.totals,
            DiffTotals {
                delta_bytes: 9464 - 2000,
                delta_allocations: 95 - 20
            }
        );
        assert!(!d.different_executables());
        assert!(diff(&old, &snap("/usr/bin/other", vec![])).different_executables());
    }

    #[test]
    fn huge_figures_never_wrap_around() {
        let max = u64::MAX;
        let a = snap(
            "/x",
            vec![
                stack(max, max, vec![frame(Some("f"), "0x1", "/x")]),
                stack(max, 1, vec![frame(Some("f"), "0x2", "/x")]),
            ],
        );
        let b = snap("/x", vec![stack(1, 1, vec![frame(Some("g"), "0x1", "/x")])]);
        let d = diff(&a, &b);
        let f = d.entries.iter().find(|e| e.status == Status::Gone).unwrap();
        assert_eq!((f.old_bytes, f.delta_bytes), (max, i64::MIN));
        let g = d.entries.iter().find(|e| e.status == Status::New).unwrap();
        assert_eq!(g.delta_bytes, 1);
        let d = diff(&b, &a);
        let f = d.entries.iter().find(|e| e.status == Status::New).unwrap();
        assert_eq!((f.new_bytes, f.delta_bytes), (max, i64::MAX));
        assert_eq!(delta(i64::MAX as u64, 0), i64::MAX);
        assert_eq!(delta(0, i64::MAX as u64), -i64::MAX);
        assert_eq!(delta(5, 7), -2);
    }

    #[test]
    fn stacks_of_one_function_merge() {
        // Two call sites in one function (different lines) are one entry.
        let a = snap(
            "/x",
            vec![
                stack(10, 1, vec![frame(Some("f"), "0x1", "/x")]),
                stack(20, 1, vec![frame(Some("f"), "0x2", "/x")]),
            ],
        );
        let b = snap(
            "/x",
            vec![stack(50, 2, vec![frame(Some("f"), "0x1", "/x")])],
        );
        let d = diff(&a, &b);
        assert_eq!(d.entries.len(), 1);
        assert_eq!(
            (
                d.entries[0].delta_bytes,
                d.entries[0].delta_allocations,
                d.entries[0].status
            ),
            (20, 0, Status::Grew)
        );
    }
}
