//! Compiles the C fixture programs with the system's gcc: with frame
//! pointers and debug info, unoptimized, so each call site is its own
//! `noinline` function with known figures; `deep` is optimized and without
//! frame pointers, for the stack walk; `exec_b_musl` is linked against musl
//! (musl-gcc), `exec_b_stripped` static and stripped; `Leak.java` with
//! javac.
use std::{env, path::PathBuf, process::Command};

const FIXTURES: &[&str] = &[
    "allocs",
    "grow",
    "startleak",
    "plugin",
    "paths",
    "stacks",
    "exec_a",
    "exec_b",
    "jit",
    "churn",
];

/// Fixtures linked against another allocator (not preloaded): the program
/// needs the library (`DT_NEEDED`), as a program built with `-ltcmalloc`.
const LINKED: &[(&str, &str, &str)] = &[
    ("allocs-jemalloc", "allocs", "libjemalloc.so.2"),
    ("allocs-tcmalloc", "allocs", "libtcmalloc_minimal.so.4"),
    ("allocs-mimalloc", "allocs", "libmimalloc.so.2"),
    (
        "startleak-tcmalloc",
        "startleak",
        "libtcmalloc_minimal.so.4",
    ),
];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    for name in FIXTURES {
        let src = format!("fixtures/{name}.c");
        println!("cargo:rerun-if-changed={src}");
        let status = Command::new("gcc")
            .args([
                "-O0",
                "-g",
                "-fno-omit-frame-pointer",
                "-pthread",
                "-Wall",
                "-o",
            ])
            .arg(out.join(name))
            .arg(&src)
            .status()
            .expect("run gcc (install it: apt-get install gcc)");
        assert!(status.success(), "gcc failed on {src}");
    }
    for (name, source, library) in LINKED {
        let lib = format!("/usr/lib/x86_64-linux-gnu/{library}");
        assert!(
            std::path::Path::new(&lib).exists(),
            "{lib} is missing: run `cargo xtask bootstrap` (it installs the allocators the tests link)"
        );
        let status = Command::new("gcc")
            .args([
                "-O0",
                "-g",
                "-fno-omit-frame-pointer",
                "-pthread",
                "-Wall",
                "-o",
            ])
            .arg(out.join(name))
            .arg(format!("fixtures/{source}.c"))
            .arg(&lib)
            .status()
            .expect("run gcc");
        assert!(status.success(), "gcc failed linking {name}");
    }
    // jemalloc linked into the executable (libjemalloc.a): the program's
    // malloc is its own.
    let archive = "/usr/lib/x86_64-linux-gnu/libjemalloc.a";
    assert!(
        std::path::Path::new(archive).exists(),
        "{archive} is missing: run `cargo xtask bootstrap` (it installs libjemalloc-dev)"
    );
    let status = Command::new("gcc")
        .args([
            "-O0",
            "-g",
            "-fno-omit-frame-pointer",
            "-pthread",
            "-Wall",
            "-o",
        ])
        .arg(out.join("allocs-jemalloc-static"))
        .arg("fixtures/allocs.c")
        .args([archive, "-lm", "-ldl"])
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc failed linking libjemalloc.a");
    // A program carrying its own allocator: je_-prefixed beside glibc's
    // malloc, under a prefix of its own (acme_), and unprefixed (it is the
    // program's malloc).
    println!("cargo:rerun-if-changed=fixtures/vendored.c");
    for (name, prefix) in [
        ("vendored-je", "je_"),
        ("vendored-acme", "acme_"),
        ("vendored-plain", ""),
    ] {
        let status = Command::new("gcc")
            .args(["-O0", "-g", "-fno-omit-frame-pointer", "-Wall"])
            .arg(format!("-DPREFIX={prefix}"))
            .arg("-o")
            .arg(out.join(name))
            .arg("fixtures/vendored.c")
            .status()
            .expect("run gcc");
        assert!(
            status.success(),
            "gcc failed on fixtures/vendored.c for {name}"
        );
    }
    // The stack-walk fixture, built as distributions build: optimized,
    // without frame pointers.
    println!("cargo:rerun-if-changed=fixtures/deep.c");
    let status = Command::new("gcc")
        .args([
            "-O2",
            "-g",
            "-fomit-frame-pointer",
            "-pthread",
            "-Wall",
            "-o",
        ])
        .arg(out.join("deep"))
        .arg("fixtures/deep.c")
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc failed on fixtures/deep.c");
    // A library the plugin fixture loads after attach, without frame
    // pointers.
    println!("cargo:rerun-if-changed=fixtures/walklib.c");
    let status = Command::new("gcc")
        .args([
            "-O2",
            "-g",
            "-fomit-frame-pointer",
            "-fPIC",
            "-shared",
            "-Wall",
            "-o",
        ])
        .arg(out.join("libwalk.so"))
        .arg("fixtures/walklib.c")
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc failed on fixtures/walklib.c");
    // The C++ fixture: operator new from methods.
    println!("cargo:rerun-if-changed=fixtures/cache.cpp");
    let status = Command::new("g++")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-Wall", "-o"])
        .arg(out.join("cache"))
        .arg("fixtures/cache.cpp")
        .status()
        .expect("run g++ (install it: apt-get install g++)");
    assert!(status.success(), "g++ failed on fixtures/cache.cpp");
    // The same exactness fixture, statically linked: its malloc lives in the
    // executable itself.
    let status = Command::new("gcc")
        .args([
            "-static",
            "-O0",
            "-g",
            "-fno-omit-frame-pointer",
            "-pthread",
            "-Wall",
            "-o",
        ])
        .arg(out.join("allocs-static"))
        .arg("fixtures/allocs.c")
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc -static failed on fixtures/allocs.c");
    hardening_fixtures(&out);
    java_fixture(&out);
    debuginfo_fixtures(&out);
    rust_fixtures(&out);
    // The program exec_a execs, linked against musl: another C library
    // than the one heapbpf hooked before the exec.
    let status = Command::new("musl-gcc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-Wall", "-o"])
        .arg(out.join("exec_b_musl"))
        .arg("fixtures/exec_b.c")
        .status()
        .expect("run musl-gcc (install it: apt-get install musl-tools, or cargo xtask bootstrap)");
    assert!(status.success(), "musl-gcc failed on fixtures/exec_b.c");
    // ... and static and stripped: nothing heapbpf can hook.
    let status = Command::new("gcc")
        .args(["-static", "-s", "-O0", "-Wall", "-o"])
        .arg(out.join("exec_b_stripped"))
        .arg("fixtures/exec_b.c")
        .status()
        .expect("run gcc");
    assert!(
        status.success(),
        "gcc -static -s failed on fixtures/exec_b.c"
    );
    println!("cargo:rustc-env=FIXTURE_DIR={}", out.display());
}

