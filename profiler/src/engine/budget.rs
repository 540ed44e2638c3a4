//! The CPU budget of one target (`heapbpf agent --max-overhead`): a pure
//! controller, fed what the target's probes cost and what CPU time the
//! target used, period after period; it says which probes should be
//! attached. No clock, no kernel: [`super::Engine`] measures and applies.
//!
//! A target whose probes fit the budget stays attached all the time
//! (*continuous*). Over it, sampling does not help (every call still traps),
//! so the target is profiled in *windows*, one cycle after another:
//!
//! - **ON**: every probe attached; allocations are recorded.
//! - **FOLLOW**: only the free probes, for [`Params::follow`]: blocks that
//!   the window allocated and that are freed soon after it leave the live
//!   set, so what stays live is what lasted (the leak signal).
//! - **OFF**: nothing attached; the kernel keeps what it holds.
//!
//! The ON length and the cycle are chosen so that the average overhead over
//! a cycle is [`Params::margin`] of the budget; the overhead at full
//! attachment is measured in every ON window, and when it would fit under
//! [`Params::resume_below`] of the budget, the target is attached
//! continuously again. A mode is kept at least [`Params::min_dwell`], so
//! that a target near its budget does not flap.
//!
//! Overhead is the probes' cost as a share of the target's *own* CPU time:
//! the CPU time the kernel charges a target includes its traps, so the
//! cost is taken off it first.
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// The probes a target has attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Allocation and free probes.
    All,
    /// Free probes only (FOLLOW).
    FreesOnly,
    /// None (OFF).
    Nothing,
}

/// Where a target is in its cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Attached all the time: the budget is met.
    Continuous,
    On,
    Follow,
    Off,
}

impl Phase {
    pub fn attachment(self) -> Attachment {
        match self {
            Phase::Continuous | Phase::On => Attachment::All,
            Phase::Follow => Attachment::FreesOnly,
            Phase::Off => Attachment::Nothing,
        }
    }
}

/// The controller's constants.
#[derive(Clone, Debug)]
pub struct Params {
    /// Shortest and longest ON window.
    pub min_on: Duration,
    pub max_on: Duration,
    /// FOLLOW after each window.
    pub follow: Duration,
    /// The cycle aimed at when the budget allows a window between
    /// `min_on` and `max_on` in it.
    pub nominal_cycle: Duration,
    /// The longest cycle: past it, the budget is not met (the target would
    /// not be seen at all), and the overhead reported says so.
    pub max_cycle: Duration,
    /// Windows are planned for this share of the budget (measurement noise,
    /// a target whose rate changes).
    pub margin: f64,
    /// Back to continuous when full attachment would cost under this share
    /// of the budget.
    pub resume_below: f64,
    /// Least target CPU time measured before an overhead is believed.
    pub min_cpu: Duration,
    /// Measurements are averaged over about this much target CPU time (older
    /// ones weigh half each time it is passed).
    pub memory_cpu: Duration,
    /// Least time in a mode before switching back.
    pub min_dwell: Duration,
    /// Recent windows kept (for snapshots).
    pub max_windows: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            min_on: Duration::from_millis(200),
            max_on: Duration::from_secs(2),
            follow: Duration::from_millis(300),
            nominal_cycle: Duration::from_secs(3),
            max_cycle: Duration::from_secs(30),
            margin: 0.8,
            resume_below: 0.6,
            min_cpu: Duration::from_millis(100),
            memory_cpu: Duration::from_secs(2),
            min_dwell: Duration::from_secs(10),
            max_windows: 16,
        }
    }
}

/// One period's measurement: the target's CPU time (as the kernel charges
/// it, traps included) and what its probes cost in it, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    pub cpu_ns: f64,
    pub cost_ns: f64,
}

/// A change of mode worth one line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Change {
    /// Over budget: profiled in windows of `on` every `cycle`; `overhead` is
    /// what full attachment costs.
    Windowed {
        overhead: f64,
        on: Duration,
        cycle: Duration,
    },
    /// Full attachment fits again (`overhead` is its measured cost).
    Continuous { overhead: f64 },
}

/// A stretch of time when allocation probes were attached, as offsets from
/// the controller's start (attach); `end` is `None` while it lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: Duration,
    pub end: Option<Duration>,
}

/// Cost and CPU time summed, older figures halved as they pile up.
#[derive(Clone, Copy, Debug, Default)]
struct Acc {
    cost_ns: f64,
    cpu_ns: f64,
}

impl Acc {
    fn add(&mut self, s: Sample, memory_ns: f64) {
        self.cost_ns += s.cost_ns;
        self.cpu_ns += s.cpu_ns;
        while self.cpu_ns > 2.0 * memory_ns {
            self.cost_ns /= 2.0;
            self.cpu_ns /= 2.0;
        }
    }

