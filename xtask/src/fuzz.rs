//! `cargo xtask fuzz`: each fuzz target of `profiler/fuzz` (cargo-fuzz,
//! libFuzzer, nightly) for a bounded time. The seeds in
//! `profiler/fuzz/corpus/TARGET` are read, never written: what a run finds
//! goes to `target/fuzz/corpus/TARGET`, so the repository's corpus stays
//! small. A crash fails the run and leaves its input in
//! `profiler/fuzz/artifacts/TARGET/`.
use std::process::Command;

use anyhow::{bail, Result};
use clap::Args;

use crate::{output, root, run};

/// The fuzz targets, each a reader of text heapbpf does not control.
pub const TARGETS: &[&str] = &[
    "snapshot_json",
    "snapshot_pprof",
    "proc_maps",
    "perf_map",
    "units",
];

const CARGO_FUZZ_VERSION: &str = "0.13.2";

#[derive(Args)]
pub struct FuzzArgs {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u32,
    /// Targets to run (default: all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
}

impl FuzzArgs {
    /// The short pass of `cargo xtask test`: about a minute in all.
    pub fn short() -> Self {
        FuzzArgs {
            seconds: 12,
            targets: Vec::new(),
        }
    }
}

/// Installs cargo-fuzz unless this version is there (idempotent).
fn ensure_cargo_fuzz() -> Result<()> {
    let have = output(Command::new("cargo").args(["fuzz", "--version"])).unwrap_or_default();
    if !have.contains(CARGO_FUZZ_VERSION) {
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    Ok(())
}

pub fn run_fuzz(args: FuzzArgs) -> Result<()> {
    if args.seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    ensure_cargo_fuzz()?;
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    let root = root();
    for target in targets {
        let found = root.join("target/fuzz/corpus").join(target);
        std::fs::create_dir_all(&found)?;
        run(Command::new("cargo")
            .current_dir(&root)
            .args(["+nightly", "fuzz", "run", "--fuzz-dir", "profiler/fuzz"])
            .args(["--target-dir", "target/fuzz", target])
            .arg(&found)
            .arg(root.join("profiler/fuzz/corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            // An input that takes this long is a finding too.
            .arg("-timeout=10")
            // The fuzz targets need no eBPF object.
            .env("HEAPBPF_SKIP_EBPF", "1"))?;
    }
    eprintln!("xtask: every fuzz target ran without a finding");
    Ok(())
}
