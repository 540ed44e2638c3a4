//! `cargo xtask bench`: what heapbpf costs a program that allocates. Quotes
//! medians of repeated runs and the ratio to a baseline from the same run.
use std::{
    process::{Command, Stdio},
    thread::sleep,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

#[derive(Args)]
pub struct BenchArgs {
    /// Runs per configuration (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// malloc/free pairs per run.
    #[arg(long, default_value_t = 200_000)]
    pairs: u64,
    /// Live blocks at which to time a snapshot (comma list).
    #[arg(long, default_value = "100000,1000000", value_delimiter = ',')]
    snapshot_blocks: Vec<u64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the loop fixture once; returns malloc/free pairs per second.
fn one_run(
    bin: &std::path::Path,
    pairs: u64,
    heapbpf: Option<(&std::path::Path, &[&str])>,
) -> Result<f64> {
    // The loop waits for a line on stdin, so probes are live before it starts.
    let mut child = Command::new(bin)
        .arg(pairs.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut profiler = None;
    if let Some((hb, extra)) = heapbpf {
        let dir = crate::root().join("target/bench");
        std::fs::create_dir_all(&dir)?;
        let mut p = Command::new(hb)
            .args([
                "attach",
                &child.id().to_string(),
                "-q",
                "--format",
                "json",
                "-o",
            ])
            .arg(&dir)
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()?;
        // Wait for the attached line.
        use std::io::BufRead;
        let err = p.stderr.take().unwrap();
        let mut lines = std::io::BufReader::new(err).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains(" attached to ") => break,
                Some(_) => continue,
                None => bail!("heapbpf exited before attaching"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        profiler = Some(p);
    }
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "go")?;
    }
    let out = child.wait_with_output()?;
    if let Some(mut p) = profiler {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(p.id() as i32, libc::SIGINT) };
        p.wait()?;
        sleep(Duration::from_millis(100));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let ns: f64 = text
        .trim()
        .parse()
        .with_context(|| format!("bench fixture printed {text:?}"))?;
    Ok(pairs as f64 / (ns / 1e9))
}

pub fn run(args: BenchArgs) -> Result<()> {
    crate::bootstrap()?;
    let heapbpf = crate::build_release()?;
    let bin = crate::root().join("target/bench/loop");
    crate::gcc(&crate::root().join("xtask/bench/loop.c"), &bin, &[])?;
    let configs: Vec<(&str, Option<Vec<&str>>)> = vec![
        ("no profiler", None),
        (
            "floor: entry probes only",
            Some(vec!["--probe-floor", "entry"]),
        ),
        (
            "floor: entry + return",
            Some(vec!["--probe-floor", "return"]),
        ),
        ("heapbpf exact", Some(vec!["--sample-bytes", "0"])),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for i in 0..args.runs {
        // Interleaved, so drift on a shared machine hits every configuration alike.
        for (c, (name, extra)) in configs.iter().enumerate() {
            let r = one_run(
                &bin,
                args.pairs,
                extra.as_ref().map(|e| (heapbpf.as_path(), e.as_slice())),
            )?;
            eprintln!(
                "xtask bench: run {}/{}: {name}: {r:.0} pairs/s",
                i + 1,
                args.runs
            );
            results[c].push(r);
        }
    }
    let snapshot_rows = snapshot_cost(&heapbpf, &args.snapshot_blocks)?;
    let medians: Vec<f64> = results.into_iter().map(median).collect();
    let b = medians[0];
    println!(
        "malloc/free pairs per second (median of {} runs, {} pairs each)",
        args.runs, args.pairs
    );
    println!(
        "{:<28} {:>14} {:>10} {:>12}",
        "configuration", "pairs/s", "ratio", "ns/pair"
    );
    for ((name, _), m) in configs.iter().zip(&medians) {
        println!("{name:<28} {m:>14.0} {:>10.3} {:>12.1}", m / b, 1e9 / m);
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
fn snapshot_cost(heapbpf: &std::path::Path, blocks: &[u64]) -> Result<Vec<(u64, f64, u64, u64)>> {
    use std::io::{BufRead, BufReader, Write};
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
        .args(["attach", &fx.id().to_string(), "-o"])
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
