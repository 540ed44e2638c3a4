//! `cargo xtask soak`: heapbpf on a target that allocates through about a
//! million distinct call paths (tests/fixtures/paths.c), exact mode, for a
//! bounded time, a snapshot every `--interval`. Prints per snapshot what was
//! recorded and dropped, heapbpf's RSS and the kernel memory of its maps,
//! and fails when the kept blocks are not exact or memory keeps growing.
use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

#[derive(Args)]
pub struct SoakArgs {
    /// How long the target churns.
    #[arg(long, default_value_t = 180)]
    seconds: u64,
    /// Seconds between snapshots.
    #[arg(long, default_value_t = 20)]
    interval: u64,
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Kernel memory of the BPF maps a process holds (their `memlock`), in KiB.
fn map_kib(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter(|t| t.contains("map_type:"))
        .filter_map(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum::<u64>()
        / 1024
}

pub fn run(args: SoakArgs) -> Result<()> {
    crate::bootstrap()?;
    crate::require_bpf()?;
    let heapbpf = crate::build_release()?;
    let dir = crate::root().join("target/soak");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let paths = dir.join("paths");
    crate::gcc(
        &crate::root().join("tests/fixtures/paths.c"),
        &paths,
        &["-O0"],
    )?;
    let mut fx = Command::new(&paths)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut fx_in = fx.stdin.take().unwrap();
    let mut fx_out = BufReader::new(fx.stdout.take().unwrap()).lines();
    let mut answer = || -> Result<String> {
        fx_out
            .next()
            .context("the fixture ended")?
            .map_err(Into::into)
    };
    answer()?; // ready PID
    let mut hb = Command::new(&heapbpf)
        .args(["attach", &fx.id().to_string(), "--sample-bytes", "0"])
        .args(["--format", "json", "--interval"])
        .arg(format!("{}s", args.interval))
        .arg("-o")
        .arg(&dir)
        .stderr(Stdio::piped())
        .spawn()?;
    let hb_pid = hb.id();
    let mut err = BufReader::new(hb.stderr.take().unwrap()).lines();
    loop {
        match err.next() {
            Some(Ok(l)) if l.contains(" attached to ") => break,
            Some(_) => continue,
            None => bail!("heapbpf exited before attaching"),
        }
    }
    writeln!(fx_in, "keep 100")?;
    answer()?;
    writeln!(fx_in, "churn {}", args.seconds)?;
    println!(
        "soak: {}s of churn, a snapshot every {}s",
        args.seconds, args.interval
    );
    println!(
        "{:>8} {:>12} {:>12} {:>8} {:>8} {:>10} {:>12}  kept live",
        "snapshot", "allocations", "dropped", "dropped%", "stacks", "RSS KiB", "maps KiB"
    );
    let mut rows: Vec<(u64, u64)> = Vec::new();
    let mut exact = true;
    let mut n = 0;
    while let Some(Ok(line)) = err.next() {
        let Some(s) = line
            .strip_prefix("heapbpf: snapshot interval ")
            .and_then(|l| l.split(" -> ").nth(1))
        else {
            continue;
        };
        let (rss, maps) = (rss_kib(hb_pid), map_kib(hb_pid));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(s)?)?;
        let t = &v["totals"];
        let allocations = t["allocations"].as_u64().unwrap_or(0);
        let dropped = t["dropped_events"].as_u64().unwrap_or(0);
        let kept: u64 = v["stacks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|st| st["frames"][0]["function"] == "site_keep")
            .map(|st| st["live_bytes"].as_u64().unwrap_or(0))
            .sum();
        exact &= kept == 100_000;
        n += 1;
        println!(
            "{n:>8} {allocations:>12} {dropped:>12} {:>7.1}% {:>8} {rss:>10} {maps:>12}  {kept}",
            100.0 * dropped as f64 / allocations.max(1) as f64,
            v["stacks"].as_array().map_or(0, Vec::len),
        );
        rows.push((rss, maps));
        if n as u64 >= args.seconds / args.interval {
            break;
        }
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(hb_pid as i32, libc::SIGINT) };
    std::thread::spawn(move || for _ in err {});
    hb.wait()?;
    let _ = fx.kill();
    let _ = fx.wait();
    std::thread::sleep(Duration::from_millis(100));
    if rows.len() < 3 {
        bail!("only {} snapshots: raise --seconds", rows.len());
    }
    if !exact {
        bail!("the kept blocks (site_keep, 100 x 1000 bytes) were not exact in every snapshot");
    }
    // Memory after the first snapshots (warm-up) must not keep growing.
    let warm = rows[1];
    let last = rows[rows.len() - 1];
    println!(
        "soak: RSS {} -> {} KiB, maps {} -> {} KiB (second to last snapshot)",
        warm.0, last.0, warm.1, last.1
    );
    if last.0 > warm.0 * 3 / 2 + 16 * 1024 || last.1 > warm.1 * 3 / 2 + 16 * 1024 {
        bail!("memory grew over the run");
    }
    Ok(())
}