/// `Leak.java` (java.rs), compiled with the JDK's javac into `java/` (the
/// class path the test runs it from). Built when a JDK is installed (`cargo
/// xtask bootstrap` installs openjdk-17-jdk-headless); the test says so
/// when it is missing.
fn java_fixture(out: &std::path::Path) {
    let src = "fixtures/Leak.java";
    println!("cargo:rerun-if-changed={src}");
    let classes = out.join("java");
    std::fs::create_dir_all(&classes).expect("create the java fixture directory");
    match Command::new("javac")
        .arg("-d")
        .arg(&classes)
        .arg(src)
        .status()
    {
        Ok(status) => assert!(status.success(), "javac failed on {src}"),
        Err(e) => {
            println!("cargo:warning=java fixture not built ({e}): install openjdk-17-jdk-headless")
        }
    }
}

/// The fixtures of `hardening_text.rs`: `hostile` (glibc, and static against
/// musl: a malloc without a free), and Go programs without and with cgo
/// (built when Go is installed; the tests that need them say so).
fn hardening_fixtures(out: &std::path::Path) {
    println!("cargo:rerun-if-changed=fixtures/hostile.c");
    let status = Command::new("gcc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-Wall", "-o"])
        .arg(out.join("hostile"))
        .arg("fixtures/hostile.c")
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc failed on fixtures/hostile.c");
    let status = Command::new("musl-gcc")
        .args([
            "-static",
            "-O0",
            "-g",
            "-fno-omit-frame-pointer",
            "-Wall",
            "-o",
        ])
        .arg(out.join("hostile-musl-static"))
        .arg("fixtures/hostile.c")
        .status()
        .expect("run musl-gcc (install it: cargo xtask bootstrap installs musl-tools)");
    assert!(
        status.success(),
        "musl-gcc -static failed on fixtures/hostile.c"
    );
    for (name, cgo) in [("gofx", "0"), ("gocgo", "1")] {
        let src = format!("fixtures/{name}.go");
        println!("cargo:rerun-if-changed={src}");
        match Command::new("go")
            .args(["build", "-o"])
            .arg(out.join(name))
            .arg(&src)
            .env("CGO_ENABLED", cgo)
            .status()
        {
            Ok(status) => assert!(status.success(), "go build failed on {src}"),
            Err(e) => println!("cargo:warning=go fixtures not built ({e}): install golang-go"),
        }
    }
}

