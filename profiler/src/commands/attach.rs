//! `heapbpf attach` and `heapbpf run`: front ends over the [`Engine`] that
//! own the event loop — signals (`SIGUSR2` snapshot, `SIGINT`/`SIGTERM`
//! stop), `--duration`, `--interval`, the maps refresh timer and, for `run`,
//! the launched command's entry and exit.
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::{
    allocator, ebpf,
    engine::{Config, Engine},
    error::{Error, Result},
    launch::{self, LaunchEvent, Launched},
    lines::{self, say},
    model::Trigger,
    output::dir::OutputDir,
    procfs::{self, ProcessInfo},
};

/// How often targets are checked for exit and thresholds.
const POLL: Duration = Duration::from_millis(100);
/// How often module tables pick up newly loaded libraries, once the first
/// seconds (refreshed every [`POLL`]: a launched command maps its libraries
/// right after exec) are over.
const MAPS_REFRESH: Duration = Duration::from_secs(2);

/// Opens the output directory, held for the whole run (bad input if
/// snapshots cannot be written there), and clears what heapbpf processes
/// killed while writing left in it.
fn open_output_dir(cfg: &Config) -> Result<OutputDir> {
    let out = OutputDir::open(&cfg.output_dir)?;
    let stale = out.remove_stale_temps();
    if !stale.is_empty() {
        say(&lines::stale_temps_removed(out.path(), stale.len()));
    }
    Ok(out)
}

/// Exit status 1 when any snapshot could not be written.
fn check_snapshots(engine: &Engine) -> Result<()> {
    match engine.failed_snapshots() {
        0 => Ok(()),
        n => Err(Error::Runtime(lines::snapshots_failed(n))),
    }
}

/// `heapbpf attach PID...`.
pub fn run_attach(cfg: Config, pids: &[u32]) -> Result<()> {
    let out = open_output_dir(&cfg)?;
    // Privileges before pids: without them, /proc of other users' processes
    // is unreadable and the pid errors would hide the real cause.
    ebpf::preflight()?;
    let infos = pids
        .iter()
        .map(|&pid| procfs::process_info(pid))
        .collect::<Result<Vec<_>>>()?;
    runtime()?.block_on(async {
        // Signal handlers first: a SIGINT during attach still detaches cleanly.
        let signals = Signals::new()?;
        let mut engine = Engine::new(cfg, out)?;
        for info in infos {
            engine.attach(info)?;
        }
        event_loop(&mut engine, signals, None).await?;
        check_snapshots(&engine)
    })
}

/// `heapbpf run -- CMD`: starts the command stopped, attaches, lets it run,
/// and returns its exit status once the final snapshot is written (1, an
/// error, when a snapshot could not be written).
pub fn run_command(cfg: Config, command: &[String]) -> Result<i32> {
    let out = open_output_dir(&cfg)?;
    ebpf::preflight()?;
    // On error, dropping `launched` kills the held command.
    let launched = launch::start(command)?;
    let exe = launch::resolve_program(&command[0]);
    runtime()?.block_on(async {
        let signals = Signals::new()?;
        let mut engine = Engine::new(cfg, out)?;
        let plan = allocator::plan_for_command(&exe, std::env::var("LD_PRELOAD").ok().as_deref())?;
        let exe = exe.display().to_string();
        let comm: String = crate::model::basename(&exe).chars().take(15).collect();
        let info = ProcessInfo {
            pid: launched.pid,
            comm,
            exe,
        };
        engine.attach_launched(info, &plan)?;
        launched.go();
        let code = event_loop(&mut engine, signals, Some(launched)).await?;
        check_snapshots(&engine)?;
        Ok(code.unwrap_or(0))
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::runtime("cannot start the runtime", e))
}

/// SIGUSR2, SIGINT and SIGTERM, handled by the event loop.
struct Signals {
    usr2: Signal,
    int: Signal,
    term: Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        let handler = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| Error::runtime(format!("{name} handler"), e))
        };
        Ok(Signals {
            usr2: handler(SignalKind::user_defined2(), "SIGUSR2")?,
            int: handler(SignalKind::interrupt(), "SIGINT")?,
            term: handler(SignalKind::terminate(), "SIGTERM")?,
        })
    }
}

/// Runs until every target is gone or heapbpf is told to stop. Returns the
/// launched command's exit status in `run` mode.
async fn event_loop(
    engine: &mut Engine,
    mut signals: Signals,
    launched: Option<Launched>,
) -> Result<Option<i32>> {
    let started = Instant::now();
    let mut deadline = engine.config().duration.map(|d| started + d);
    let interval = engine.config().interval;
    let mut next_interval = interval.map(|i| started + i);
    let mut next_refresh = started + POLL;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let held = launched.as_ref().map(|l| l.pid);
    let mut exit_code = None;
    // SIGINT/SIGTERM: final snapshot and stop; in `run` mode the signal is
    // the command's (it ends, and its exit writes the final snapshot).
    let stop = |engine: &mut Engine, sig: i32| match &launched {
        Some(l) => {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(l.pid as i32, sig) };
            false
        }
        None => {
            engine.snapshot_all(Trigger::Stop);
            true
        }
    };
    loop {
        tokio::select! {
            _ = signals.usr2.recv() => engine.snapshot_all(Trigger::Signal),
            _ = signals.int.recv() => { if stop(engine, libc::SIGINT) { break; } }
            _ = signals.term.recv() => { if stop(engine, libc::SIGTERM) { break; } }
            _ = tick.tick() => {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    engine.snapshot_all(Trigger::Duration);
                    deadline = None;
                    if launched.is_none() {
                        break;
                    }
                    // run: stop profiling, let the command finish.
                    engine.detach_all();
                }
                if let Some(l) = &launched {
                    if let Some(code) = launched_events(engine, l) {
                        exit_code = Some(code);
                        break;
                    }
                }
                engine.tick(held);
                if engine.is_idle() && launched.is_none() {
                    break;
                }
                if next_interval.is_some_and(|t| now >= t) {
                    engine.snapshot_all(Trigger::Interval);
                    next_interval = interval.map(|i| now + i);
                }
                engine.check_steps();
                if now >= next_refresh {
                    engine.refresh_all();
                    next_refresh = now
                        + if now.duration_since(started) < MAPS_REFRESH {
                            POLL
                        } else {
                            MAPS_REFRESH
                        };
                }
            }
        }
    }
    engine.detach_all();
    Ok(exit_code)
}

/// `run` mode: the command at its entry point and at its exit. Returns its
/// status once it is gone.
fn launched_events(engine: &mut Engine, launched: &Launched) -> Option<i32> {
    loop {
        match launched.events.try_recv() {
            Ok(LaunchEvent::AtEntry) => {
                // The program's libraries are mapped; main has not run.
                engine.refresh_all();
                let _ = launched.ack.send(());
            }
            Ok(LaunchEvent::Exiting) => {
                engine.target_exiting(launched.pid);
                let _ = launched.ack.send(());
            }
            Ok(LaunchEvent::Exited(code)) => {
                // Not held at its exit (a thread other than the leader
                // exec'd): its final snapshot now, from what was kept.
                engine.tick(None);
                return Some(code);
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => return None,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return Some(1),
        }
    }
}
