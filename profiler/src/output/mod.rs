//! Snapshot files: one module per format (plain functions over
//! [`crate::model`] data), and [`writer`], which owns naming, safe
//! publishing and retention.
pub mod collapsed;
pub mod json;
pub mod pprof;
pub mod svg;
pub mod writer;

use crate::error::Result;

/// The output formats of `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Pprof,
    Collapsed,
    Svg,
}

/// `--format` when none is given.
pub const DEFAULT_FORMATS: &str = "json,pprof";

impl Format {
    pub fn ext(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Pprof => "pb.gz",
            Format::Collapsed => "collapsed",
            Format::Svg => "svg",
        }
    }

    /// The file contents of a snapshot in this format.
    pub fn render(self, s: &crate::model::Snapshot) -> Result<Vec<u8>> {
        Ok(match self {
            Format::Json => json::to_bytes(s),
            Format::Pprof => pprof::to_bytes(s),
            Format::Collapsed => collapsed::to_string(s).into_bytes(),
            Format::Svg => svg::to_bytes(s)?,
        })
    }

    /// Parses a `--format` list. Formats of the contract that do not exist
    /// yet are refused by name.
    pub fn parse_list(text: &str) -> Result<Vec<Format>, String> {
        let mut out = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let f = match item {
                "json" => Format::Json,
                "pprof" => Format::Pprof,
                "collapsed" => Format::Collapsed,
                "svg" => Format::Svg,
                other => {
                    return Err(format!(
                        "unknown format {other:?}: expected a comma list of json, pprof, collapsed, svg"
                    ))
                }
            };
            if !out.contains(&f) {
                out.push(f);
            }
        }
        if out.is_empty() {
            return Err("--format needs at least one format, e.g. json".into());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_lists() {
        assert_eq!(Format::parse_list("json"), Ok(vec![Format::Json]));
        assert_eq!(Format::parse_list("json,json"), Ok(vec![Format::Json]));
        assert_eq!(
            Format::parse_list("json,pprof,collapsed,svg"),
            Ok(vec![
                Format::Json,
                Format::Pprof,
                Format::Collapsed,
                Format::Svg
            ])
        );
        assert!(Format::parse_list("xml")
            .unwrap_err()
            .contains("unknown format"));
        assert!(Format::parse_list("").is_err());
    }
}
