//! `cargo xtask bench`: what heapbpf costs programs that allocate, next to
//! the tools users would pick instead and to the floor of the probes
//! themselves. Every configuration runs interleaved with the others, several
//! times; the table shows medians and ratios to the no-profiler run of the
//! same bench. A benchmark, not a timed test: CI runs it on a short setting
//! only to check that it works.
use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

#[derive(Args)]
pub struct BenchArgs {
    /// Runs per configuration (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Rounds (an allocation and its free) per thread of the microbenchmark.
    #[arg(long, default_value_t = 200_000)]
    pairs: u64,
    /// Thread counts of the microbenchmark (comma list).
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    threads: Vec<u32>,
    /// Extra frames between the thread's start and the loop for the
    /// deep-stack microbenchmark (one thread); 0 skips it.
    #[arg(long, default_value_t = 32)]
    deep_stack: u32,
    /// Requests per redis-benchmark test (SET and GET); 0 skips redis.
    #[arg(long, default_value_t = 20_000)]
    redis_requests: u64,
    /// Requests per measured redis-benchmark run of the agent's CPU budget
    /// table (after a quarter as many of warm-up); 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    agent_requests: u64,
    /// Seconds of the agent's leak run (the leak's rank in each interval's
    /// snapshot under the default budget); 0 skips it.
    #[arg(long, default_value_t = 120)]
    agent_leak_seconds: u64,
    /// Only the agent's CPU budget table.
    #[arg(long)]
    agent_only: bool,
    /// Live blocks at which to time a snapshot (comma list).
    #[arg(long, default_value = "100000,1000000", value_delimiter = ',')]
    snapshot_blocks: Vec<u64>,
    /// Another heapbpf binary (an earlier build) whose default and exact
    /// rows run interleaved with this build's, for a before/after table.
    #[arg(long, value_name = "BIN")]
    baseline: Option<PathBuf>,
}

