//! `heapbpf report`: the top allocation sites of a snapshot, for people
//! (text) or scripts (JSON). Pure: snapshot in, string out.
use std::fmt::Write as _;

use serde_json::json;

use crate::{
    lines::escape,
    model::{Diff, Snapshot},
    units::{human_age_ms, human_bytes},
};

/// How many frames of each stack the text report shows.
pub const FRAMES_SHOWN: usize = 6;

/// ANSI styling, or nothing when colour is off.
struct Style(bool);

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
    fn bold(&self, t: &str) -> String {
        self.paint("1", t)
    }
    fn site(&self, t: &str) -> String {
        self.paint("1;36", t)
    }
    fn warn(&self, t: &str) -> String {
        self.paint("1;33", t)
    }
    fn grew(&self, t: &str) -> String {
        self.paint("31", t)
    }
    fn shrank(&self, t: &str) -> String {
        self.paint("34", t)
    }
}

/// Pads `text` to `width` columns, then styles it (escape codes take no
/// columns on screen, so padding goes first).
fn cell(text: String, width: usize, style: impl Fn(&str) -> String) -> String {
    style(&format!("{text:>width$}"))
}

/// A frame as people read it, with what the target controls escaped.
fn label(f: &crate::model::Frame) -> String {
    escape(&f.label()).into_owned()
}

pub fn text(s: &Snapshot, top: usize, color: bool) -> String {
    let c = Style(color);
    let mut o = String::new();
    let sampling = if s.sample_bytes == 0 {
        "exact".to_string()
    } else {
        format!("sampled every {}", human_bytes(s.sample_bytes as i128))
    };
    let _ = writeln!(
        o,
        "heapbpf snapshot of pid {} ({}) {}",
        s.pid,
        escape(&s.comm),
        escape(&s.exe)
    );
    let _ = writeln!(
        o,
        "taken {} (trigger {}), attached {}, {}",
        escape(&s.taken_at),
        s.trigger.as_str(),
        escape(&s.attached_at),
        sampling
    );
    let t = &s.totals;
    let _ = writeln!(
        o,
        "live heap: {} in {} allocations; since attach: {} in {} allocations, {} frees",
        human_bytes(t.live_bytes as i128),
        t.live_allocations,
        human_bytes(t.allocated_bytes as i128),
        t.allocations,
        t.frees
    );
    if t.rss_bytes > 0 {
        let pct = 100.0 * t.live_bytes as f64 / t.rss_bytes as f64;
        let _ = writeln!(
            o,
            "RSS: {}; the tracked heap explains {pct:.1}% of it (the rest: allocator overhead, memory allocated before attach, stacks, code, mappings)",
            human_bytes(t.rss_bytes as i128)
        );
    }
    if t.dropped_events > 0 {
        let warning = format!("WARNING: {}", crate::lines::dropped_events(t, None));
        let _ = writeln!(o, "{}", c.warn(&warning));
    }
    if t.truncated_stacks > 0 {
        let bytes = s
            .stacks
            .iter()
            .filter(|st| st.truncated)
            .fold(0u64, |sum, st| sum.saturating_add(st.live_bytes));
        let _ = writeln!(
            o,
            "{} of {} stacks are truncated ({} live): the walk stopped before the program's or thread's start",
            t.truncated_stacks,
            s.stacks.len(),
            human_bytes(bytes as i128)
        );
    }
    for line in symbol_gaps(s) {
        let _ = writeln!(o, "{}", c.warn(&line));
    }
    let _ = writeln!(o);
    let shown: Vec<_> = s
        .stacks
        .iter()
        .filter(|st| st.live_bytes > 0)
        .take(top)
        .collect();
    if shown.is_empty() {
        let _ = writeln!(o, "no live allocations");
        return o;
    }
    let _ = writeln!(
        o,
        "{:>3}  {:>10}  {:>9}  {:>6}  {:>7}  site",
        "#", "live", "allocs", "share", "oldest"
    );
    for (i, st) in shown.iter().enumerate() {
        let share = if t.live_bytes > 0 {
            100.0 * st.live_bytes as f64 / t.live_bytes as f64
        } else {
            0.0
        };
        let mut frames = st.frames.iter();
        let first = frames
            .next()
            .map(label)
            .unwrap_or_else(|| "[unknown stack]".into());
        let _ = writeln!(
            o,
            "{:>3}  {}  {:>9}  {:>5.1}%  {:>7}  {}",
            i + 1,
            cell(human_bytes(st.live_bytes as i128), 10, |t| c.bold(t)),
            st.live_allocations,
            share,
            human_age_ms(st.oldest_age_ms),
            c.site(&first)
        );
        for f in frames.by_ref().take(FRAMES_SHOWN - 1) {
            let _ = writeln!(
                o,
                "{:>44}  {}{}",
                "",
                if f.inlined { "(inlined) " } else { "" },
                label(f)
            );
        }
        let rest = st.frames.len().saturating_sub(FRAMES_SHOWN);
        if rest > 0 {
            let _ = writeln!(o, "{:>44}  ... {rest} more frames", "");
        }
        if st.truncated {
            let _ = writeln!(
                o,
                "{:>44}  {}",
                "",
                c.warn("[truncated] (callers beyond this frame are unknown)")
            );
        }
    }
    let others = s
        .stacks
        .iter()
        .filter(|st| st.live_bytes > 0)
        .count()
        .saturating_sub(shown.len());
    if others > 0 {
        let _ = writeln!(
            o,
            "\n{others} more sites with live allocations (use --top to see them)"
        );
    }
    o
}

