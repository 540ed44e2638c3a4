//! Node.js: the native memory behind retained Buffers shows in snapshots,
//! and with `--perf-basic-prof` the retaining JavaScript function is named
//! from node's perf map.
use std::{path::Path, process::Command};

use heapbpf_integration_tests::*;

const MIB: u64 = 1 << 20;

#[test]
fn node_buffers_are_attributed_to_the_javascript_that_retains_them() {
    require_root();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/retain.js");
    let dir = TempDir::new("node");
    let mut cmd = Command::new("node");
    // node writes V8 logs (isolate-*.log) into its working directory.
    cmd.arg("--perf-basic-prof")
        .arg(&script)
        .current_dir(dir.path());
    let mut fx = Fixture::from_command(&mut cmd, |child, _| child.id());
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--format", "json"]);
    fx.command("run");
    hb.signal(libc::SIGUSR2);
    let s = read_json(&hb.wait_snapshot("signal", fx.pid)[0]);
    hb.signal(libc::SIGINT);
    hb.wait_snapshot("stop", fx.pid);
    assert_eq!(hb.wait_exit().code(), Some(0));
    let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", fx.pid));

    assert!(
        s["totals"]["live_bytes"].as_u64().unwrap() >= 60 * MIB,
        "{}",
        s["totals"]
    );
    let names = |st: &Value| -> Vec<String> {
        st["frames"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f["function"].as_str().map(str::to_string))
            .collect()
    };
    let retained: u64 = s["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|st| {
            names(st)
                .iter()
                .any(|n| n.contains("retainBuffers") && n.contains("retain.js"))
        })
        .map(|st| st["live_bytes"].as_u64().unwrap())
        .sum();
    assert!(
        retained >= 60 * MIB,
        "live bytes under retainBuffers: {retained}"
    );
    let top = names(&s["stacks"][0]);
    assert!(
        top.iter().any(|n| n.contains("ArrayBufferAllocator")),
        "native frames: {top:?}"
    );
}
