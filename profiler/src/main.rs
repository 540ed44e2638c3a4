//! The `heapbpf` binary: parse the command line, run, map errors to the
//! contract's exit codes.
use clap::Parser;
use heapbpf::cli::{Cli, Command};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version exit 0; usage errors exit 2.
            let _ = e.print();
            std::process::exit(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let (verbose, quiet) = match &cli.command {
        Command::Attach(a) => (a.profile.verbose, a.profile.quiet),
        Command::Run(r) => (r.profile.verbose, r.profile.quiet),
        Command::Report(_) | Command::Diff(_) => (0, false),
    };
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (_, 0) => "warn",
        (_, 1) => "info",
        (_, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HEAPBPF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("heapbpf={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();

    let result = match cli.command {
        Command::Attach(args) => args
            .profile
            .into_config(args.pids)
            .and_then(heapbpf::session::run_attach),
        Command::Run(args) => match args.profile.into_config(Vec::new()) {
            // heapbpf run exits with the command's own status.
            Ok(cfg) => match heapbpf::session::run_command(cfg, args.command) {
                Ok(code) => std::process::exit(code),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        Command::Report(args) => heapbpf::session::run_report(&args),
        Command::Diff(args) => heapbpf::session::run_diff(&args),
    };
    if let Err(e) = result {
        for line in e.to_string().lines() {
            eprintln!("heapbpf: {line}");
        }
        std::process::exit(e.exit_code());
    }
}
