//! The agent's CPU budget, measured: redis-server at full load under
//! redis-benchmark, with no profiler, with `heapbpf agent` at its default
//! `--max-overhead 2%`, and with the agent allowed everything (continuous
//! probes, as `attach`). Runs interleaved; the table shows medians and
//! ratios to the no-profiler runs. A leak is injected meanwhile (a client
//! that keeps adding keys with `DEBUG POPULATE`, whose allocations are
//! never freed): the agent's last snapshot must still show it on top.
use std::{
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

const PORT: &str = "16380";

/// One configuration of the table.
struct Config {
    name: &'static str,
    /// `None`: no profiler; else the agent's extra flags.
    agent: Option<Vec<&'static str>>,
}

fn configs() -> Vec<Config> {
    vec![
        Config {
            name: "no profiler",
            agent: None,
        },
        Config {
            name: "agent, --max-overhead 2% (default)",
            agent: Some(vec![]),
        },
        Config {
            name: "agent, --max-overhead 1000% (continuous)",
            agent: Some(vec!["--max-overhead", "1000%"]),
        },
    ]
}

/// What one run measured.
struct Run {
    set_per_s: f64,
    /// From the agent's last snapshot: coverage ratio, and where the leak
    /// site ranks by live bytes (1 = top) with its bytes.
    coverage: Option<f64>,
    leak: Leak,
}

fn start_redis() -> Result<Child> {
    // redis on one core, the load on the other: less of the scheduler's
    // noise in the figures (the agent runs where it can).
    let mut server = Command::new("taskset")
        .args([
            "-c",
            "1",
            "redis-server",
            "--port",
            PORT,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("redis-server (cargo xtask bootstrap installs it)")?;
    let ready = Instant::now();
    while !redis_cli(&["ping"]).is_ok_and(|o| o.contains("PONG")) {
        if ready.elapsed() > Duration::from_secs(10) {
            let _ = server.kill();
            bail!("redis-server did not start");
        }
        sleep(Duration::from_millis(50));
    }
    Ok(server)
}

fn redis_cli(args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .args(["-p", PORT])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// SET requests per second of one redis-benchmark run.
fn benchmark(requests: u64) -> Result<f64> {
    let out = Command::new("taskset")
        .args([
            "-c",
            "0",
            "redis-benchmark",
            "-p",
            PORT,
            "-t",
            "set",
            "-n",
            &requests.to_string(),
            "-d",
            "256",
            "-r",
            "50000",
            "-q",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(['\r', '\n'])
        .filter_map(|l| l.split_once(" requests per second"))
        .filter_map(|(l, _)| l.rsplit(' ').next()?.parse().ok())
        .next_back()
        .with_context(|| format!("redis-benchmark printed {text:?}"))
}

/// The agent on `pid`, once its probes are live.
fn start_agent(
    heapbpf: &Path,
    pid: u32,
    dir: &Path,
    interval: &str,
    extra: &[&str],
) -> Result<Child> {
    let mut p = Command::new(heapbpf)
        .args(["agent", "--select"])
        .arg(format!("pid={pid}"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--interval",
            interval,
            "--format",
            "json",
            "--data-dir",
        ])
        .arg(dir)
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(p.stderr.take().context("stderr")?).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(" attached to ") => break,
            Some(_) => continue,
            None => bail!("the agent exited before attaching"),
        }
    }
    std::thread::spawn(move || {
        for l in lines.map_while(|l| l.ok()) {
            if !l.contains(" snapshot ") {
                eprintln!("agent: {l}");
            }
        }
    });
    Ok(p)
}

/// The newest JSON snapshot in `dir`.
fn newest_snapshot(dir: &Path) -> Option<PathBuf> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    // heapbpf-PID-TIME-SEQ.json: by time, then seq.
    names.sort();
    names.pop()
}

/// Where the leak site ranks by live bytes (1 = top), and its bytes.
type Leak = Option<(usize, u64)>;

/// (coverage, the first stack through `debugCommand`).
fn read_leak(path: &Path) -> Result<(Option<f64>, Leak)> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let coverage = v["coverage"]["ratio"].as_f64().or(Some(1.0));
    let leak = v["stacks"].as_array().and_then(|stacks| {
        stacks.iter().enumerate().find_map(|(i, s)| {
            let through = s["frames"].as_array()?.iter().any(|f| {
                f["function"]
                    .as_str()
                    .is_some_and(|n| n.contains("debugCommand"))
            });
            through.then(|| (i + 1, s["live_bytes"].as_u64().unwrap_or(0)))
        })
    });
    Ok((coverage, leak))
}

fn one_run(heapbpf: &Path, cfg: &Config, requests: u64, warmup: u64) -> Result<Run> {
    let mut server = start_redis()?;
    let dir = crate::root().join("target/bench/agent");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> Result<Run> {
        let agent = match &cfg.agent {
            Some(extra) => Some(start_agent(heapbpf, server.id(), &dir, "10s", extra)?),
            None => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let leaker = leak(stop.clone())?;
        // Load before measuring, so that the budget has settled.
        benchmark(warmup)?;
        let set_per_s = benchmark(requests)?;
        stop.store(true, Ordering::Relaxed);
        let _ = leaker.join();
        let (coverage, leak) = match agent {
            Some(mut a) => {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
                a.wait()?;
                match newest_snapshot(&dir) {
                    Some(p) => read_leak(&p)?,
                    None => (None, None),
                }
            }
            None => (None, None),
        };
        Ok(Run {
            set_per_s,
            coverage,
            leak,
        })
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

/// One snapshot of the leak run: when, the leak's rank and bytes, coverage.
struct LeakPoint {
    taken_at: String,
    trigger: String,
    leak: Leak,
    coverage: Option<f64>,
    windows: usize,
}

/// The agent at its default budget on redis at full load for `seconds`,
/// the leak running: where the leak ranks in each interval's snapshot.
fn leak_run(heapbpf: &Path, seconds: u64) -> Result<Vec<LeakPoint>> {
    let mut server = start_redis()?;
    let dir = crate::root().join("target/bench/agent-leak");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> Result<Vec<LeakPoint>> {
        let mut agent = start_agent(heapbpf, server.id(), &dir, "15s", &[])?;
        let stop = Arc::new(AtomicBool::new(false));
        let leaker = leak(stop.clone())?;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(seconds) {
            benchmark(200_000)?;
        }
        stop.store(true, Ordering::Relaxed);
        let _ = leaker.join();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
        agent.wait()?;
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| {
                let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p)?)?;
                let (coverage, leak) = read_leak(p)?;
                Ok(LeakPoint {
                    taken_at: v["taken_at"].as_str().unwrap_or("").to_string(),
                    trigger: v["trigger"].as_str().unwrap_or("").to_string(),
                    leak,
                    coverage,
                    windows: v["coverage"]["windows"].as_array().map_or(0, Vec::len),
                })
            })
            .collect()
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

/// The leak: 100 keys of 4 KiB every 100 ms, never deleted, over one
/// connection, until `stop`.
fn leak(stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>> {
    let mut conn = std::net::TcpStream::connect(format!("127.0.0.1:{PORT}"))?;
    Ok(std::thread::spawn(move || {
        let mut i = 0u64;
        let mut reply = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            let prefix = format!("leak:{i}:");
            let cmd = format!(
                "*5\r\n$5\r\nDEBUG\r\n$8\r\nPOPULATE\r\n$3\r\n100\r\n${}\r\n{prefix}\r\n$4\r\n4096\r\n",
                prefix.len()
            );
            if conn.write_all(cmd.as_bytes()).is_err() || conn.read(&mut reply).is_err() {
                break;
            }
            i += 1;
            sleep(Duration::from_millis(100));
        }
    }))
}

/// The table: `runs` interleaved rounds of every configuration, then the
/// leak run of `leak_seconds` (0: none).
pub fn run(heapbpf: &Path, runs: usize, requests: u64, leak_seconds: u64) -> Result<()> {
    let configs = configs();
    let warmup = (requests / 4).max(1000);
    let mut results: Vec<Vec<Run>> = configs.iter().map(|_| Vec::new()).collect();
    for round in 0..runs {
        for (c, cfg) in configs.iter().enumerate() {
            let r = one_run(heapbpf, cfg, requests, warmup)?;
            eprintln!(
                "xtask bench: run {}/{runs}: {}: SET {:.0}/s, coverage {}, leak {}",
                round + 1,
                cfg.name,
                r.set_per_s,
                r.coverage.map_or("-".into(), |c| format!("{c:.3}")),
                r.leak
                    .map_or("-".into(), |(rank, b)| format!("#{rank}, {b} bytes"))
            );
            results[c].push(r);
        }
    }
    println!();
    println!(
        "redis-server (jemalloc) at full load, redis-benchmark -t set -n {requests} -d 256 -r 50000 after {warmup} requests of warm-up, a leak of 100 x 4 KiB keys every 100 ms (DEBUG POPULATE)"
    );
    println!(
        "{:<42} {:>12} {:>8} {:>8} {:>10} {:>14}",
        "configuration", "SET/s", "ratio", "paired", "coverage", "leak rank"
    );
    let base = median(results[0].iter().map(|r| r.set_per_s).collect()).unwrap_or(1.0);
    for (cfg, rs) in configs.iter().zip(&results) {
        let m = median(rs.iter().map(|r| r.set_per_s).collect()).unwrap_or(0.0);
        // Each round's ratio to the no-profiler run of the same round: the
        // machine's drift between rounds cancels out.
        let paired = median(
            rs.iter()
                .zip(&results[0])
                .map(|(r, n)| r.set_per_s / n.set_per_s)
                .collect(),
        )
        .unwrap_or(0.0);
        let cov = median(rs.iter().filter_map(|r| r.coverage).collect());
        let ranks: Vec<String> = rs
            .iter()
            .map(|r| r.leak.map_or("-".into(), |(rank, _)| format!("#{rank}")))
            .collect();
        println!(
            "{:<42} {m:>12.0} {:>8.3} {paired:>8.3} {:>10} {:>14}",
            cfg.name,
            m / base,
            cov.map_or("-".into(), |c| format!("{c:.3}")),
            if cfg.agent.is_some() {
                ranks.join(",")
            } else {
                "-".into()
            }
        );
    }
    if leak_seconds > 0 {
        let points = leak_run(heapbpf, leak_seconds)?;
        println!();
        println!(
            "the leak over time: agent at --max-overhead 2%, --interval 15s, redis at full load for {leak_seconds} s"
        );
        println!(
            "{:<22} {:<10} {:>10} {:>14} {:>10} {:>8}",
            "snapshot", "trigger", "leak rank", "leak bytes", "coverage", "windows"
        );
        for p in points {
            let (rank, bytes) = p.leak.map_or(("-".to_string(), "-".to_string()), |(r, b)| {
                (format!("#{r}"), b.to_string())
            });
            println!(
                "{:<22} {:<10} {rank:>10} {bytes:>14} {:>10} {:>8}",
                p.taken_at,
                p.trigger,
                p.coverage.map_or("-".into(), |c| format!("{c:.3}")),
                p.windows
            );
        }
    }
    Ok(())
}
