//! Threshold triggers (`--rss-step`, `--heap-step`): pure state machines fed
//! with observed values.

/// Fires once each time a value reaches `base + k*step` for a `k` higher than
/// any reported so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepTrigger {
    base: u64,
    step: u64,
    reported: u64,
}

/// A step crossing: the threshold index reached and how many thresholds were
/// jumped over at once (0 when exactly one was crossed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crossing {
    pub k: u64,
    pub threshold: u64,
    pub skipped: u64,
}

impl StepTrigger {
    pub fn new(base: u64, step: u64) -> Self {
        StepTrigger {
            base,
            step: step.max(1),
            reported: 0,
        }
    }

    pub fn observe(&mut self, value: u64) -> Option<Crossing> {
        let k = value.saturating_sub(self.base) / self.step;
        if k <= self.reported {
            return None;
        }
        let skipped = k - self.reported - 1;
        self.reported = k;
        Some(Crossing {
            k,
            threshold: self.base + k * self.step,
            skipped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_snapshot_per_new_threshold() {
        let mut t = StepTrigger::new(1000, 100);
        assert_eq!(t.observe(1099), None);
        assert_eq!(
            t.observe(1100),
            Some(Crossing {
                k: 1,
                threshold: 1100,
                skipped: 0
            })
        );
        assert_eq!(t.observe(1150), None);
        // A jump over several thresholds writes one snapshot.
        assert_eq!(
            t.observe(1420),
            Some(Crossing {
                k: 4,
                threshold: 1400,
                skipped: 2
            })
        );
        // Falling back and climbing past a reported threshold writes nothing.
        assert_eq!(t.observe(900), None);
        assert_eq!(t.observe(1400), None);
        assert_eq!(
            t.observe(1500),
            Some(Crossing {
                k: 5,
                threshold: 1500,
                skipped: 0
            })
        );
    }
}
