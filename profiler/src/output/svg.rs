//! Interactive flamegraphs of live bytes, drawn by inferno.
use inferno::flamegraph::{self, Options};

use crate::{
    error::{Error, Result},
    lines::escape,
    model::{Diff, Snapshot},
    units::human_bytes,
};

use super::collapsed;

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
        "{} — trigger {}; width = live bytes",
        escape(&s.exe),
        s.trigger.as_str()
    ));
    opts.count_name = "bytes".into();
    opts.colors = flamegraph::color::Palette::Basic(flamegraph::color::BasicPalette::Mem);
    opts.deterministic = true;
    render(&mut opts, &collapsed::to_string(s))
}

/// A differential flamegraph of growth: red grew, blue shrank.
pub fn diff_to_bytes(d: &Diff) -> Result<Vec<u8>> {
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
        "{} (pid {}) → {} (pid {}); width = live bytes in NEW, red grew, blue shrank",
        escape(&d.old.exe),
        d.old.pid,
        escape(&d.new.exe),
        d.new.pid
    ));
    opts.count_name = "bytes".into();
    opts.deterministic = true;
    render(&mut opts, &collapsed::diff_to_string(d))
}
