//! heapbpf: live-heap profiling of running processes with eBPF.
//!
//! Data flows one way:
//!
//! 1. [`allocator`] decides what to hook in a target — its allocator, found
//!    from its memory map, and the entry points of that allocator — as a
//!    plain [`allocator::AttachPlan`]; [`elf`] reads the symbol tables and
//!    places each probe ([`elf::placement`]); [`unwind`] turns call-frame
//!    information into the rows the kernel's stack walk reads.
//! 2. [`ebpf`] (the only module that names aya or calls `bpf(2)`) loads the
//!    programs, applies the plan, keeps the walk's tables, and reads the
//!    kernel maps out as plain [`model::KernelData`].
//! 3. [`model`] (pure) aggregates that into a [`model::RawSnapshot`]: stacks
//!    as addresses with exact per-stack figures; [`symbolize`] (the only
//!    module that names blazesym) turns addresses into frames, through file
//!    handles kept open on every module the target mapped, so a target that
//!    has exited is still fully symbolized; a stripped module is symbolized
//!    from its separate debug info, which [`debuginfo`] finds (build id,
//!    `.gnu_debuglink`) or downloads (debuginfod). The result is the
//!    canonical [`model::Snapshot`].
//! 4. [`output`] writes it in each format ([`output::writer`] owns names,
//!    safe publishing and retention) and reads it back; [`report`] renders
//!    snapshots and diffs for people.
//! 5. [`engine`] holds the target lifecycle — attach, refresh, triggers,
//!    snapshot, exit, detach — and [`commands`] are the front ends over it
//!    (`attach`, `run`) and over files (`report`, `diff`); [`cli`] (the
//!    only module that names clap) turns flags into their plain config;
//!    [`lines`] words the contract's stderr lines. [`agent`] is the node
//!    agent: a front end that selects processes, keeps them within a CPU
//!    budget and serves their heaps over HTTP.
//!
//! Everything after the kernel data is pure and unit-tested without
//! privileges.

pub mod agent;
pub mod allocator;
pub mod cli;
pub mod commands;
pub mod debuginfo;
pub mod ebpf;
pub mod elf;
pub mod engine;
pub mod error;
pub mod launch;
pub mod lines;
pub mod model;
pub mod output;
pub mod procfs;
pub mod report;
pub mod symbolize;
pub mod trigger;
pub mod units;
pub mod unwind;

pub use error::{Error, Result};
