//! heapbpf: live-heap profiling of running processes with eBPF.
//!
//! Data flows one way:
//!
//! 1. [`ebpf`] (the only module that talks to aya and the kernel) loads the
//!    uprobes, attaches them to each target's allocator and drains the kernel
//!    maps into a [`model::RawSnapshot`]: stacks as addresses, with exact
//!    per-stack figures.
//! 2. [`symbolize`] (the only module that names blazesym) turns addresses into
//!    frames, using file handles kept open on every module the target mapped,
//!    so a target that has exited is still fully symbolized.
//! 3. [`model`] builds the [`model::Snapshot`], the canonical plain-data form;
//!    [`output`] writes it (JSON, atomically) and reads it back; [`report`]
//!    renders it for people.
//! 4. [`session`] orchestrates: attach, then snapshots on signals, duration
//!    and target exit.
//!
//! Everything after the raw snapshot is pure and unit-tested without
//! privileges.

pub mod cli;
pub mod ebpf;
pub mod elf;
pub mod error;
pub mod launch;
pub mod model;
pub mod output;
pub mod procfs;
pub mod report;
pub mod session;
pub mod symbolize;
pub mod trigger;
pub mod units;
pub mod unwind;

pub use error::{Error, Result};
