//! Interactive flamegraphs of live bytes, drawn by inferno, bounded by what
//! a person can see: stacks narrower than a pixel are merged into one
//! `[other]` frame under the widest frame they share with visible stacks,
//! so the picture's size follows its width, not the target's stack count.
use inferno::flamegraph::{self, Options};

use crate::{
    error::{Error, Result},
    lines::escape,
    model::{Diff, Snapshot},
    units::human_bytes,
};

use super::collapsed;

/// inferno's default image width: stacks narrower than one of its pixels
/// (a share below 1/1200 of the total) are merged into `[other]`.
const IMAGE_WIDTH_PX: u64 = 1200;

/// The name of the frame that stands for the stacks merged under a frame.
pub const OTHER: &str = "[other]";

/// One stack for the flamegraph: frame names root first, and its bytes in
/// the old and the new snapshot (only `new` for a single snapshot).
#[derive(Debug)]
struct Line {
    frames: Vec<String>,
    old: u64,
    new: u64,
}

impl Line {
    /// How wide it is drawn: a diff draws NEW, and colours by the change
    /// from OLD, so a stack that shrank away still matters by its OLD.
    fn width(&self) -> u64 {
        self.old.max(self.new)
    }
}

/// Folded input for inferno, with stacks too narrow to see merged.
struct Bounded {
    folded: String,
    /// Stacks merged into `[other]` frames.
    merged: usize,
}

/// Merges the stacks of `lines` narrower than a pixel: at each frame, the
/// children too narrow to draw become one `[other]` child carrying their
/// bytes. Visible frames are at most [`IMAGE_WIDTH_PX`] per depth, so the
/// output is bounded by the picture, not by the number of stacks.
fn bound(mut lines: Vec<Line>, diff: bool) -> Bounded {
    lines.sort_unstable_by(|a, b| a.frames.cmp(&b.frames));
    let total: u128 = lines.iter().map(|l| u128::from(l.width())).sum();
    let mut out = Bounded {
        folded: String::new(),
        merged: 0,
    };
    let mut prefix = Vec::new();
    walk(&lines, 0, total, diff, &mut prefix, &mut out);
    out
}

fn emit(out: &mut String, prefix: &[&str], last: Option<&str>, old: u64, new: u64, diff: bool) {
    let mut first = true;
    for f in prefix.iter().copied().chain(last) {
        if !first {
            out.push(';');
        }
        out.push_str(f);
        first = false;
    }
    if diff {
        out.push_str(&format!(" {old} {new}\n"));
    } else {
        out.push_str(&format!(" {new}\n"));
    }
}

/// `lines` (sorted) all share the frames of `prefix`, `depth` of them.
fn walk<'a>(
    lines: &'a [Line],
    depth: usize,
    total: u128,
    diff: bool,
    prefix: &mut Vec<&'a str>,
    out: &mut Bounded,
) {
    let visible = |width: u128| width * u128::from(IMAGE_WIDTH_PX) >= total;
    let (mut other_old, mut other_new, mut other_stacks) = (0u64, 0u64, 0usize);
    let mut i = 0;
    while i < lines.len() {
        if lines[i].frames.len() == depth {
            // Stacks that end here (sorted first): identical, one line.
            let mut j = i;
            let (mut old, mut new) = (0u64, 0u64);
            while j < lines.len() && lines[j].frames.len() == depth {
                old = old.saturating_add(lines[j].old);
                new = new.saturating_add(lines[j].new);
                j += 1;
            }
            if let Some((last, head)) = prefix.split_last() {
                emit(&mut out.folded, head, Some(last), old, new, diff);
            }
            i = j;
            continue;
        }
        let name = lines[i].frames[depth].as_str();
        let mut j = i;
        let mut width = 0u128;
        while j < lines.len() && lines[j].frames.get(depth).map(String::as_str) == Some(name) {
            width += u128::from(lines[j].width());
            j += 1;
        }
        if visible(width) {
            prefix.push(name);
            walk(&lines[i..j], depth + 1, total, diff, prefix, out);
            prefix.pop();
        } else {
            for l in &lines[i..j] {
                other_old = other_old.saturating_add(l.old);
                other_new = other_new.saturating_add(l.new);
            }
            other_stacks += j - i;
        }
        i = j;
    }
    if other_stacks > 0 {
        emit(
            &mut out.folded,
            prefix,
            Some(OTHER),
            other_old,
            other_new,
            diff,
        );
        out.merged += other_stacks;
    }
}

fn merged_note(merged: usize) -> String {
    match merged {
        0 => String::new(),
        1 => format!("; 1 stack narrower than a pixel is in {OTHER}"),
        n => format!("; {n} stacks narrower than a pixel are merged into {OTHER}"),
    }
}

fn render(opts: &mut Options<'_>, folded: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    if folded.is_empty() {
        // inferno refuses empty input; an empty heap is still a picture.
        let mut lines = vec!["[no live allocations] 1"];
        flamegraph::from_lines(opts, lines.drain(..), &mut out)
            .map_err(|e| Error::runtime("cannot draw the flamegraph", e))?;
        return Ok(out);
    }
    flamegraph::from_lines(opts, folded.lines(), &mut out)
        .map_err(|e| Error::runtime("cannot draw the flamegraph", e))?;
    Ok(out)
}

