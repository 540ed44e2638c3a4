//! The pprof snapshot reader, raw or gzipped: never a panic, every failure
//! a bad-snapshot error, memory bounded (a smaller budget than heapbpf's own,
//! to stay under libFuzzer's RSS limit).
#![no_main]

use heapbpf::output::{pprof, Limits};
use libfuzzer_sys::fuzz_target;

mod common;

const LIMITS: Limits = Limits {
    pprof_bytes: 64 << 20,
    pprof_memory_bytes: 256 << 20,
    ..Limits::DEFAULT
};

fuzz_target!(|data: &[u8]| {
    match pprof::from_reader(std::path::Path::new(common::PATH), data, &LIMITS) {
        Ok(s) => common::check_snapshot(&s),
        Err(e) => common::check_error(&e),
    }
});