/// The fixtures of `debuginfo.rs`, split as distributions ship programs:
/// built with `-g`, the debug info copied off (`objcopy --only-keep-debug`:
/// `debuginfo.debug`, `libdebuginfo.so.debug`), and stripped copies of the
/// very same image (`objcopy --strip-all`, as `strip`): `debuginfo-stripped`
/// and `libdebuginfo-stripped.so` with nothing left but a build id,
/// `debuginfo-linked` with a `.gnu_debuglink` to `debuginfo.debug`.
fn debuginfo_fixtures(out: &std::path::Path) {
    let run = |cmd: &mut Command| {
        let status = cmd.current_dir(out).status().unwrap_or_else(|e| {
            panic!("run {cmd:?}: {e} (binutils and gcc: cargo xtask bootstrap)")
        });
        assert!(status.success(), "{cmd:?} failed");
    };
    let src = std::env::current_dir().unwrap().join("fixtures");
    for f in ["debuginfo.c", "debuginfo_lib.c"] {
        println!("cargo:rerun-if-changed=fixtures/{f}");
    }
    run(Command::new("gcc")
        .args([
            "-O0",
            "-g",
            "-fno-omit-frame-pointer",
            "-Wall",
            "-Wl,--build-id",
            "-o",
            "debuginfo",
        ])
        .arg(src.join("debuginfo.c"))
        .arg("-ldl"));
    run(Command::new("gcc")
        .args([
            "-O0",
            "-g",
            "-fno-omit-frame-pointer",
            "-fPIC",
            "-shared",
            "-Wall",
            "-Wl,--build-id",
            "-o",
            "libdebuginfo.so",
        ])
        .arg(src.join("debuginfo_lib.c")));
    run(Command::new("objcopy").args(["--only-keep-debug", "debuginfo", "debuginfo.debug"]));
    run(Command::new("objcopy").args(["--strip-all", "debuginfo", "debuginfo-stripped"]));
    run(Command::new("objcopy").args([
        "--strip-all",
        "--add-gnu-debuglink=debuginfo.debug",
        "debuginfo",
        "debuginfo-linked",
    ]));
    run(Command::new("objcopy").args([
        "--only-keep-debug",
        "libdebuginfo.so",
        "libdebuginfo.so.debug",
    ]));
    run(Command::new("objcopy").args([
        "--strip-all",
        "libdebuginfo.so",
        "libdebuginfo-stripped.so",
    ]));
}

/// The Rust fixtures of `rust_alloc.rs` (`fixtures/rust/`, its own cargo
/// workspace): `rust-jemalloc`, `rust-mimalloc`, `rust-system`, built in
/// release with `debug = 1`, and `rust-jemalloc-lto` (fat LTO), into
/// `target/rust-fixtures` (kept between builds: jemalloc's C build is the
/// slow part, about 3 minutes in all on a 2-core VM) and copied here.
/// Offline once its crates are in cargo's cache (`Cargo.lock` pins them);
/// the first build fetches them from crates.io.
fn rust_fixtures(out: &std::path::Path) {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let dir = manifest_dir.join("fixtures/rust");
    for f in ["Cargo.toml", "Cargo.lock", "build.rs", "src"] {
        println!("cargo:rerun-if-changed=fixtures/rust/{f}");
    }
    let target = manifest_dir.join("../target/rust-fixtures");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = |args: &[&str], offline: bool| {
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(&dir)
            .args(["build", "--locked"])
            .args(args)
            .arg("--target-dir")
            .arg(&target);
        if offline {
            cmd.arg("--offline");
        }
        // Not this build's settings: the fixtures are a program of their own.
        for var in [
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
        ] {
            cmd.env_remove(var);
        }
        cmd.status().expect("run cargo for the Rust fixtures")
    };
    // Every allocator in release; jemalloc again with fat LTO, which
    // inlines the shims into their callers.
    let builds: [&[&str]; 2] = [
        &["--release", "--bins", "--features", "jemalloc,mimalloc"],
        &[
            "--profile",
            "release-lto",
            "--bin",
            "rust-jemalloc",
            "--features",
            "jemalloc",
        ],
    ];
    for args in builds {
        // Offline first (the crates are cached after the first build),
        // else fetch them.
        if !build(args, true).success() {
            let status = build(args, false);
            assert!(
                status.success(),
                "cargo build {args:?} failed for tests/fixtures/rust (its crates come from crates.io on the first build)"
            );
        }
    }
    for (built, name) in [
        ("release/rust-jemalloc", "rust-jemalloc"),
        ("release/rust-mimalloc", "rust-mimalloc"),
        ("release/rust-system", "rust-system"),
        ("release-lto/rust-jemalloc", "rust-jemalloc-lto"),
    ] {
        let built = target.join(built);
        std::fs::copy(&built, out.join(name))
            .unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
    }
}
