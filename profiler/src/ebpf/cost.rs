//! What heapbpf's probes cost, for the agent's CPU budget: each target's
//! probe hits (the `HITS` map: entries and frees apart from returns), the
//! run time per run of heapbpf's programs (`BPF_ENABLE_STATS`), and the cost
//! of a trap alone, calibrated on this machine with empty programs on a
//! function of heapbpf's own process.
use std::{num::NonZeroU32, time::Instant};

use aya::{
    maps::PerCpuArray,
    programs::{
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
        UProbe,
    },
};
use heapbpf_common::{hit, names::maps, HIT_SLOTS};

use super::{programs, sys, Profiler};
use crate::error::{Error, Result};

/// Probe hits of a target since it was attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hits {
    /// Entry probes: allocating calls' entries and frees.
    pub entries: u64,
    /// Return probes: uretprobes and sessions' return halves.
    pub returns: u64,
}

impl Hits {
    pub fn since(self, earlier: Hits) -> Hits {
        Hits {
            entries: self.entries.saturating_sub(earlier.entries),
            returns: self.returns.saturating_sub(earlier.returns),
        }
    }
}

/// What one trap costs the traced thread, with an empty program: measured
/// by [`Profiler::calibrate_traps`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrapCost {
    pub entry_ns: f64,
    /// A uretprobe's return (a session's return half costs about as much
    /// or less: this errs on the safe side).
    pub return_ns: f64,
}

/// Run time and runs of heapbpf's programs, all summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    pub run_time_ns: u64,
    pub runs: u64,
}

/// The function the calibration probes: in heapbpf's own executable, never
/// inlined, doing next to nothing. On x86-64 it starts with a `nop`, which
/// the kernel emulates as it does the instructions heapbpf's probes sit on
/// in allocators (see `elf::placement`): a trap, not a single step.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn heapbpf_calibration_point(x: u64) -> u64 {
    core::arch::naked_asm!("nop", "lea rax, [rdi + 1]", "ret")
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn heapbpf_calibration_point(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_add(1)
}

/// Calls of the probed function per timed run, and runs per figure.
const CALIBRATION_CALLS: u64 = 20_000;
const CALIBRATION_RUNS: usize = 5;

impl Profiler {
    /// Gives `pid` a slot in `HITS`, remembering what the slot counted
    /// already (a slot is reused after its target leaves). 0: none free.
    pub(super) fn take_hit_slot(&self) -> u32 {
        (1..HIT_SLOTS)
            .find(|s| !self.targets.values().any(|t| t.hit_slot == *s))
            .unwrap_or(0)
    }

    /// What `HITS` holds for `slot`, summed over the CPUs.
    pub(super) fn slot_hits(&self, slot: u32) -> Option<Hits> {
        if slot == 0 {
            return None;
        }
        let map = PerCpuArray::<_, u64>::try_from(self.map(maps::HITS).ok()?).ok()?;
        let read = |kind: u32| -> Option<u64> {
            map.get(&(slot * hit::KINDS + kind), 0)
                .ok()
                .map(|v| v.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Some(Hits {
            entries: read(hit::ENTRY)?,
            returns: read(hit::RETURN)?,
        })
    }

    /// The probe hits of `pid` since it was attached (`None` when it has no
    /// slot: more than [`HIT_SLOTS`] targets).
    pub fn hits(&self, pid: u32) -> Option<Hits> {
        let t = self.targets.get(&pid)?;
        Some(self.slot_hits(t.hit_slot)?.since(t.hits_at_attach))
    }

    /// Counts the probe hits of targets attached from now on (a slot in
    /// `HITS` each); without it (`attach`, `run`: no budget) probes carry
    /// slot 0 and count nothing.
    pub fn count_hits(&mut self) {
        self.count_hits = true;
    }

    /// Turns on the kernel's run-time statistics of BPF programs for as
    /// long as this profiler lives (a little cost on every BPF program of
    /// the machine: two clock reads a run). `false` when the kernel refuses.
    pub fn enable_run_stats(&mut self) -> bool {
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => {
                self.run_stats_fd = Some(fd);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "BPF run-time statistics unavailable; the CPU budget counts the traps alone (calibrated)");
                false
            }
        }
    }

