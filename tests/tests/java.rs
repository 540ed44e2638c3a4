//! Java: the native memory a JVM takes from glibc's malloc on the program's
//! behalf — direct ByteBuffers and `Unsafe.allocateMemory`, both
//! `Unsafe_AllocateMemory0` → `os::malloc` → `malloc` in libjvm.so — shows
//! exactly, under libjvm's C++ frames named from its symbol table, and, once
//! the JVM wrote its perf map (`jcmd PID Compiler.perfmap`), under the Java
//! method that allocated it.
//!
//! The JVM runs with `-XX:+PreserveFramePointer` (a flag production
//! services run with for perf's call graphs): without it, JIT-compiled Java
//! frames keep no frame pointer and the walk ends (marked truncated) at the
//! first of them. `-XX:-BackgroundCompilation` only makes the test
//! deterministic: the warm-up's calls wait for the JIT, so the leaking
//! method is compiled code (named in the perf map; an interpreted method is
//! the one `Interpreter` blob) when the leak starts.
use std::process::Command;

use heapbpf_integration_tests::*;

const MIB: u64 = 1 << 20;

fn java() -> Command {
    let classes = fixture_path("java");
    assert!(
        classes.join("Leak.class").exists(),
        "{} is missing: install a JDK (cargo xtask bootstrap installs openjdk-17-jdk-headless) and rebuild the tests",
        classes.join("Leak.class").display()
    );
    let mut cmd = Command::new("java");
    cmd.args([
        "-XX:+PreserveFramePointer",
        "-XX:-BackgroundCompilation",
        "-cp",
    ])
    .arg(classes)
    .arg("Leak");
    cmd
}

