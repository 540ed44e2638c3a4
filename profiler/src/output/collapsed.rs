//! Folded stacks (`main;worker;leak_malloc 4096000`), root first, weighted
//! by live bytes: the input of flamegraph.pl, inferno and speedscope.
use crate::model::{Diff, Frame, Snapshot};

/// A frame's name in folded output. `;` separates frames and a newline
/// stacks, so neither may appear inside a name (control characters are
/// written out, as heapbpf prints them: `\n`, `\x1b`); the count follows
/// the last space.
pub fn frame_name(f: &Frame) -> String {
    let name = match &f.function {
        Some(func) => {
            if f.inlined {
                format!("{func}_[i]")
            } else {
                func.clone()
            }
        }
        None => {
            let module = f
                .module
                .as_deref()
                .map(crate::model::basename)
                .unwrap_or("?");
            format!("[unknown] {module}@{}", f.address)
        }
    };
    crate::lines::escape(&name).replace(';', ":")
}

/// A stack's frame names in folded output, root first.
pub fn folded_frames(frames: &[Frame]) -> Vec<String> {
    if frames.is_empty() {
        return vec!["[unknown stack]".into()];
    }
    frames.iter().rev().map(frame_name).collect()
}

fn folded_stack(frames: &[Frame]) -> String {
    folded_frames(frames).join(";")
}

/// One line per stack with live bytes, largest first (the snapshot's order).
pub fn to_string(s: &Snapshot) -> String {
    let mut out = String::new();
    for st in s.stacks.iter().filter(|st| st.live_bytes > 0) {
        out.push_str(&folded_stack(&st.frames_with_root()));
        out.push(' ');
        out.push_str(&st.live_bytes.to_string());
        out.push('\n');
    }
    out
}

/// Differential folded stacks (`stack OLD NEW`), as inferno's
/// differential mode writes them: the input of a differential flamegraph.
pub fn diff_to_string(d: &Diff) -> String {
    let mut out = String::new();
    for e in &d.entries {
        if e.old_bytes == 0 && e.new_bytes == 0 {
            continue;
        }
        out.push_str(&format!(
            "{} {} {}\n",
            folded_stack(&e.frames),
            e.old_bytes,
            e.new_bytes
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_break_the_folded_format() {
        let f = Frame {
            function: Some("a;b\nc\r\x1b]0;t\x07".into()),
            ..Default::default()
        };
        assert_eq!(frame_name(&f), "a:b\\nc\\r\\x1b]0:t\\x07");
        let unresolved = Frame {
            module: Some("/tmp/x\ny;z.so".into()),
            ..Default::default()
        };
        let name = frame_name(&unresolved);
        assert!(name.starts_with("[unknown] x\\ny:z.so@"), "{name}");
    }
}