/// A line per module, once, whose frames in the snapshot lack names for
/// want of debug info: none found, or still downloading when it was taken.
pub fn symbol_gaps(s: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    let mut said = std::collections::BTreeSet::new();
    for m in s.mappings.iter().filter(|m| m.lacks_symbols()) {
        let used = s
            .stacks
            .iter()
            .flat_map(|st| &st.frames)
            .any(|f| f.module.as_deref() == Some(&m.path));
        if !used || !said.insert(&m.path) {
            continue;
        }
        let id = m.build_id.as_deref().map_or_else(
            || "no build id".to_string(),
            |b| format!("build id {}", escape(b)),
        );
        out.push(if m.symbols.as_deref() == Some(crate::model::SYMBOLS_PENDING) {
            format!(
                "no symbols yet for {} ({id}): its debug info was still downloading from debuginfod; a later snapshot names its frames",
                escape(&m.path)
            )
        } else {
            format!(
                "no symbols for {} ({id}): install its debug info, or pass --debuginfod URL",
                escape(&m.path)
            )
        });
    }
    out
}

pub fn json(s: &Snapshot, top: usize) -> String {
    let stacks: Vec<_> = s.stacks.iter().filter(|st| st.live_bytes > 0).take(top).map(|st| {
        json!({
            "live_bytes": st.live_bytes,
            "live_allocations": st.live_allocations,
            "share": if s.totals.live_bytes > 0 { st.live_bytes as f64 / s.totals.live_bytes as f64 } else { 0.0 },
            "oldest_age_ms": st.oldest_age_ms,
            "truncated": st.truncated,
            "frames": st.frames,
        })
    }).collect();
    let v = json!({
        "format": "heapbpf-report",
        "version": 1,
        "pid": s.pid,
        "comm": s.comm,
        "exe": s.exe,
        "taken_at": s.taken_at,
        "trigger": s.trigger,
        "sample_bytes": s.sample_bytes,
        "totals": s.totals,
        "stacks": stacks,
    });
    let mut out = serde_json::to_string_pretty(&v).unwrap_or_default();
    out.push('\n');
    out
}

fn signed_bytes(v: i64) -> String {
    if v > 0 {
        format!("+{}", human_bytes(v as i128))
    } else {
        human_bytes(v as i128)
    }
}

pub fn diff_text(d: &Diff, top: usize, color: bool) -> String {
    let c = Style(color);
    let mut o = String::new();
    let _ = writeln!(o, "heapbpf diff");
    let _ = writeln!(
        o,
        "  old: pid {} {} taken {}",
        d.old.pid,
        escape(&d.old.exe),
        escape(&d.old.taken_at)
    );
    let _ = writeln!(
        o,
        "  new: pid {} {} taken {}",
        d.new.pid,
        escape(&d.new.exe),
        escape(&d.new.taken_at)
    );
    if d.different_executables() {
        let _ = writeln!(
            o,
            "  (different executables: stacks matched by module and function names)"
        );
    }
    let _ = writeln!(
        o,
        "live heap change: {} ({:+} allocations)\n",
        signed_bytes(d.totals.delta_bytes),
        d.totals.delta_allocations
    );
    let shown: Vec<_> = d
        .entries
        .iter()
        .filter(|e| e.delta_bytes != 0 || e.delta_allocations != 0)
        .take(top)
        .collect();
    if shown.is_empty() {
        let _ = writeln!(o, "no change in live allocations");
        return o;
    }
    let _ = writeln!(
        o,
        "{:>3}  {:>11}  {:>10}  {:>10}  {:>8}  {:<6}  site",
        "#", "delta", "old", "new", "allocs", "status"
    );
    for (i, e) in shown.iter().enumerate() {
        let mut frames = e.frames.iter();
        let first = frames
            .next()
            .map(label)
            .unwrap_or_else(|| "[unknown stack]".into());
        let paint = |t: &str| {
            if e.delta_bytes > 0 {
                c.grew(t)
            } else if e.delta_bytes < 0 {
                c.shrank(t)
            } else {
                t.to_string()
            }
        };
        let _ = writeln!(
            o,
            "{:>3}  {}  {:>10}  {:>10}  {:>+8}  {:<6}  {}",
            i + 1,
            cell(signed_bytes(e.delta_bytes), 11, paint),
            human_bytes(e.old_bytes as i128),
            human_bytes(e.new_bytes as i128),
            e.delta_allocations,
            e.status.as_str(),
            c.site(&first)
        );
        for f in frames.take(3) {
            let _ = writeln!(o, "{:>62}  {}", "", label(f));
        }
    }
    o
}