    /// Cost over own CPU time, once `min_ns` of CPU time is measured.
    fn overhead(&self, min_ns: f64) -> Option<f64> {
        (self.cpu_ns >= min_ns).then(|| overhead(self.cost_ns, self.cpu_ns))
    }
}

/// `cost` as a share of `cpu - cost` (the target's own time); a cost as
/// large as the CPU time measured (clock-tick rounding) counts as 100×.
fn overhead(cost_ns: f64, cpu_ns: f64) -> f64 {
    let own = cpu_ns - cost_ns;
    if cost_ns <= 0.0 {
        0.0
    } else if own <= cost_ns / 100.0 {
        100.0
    } else {
        cost_ns / own
    }
}

/// ON length and the OFF after FOLLOW, in windowed mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub on: Duration,
    pub off: Duration,
}

/// The controller of one target.
#[derive(Clone, Debug)]
pub struct Governor {
    p: Params,
    budget: f64,
    started: Instant,
    last: Instant,
    phase: Phase,
    phase_since: Instant,
    /// When it last went windowed or continuous.
    mode_since: Option<Instant>,
    plan: Plan,
    /// Measured with every probe attached, with frees only, and overall.
    full: Acc,
    frees: Acc,
    all: Acc,
    /// Time allocation probes were attached in closed windows.
    covered: Duration,
    windows: VecDeque<Window>,
}