/// `jcmd PID Compiler.perfmap`: the JVM writes `/tmp/perf-PID.map` (the
/// whole file again each time, in place).
fn write_perf_map(pid: u32) {
    let out = Command::new("jcmd")
        .arg(pid.to_string())
        .arg("Compiler.perfmap")
        .output()
        .expect("run jcmd (cargo xtask bootstrap installs openjdk-17-jdk-headless)");
    assert!(
        out.status.success(),
        "jcmd {pid} Compiler.perfmap: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sums over the stacks with a frame whose function contains `name`.
fn under(snap: &Value, name: &str) -> Site {
    let mut s = Site::default();
    for st in stacks_under(snap, name) {
        s.live_bytes += st["live_bytes"].as_u64().unwrap();
        s.live_allocations += st["live_allocations"].as_u64().unwrap();
        s.allocated_bytes += st["allocated_bytes"].as_u64().unwrap();
        s.allocations += st["allocations"].as_u64().unwrap();
    }
    s
}

fn stacks_under<'a>(snap: &'a Value, name: &str) -> Vec<&'a Value> {
    snap["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|st| functions(st).iter().any(|f| f.contains(name)))
        .collect()
}

/// The JVM's perf map is left in the host's /tmp: removed however the
/// test ends.
struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn direct_buffers_and_unsafe_memory_are_named_down_to_the_java_method() {
    require_root();
    let dir = TempDir::new("java");
    let mut fx = Fixture::from_command(&mut java(), |_, own| own);
    let perf_map = format!("/tmp/perf-{}.map", fx.pid);
    let _remove = RemoveOnDrop(perf_map.clone());
    fx.command("warm 20000");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--format", "json"]);
    fx.command("leak 64 1048576");
    write_perf_map(fx.pid);
    hb.signal(libc::SIGUSR2);
    let first = read_json(&hb.wait_snapshot("signal", fx.pid)[0]);
    // leakUnsafe is compiled after the first perf map: the second one,
    // the same file rewritten, names it among the old symbols.
    fx.command("warm-unsafe 20000");
    fx.command("unsafe 10 100000");
    write_perf_map(fx.pid);
    hb.signal(libc::SIGUSR2);
    let second = read_json(&hb.wait_snapshot("signal", fx.pid)[0]);
    fx.command("free");
    hb.signal(libc::SIGINT);
    let last = read_json(&hb.wait_snapshot("stop", fx.pid)[0]);
    assert_eq!(hb.wait_exit().code(), Some(0));
    fx.command("exit");
    assert!(fx.wait_exit().success());

    assert_eq!(first["totals"]["dropped_events"], 0, "{}", first["totals"]);
    // Exact: a direct buffer of N bytes is one malloc(N) (not page-aligned
    // by default, no header while native memory tracking is off); its
    // Cleaner and the buffer object are on the Java heap.
    let leaked = Site {
        live_bytes: 64 * MIB,
        live_allocations: 64,
        allocated_bytes: 64 * MIB,
        allocations: 64,
    };
    assert_eq!(under(&first, "Unsafe_AllocateMemory0"), leaked);
    assert_eq!(under(&first, "Leak.leakDirect("), leaked, "{first:#}");
    for st in stacks_under(&first, "Leak.leakDirect(") {
        let f = functions(st);
        let frames = st["frames"].as_array().unwrap();
        // libjvm's C++ frames by name (Debian keeps its .symtab), then the
        // JIT's frames from the perf map, down to the thread's start.
        assert!(f[0].starts_with("os::malloc("), "{f:?}");
        assert!(
            frames[0]["module"]
                .as_str()
                .is_some_and(|m| m.ends_with("/libjvm.so")),
            "{st}"
        );
        assert_eq!(f[1], "Unsafe_AllocateMemory0", "{f:?}");
        let java = frames
            .iter()
            .find(|fr| {
                fr["function"]
                    .as_str()
                    .unwrap_or("")
                    .contains("Leak.leakDirect(")
            })
            .unwrap();
        assert_eq!(java["function"], "java.nio.ByteBuffer Leak.leakDirect(int)");
        assert_eq!(java["module"], perf_map.as_str());
        assert!(
            f.iter().any(|n| n.starts_with("JavaCalls::call_helper")),
            "{f:?}"
        );
        assert_eq!(st["truncated"], false, "{f:?}");
        assert_eq!(f.last().map(String::as_str), Some("clone3"), "{f:?}");
    }

    assert_eq!(second["totals"]["dropped_events"], 0);
    assert_eq!(
        under(&second, "Leak.leakUnsafe(").live_bytes,
        1_000_000,
        "{second:#}"
    );
    assert_eq!(under(&second, "Leak.leakUnsafe(").live_allocations, 10);
    assert_eq!(under(&second, "Leak.leakDirect("), leaked);
    assert_eq!(
        under(&second, "Unsafe_AllocateMemory0").live_bytes,
        64 * MIB + 1_000_000
    );

    // Freed: Unsafe.freeMemory at once, the buffers by the JVM's Cleaner
    // thread (os::free → free), each paired with its allocation.
    let direct = under(&last, "Leak.leakDirect(");
    assert_eq!((direct.live_bytes, direct.allocated_bytes), (0, 64 * MIB));
    assert_eq!(under(&last, "Leak.leakUnsafe(").live_bytes, 0);
    assert_eq!(under(&last, "Unsafe_AllocateMemory0").live_bytes, 0);
}

/// A JVM in its own pid and mount namespace (a container's): it is pid 1
/// there and writes `/tmp/perf-1.map` into its own /tmp; `jcmd` on the
/// host reaches it by its host pid, and heapbpf reads the map inside its
/// root under the pid it sees.
#[test]
fn a_jvm_in_its_own_namespaces_is_named_from_its_own_perf_map() {
    require_root();
    let dir = TempDir::new("java-ns");
    // The JVM's class path as `java()` has it, but in its own /tmp: the
    // checkout (and so the classes) may itself be under /tmp, which the
    // tmpfs hides. The tmpfs is filled at a test-owned directory, then
    // moved onto /tmp.
    let java = java();
    let mut inner = vec![java.get_program().to_str().unwrap().to_string()];
    let mut args: Vec<String> = java
        .get_args()
        .map(|a| a.to_str().unwrap().to_string())
        .collect();
    let cp = args.iter().position(|a| a == "-cp").unwrap() + 1;
    let classes = std::mem::replace(&mut args[cp], "/tmp/classes".into());
    inner.extend(args);
    let stage = dir.path().join("jvm-tmp");
    std::fs::create_dir(&stage).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--pid", "--fork", "--propagation", "private"])
        .args([
            "sh",
            "-c",
            "set -e; mount -t tmpfs heapbpf-java-tmp \"$1\"; cp -r \"$2\" \"$1/classes\"; \
             mount --move \"$1\" /tmp; shift 2; exec \"$@\"",
            "sh",
        ])
        .arg(&stage)
        .arg(&classes)
        .args(inner);
    let mut fx = Fixture::from_command(&mut cmd, |unshare, own_pid| {
        assert_eq!(own_pid, 1, "the JVM should be pid 1 of its namespace");
        // unshare --fork: the JVM (sh exec'd it) is unshare's only child.
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id())).unwrap();
        children
            .split_whitespace()
            .next()
            .expect("unshare has a child")
            .parse()
            .unwrap()
    });
    fx.command("warm 20000");
    let mut hb = Heapbpf::attach(&[fx.pid], dir.path(), &["--format", "json"]);
    fx.command("leak 8 1048576");
    write_perf_map(fx.pid);
    assert!(
        std::path::Path::new(&format!("/proc/{}/root/tmp/perf-1.map", fx.pid)).exists(),
        "the JVM wrote its perf map into its own /tmp"
    );
    hb.signal(libc::SIGINT);
    let snap = read_json(&hb.wait_snapshot("stop", fx.pid)[0]);
    assert_eq!(hb.wait_exit().code(), Some(0));
    fx.command("exit");
    assert!(fx.wait_exit().success());

    assert_eq!(snap["pid"], fx.pid, "the host pid");
    let leaked = under(&snap, "Leak.leakDirect(");
    assert_eq!(
        (leaked.live_bytes, leaked.live_allocations),
        (8 * MIB, 8),
        "{snap:#}"
    );
    for st in stacks_under(&snap, "Leak.leakDirect(") {
        let java = st["frames"]
            .as_array()
            .unwrap()
            .iter()
            .find(|fr| {
                fr["function"]
                    .as_str()
                    .unwrap_or("")
                    .contains("Leak.leakDirect(")
            })
            .unwrap();
        assert_eq!(java["module"], "/tmp/perf-1.map", "{st}");
    }
}
