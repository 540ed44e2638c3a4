//! `cargo xtask image`: heapbpf's container image, `FROM scratch`, built
//! offline with podman (no base image can be pulled): the release binary
//! without its debug info (its symbols stay, for backtraces and `perf`),
//! the shared libraries `ldd` names, the dynamic loader, and the CA
//! certificates for pushing over https. Tagged `localhost/heapbpf:<version>`
//! and `:latest`. With `--fixture PATH --tag T`, the same for any program
//! (the tests' fixtures).
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use clap::Args;

use crate::scratch::{self, ScratchImage};

#[derive(Args)]
pub struct ImageArgs {
    /// Build an image of this program instead of heapbpf's (entrypoint `/NAME`).
    #[arg(long, value_name = "PATH", requires = "tag")]
    pub fixture: Option<PathBuf>,
    /// The fixture image's tag (`localhost/NAME:TAG`).
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,
}

/// The image's name and version tag.
pub fn version_tag() -> String {
    format!("localhost/heapbpf:{}", env!("CARGO_PKG_VERSION"))
}

const COMMENT: &str =
    "heapbpf's image, built by `cargo xtask image` (xtask/src/image.rs): no base image,
just the binary, the libraries ldd names, the loader and the CA certificates.
It runs as root (uid 0) only because loading BPF programs and attaching uprobes
to other users' processes needs it; the DaemonSet drops every capability but the
few it names (deploy/kubernetes/daemonset.yaml) and mounts this root read-only.";

pub fn run(args: ImageArgs) -> Result<()> {
    if let Some(fixture) = args.fixture {
        let tag = args.tag.unwrap();
        let name = fixture
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("{}: not a program's path", fixture.display()))?
            .to_string();
        let ctx = crate::root().join("target/image").join(&name);
        let size = scratch::build(&ScratchImage {
            binary: &fixture,
            entry_name: &name,
            extra_files: &[],
            strip_debug: false,
            tags: std::slice::from_ref(&tag),
            context: &ctx,
            comment: "a test fixture's image (cargo xtask image --fixture)",
        })
        .map_err(|e| anyhow!(e))?;
        eprintln!("xtask: image {tag}: {size} bytes");
        return Ok(());
    }
    let (tag, size) = build_heapbpf()?;
    eprintln!(
        "xtask: image {tag} (and localhost/heapbpf:latest): {size} bytes ({:.1} MiB)",
        size as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// Builds the release binary and its image; returns the version tag and the size.
pub fn build_heapbpf() -> Result<(String, u64)> {
    let binary = crate::build_release()?;
    let tag = version_tag();
    let tags = [tag.clone(), "localhost/heapbpf:latest".to_string()];
    let certs = Path::new("/etc/ssl/certs/ca-certificates.crt");
    let extra: Vec<&Path> = if certs.exists() { vec![certs] } else { vec![] };
    if extra.is_empty() {
        eprintln!("xtask: no {}: the image cannot check https servers' certificates (apt-get install ca-certificates)", certs.display());
    }
    let size = scratch::build(&ScratchImage {
        binary: &binary,
        entry_name: "heapbpf",
        extra_files: &extra,
        strip_debug: true,
        tags: &tags,
        context: &crate::root().join("target/image/heapbpf"),
        comment: COMMENT,
    })
    .map_err(|e| anyhow!(e))?;
    Ok((tag, size))
}