impl Governor {
    /// A target attached (all its probes) at `now`, with budget `budget`
    /// (a fraction: 0.02 for 2%).
    pub fn new(budget: f64, p: Params, now: Instant) -> Self {
        let plan = Plan {
            on: p.max_on,
            off: Duration::ZERO,
        };
        Governor {
            p,
            budget,
            started: now,
            last: now,
            phase: Phase::Continuous,
            phase_since: now,
            mode_since: None,
            plan,
            full: Acc::default(),
            frees: Acc::default(),
            all: Acc::default(),
            covered: Duration::ZERO,
            windows: VecDeque::from([Window {
                start: Duration::ZERO,
                end: None,
            }]),
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The probes that should be attached now.
    pub fn attachment(&self) -> Attachment {
        self.phase.attachment()
    }

    pub fn windowed(&self) -> bool {
        self.phase != Phase::Continuous
    }

    pub fn budget(&self) -> f64 {
        self.budget
    }

    pub fn follow(&self) -> Duration {
        self.p.follow
    }

    pub fn plan(&self) -> Plan {
        self.plan
    }

    /// What the probes cost the target lately, whatever was attached: the
    /// figure to hold against the budget.
    pub fn overhead(&self) -> f64 {
        // Not before enough CPU time is seen: a first period of a few clock
        // ticks says nothing.
        self.all.overhead(self.min_cpu_ns()).unwrap_or(0.0)
    }

    /// What full attachment costs, as measured lately (`None` until enough
    /// CPU time is seen with every probe attached).
    pub fn full_overhead(&self) -> Option<f64> {
        self.full.overhead(self.min_cpu_ns())
    }

    fn min_cpu_ns(&self) -> f64 {
        self.p.min_cpu.as_nanos() as f64
    }

    /// Share of the time since attach that allocation probes were attached.
    pub fn coverage(&self, now: Instant) -> f64 {
        let total = now.saturating_duration_since(self.started);
        if total.is_zero() {
            return 1.0;
        }
        let at = now.saturating_duration_since(self.started);
        let open = self
            .windows
            .back()
            .filter(|w| w.end.is_none())
            .map_or(Duration::ZERO, |w| at.saturating_sub(w.start));
        ((self.covered + open).as_secs_f64() / total.as_secs_f64()).min(1.0)
    }

    /// The recent windows, oldest first, the one open ending at `now`.
    pub fn windows(&self, now: Instant) -> Vec<(Duration, Duration)> {
        let at = now.saturating_duration_since(self.started);
        self.windows
            .iter()
            .map(|w| (w.start, w.end.unwrap_or(at)))
            .collect()
    }

    /// Takes the measurement of the period that ends at `now` (made with
    /// [`Governor::attachment`] as it was), and moves on. A change of mode
    /// is returned once.
    pub fn observe(&mut self, now: Instant, sample: Sample) -> Option<Change> {
        let memory = self.p.memory_cpu.as_nanos() as f64;
        match self.phase.attachment() {
            Attachment::All => self.full.add(sample, memory),
            Attachment::FreesOnly => self.frees.add(sample, memory),
            Attachment::Nothing => {}
        }
        // Over several cycles (the longest is 30 s), not one window.
        self.all.add(sample, memory * 16.0);
        self.last = now;
        let in_phase = now.saturating_duration_since(self.phase_since);
        let dwelt = self
            .mode_since
            .is_none_or(|t| now.saturating_duration_since(t) >= self.p.min_dwell);
        match self.phase {
            Phase::Continuous => {
                let a = self.full_overhead()?;
                if a <= self.budget || !dwelt {
                    return None;
                }
                self.plan = self.plan_for(a);
                self.mode_since = Some(now);
                self.close_window(now);
                self.enter(Phase::Follow, now);
                Some(Change::Windowed {
                    overhead: a,
                    on: self.plan.on,
                    cycle: self.plan.on + self.p.follow + self.plan.off,
                })
            }
            Phase::On => {
                if in_phase >= self.plan.on {
                    self.close_window(now);
                    self.enter(Phase::Follow, now);
                }
                None
            }
            Phase::Follow => {
                if in_phase >= self.p.follow {
                    if self.plan.off.is_zero() {
                        return self.next_window(now, dwelt);
                    }
                    self.enter(Phase::Off, now);
                }
                None
            }
            Phase::Off => {
                if in_phase >= self.plan.off {
                    return self.next_window(now, dwelt);
                }
                None
            }
        }
    }

    /// The end of a cycle: back to continuous if full attachment fits well
    /// enough, else the next window, planned from the latest figures.
    fn next_window(&mut self, now: Instant, dwelt: bool) -> Option<Change> {
        self.open_window(now);
        let a = self.full_overhead();
        if let Some(a) = a {
            if dwelt && a < self.budget * self.p.resume_below {
                self.mode_since = Some(now);
                self.enter(Phase::Continuous, now);
                return Some(Change::Continuous { overhead: a });
            }
            self.plan = self.plan_for(a);
        }
        self.enter(Phase::On, now);
        None
    }

    fn enter(&mut self, phase: Phase, now: Instant) {
        self.phase = phase;
        self.phase_since = now;
    }

    fn open_window(&mut self, now: Instant) {
        if self.windows.back().is_some_and(|w| w.end.is_none()) {
            return;
        }
        if self.windows.len() >= self.p.max_windows {
            self.windows.pop_front();
        }
        self.windows.push_back(Window {
            start: now.saturating_duration_since(self.started),
            end: None,
        });
    }

    fn close_window(&mut self, now: Instant) {
        let at = now.saturating_duration_since(self.started);
        if let Some(w) = self.windows.back_mut().filter(|w| w.end.is_none()) {
            w.end = Some(at);
            self.covered += at.saturating_sub(w.start);
        }
    }

    /// The window and cycle for an overhead `a` at full attachment: the ON
    /// length that makes a cycle of [`Params::nominal_cycle`] cost
    /// `margin × budget` on average (FOLLOW included), within
    /// [`Params::min_on`]..[`Params::max_on`]; the cycle then stretched as
    /// needed, up to [`Params::max_cycle`].
    pub fn plan_for(&self, a: f64) -> Plan {
        let b = self.budget * self.p.margin;
        // Frees are about half the traps until measured.
        let f = self.frees.overhead(self.min_cpu_ns()).unwrap_or(a / 2.0);
        let follow = self.p.follow.as_secs_f64();
        let fixed = follow * f;
        let on = if a <= 0.0 {
            self.p.max_on.as_secs_f64()
        } else {
            ((b * self.p.nominal_cycle.as_secs_f64() - fixed) / a)
                .clamp(self.p.min_on.as_secs_f64(), self.p.max_on.as_secs_f64())
        };
        let cycle = ((on * a + fixed) / b)
            .max(on + follow)
            .min(self.p.max_cycle.as_secs_f64().max(on + follow));
        Plan {
            on: Duration::from_secs_f64(on),
            off: Duration::from_secs_f64((cycle - on - follow).max(0.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Drives `g` for `span` in 100 ms periods of a target that uses one
    /// CPU and whose probes, when all attached, cost `a` of its own time
    /// (frees alone half that); returns the phases seen and the changes.
    fn drive(g: &mut Governor, t: &mut Instant, span: Duration, a: f64) -> Vec<Change> {
        let mut changes = Vec::new();
        let end = *t + span;
        while *t < end {
            *t += 100 * MS;
            let own = 100e6 / (1.0 + a);
            let cost = match g.attachment() {
                Attachment::All => own * a,
                Attachment::FreesOnly => own * a / 2.0,
                Attachment::Nothing => 0.0,
            };
            let sample = Sample {
                cpu_ns: own + cost,
                cost_ns: cost,
            };
            changes.extend(g.observe(*t, sample));
        }
        changes
    }

    #[test]
    fn a_target_within_its_budget_stays_attached() {
        let mut t = Instant::now();
        let mut g = Governor::new(0.02, Params::default(), t);
        let changes = drive(&mut g, &mut t, Duration::from_secs(30), 0.01);
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(g.phase(), Phase::Continuous);
        assert!((g.coverage(t) - 1.0).abs() < 1e-9);
        assert!((g.overhead() - 0.01).abs() < 1e-3, "{}", g.overhead());
        assert_eq!(g.windows(t).len(), 1);
    }

    #[test]
    fn over_budget_goes_windowed_and_keeps_the_average_under_it() {
        let mut t = Instant::now();
        let start = t;
        let mut g = Governor::new(0.02, Params::default(), t);
        let changes = drive(&mut g, &mut t, Duration::from_secs(60), 0.142);
        let Some(Change::Windowed {
            overhead,
            on,
            cycle,
        }) = changes.first().copied()
        else {
            panic!("{changes:?}");
        };
        assert_eq!(changes.len(), 1, "no flapping: {changes:?}");
        assert!((overhead - 0.142).abs() < 1e-3, "{overhead}");
        assert!(on >= 200 * MS && cycle > on, "{on:?} {cycle:?}");
        assert!(g.windowed());
        // The average over the last cycles meets the budget.
        assert!(g.overhead() < 0.02, "{}", g.overhead());
        let coverage = g.coverage(t);
        assert!(coverage > 0.05 && coverage < 0.5, "{coverage}");
        // Windows are kept, bounded, each ON long or the first (the
        // continuous start).
        let windows = g.windows(t);
        assert!(windows.len() > 3 && windows.len() <= 16, "{windows:?}");
        for (s, e) in &windows[1..] {
            assert!(*e > *s && *e - *s >= 200 * MS, "{windows:?}");
        }
        assert!(windows.windows(2).all(|w| w[0].1 <= w[1].0));
        let _ = start;
    }

    #[test]
    fn the_phases_cycle_on_follow_off() {
        let mut t = Instant::now();
        let mut g = Governor::new(0.02, Params::default(), t);
        drive(&mut g, &mut t, Duration::from_secs(2), 0.2);
        assert_eq!(g.phase(), Phase::Off, "{:?}", g.plan());
        let mut seen = vec![g.phase()];
        for _ in 0..200 {
            drive(&mut g, &mut t, 100 * MS, 0.2);
            if seen.last() != Some(&g.phase()) {
                seen.push(g.phase());
            }
        }
        assert_eq!(
            &seen[..4],
            &[Phase::Off, Phase::On, Phase::Follow, Phase::Off],
            "{seen:?}"
        );
        assert_eq!(Phase::Follow.attachment(), Attachment::FreesOnly);
    }

    #[test]
    fn back_to_continuous_when_the_cost_falls_and_not_before_the_dwell() {
        let mut t = Instant::now();
        let mut g = Governor::new(0.02, Params::default(), t);
        let went = t;
        drive(&mut g, &mut t, Duration::from_secs(1), 0.1);
        assert!(g.windowed());
        // Cheaper at once: it stays windowed for the dwell time.
        let changes = drive(&mut g, &mut t, Duration::from_secs(5), 0.001);
        assert!(changes.is_empty(), "{changes:?}");
        let changes = drive(&mut g, &mut t, Duration::from_secs(30), 0.001);
        assert!(
            matches!(changes.as_slice(), [Change::Continuous { overhead }] if *overhead < 0.012),
            "{changes:?}"
        );
        assert_eq!(g.phase(), Phase::Continuous);
        assert!(t - went >= Params::default().min_dwell);
        // Near the budget, just under it: no flapping back.
        let changes = drive(&mut g, &mut t, Duration::from_secs(60), 0.018);
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn plans_stay_within_their_bounds() {
        let t = Instant::now();
        let p = Params::default();
        let g = Governor::new(0.02, p.clone(), t);
        // Barely over: long windows.
        let plan = g.plan_for(0.021);
        assert_eq!(plan.on, p.max_on);
        // Far over: the shortest window, the cycle capped.
        let plan = g.plan_for(50.0);
        assert_eq!(plan.on, p.min_on);
        assert!(plan.on + p.follow + plan.off <= p.max_cycle + MS);
        // In between: a cycle that costs margin × budget on average.
        let a = 0.142;
        let plan = g.plan_for(a);
        let cycle = (plan.on + p.follow + plan.off).as_secs_f64();
        let avg = (plan.on.as_secs_f64() * a + p.follow.as_secs_f64() * a / 2.0) / cycle;
        assert!((avg - 0.02 * p.margin).abs() < 1e-3, "{plan:?} {avg}");
    }

    #[test]
    fn an_idle_target_changes_nothing() {
        let mut t = Instant::now();
        let mut g = Governor::new(0.02, Params::default(), t);
        for _ in 0..100 {
            t += 100 * MS;
            assert_eq!(g.observe(t, Sample::default()), None);
        }
        assert_eq!(g.phase(), Phase::Continuous);
        assert_eq!(g.overhead(), 0.0);
    }
}
