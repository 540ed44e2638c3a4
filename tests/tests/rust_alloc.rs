//! Rust programs, whatever their global allocator (`fixtures/rust/`):
//! tikv-jemallocator (`_rjem_*` inside the executable, no `_rjem_free`),
//! mimalloc (`mi_*`), and the System allocator with C code that mallocs.
//! heapbpf hooks Rust's allocator shims (`__rust_alloc` & co) and the
//! allocators underneath; each leak site is exact to the byte with no
//! option at all, its Rust function is the first frame outside Rust's
//! allocation code, and nothing is counted twice: the live totals are the
//! leaks, to the byte.
use heapbpf_integration_tests::*;
use std::path::{Path, PathBuf};

// The figures of `fixtures/rust/src/lib.rs` and `src/bin/system.rs`.
const RAW: u64 = (1 << 20) + 7;
const RAW_TIMES: u64 = 2;
const ZEROED: u64 = (2 << 20) + 3;
const SEED: u64 = 1 << 20;
const GROWN: u64 = (3 << 20) + 5;
const VEC_BYTES: u64 = ((1 << 17) + 1) * 8;
const CHURN: u64 = 50;
const CHURN_BYTES: u64 = 1000;
const C_LEAK: u64 = (1 << 20) + 11;
const C_CALLOC: u64 = 4 * 300_000;
const C_CHURN: u64 = 20;
const C_CHURN_BYTES: u64 = 100;

/// Whether a frame's function is Rust's allocation code (inlined
/// `alloc::alloc::alloc`, `RawVec`, `Box::new`'s `exchange_malloc`), which
/// sits between an allocating Rust function and the shim it calls.
fn is_rust_alloc_code(function: &str) -> bool {
    [
        "alloc::",
        "<alloc::",
        "core::",
        "<core::",
        "std::alloc",
        "__rust",
    ]
    .iter()
    .any(|p| function.starts_with(p))
}

/// The figures of the stacks whose first frame outside Rust's allocation
/// code is `function`; asserts that every frame before it is that code.
fn rust_site(snap: &Value, function: &str) -> Site {
    let mut s = Site::default();
    for st in snap["stacks"].as_array().expect("stacks") {
        let frames = st["frames"].as_array().expect("frames");
        let names: Vec<&str> = frames
            .iter()
            .map(|f| f["function"].as_str().unwrap_or("?"))
            .collect();
        let Some(first) = names.iter().position(|f| !is_rust_alloc_code(f)) else {
            continue;
        };
        if names[first] != function {
            continue;
        }
        s.live_bytes += st["live_bytes"].as_u64().unwrap();
        s.live_allocations += st["live_allocations"].as_u64().unwrap();
        s.allocated_bytes += st["allocated_bytes"].as_u64().unwrap();
        s.allocations += st["allocations"].as_u64().unwrap();
    }
    s
}

fn kept(bytes: u64, n: u64) -> Site {
    Site {
        live_bytes: bytes * n,
        live_allocations: n,
        allocated_bytes: bytes * n,
        allocations: n,
    }
}

fn freed(bytes: u64, n: u64) -> Site {
    Site {
        allocated_bytes: bytes * n,
        allocations: n,
        ..Site::default()
    }
}

/// One run: the fixture leaks once, heapbpf's `stop` snapshot is read.
/// `plain`: `heapbpf attach PID` with no option at all (sampling by
/// default); else exact and verbose. Returns the snapshot and heapbpf's
/// stderr.
fn leak_once(fixture: &str, plain: bool) -> (Value, Vec<String>, u32) {
    let dir = TempDir::new(fixture);
    let mut fx = Fixture::spawn(fixture);
    let mut hb = if plain {
        Heapbpf::attach_plain(&[fx.pid], dir.path())
    } else {
        Heapbpf::attach(&[fx.pid], dir.path(), &["-v", "--format", "json"])
    };
    fx.command("leak");
    hb.signal(libc::SIGINT);
    let paths = hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0), "{:#?}", hb.stderr);
    let json: PathBuf = paths
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| dir.path().join(p))
        .unwrap_or_else(|| panic!("no JSON snapshot in {paths:?}"));
    let snap = read_json(&json);
    (snap, hb.stderr.clone(), fx.pid)
}