pub fn to_bytes(s: &Snapshot) -> Result<Vec<u8>> {
    let lines = s
        .stacks
        .iter()
        .filter(|st| st.live_bytes > 0)
        .map(|st| Line {
            frames: collapsed::folded_frames(&st.frames_with_root()),
            old: 0,
            new: st.live_bytes,
        })
        .collect();
    let b = bound(lines, false);
    let mut opts = Options::default();
    opts.title = format!(
        "heapbpf: {} (pid {}) live heap {} in {} allocations, {}",
        escape(&s.comm),
        s.pid,
        human_bytes(s.totals.live_bytes as i128),
        s.totals.live_allocations,
        escape(&s.taken_at)
    );
    opts.subtitle = Some(format!(
        "{} — trigger {}; width = live bytes{}",
        escape(&s.exe),
        s.trigger.as_str(),
        merged_note(b.merged)
    ));
    opts.count_name = "bytes".into();
    opts.colors = flamegraph::color::Palette::Basic(flamegraph::color::BasicPalette::Mem);
    opts.deterministic = true;
    render(&mut opts, &b.folded)
}

/// A differential flamegraph of growth: red grew, blue shrank.
pub fn diff_to_bytes(d: &Diff) -> Result<Vec<u8>> {
    let lines = d
        .entries
        .iter()
        .filter(|e| e.old_bytes > 0 || e.new_bytes > 0)
        .map(|e| Line {
            frames: collapsed::folded_frames(&e.frames),
            old: e.old_bytes,
            new: e.new_bytes,
        })
        .collect();
    let b = bound(lines, true);
    let mut opts = Options::default();
    opts.title = format!(
        "heapbpf diff: live heap {} from {} to {}",
        if d.totals.delta_bytes >= 0 {
            format!("+{}", human_bytes(d.totals.delta_bytes as i128))
        } else {
            human_bytes(d.totals.delta_bytes as i128)
        },
        escape(&d.old.taken_at),
        escape(&d.new.taken_at)
    );
    opts.subtitle = Some(format!(
        "{} (pid {}) → {} (pid {}); width = live bytes in NEW, red grew, blue shrank{}",
        escape(&d.old.exe),
        d.old.pid,
        escape(&d.new.exe),
        d.new.pid,
        merged_note(b.merged)
    ));
    opts.count_name = "bytes".into();
    opts.deterministic = true;
    render(&mut opts, &b.folded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(frames: &str, old: u64, new: u64) -> Line {
        Line {
            frames: frames.split(';').map(String::from).collect(),
            old,
            new,
        }
    }

    /// (folded line → bytes) of a bounded output, for comparisons.
    fn parse(folded: &str) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = folded
            .lines()
            .map(|l| {
                let (stack, n) = l.rsplit_once(' ').unwrap();
                (stack.to_string(), n.parse().unwrap())
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn visible_stacks_stay_and_narrow_ones_merge_under_their_shared_frames() {
        let mut lines = vec![
            line("main;work;big", 0, 600_000),
            line("main;work;big", 0, 1000),
            line("main;work", 0, 300_000),
        ];
        // 500 stacks of 100 bytes under main;work;tiny: each far below a
        // pixel of the 950,000-byte total, together 50,000 (visible).
        for i in 0..500 {
            lines.push(line(&format!("main;work;tiny;t{i}"), 0, 100));
        }
        lines.push(line("main;rare", 0, 100));
        let b = bound(lines, false);
        assert_eq!(
            parse(&b.folded),
            vec![
                ("main;[other]".into(), 100),
                ("main;work".into(), 300_000),
                ("main;work;big".into(), 601_000),
                ("main;work;tiny;[other]".into(), 50_000),
            ]
        );
        assert_eq!(b.merged, 501);
    }

    #[test]
    fn nothing_is_lost_and_nothing_merged_when_every_stack_is_visible() {
        let lines = vec![line("a;b", 0, 10), line("a;c", 0, 20), line("d", 0, 30)];
        let b = bound(lines, false);
        assert_eq!(b.merged, 0);
        assert_eq!(b.folded, "a;b 10\na;c 20\nd 30\n");
    }

    #[test]
    fn a_diff_keeps_both_sides_and_what_shrank_away() {
        let mut lines = vec![
            line("main;gone", 1_000_000, 0),
            line("main;grew", 10, 1_000_000),
        ];
        for i in 0..100 {
            lines.push(line(&format!("main;n{i}"), 1, 2));
        }
        let b = bound(lines, true);
        assert_eq!(
            b.folded,
            "main;gone 1000000 0\nmain;grew 10 1000000\nmain;[other] 100 200\n"
        );
        assert_eq!(b.merged, 100);
    }

    /// The shape of the reproduction: 32,768 distinct stacks, two
    /// functions choosing between each other 15 calls deep.
    fn many_stacks(n_bits: u32) -> Vec<Line> {
        (0..1u64 << n_bits)
            .map(|i| {
                let mut frames = vec!["_start".to_string(), "main".to_string()];
                for bit in 0..n_bits {
                    frames.push(
                        if i >> bit & 1 == 1 {
                            "path_a"
                        } else {
                            "path_b"
                        }
                        .into(),
                    );
                }
                Line {
                    frames,
                    old: 0,
                    // Uneven sizes, as real heaps are.
                    new: 64 + (i % 97) * 4096,
                }
            })
            .collect()
    }

    #[test]
    fn the_flamegraph_of_32k_stacks_is_bounded() {
        let lines = many_stacks(15);
        let total: u64 = lines.iter().map(|l| l.new).sum();
        let unbounded_lines = lines.len();
        let b = bound(lines, false);
        let out = parse(&b.folded);
        assert!(
            out.len() < 2 * IMAGE_WIDTH_PX as usize,
            "{} lines",
            out.len()
        );
        assert!(b.merged > 30_000, "{}", b.merged);
        // Every byte is still drawn somewhere.
        assert_eq!(out.iter().map(|(_, n)| n).sum::<u64>(), total);
        let mut opts = Options::default();
        opts.deterministic = true;
        let svg = render(&mut opts, &b.folded).unwrap();
        assert!(svg.len() < 2 << 20, "{} bytes", svg.len());
        assert!(unbounded_lines > 10 * out.len());
    }
}
