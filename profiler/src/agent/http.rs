//! The agent's HTTP API (the contract's *Agent* section): `/healthz`,
//! `/targets`, `/debug/pprof/heap`, `/snapshots`, `/metrics`. Runs on a
//! thread and runtime of its own, so that a slow or hostile client never
//! stalls profiling; reads [`Shared`] and the data directory, and asks the
//! engine through [`Requests`] only for what needs it.
// INTERFACE (filled in by the HTTP work; the agent uses exactly this).
use std::{net::TcpListener, sync::Arc};

use super::view::{Requests, Shared};
use crate::{error::Result, output::dir::OutputDir};

/// What the server needs besides the shared view.
pub struct ServerConfig {
    /// The bearer token every endpoint but `/healthz` requires.
    pub token: Option<Vec<u8>>,
    /// The data directory, for `/snapshots` (a handle of its own).
    pub data_dir: OutputDir,
}

/// The running server; [`Server::stop`] ends it.
pub struct Server {
    _private: (),
}

/// Starts serving on `listener` (bound by the caller, so a bad `--listen`
/// fails before anything is attached).
pub fn start(
    listener: TcpListener,
    cfg: ServerConfig,
    shared: Arc<Shared>,
    requests: Requests,
) -> Result<Server> {
    let _ = (listener, cfg, shared, requests);
    Ok(Server { _private: () })
}

impl Server {
    /// Stops accepting, lets requests in flight finish (briefly), joins.
    pub fn stop(self) {}
}
