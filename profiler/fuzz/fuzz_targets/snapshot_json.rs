//! The JSON snapshot reader (`report`, `diff`): never a panic, every
//! failure a bad-snapshot error.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    match heapbpf::output::json::from_bytes(std::path::Path::new(common::PATH), data) {
        Ok(s) => common::check_snapshot(&s),
        Err(e) => common::check_error(&e),
    }
});