/// The Rust leaks of every fixture, to the byte; with `exact`, also what
/// was allocated and freed.
fn assert_rust_sites(snap: &Value, exact: bool, what: &str) {
    let checks = [
        ("rustalloc::leak_raw", kept(RAW, RAW_TIMES)),
        ("rustalloc::leak_zeroed", kept(ZEROED, 1)),
        ("rustalloc::leak_grown", kept(GROWN, 1)),
        ("rustalloc::leak_vec", kept(VEC_BYTES, 1)),
        // Moved by the realloc: freed here, allocated again at leak_grown.
        ("rustalloc::leak_seed", freed(SEED, 1)),
    ];
    for (function, want) in checks {
        assert_eq!(
            rust_site(snap, function),
            want,
            "{function} in {what}:\n{snap:#}"
        );
    }
    if exact {
        assert_eq!(
            rust_site(snap, "rustalloc::churn"),
            freed(CHURN_BYTES, CHURN),
            "churn in {what}"
        );
    }
    // The direct calls of `std::alloc`: the Rust function is frames[0]
    // (the inlined `alloc::alloc::alloc` & co are left out), its caller next.
    for (function, want) in checks {
        if function != "rustalloc::leak_vec" {
            assert_eq!(site(snap, function), want, "frames[0] {function} in {what}");
        }
    }
    for function in ["rustalloc::leak_raw", "rustalloc::leak_grown"] {
        let stack = snap["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|st| functions(st).first().map(String::as_str) == Some(function))
            .unwrap_or_else(|| panic!("no stack of {what} starts at {function}:\n{snap:#}"));
        assert_eq!(
            functions(stack).get(1).map(String::as_str),
            Some("rustalloc::serve"),
            "{stack:#}"
        );
    }
}

const RUST_LIVE: u64 = RAW * RAW_TIMES + ZEROED + GROWN + VEC_BYTES;
const RUST_ALLOCATED: u64 = RUST_LIVE + SEED + CHURN * CHURN_BYTES;
const RUST_ALLOCATIONS: u64 = RAW_TIMES + 4 + CHURN;

/// Nothing counted twice, nothing missed: the live totals are the leaks
/// (the fixture allocates nothing else after `ready`).
fn assert_totals(snap: &Value, live_bytes: u64, live_allocations: u64, what: &str) {
    let t = &snap["totals"];
    assert_eq!(
        t["live_bytes"], live_bytes,
        "live bytes of {what}:\n{snap:#}"
    );
    assert_eq!(
        t["live_allocations"], live_allocations,
        "live allocations of {what}:\n{snap:#}"
    );
    assert_eq!(t["dropped_events"], 0, "{what}");
}

/// What `-v` says was chosen for a Rust program.
fn assert_shims_chosen(stderr: &[String], exe: &Path) {
    let exe = exe.display().to_string();
    let said = |needle: &str| stderr.iter().any(|l| l.contains(needle));
    assert!(
        said(&format!("Rust allocator shims hooked in {exe}")),
        "{stderr:#?}"
    );
    let attached = stderr
        .iter()
        .find(|l| l.contains(" attached to "))
        .expect("attached line");
    assert!(
        attached.contains(&format!("{exe} (__rust_alloc & co)")),
        "{attached}"
    );
}

fn check_rust_only(fixture: &str, family: &str) {
    require_root();
    let exe = fixture_path(fixture);
    // As a user runs it: no option.
    let (snap, stderr, _) = leak_once(fixture, true);
    assert_rust_sites(&snap, false, &format!("{fixture}, no option"));
    assert_totals(&snap, RUST_LIVE, RAW_TIMES + 3, fixture);
    assert!(
        stderr.iter().any(|l| l.contains("(__rust_alloc & co)")),
        "{stderr:#?}"
    );
    // Exact: what was freed too, and the choice in -v.
    let (snap, stderr, _) = leak_once(fixture, false);
    assert_rust_sites(&snap, true, &format!("{fixture}, exact"));
    assert_totals(&snap, RUST_LIVE, RAW_TIMES + 3, fixture);
    let t = &snap["totals"];
    assert_eq!(t["allocated_bytes"], RUST_ALLOCATED, "{fixture}");
    assert_eq!(t["allocations"], RUST_ALLOCATIONS, "{fixture}");
    assert_eq!(t["frees"], CHURN + 1, "{fixture}: the churn and the seed");
    assert_shims_chosen(&stderr, &exe);
    // A #[global_allocator]'s frees are seen at the shim.
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("Rust frees at __rust_dealloc")),
        "{stderr:#?}"
    );
    if !family.is_empty() {
        // The allocator family inside the executable, found by its shape.
        assert!(
            stderr
                .iter()
                .any(|l| l.contains(&format!("the {family}* family hooked in"))),
            "{stderr:#?}"
        );
    }
}