pub fn diff_json(d: &Diff, top: usize) -> String {
    let mut d = d.clone();
    d.entries.truncate(top);
    let mut out = serde_json::to_string_pretty(&d).unwrap_or_default();
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Address, Frame, Stack, Totals, Trigger, SNAPSHOT_FORMAT};

    fn snap() -> Snapshot {
        let frame = |f: &str, line| Frame {
            address: Address(0x401136),
            function: Some(f.into()),
            file: Some("/src/leak.c".into()),
            line: Some(line),
            module: Some("/usr/local/bin/app".into()),
            inlined: false,
        };
        Snapshot {
            mappings: Vec::new(),
            coverage: None,
            kubernetes: None,
            format: SNAPSHOT_FORMAT.into(),
            version: 1,
            pid: 42,
            comm: "app".into(),
            exe: "/usr/local/bin/app".into(),
            taken_at: "2026-11-24T19:00:00Z".into(),
            attached_at: "2026-11-24T18:59:00Z".into(),
            trigger: Trigger::Exit,
            sample_bytes: 0,
            totals: Totals {
                live_bytes: 3072,
                live_allocations: 3,
                allocated_bytes: 4096,
                allocations: 4,
                frees: 1,
                rss_bytes: 1 << 20,
                dropped_events: 0,
                dropped: Default::default(),
                truncated_stacks: 1,
            },
            stacks: vec![
                Stack {
                    live_bytes: 2048,
                    live_allocations: 2,
                    allocated_bytes: 2048,
                    allocations: 2,
                    oldest_age_ms: 5120,
                    truncated: false,
                    frames: vec![frame("leak_malloc", 12), frame("main", 30)],
                },
                Stack {
                    live_bytes: 1024,
                    live_allocations: 1,
                    allocated_bytes: 2048,
                    allocations: 2,
                    oldest_age_ms: 10,
                    truncated: true,
                    frames: vec![],
                },
                Stack {
                    live_bytes: 0,
                    live_allocations: 0,
                    allocated_bytes: 64,
                    allocations: 1,
                    oldest_age_ms: 0,
                    truncated: false,
                    frames: vec![frame("tmp", 3)],
                },
            ],
        }
    }

    #[test]
    fn modules_without_symbols_are_named_once() {
        use crate::model::{MappingInfo, SYMBOLS_NONE, SYMBOLS_PENDING};
        let mut s = snap();
        assert!(symbol_gaps(&s).is_empty());
        let app = |symbols: Option<&str>, start| MappingInfo {
            start: Address(start),
            limit: Address(start + 0x1000),
            path: "/usr/local/bin/app".into(),
            build_id: Some("ab12".into()),
            symbols: symbols.map(str::to_string),
            ..Default::default()
        };
        // Two mappings of one module: one line.
        s.mappings = vec![
            app(Some(SYMBOLS_NONE), 0x401000),
            app(Some(SYMBOLS_NONE), 0x402000),
            MappingInfo {
                path: "/lib/unused.so".into(),
                symbols: Some(SYMBOLS_NONE.into()),
                ..Default::default()
            },
        ];
        assert_eq!(
            symbol_gaps(&s),
            vec!["no symbols for /usr/local/bin/app (build id ab12): install its debug info, or pass --debuginfod URL"]
        );
        assert!(text(&s, 10, false).contains("no symbols for /usr/local/bin/app (build id ab12)"));
        s.mappings = vec![app(Some(SYMBOLS_PENDING), 0x401000)];
        assert!(symbol_gaps(&s)[0].starts_with("no symbols yet for /usr/local/bin/app"));
        s.mappings = vec![app(None, 0x401000)];
        assert!(symbol_gaps(&s).is_empty(), "its own symbols");
    }

    #[test]
    fn text_report_ranks_sites_with_shares() {
        let r = text(&snap(), 10, false);
        assert!(r.contains("live heap: 3.0 KiB in 3 allocations"), "{r}");
        assert!(r.contains("explains 0.3% of it"), "{r}");
        let lines: Vec<&str> = r.lines().collect();
        let first = lines
            .iter()
            .position(|l| l.contains("leak_malloc (leak.c:12)"))
            .unwrap();
        assert!(
            lines[first].contains("2.0 KiB")
                && lines[first].contains("66.7%")
                && lines[first].contains("5.1s"),
            "{}",
            lines[first]
        );
        assert!(lines[first + 1].contains("main (leak.c:30)"));
        assert!(r.contains("[unknown stack]"));
        assert!(
            !r.contains("tmp (leak.c:3)"),
            "stacks with nothing live are not listed"
        );
        let r1 = text(&snap(), 1, false);
        assert!(!r1.contains('\x1b'), "no colour when asked for none");
        assert!(text(&snap(), 1, true).contains("\x1b[1;36mleak_malloc"));
        assert!(r1.contains("1 more sites"));
    }

    #[test]
    fn diff_reports_growth_first() {
        let old = snap();
        let mut new = snap();
        new.stacks[0].live_bytes = 10240;
        new.stacks[0].live_allocations = 10;
        new.totals.live_bytes = 11264;
        new.totals.live_allocations = 11;
        let d = crate::model::diff(&old, &new);
        let t = diff_text(&d, 10, false);
        assert!(
            t.contains("live heap change: +8.0 KiB (+8 allocations)"),
            "{t}"
        );
        let row = t.lines().find(|l| l.contains("leak_malloc")).unwrap();
        assert!(
            row.contains("+8.0 KiB") && row.contains("grew") && row.contains("+8"),
            "{row}"
        );
        let v: serde_json::Value = serde_json::from_str(&diff_json(&d, 10)).unwrap();
        assert_eq!(v["format"], "heapbpf-diff");
        assert_eq!(v["entries"][0]["delta_bytes"], 8192);
        assert_eq!(v["entries"][0]["status"], "grew");
        assert_eq!(v["totals"]["delta_bytes"], 8192);
    }

    #[test]
    fn json_report_is_machine_readable() {
        let v: serde_json::Value = serde_json::from_str(&json(&snap(), 1)).unwrap();
        assert_eq!(v["stacks"].as_array().unwrap().len(), 1);
        assert_eq!(v["stacks"][0]["live_bytes"], 2048);
        assert_eq!(v["stacks"][0]["frames"][0]["function"], "leak_malloc");
        assert_eq!(v["totals"]["live_bytes"], 3072);
        assert_eq!(v["stacks"][0]["truncated"], false);
    }

    #[test]
    fn text_a_target_controls_is_escaped() {
        let mut s = snap();
        s.comm = "\x1b[2Jx\ny".into();
        s.exe = "/tmp/\x1b]0;t\x07".into();
        s.taken_at = "\u{9b}31m".into();
        s.stacks[0].frames[0].function = Some("\x1b]8;;http://x\x07f\rg".into());
        s.stacks[0].frames[1].module = Some("/x/\nm".into());
        s.stacks[0].frames[1].file = None;
        let no_controls = |t: &str| {
            t.lines()
                .all(|l| !l.chars().any(|c| c.is_control() && c != '\x1b'))
        };
        let r = text(&s, 10, false);
        assert!(
            !r.contains(['\x1b', '\r', '\u{9b}']) && no_controls(&r),
            "{r}"
        );
        assert!(r.contains("(\\x1b[2Jx\\ny) /tmp/\\x1b]0;t\\x07"), "{r}");
        assert!(r.contains("taken \\u{9b}31m"), "{r}");
        assert!(r.contains("\\x1b]8;;http://x\\x07f\\rg (leak.c:12)"), "{r}");
        assert!(r.contains("main (\\nm)"), "{r}");
        // With colour, the only escapes are heapbpf's own.
        let c = text(&s, 10, true);
        assert!(!c.contains("\x1b]") && !c.contains("\x1b[2J"), "{c:?}");
        let d = crate::model::diff(&snap(), &s);
        let t = diff_text(&d, 10, false);
        assert!(
            !t.contains(['\x1b', '\r', '\u{9b}']) && no_controls(&t),
            "{t}"
        );
        assert!(t.contains("/tmp/\\x1b]0;t\\x07 taken \\u{9b}31m"), "{t}");
    }

    #[test]
    fn truncated_stacks_are_said_to_be() {
        let r = text(&snap(), 10, false);
        assert!(
            r.contains("1 of 3 stacks are truncated (1.0 KiB live)"),
            "{r}"
        );
        assert_eq!(r.matches("[truncated]").count(), 1, "{r}");
    }
}
