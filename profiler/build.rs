//! Builds the eBPF programs of `profiler-ebpf` for the BPF target with
//! aya-build (nightly, `-Z build-std=core`, bpf-linker). `cargo xtask
//! bootstrap` installs what this needs.
//!
//! Without bpf-linker (a contributor running plain `cargo test` for the pure
//! unit tests) the object is left empty, with a warning, and a heapbpf built
//! so refuses to profile, saying why. `HEAPBPF_REQUIRE_EBPF=1` (set by
//! `cargo xtask`) makes a missing bpf-linker a build error instead;
//! `HEAPBPF_SKIP_EBPF=1` skips the eBPF build on purpose.
use anyhow::{anyhow, bail, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=HEAPBPF_SKIP_EBPF");
    println!("cargo::rerun-if-env-changed=HEAPBPF_REQUIRE_EBPF");
    println!("cargo::rustc-check-cfg=cfg(heapbpf_no_ebpf)");
    let require = std::env::var_os("HEAPBPF_REQUIRE_EBPF").is_some_and(|v| v == "1");
    let skip = std::env::var_os("HEAPBPF_SKIP_EBPF").is_some_and(|v| v == "1");
    let why_not = if skip {
        Some("HEAPBPF_SKIP_EBPF=1")
    } else if !on_path("bpf-linker") {
        Some("bpf-linker is not installed (cargo xtask bootstrap installs it)")
    } else {
        None
    };
    if let Some(why) = why_not {
        if require {
            bail!("heapbpf's eBPF programs cannot be built: {why}");
        }
        println!(
            "cargo::warning=building heapbpf without its eBPF programs: {why}; it will refuse to profile"
        );
        println!("cargo::rustc-cfg=heapbpf_no_ebpf");
        let out = std::env::var("OUT_DIR").context("OUT_DIR")?;
        std::fs::write(std::path::Path::new(&out).join("heapbpf"), [])?;
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "heapbpf-ebpf")
        .ok_or_else(|| anyhow!("heapbpf-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("heapbpf-ebpf manifest has no parent"))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}
