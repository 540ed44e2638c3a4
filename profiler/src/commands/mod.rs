//! Front ends: `attach` and `run` over the [`crate::engine`], `report` and
//! `diff` over snapshot files. They take plain config, never clap types.
pub mod attach;

use std::{
    io::{IsTerminal, Write as _},
    path::Path,
};

use crate::{
    error::{Error, Result},
    lines::say,
    model, output, report,
};

/// How `report` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    Text,
    Json,
}

/// How `diff` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffFormat {
    Text,
    Json,
    Collapsed,
    Svg,
}

/// `heapbpf report SNAPSHOT`: the top sites of one snapshot.
pub fn run_report(snapshot: &Path, top: usize, format: ReportFormat) -> Result<()> {
    let snapshot = output::read_snapshot(snapshot)?;
    let text = match format {
        ReportFormat::Text => report::text(&snapshot, top, color_stdout()),
        ReportFormat::Json => report::json(&snapshot, top),
    };
    write_stdout(&text)
}

/// `heapbpf diff OLD NEW`: what grew between two snapshots.
pub fn run_diff(old_path: &Path, new_path: &Path, top: usize, format: DiffFormat) -> Result<()> {
    let old = output::read_snapshot(old_path)?;
    let new = output::read_snapshot(new_path)?;
    let d = model::diff(&old, &new);
    if d.different_executables() {
        say(&format!(
            "warning: {} is of {} and {} of {}; stacks are matched by module and function names",
            old_path.display(),
            d.old.exe,
            new_path.display(),
            d.new.exe
        ));
    }
    let text = match format {
        DiffFormat::Json => report::diff_json(&d, top),
        DiffFormat::Text => report::diff_text(&d, top, color_stdout()),
        // Flamegraphs show every stack, not just the top N.
        DiffFormat::Collapsed => output::collapsed::diff_to_string(&d),
        DiffFormat::Svg => String::from_utf8_lossy(&output::svg::diff_to_bytes(&d)?).into_owned(),
    };
    write_stdout(&text)
}

/// Colour only for people: stdout is a terminal and NO_COLOR is unset.
fn color_stdout() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

fn write_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()) {
        Ok(()) => Ok(()),
        // `heapbpf report x | head` is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::runtime("cannot write the report", e)),
    }
}
