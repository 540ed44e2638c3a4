//! Sampling (`--sample-bytes R`) is Poisson sampling by bytes: sample points
//! fall on the stream of allocated bytes as a Poisson process of rate 1/R.
//! Points in disjoint byte ranges are independent, so each allocation of
//! size s holds at least one point — is sampled — independently, with
//! probability p = 1 - exp(-s/R), and then stands for s/p bytes and 1/p
//! allocations, which makes every estimate unbiased. No per-thread state is
//! needed: one random number per call.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use heapbpf_common::{config, COUNT_UNIT, SAMPLE_TABLE_LEN, SAMPLE_TABLE_STEPS};

use crate::maps::{CONFIG, SAMPLE_P};

/// Bits of `x` (`size / rate` in units of 2^-16, in [`sample_p`]) below one
/// step of the table, which has `SAMPLE_TABLE_STEPS` steps per unit: 8.
const STEP_SHIFT: u32 = 16 - SAMPLE_TABLE_STEPS.trailing_zeros();
const _: () = assert!(SAMPLE_TABLE_STEPS.is_power_of_two() && SAMPLE_TABLE_STEPS < 1 << 16);

/// The sampling rate R (mean bytes between samples); 0 = exact.
#[inline(always)]
pub(crate) fn sample_bytes() -> u64 {
    CONFIG.get(config::SAMPLE_BYTES).copied().unwrap_or(0)
}

/// Probability that an allocation of `size` bytes is sampled, in units of
/// 2^-32 (`u32::MAX` and above: always).
#[inline(always)]
fn sample_p(size: u64, rate: u64) -> u64 {
    if rate == 0 || size >= 16 * rate {
        return 1 << 32;
    }
    // x = size / rate in units of 2^-16.
    // checked_div: a plain `/` leaves a panic path the verifier rejects.
    let x = (size << 16).checked_div(rate).unwrap_or(0);
    let i = x >> STEP_SHIFT; // table steps of 1 / SAMPLE_TABLE_STEPS
    if i == 0 {
        // p = x - x^2/2 + ..., exact enough below one step.
        return (x << 16).saturating_sub((x * x) >> 1).max(1);
    }
    let frac = x & ((1 << STEP_SHIFT) - 1);
    let lo = SAMPLE_P.get(i as u32).copied().unwrap_or(u32::MAX) as u64;
    let hi = if (i as u32) + 1 < SAMPLE_TABLE_LEN {
        SAMPLE_P.get(i as u32 + 1).copied().unwrap_or(u32::MAX) as u64
    } else {
        lo
    };
    (lo + (((hi.saturating_sub(lo)) * frac) >> STEP_SHIFT)).max(1)
}

/// The weight of a sampled block: (bytes, allocations in COUNT_UNITs).
#[inline(always)]
pub(crate) fn weight(size: u64, rate: u64) -> (u64, u64) {
    let p = sample_p(size, rate);
    if p >= 1 << 32 {
        return (size, COUNT_UNIT);
    }
    // size < 16 * rate <= 2^30, so size << 32 fits.
    (
        (size << 32).checked_div(p).unwrap_or(size),
        (COUNT_UNIT << 32).checked_div(p).unwrap_or(COUNT_UNIT),
    )
}

/// Whether an allocation of `size` bytes is sampled (one random number).
#[inline(always)]
pub(crate) fn sampled(size: u64, rate: u64) -> bool {
    let p = sample_p(size, rate);
    // SAFETY: the helper takes no arguments and touches no memory of ours.
    p >= 1 << 32 || (unsafe { bpf_get_prandom_u32() } as u64) < p
}
