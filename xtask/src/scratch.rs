//! `FROM scratch` images of one dynamically linked program, assembled
//! offline with podman: the program, exactly the shared libraries `ldd`
//! names, the dynamic loader, and a few plain files. No base image, no
//! registry, no shell in the image.
//!
//! Plain std only: `cargo xtask image` uses it for heapbpf, and the
//! integration tests include this same file (`#[path]`) for their fixtures'
//! images, so both are built the same way.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// What goes into an image.
pub struct ScratchImage<'a> {
    /// The program, copied to `/<entry_name>` and run as the entrypoint.
    pub binary: &'a Path,
    pub entry_name: &'a str,
    /// Host files copied to the same path in the image (CA certificates).
    pub extra_files: &'a [&'a Path],
    /// Strip debug info from the program (its symbols stay).
    pub strip_debug: bool,
    /// Tags, as `localhost/NAME:TAG`; the first is the image's name.
    pub tags: &'a [String],
    /// A scratch directory for the build context (emptied first).
    pub context: &'a Path,
    /// Comment lines written at the top of the Containerfile.
    pub comment: &'a str,
}

/// The files `ldd` says `binary` needs, the dynamic loader included, as
/// host paths (symlinks not yet followed).
pub fn ldd_files(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("cannot run ldd (install libc-bin): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "ldd {} failed: {}{}",
            binary.display(),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_ldd(&text).map_err(|e| format!("ldd {}: {e}", binary.display()))
}

/// The absolute paths in `ldd`'s output; a library it could not find is
/// an error, and so is a program that needs none (static: nothing to
/// assemble around it).
pub fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for line in text.lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)",
        // "/lib64/ld-linux-x86-64.so.2 (0x...)", "linux-vdso.so.1 (0x...)".
        let line = line.trim();
        let path = match line.split_once(" => ") {
            Some((_, rest)) => rest.split(" (").next().unwrap_or("").trim(),
            None => line.split(" (").next().unwrap_or("").trim(),
        };
        if path == "not found" {
            return Err(format!("a library is missing: {line}"));
        }
        if path.starts_with('/') {
            files.push(PathBuf::from(path));
        }
    }
    if files.is_empty() {
        return Err("names no library: a static program needs no libraries beside it".into());
    }
    Ok(files)
}

fn copy_into(root: &Path, host: &Path) -> Result<(), String> {
    let rel = host.strip_prefix("/").unwrap_or(host);
    let dest = root.join(rel);
    std::fs::create_dir_all(dest.parent().unwrap())
        .map_err(|e| format!("mkdir for {}: {e}", dest.display()))?;
    // fs::copy follows symlinks: the image gets the file under the name
    // the loader looks for.
    std::fs::copy(host, &dest)
        .map_err(|e| format!("copy {} to {}: {e}", host.display(), dest.display()))?;
    Ok(())
}

/// Builds the image; returns its size in bytes as podman counts it.
pub fn build(image: &ScratchImage) -> Result<u64, String> {
    let ctx = image.context;
    let _ = std::fs::remove_dir_all(ctx);
    let rootfs = ctx.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| format!("mkdir {}: {e}", rootfs.display()))?;
    let entry = rootfs.join(image.entry_name);
    if image.strip_debug {
        let st = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(image.binary)
            .arg(&entry)
            .status()
            .map_err(|e| format!("cannot run objcopy (install binutils): {e}"))?;
        if !st.success() {
            return Err(format!(
                "objcopy --strip-debug {} failed",
                image.binary.display()
            ));
        }
    } else {
        std::fs::copy(image.binary, &entry)
            .map_err(|e| format!("copy {}: {e}", image.binary.display()))?;
    }
    for lib in ldd_files(image.binary)? {
        copy_into(&rootfs, &lib)?;
    }
    for f in image.extra_files {
        copy_into(&rootfs, f)?;
    }
    let containerfile = format!(
        "{}FROM scratch\nCOPY rootfs/ /\nENTRYPOINT [\"/{}\"]\n",
        image
            .comment
            .lines()
            .map(|l| format!("# {l}\n"))
            .collect::<String>(),
        image.entry_name
    );
    std::fs::write(ctx.join("Containerfile"), containerfile)
        .map_err(|e| format!("write the Containerfile: {e}"))?;
    let mut cmd = Command::new("podman");
    cmd.args(["build", "--pull=never", "--quiet", "-f"])
        .arg(ctx.join("Containerfile"));
    for t in image.tags {
        cmd.arg("-t").arg(t);
    }
    cmd.arg(ctx);
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run podman (cargo xtask bootstrap installs it): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "podman build of {} failed: {}",
            image.tags.first().map(String::as_str).unwrap_or("?"),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    size(&image.tags[0])
}

/// The image's size in bytes, as `podman image inspect` gives it.
pub fn size(tag: &str) -> Result<u64, String> {
    let out = Command::new("podman")
        .args(["image", "inspect", "--format", "{{.Size}}", tag])
        .output()
        .map_err(|e| format!("cannot run podman: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| {
            format!(
                "podman image inspect {tag}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd5a5f2000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1c2a000000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1c29e00000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f1c2a100000)
";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        let missing =
            "\tlibfoo.so.1 => not found\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)\n";
        assert!(parse_ldd(missing).unwrap_err().contains("libfoo.so.1"));
        assert!(parse_ldd("\tstatically linked\n").is_err());
    }
}
