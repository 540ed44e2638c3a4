//! The `heapbpf` binary: parse the command line, run, map errors to the
//! contract's exit codes.
use clap::Parser;
use heapbpf::{
    cli::{Cli, Command},
    commands,
};

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
    init_logging(verbose, quiet);

    let result = match cli.command {
        Command::Attach(args) => {
            let pids = args.unique_pids();
            args.profile
                .into_config()
                .and_then(|cfg| commands::attach::run_attach(cfg, &pids))
        }
        // heapbpf run exits with the command's own status.
        Command::Run(args) => args
            .profile
            .into_config()
            .and_then(|cfg| commands::attach::run_command(cfg, &args.command))
            .map(|code| std::process::exit(code)),
        Command::Report(a) => commands::run_report(&a.snapshot, a.top, a.format.into()),
        Command::Diff(a) => commands::run_diff(&a.old, &a.new, a.top, a.format.into()),
    };
    if let Err(e) = result {
        for line in e.to_string().lines() {
            eprintln!("heapbpf: {line}");
        }
        std::process::exit(e.exit_code());
    }
}

/// Logs to stderr at the level `-v`/`-q` ask for (`HEAPBPF_LOG` overrides).
fn init_logging(verbose: u8, quiet: bool) {
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
}
