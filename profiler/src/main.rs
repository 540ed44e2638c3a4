//! The `heapbpf` binary: parse the command line, run, map errors to the
//! contract's exit codes.
use std::io::{IsTerminal, Write};

use clap::Parser;
use heapbpf::{
    cli::{self, Cli, Command},
    commands, lines,
};

fn main() {
    // An empty HEAPBPF_* setting (a ConfigMap's blank value) is the flag
    // left out, not an empty value. Still one thread here.
    for (key, value) in std::env::vars_os() {
        if value.is_empty() && key.to_str().is_some_and(|k| k.starts_with("HEAPBPF_")) {
            std::env::remove_var(key);
        }
    }
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
        Command::Agent(a) => (a.verbose, a.quiet),
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
        Command::Agent(args) => args.into_config().and_then(heapbpf::agent::run_agent),
        Command::Report(a) => cli::checked_top(a.top)
            .and_then(|top| commands::run_report(&a.snapshot, top, a.format.into())),
        Command::Diff(a) => cli::checked_top(a.top)
            .and_then(|top| commands::run_diff(&a.old, &a.new, top, a.format.into())),
    };
    if let Err(e) = result {
        for line in e.to_string().lines() {
            lines::say(line);
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
    // Colour for people only: on a terminal, unless NO_COLOR is set.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || EventWriter { ansi })
        .with_ansi(ansi)
        .with_target(false)
        .init();
}

/// stderr for tracing's lines, one line per event whatever its fields hold:
/// tracing writes each event with one `write_all`, here with every control
/// character inside it written out ([`lines::escape`]), but the escapes of
/// its own colours.
struct EventWriter {
    ansi: bool,
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let body = text.strip_suffix('\n').unwrap_or(&text);
        let mut line = String::with_capacity(body.len() + 1);
        for c in body.chars() {
            if c.is_control() && !(self.ansi && c == '\x1b') {
                line.push_str(&lines::escape(c.encode_utf8(&mut [0; 4])));
            } else {
                line.push(c);
            }
        }
        line.push('\n');
        std::io::stderr().lock().write_all(line.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