impl BenchArgs {
    /// The setting CI runs: one short round of everything.
    pub fn short() -> Self {
        BenchArgs {
            runs: 1,
            pairs: 2_000,
            threads: vec![1],
            deep_stack: 32,
            redis_requests: 500,
            agent_requests: 4_000,
            agent_only: false,
            agent_leak_seconds: 0,
            snapshot_blocks: vec![1_000],
            baseline: None,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Who watches the program.
#[derive(Clone)]
enum Watcher {
    Nobody,
    Heapbpf(Vec<&'static str>),
    /// Another heapbpf binary (`--baseline`) with these arguments.
    HeapbpfAt(PathBuf, Vec<&'static str>),
    /// A memleak-equivalent bpftrace script: uprobe + uretprobe on the
    /// allocating functions keeping size and user stack per address, uprobe
    /// on free, filtered by pid inside the program.
    Bpftrace,
    /// heaptrack in launch mode (LD_PRELOAD; microbenchmark only).
    Heaptrack,
}

const FLOOR_ENTRY: &str = "floor: entry probes only";
const FLOOR_RETURN: &str = "floor: entry + return";
const EXACT: &str = "heapbpf exact (auto)";
const DEFAULT: &str = "heapbpf default (sampling, auto)";
const BPFTRACE: &str = "bpftrace memleak-equivalent";

/// The issue's targets as ratios of one table's medians: (what, ratio, goal).
fn targets(names: &[&str], medians: &[Option<f64>]) -> Vec<(String, Option<f64>, f64)> {
    let get = |n: &str| names.iter().position(|x| *x == n).and_then(|i| medians[i]);
    let ratio = |a: &str, b: &str| Some(get(a)? / get(b)?);
    vec![
        (
            format!("default / {FLOOR_ENTRY}"),
            ratio(DEFAULT, FLOOR_ENTRY),
            0.9,
        ),
        (
            format!("exact / {FLOOR_RETURN}"),
            ratio(EXACT, FLOOR_RETURN),
            0.75,
        ),
        (
            format!("default / {BPFTRACE}"),
            ratio(DEFAULT, BPFTRACE),
            10.0,
        ),
        (format!("exact / {BPFTRACE}"), ratio(EXACT, BPFTRACE), 10.0),
    ]
}

fn configs(baseline: Option<&Path>) -> Vec<(&'static str, Watcher)> {
    let mut configs = vec![
        ("no profiler", Watcher::Nobody),
        (
            FLOOR_ENTRY,
            Watcher::Heapbpf(vec!["--probe-floor", "entry"]),
        ),
        (
            FLOOR_RETURN,
            Watcher::Heapbpf(vec!["--probe-floor", "return"]),
        ),
        (
            "heapbpf exact, fp",
            Watcher::Heapbpf(vec!["--sample-bytes", "0", "--unwind", "fp"]),
        ),
        (EXACT, Watcher::Heapbpf(vec!["--sample-bytes", "0"])),
        (
            "heapbpf exact, dwarf",
            Watcher::Heapbpf(vec!["--sample-bytes", "0", "--unwind", "dwarf"]),
        ),
        (
            "heapbpf sampling, fp",
            Watcher::Heapbpf(vec!["--unwind", "fp"]),
        ),
        (DEFAULT, Watcher::Heapbpf(vec![])),
        (
            "heapbpf default, no sessions",
            Watcher::Heapbpf(vec!["--no-uprobe-sessions"]),
        ),
        (
            "heapbpf sampled 512KiB",
            Watcher::Heapbpf(vec!["--sample-bytes", "512KiB"]),
        ),
        (BPFTRACE, Watcher::Bpftrace),
        ("heaptrack (launch mode)", Watcher::Heaptrack),
    ];
    if let Some(b) = baseline {
        configs.push((
            "baseline exact (auto)",
            Watcher::HeapbpfAt(b.to_path_buf(), vec!["--sample-bytes", "0"]),
        ));
        configs.push((
            "baseline default",
            Watcher::HeapbpfAt(b.to_path_buf(), vec![]),
        ));
    }
    configs
}

fn bpftrace_script(lib: &str, pid: u32) -> String {
    let mut s = String::new();
    for (f, size) in [
        ("malloc", "arg0"),
        ("calloc", "arg0 * arg1"),
        ("realloc", "arg1"),
    ] {
        let free_old = if f == "realloc" {
            "delete(@sizes[arg0]); delete(@stacks[arg0]); "
        } else {
            ""
        };
        s += &format!("uprobe:{lib}:{f} /pid == {pid}/ {{ {free_old}@size[tid] = {size}; }}\n");
        s += &format!(
            "uretprobe:{lib}:{f} /pid == {pid} && @size[tid]/ {{ @sizes[retval] = @size[tid]; @stacks[retval] = ustack; delete(@size[tid]); }}\n"
        );
    }
    s += &format!(
        "uprobe:{lib}:free /pid == {pid}/ {{ delete(@sizes[arg0]); delete(@stacks[arg0]); }}\n"
    );
    s += "END { clear(@size); clear(@sizes); clear(@stacks); }\n";
    s
}

/// The allocator library a process maps (jemalloc before libc).
fn allocator_lib(pid: u32) -> Result<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let paths: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    for want in ["libjemalloc", "libc.so"] {
        if let Some(p) = paths
            .iter()
            .find(|p| p.rsplit('/').next().is_some_and(|n| n.starts_with(want)))
        {
            return Ok(p.to_string());
        }
    }
    bail!("no allocator library in /proc/{pid}/maps")
}

/// Waits until a freshly spawned process has its C library mapped.
fn wait_for_libc(pid: u32) -> Result<()> {
    let start = Instant::now();
    while !std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .contains("libc.so")
    {
        if start.elapsed() > Duration::from_secs(5) {
            bail!("process {pid} never mapped libc");
        }
        sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Starts `watcher` on `pid` and returns once its probes are live.
fn watch(heapbpf: &Path, watcher: &Watcher, pid: u32) -> Result<Option<Child>> {
    match watcher {
        Watcher::Nobody | Watcher::Heaptrack => Ok(None),
        Watcher::Heapbpf(extra) | Watcher::HeapbpfAt(_, extra) => {
            let heapbpf = match watcher {
                Watcher::HeapbpfAt(bin, _) => bin.as_path(),
                _ => heapbpf,
            };
            let dir = crate::root().join("target/bench/out");
            std::fs::create_dir_all(&dir)?;
            let mut p = Command::new(heapbpf)
                .args(["attach", &pid.to_string(), "-q", "--format", "json", "-o"])
                .arg(&dir)
                .args(extra)
                .stderr(Stdio::piped())
                .spawn()?;
            let mut lines = BufReader::new(p.stderr.take().unwrap()).lines();
            loop {
                match lines.next() {
                    Some(Ok(l)) if l.contains(" attached to ") => break,
                    Some(_) => continue,
                    None => bail!("heapbpf exited before attaching"),
                }
            }
            std::thread::spawn(move || for _ in lines {});
            Ok(Some(p))
        }
        Watcher::Bpftrace => {
            let script = bpftrace_script(&allocator_lib(pid)?, pid);
            let mut p = Command::new("bpftrace")
                .arg("-e")
                .arg(&script)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            let mut lines = BufReader::new(p.stdout.take().unwrap()).lines();
            loop {
                match lines.next() {
                    Some(Ok(l)) if l.starts_with("Attaching") => break,
                    Some(_) => continue,
                    None => bail!("bpftrace exited before attaching"),
                }
            }
            std::thread::spawn(move || for _ in lines {});
            // "Attaching" is printed before the probes are in place.
            sleep(Duration::from_secs(2));
            Ok(Some(p))
        }
    }
}

fn unwatch(p: Option<Child>) -> Result<()> {
    if let Some(mut p) = p {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(p.id() as i32, libc::SIGINT) };
        p.wait()?;
    }
    Ok(())
}

/// One microbenchmark run: rounds per second.
fn micro_run(
    bin: &Path,
    heapbpf: &Path,
    watcher: &Watcher,
    pairs: u64,
    threads: u32,
    depth: u32,
) -> Result<f64> {
    let mut cmd = if matches!(watcher, Watcher::Heaptrack) {
        let dir = crate::root().join("target/bench/heaptrack");
        std::fs::create_dir_all(&dir)?;
        let mut c = Command::new("heaptrack");
        c.arg("-o").arg(dir.join("loop")).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    // The loop waits for a line on stdin, so probes are live before it starts.
    let mut child = cmd
        .arg(pairs.to_string())
        .arg(threads.to_string())
        .arg(depth.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    if !matches!(watcher, Watcher::Heaptrack) {
        wait_for_libc(child.id())?;
    }
    let w = watch(heapbpf, watcher, child.id())?;
    {
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "go")?;
    }
    let out = child.wait_with_output()?;
    unwatch(w)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ns: f64 = text
        .lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .with_context(|| format!("bench loop printed {text:?}"))?;
    Ok((pairs * threads as u64) as f64 / (ns / 1e9))
}

/// One redis run: (SET, GET) requests per second.
fn redis_run(heapbpf: &Path, watcher: &Watcher, requests: u64) -> Result<(f64, f64)> {
    const PORT: &str = "16379";
    let mut server = Command::new("redis-server")
        .args([
            "--port",
            PORT,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("redis-server (cargo xtask bootstrap installs it)")?;
    let ready = Instant::now();
    while Command::new("redis-cli")
        .args(["-p", PORT, "ping"])
        .output()
        .map(|o| !String::from_utf8_lossy(&o.stdout).contains("PONG"))
        .unwrap_or(true)
    {
        if ready.elapsed() > Duration::from_secs(10) {
            let _ = server.kill();
            bail!("redis-server did not start");
        }
        sleep(Duration::from_millis(50));
    }
    let result = (|| -> Result<(f64, f64)> {
        let w = watch(heapbpf, watcher, server.id())?;
        let mut rps = Vec::new();
        for test in ["set", "get"] {
            let out = Command::new("redis-benchmark")
                .args([
                    "-p",
                    PORT,
                    "-t",
                    test,
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
            let v: f64 = text
                .split(['\r', '\n'])
                .filter_map(|l| l.split_once(" requests per second"))
                .filter_map(|(l, _)| l.rsplit(' ').next()?.parse().ok())
                .next_back()
                .with_context(|| format!("redis-benchmark printed {text:?}"))?;
            rps.push(v);
        }
        unwatch(w)?;
        Ok((rps[0], rps[1]))
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

fn print_table(title: &str, unit: &str, names: &[&str], medians: &[Option<f64>]) {
    println!();
    println!("{title}");
    println!(
        "{:<34} {:>14} {:>8} {:>12}",
        "configuration", unit, "ratio", "ns each"
    );
    let base = medians[0].unwrap_or(1.0);
    for (name, m) in names.iter().zip(medians) {
        match m {
            Some(m) => println!("{name:<34} {m:>14.0} {:>8.3} {:>12.1}", m / base, 1e9 / m),
            None => println!("{name:<34} {:>14} {:>8} {:>12}", "-", "-", "-"),
        }
    }
    for (what, r, goal) in targets(names, medians) {
        if let Some(r) = r {
            let verdict = if r >= goal { "met" } else { "missed" };
            println!("  target {what}: {r:.2} (goal {goal}: {verdict})");
        }
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    crate::bootstrap()?;
    let heapbpf = crate::build_release()?;
    if args.agent_only {
        return crate::bench_agent::run(
            &heapbpf,
            args.runs,
            args.agent_requests,
            args.agent_leak_seconds,
        );
    }
    let bin = crate::root().join("target/bench/loop");
    crate::gcc(&crate::root().join("xtask/bench/loop.c"), &bin, &[])?;
    let configs = configs(args.baseline.as_deref());
    let names: Vec<&str> = configs.iter().map(|c| c.0).collect();
    let mut micro: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); configs.len()]; args.threads.len()];
    let mut deep: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut set: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut get: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for run in 0..args.runs {
        for (c, (name, watcher)) in configs.iter().enumerate() {
            for (t, &threads) in args.threads.iter().enumerate() {
                let r = micro_run(&bin, &heapbpf, watcher, args.pairs, threads, 0)?;
                eprintln!(
                    "xtask bench: run {}/{}: {name}, {threads} thread(s): {r:.0} rounds/s",
                    run + 1,
                    args.runs
                );
                micro[t][c].push(r);
            }
            if args.deep_stack > 0 {
                let r = micro_run(&bin, &heapbpf, watcher, args.pairs, 1, args.deep_stack)?;
                eprintln!(
                    "xtask bench: run {}/{}: {name}, 1 thread, {} frames deeper: {r:.0} rounds/s",
                    run + 1,
                    args.runs,
                    args.deep_stack
                );
                deep[c].push(r);
            }
            if args.redis_requests > 0 && !matches!(watcher, Watcher::Heaptrack) {
                let (s, g) = redis_run(&heapbpf, watcher, args.redis_requests)?;
                eprintln!(
                    "xtask bench: run {}/{}: {name}, redis: SET {s:.0}/s GET {g:.0}/s",
                    run + 1,
                    args.runs
                );
                set[c].push(s);
                get[c].push(g);
            }
        }
    }
    let snapshot_rows = snapshot_cost(&heapbpf, &args.snapshot_blocks)?;

    let med = |v: &Vec<f64>| (!v.is_empty()).then(|| median(v.clone()));
    println!(
        "heapbpf bench: medians of {} interleaved runs; ratio = throughput / no profiler's ({} cores, kernel {})",
        args.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    );
    for (t, &threads) in args.threads.iter().enumerate() {
        let title = format!("microbenchmark, {threads} thread(s): malloc/calloc/realloc + free rounds, {} per thread", args.pairs);
        print_table(
            &title,
            "rounds/s",
            &names,
            &micro[t].iter().map(med).collect::<Vec<_>>(),
        );
    }
    if args.deep_stack > 0 {
        let title = format!(
            "microbenchmark, 1 thread, the loop {} calls deeper (stacks of {} frames)",
            args.deep_stack,
            args.deep_stack + 5
        );
        print_table(
            &title,
            "rounds/s",
            &names,
            &deep.iter().map(med).collect::<Vec<_>>(),
        );
    }
    if args.redis_requests > 0 {
        let title = format!(
            "redis-server (jemalloc) SET, redis-benchmark -n {} -d 256 -r 50000",
            args.redis_requests
        );
        print_table(
            &title,
            "requests/s",
            &names,
            &set.iter().map(med).collect::<Vec<_>>(),
        );
        let title = format!(
            "redis-server (jemalloc) GET, redis-benchmark -n {} -d 256 -r 50000",
            args.redis_requests
        );
        print_table(
            &title,
            "requests/s",
            &names,
            &get.iter().map(med).collect::<Vec<_>>(),
        );
    }
    println!();
    println!("snapshot cost (release build, exact mode, one target)");
    println!(
        "{:>12} {:>16} {:>18} {:>18}",
        "live blocks", "snapshot (ms)", "heapbpf RSS (MiB)", "heapbpf peak (MiB)"
    );
    for (blocks, ms, rss, hwm) in snapshot_rows {
        println!(
            "{blocks:>12} {ms:>16.0} {:>18.1} {:>18.1}",
            rss as f64 / 1048576.0,
            hwm as f64 / 1048576.0
        );
    }
    if args.agent_requests > 0 {
        crate::bench_agent::run(
            &heapbpf,
            args.runs,
            args.agent_requests,
            args.agent_leak_seconds,
        )?;
    }
    Ok(())
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Grows a fixture to each number of live blocks and times a SIGUSR2
/// snapshot (signal to the `snapshot` line). Returns (blocks, ms, RSS, peak RSS) rows.
fn snapshot_cost(heapbpf: &Path, blocks: &[u64]) -> Result<Vec<(u64, f64, u64, u64)>> {
    let grow = crate::root().join("target/bench/grow");
    crate::gcc(&crate::root().join("tests/fixtures/grow.c"), &grow, &[])?;
    let dir = crate::root().join("target/bench/snapshots");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut fx = Command::new(&grow)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut fx_in = fx.stdin.take().unwrap();
    let mut fx_out = BufReader::new(fx.stdout.take().unwrap()).lines();
    fx_out.next();
    let mut hb = Command::new(heapbpf)
        .args(["attach", &fx.id().to_string(), "--sample-bytes", "0", "-o"])
        .arg(&dir)
        .stderr(Stdio::piped())
        .spawn()?;
    let mut hb_err = BufReader::new(hb.stderr.take().unwrap()).lines();
    let mut next_line = |want: &str| -> Result<String> {
        loop {
            match hb_err.next() {
                Some(Ok(l)) if l.contains(want) => return Ok(l),
                Some(_) => continue,
                None => bail!("heapbpf exited while waiting for {want:?}"),
            }
        }
    };
    next_line(" attached to ")?;
    let mut rows = Vec::new();
    let mut have = 0;
    for &n in blocks {
        writeln!(fx_in, "leak {} 64 0", n.saturating_sub(have))?;
        fx_out.next();
        have = n;
        let t = std::time::Instant::now();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(hb.id() as i32, libc::SIGUSR2) };
        let line = next_line("heapbpf: snapshot signal")?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        eprintln!("xtask bench: {line}");
        rows.push((
            n,
            ms,
            status_kib(hb.id(), "VmRSS:") * 1024,
            status_kib(hb.id(), "VmHWM:") * 1024,
        ));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(hb.id() as i32, libc::SIGINT) };
    let _ = next_line("heapbpf: snapshot stop");
    hb.wait()?;
    let _ = fx.kill();
    let _ = fx.wait();
    Ok(rows)
}