/// tikv-jemallocator: `_rjem_mallocx`, `_rjem_sdallocx`, ... inside the
/// executable, no `_rjem_free`.
#[test]
fn rust_with_jemalloc_as_global_allocator() {
    check_rust_only("rust-jemalloc", "_rjem_");
}

/// The `mimalloc` crate: `mi_malloc_aligned`, `mi_free`, ... inside the
/// executable (no `mi_malloc`: the linker keeps what the crate calls).
#[test]
fn rust_with_mimalloc_as_global_allocator() {
    check_rust_only("rust-mimalloc", "mi_");
}

/// Fat LTO inlines the shims into their callers, which call
/// `_rjem_mallocx` & co directly: those calls are counted at the family,
/// the rest at the shims, each once, with the Rust function as frames[0].
#[test]
fn rust_with_jemalloc_and_lto() {
    check_rust_only("rust-jemalloc-lto", "_rjem_");
}

/// The System allocator (glibc's malloc) and C code calling malloc in the
/// same process: both seen, each block once.
#[test]
fn rust_on_the_system_allocator_with_c_code() {
    require_root();
    let fixture = "rust-system";
    let c_sites = |snap: &Value, exact: bool| {
        assert_eq!(site(snap, "c_leak"), kept(C_LEAK, 2), "{snap:#}");
        assert_eq!(site(snap, "c_leak_calloc"), kept(C_CALLOC, 1), "{snap:#}");
        if exact {
            assert_eq!(site(snap, "c_churn"), freed(C_CHURN_BYTES, C_CHURN));
        }
    };
    let live = RUST_LIVE + 2 * C_LEAK + C_CALLOC;
    let live_allocations = RAW_TIMES + 3 + 3;
    let (snap, _, _) = leak_once(fixture, true);
    assert_rust_sites(&snap, false, "rust-system, no option");
    c_sites(&snap, false);
    assert_totals(&snap, live, live_allocations, fixture);
    let (snap, stderr, _) = leak_once(fixture, false);
    assert_rust_sites(&snap, true, "rust-system, exact");
    c_sites(&snap, true);
    assert_totals(&snap, live, live_allocations, fixture);
    let t = &snap["totals"];
    assert_eq!(
        t["allocated_bytes"],
        RUST_ALLOCATED + 2 * C_LEAK + C_CALLOC + C_CHURN * C_CHURN_BYTES
    );
    assert_eq!(t["allocations"], RUST_ALLOCATIONS + 3 + C_CHURN);
    assert_eq!(t["frees"], CHURN + 1 + C_CHURN);
    assert_shims_chosen(&stderr, &fixture_path(fixture));
    // The System allocator's frees are seen in glibc's free alone.
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("Rust frees in the C library's free")),
        "{stderr:#?}"
    );
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("allocator: malloc & co hooked in") && l.contains("libc.so.6")),
        "{stderr:#?}"
    );
}
