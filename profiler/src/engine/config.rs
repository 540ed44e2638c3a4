//! What the engine is told, as plain data (the CLI converts its flags into
//! this; the agent will build it from its own).
use std::{path::PathBuf, time::Duration};

use crate::{allocator, ebpf::Floor, output::Format, unwind};

/// Everything a profiling run needs to know.
#[derive(Clone, Debug)]
pub struct Config {
    pub output_dir: PathBuf,
    pub formats: Vec<Format>,
    pub duration: Option<Duration>,
    pub interval: Option<Duration>,
    pub rss_step: Option<u64>,
    pub heap_step: Option<u64>,
    /// Mean bytes between sampled allocations; 0 = exact.
    pub sample_bytes: u64,
    pub min_age: Duration,
    pub max_snapshots: Option<usize>,
    /// Live blocks the kernel maps can hold at once (all targets together).
    pub max_live_blocks: u32,
    /// Distinct stacks the kernel maps can hold at once (all targets).
    pub max_stacks: u32,
    /// Benchmark floors: programs that do nothing at the same probe points.
    pub floor: Option<Floor>,
    pub allocator: allocator::Choice,
    pub unwind: unwind::Mode,
    /// Uprobe sessions where the kernel has them.
    pub sessions: bool,
    /// Execs seen by the `sched_process_exec` tracepoint where the kernel
    /// has it (else noticed by the executable changing).
    pub exec_tracepoint: bool,
    /// The agent's `--max-overhead` (a fraction: 0.02 for 2%): what the
    /// probes may cost each target, as a share of its own CPU time; over
    /// it, the target is profiled in windows ([`super::budget`]). `None`
    /// (`attach`, `run`): no budget, every probe attached all the time.
    pub max_overhead: Option<f64>,
    /// Keep each snapshot written for [`super::Engine::take_written`] (the
    /// agent pushes them to a profile store).
    pub keep_written: bool,
    /// Where missing debug info is downloaded from (`--debuginfod`,
    /// `DEBUGINFOD_URLS`), and kept; `None`: only what is installed.
    pub debuginfod: Option<crate::debuginfo::debuginfod::Config>,
}