    /// Run time and runs of heapbpf's probe programs since they were loaded
    /// (while statistics are on); `None` when statistics are off.
    pub fn run_stats(&self) -> Option<RunStats> {
        self.run_stats_fd.as_ref()?;
        let mut total = RunStats::default();
        for name in programs::uprobes() {
            if name == programs::NOOP_ENTER || name == programs::NOOP_RETURN {
                continue;
            }
            let Some(prog) = self
                .ebpf
                .program(name)
                .and_then(|p| <&UProbe>::try_from(p).ok())
            else {
                continue;
            };
            if let Ok(info) = prog.info() {
                total.run_time_ns += info.run_time().as_nanos() as u64;
                total.runs += info.run_count();
            }
        }
        if let Some(sessions) = &self.sessions {
            for (_, fd) in sessions.programs() {
                if let Ok((time, runs)) = sys::prog_run_stats(fd) {
                    total.run_time_ns += time;
                    total.runs += runs;
                }
            }
        }
        Some(total)
    }

    /// Measures what a trap costs here: [`heapbpf_calibration_point`]
    /// called [`CALIBRATION_CALLS`] times bare, with an empty uprobe, and
    /// with an empty uprobe and uretprobe; the median of
    /// [`CALIBRATION_RUNS`] runs each, interleaved.
    pub fn calibrate_traps(&mut self) -> Result<TrapCost> {
        let (path, offset) = own_function_offset(heapbpf_calibration_point as *const () as usize)
            .ok_or_else(|| {
            Error::Runtime("cannot find heapbpf's own code in /proc/self/maps".into())
        })?;
        let pid =
            NonZeroU32::new(std::process::id()).ok_or_else(|| Error::Runtime("no pid".into()))?;
        let time = || {
            let started = Instant::now();
            let mut x = 0;
            for _ in 0..CALIBRATION_CALLS {
                x = heapbpf_calibration_point(x);
            }
            std::hint::black_box(x);
            started.elapsed().as_nanos() as f64 / CALIBRATION_CALLS as f64
        };
        let mut bare = Vec::new();
        let mut entry = Vec::new();
        let mut both = Vec::new();
        for _ in 0..CALIBRATION_RUNS {
            bare.push(time());
            let e = self.attach_own(programs::NOOP_ENTER, &path, offset, pid)?;
            entry.push(time());
            let r = match self.attach_own(programs::NOOP_RETURN, &path, offset, pid) {
                Ok(r) => r,
                Err(err) => {
                    self.detach_own(programs::NOOP_ENTER, e);
                    return Err(err);
                }
            };
            both.push(time());
            self.detach_own(programs::NOOP_RETURN, r);
            self.detach_own(programs::NOOP_ENTER, e);
        }
        let (bare, entry, both) = (median(bare), median(entry), median(both));
        let cost = TrapCost {
            entry_ns: (entry - bare).max(0.0),
            return_ns: (both - entry).max(0.0),
        };
        tracing::debug!(
            bare_ns = bare,
            entry_ns = cost.entry_ns,
            return_ns = cost.return_ns,
            "trap cost calibrated"
        );
        Ok(cost)
    }

    fn attach_own(
        &mut self,
        program: &str,
        path: &std::path::Path,
        offset: u64,
        pid: NonZeroU32,
    ) -> Result<aya::programs::uprobe::UProbeLinkId> {
        let prog: &mut UProbe = self
            .ebpf
            .program_mut(program)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| Error::Runtime(format!("no uprobe program {program}")))?;
        let point = UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(offset),
            cookie: None,
        };
        prog.attach(point, path, UProbeScope::OneProcess(pid))
            .map_err(|e| Error::runtime("cannot calibrate the cost of a trap", e))
    }

    fn detach_own(&mut self, program: &str, link: aya::programs::uprobe::UProbeLinkId) {
        if let Some(prog) = self
            .ebpf
            .program_mut(program)
            .and_then(|p| <&mut UProbe>::try_from(p).ok())
        {
            let _ = prog.detach(link);
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The file and file offset of address `addr` of this process's code.
fn own_function_offset(addr: usize) -> Option<(std::path::PathBuf, u64)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let addr = addr as u64;
    maps.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (start, end) = f.next()?.split_once('-')?;
        let (start, end) = (
            u64::from_str_radix(start, 16).ok()?,
            u64::from_str_radix(end, 16).ok()?,
        );
        let perms = f.next()?;
        let offset = u64::from_str_radix(f.next()?, 16).ok()?;
        let path = f.nth(2)?;
        (addr >= start && addr < end && perms.contains('x') && path.starts_with('/'))
            .then(|| (path.into(), addr - start + offset))
    })
}
