//! C++ programs: `operator new` / `delete` with glibc (libstdc++'s go
//! through malloc and free) and with allocators that define their own
//! (jemalloc, tcmalloc, mimalloc), exact per method.
use heapbpf_integration_tests::*;

const LIBS: &str = "/usr/lib/x86_64-linux-gnu";

fn check(preload: Option<&str>) {
    let dir = TempDir::new("cplusplus");
    let mut fx = match preload {
        Some(lib) => Fixture::spawn_preloaded("cache", &format!("{LIBS}/{lib}")),
        None => Fixture::spawn("cache"),
    };
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &[]);
    fx.command("remember 100");
    fx.command("nodes 50");
    fx.command("forget 30");
    hb.signal(libc::SIGINT);
    let snap = read_json(&hb.wait_snapshot("stop", fx.pid)[0]);
    assert_eq!(hb.wait_exit().code(), Some(0));
    let what = preload.unwrap_or("glibc");
    assert_eq!(
        site(&snap, "Cache::remember"),
        Site {
            live_bytes: 70 * 1000,
            live_allocations: 70,
            allocated_bytes: 100 * 1000,
            allocations: 100
        },
        "Cache::remember with {what}:\n{snap:#}"
    );
    assert_eq!(
        site(&snap, "Cache::add_node"),
        Site {
            live_bytes: 50 * 48,
            live_allocations: 50,
            allocated_bytes: 50 * 48,
            allocations: 50
        },
        "Cache::add_node with {what}"
    );
    assert_eq!(snap["totals"]["dropped_events"], 0);
    // The method's caller follows it, and nothing of the allocator precedes it.
    let st = snap["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["frames"][0]["function"]
                .as_str()
                .unwrap_or("")
                .starts_with("Cache::remember")
        })
        .unwrap();
    assert_eq!(st["frames"][1]["function"], "main", "{st}");
}

#[test]
fn operator_new_with_glibc() {
    require_root();
    check(None);
}

#[test]
fn operator_new_with_tcmalloc() {
    require_root();
    check(Some("libtcmalloc_minimal.so.4"));
}

#[test]
fn operator_new_with_jemalloc() {
    require_root();
    check(Some("libjemalloc.so.2"));
}

#[test]
fn operator_new_with_mimalloc() {
    require_root();
    check(Some("libmimalloc.so.2"));
}
