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
    #[arg(long, default_value_t = 2_000_000)]
    pairs: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the loop fixture once; returns malloc/free pairs per second.
fn one_run(bin: &std::path::Path, pairs: u64, heapbpf: Option<&std::path::Path>) -> Result<f64> {
    // The loop waits for a line on stdin, so probes are live before it starts.
    let mut child = Command::new(bin)
        .arg(pairs.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut profiler = None;
    if let Some(hb) = heapbpf {
        let dir = crate::root().join("target/bench");
        std::fs::create_dir_all(&dir)?;
        let mut p = Command::new(hb)
            .args(["attach", &child.id().to_string(), "-q", "-o"])
            .arg(&dir)
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
    let mut base = Vec::new();
    let mut exact = Vec::new();
    for i in 0..args.runs {
        // Interleaved, so drift on a shared machine hits both alike.
        base.push(one_run(&bin, args.pairs, None)?);
        exact.push(one_run(&bin, args.pairs, Some(&heapbpf))?);
        eprintln!(
            "xtask bench: run {}/{}: no profiler {:.0} pairs/s, heapbpf exact {:.0} pairs/s",
            i + 1,
            args.runs,
            base[i],
            exact[i]
        );
    }
    let (b, e) = (median(base), median(exact));
    println!(
        "malloc/free pairs per second (median of {} runs, {} pairs each)",
        args.runs, args.pairs
    );
    println!(
        "{:<28} {:>14} {:>10} {:>12}",
        "configuration", "pairs/s", "ratio", "ns/pair"
    );
    println!(
        "{:<28} {:>14.0} {:>10.3} {:>12.1}",
        "no profiler",
        b,
        1.0,
        1e9 / b
    );
    println!(
        "{:<28} {:>14.0} {:>10.3} {:>12.1}",
        "heapbpf --sample-bytes 0",
        e,
        e / b,
        1e9 / e
    );
    Ok(())
}
