//! Errors a caller acts on, each mapped to the contract's exit code.
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or argument that makes no sense.
    #[error("{0}")]
    BadInput(String),
    #[error("no such process: {pid} (check the pid with `ps -p {pid}`)")]
    NoSuchProcess { pid: u32 },
    #[error("process {pid} exited while heapbpf was attaching to it")]
    Exited { pid: u32 },
    #[error("cannot trace pid {pid}: {why}")]
    NotTraceable { pid: u32, why: String },
    #[error("cannot write snapshots to {}: {why}", path.display())]
    OutputDir { path: PathBuf, why: String },
    #[error("{}: {why}", path.display())]
    BadSnapshot { path: PathBuf, why: String },
    #[error(
        "missing privileges to load eBPF programs: {0}\n\
         run heapbpf as root, or grant it CAP_BPF and CAP_PERFMON (plus CAP_SYS_ADMIN to read /proc/PID/map_files)"
    )]
    Privileges(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    /// The process exit code of the contract: 2 for bad input, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::BadInput(_)
            | Error::NoSuchProcess { .. }
            | Error::Exited { .. }
            | Error::NotTraceable { .. }
            | Error::OutputDir { .. }
            | Error::BadSnapshot { .. } => 2,
            Error::Privileges(_) | Error::Unsupported(_) | Error::Runtime(_) => 1,
        }
    }

    pub fn runtime(context: impl std::fmt::Display, err: impl std::fmt::Display) -> Self {
        Error::Runtime(format!("{context}: {err}"))
    }
}
