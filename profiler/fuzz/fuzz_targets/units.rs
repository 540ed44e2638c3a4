//! Sizes and durations of the command line: never a panic, errors on one
//! plain line (clap shows them and exits 2), sizes that parse print back.
#![no_main]

use heapbpf::units::{human_age_ms, human_bytes, parse_duration, parse_size, size_label};
use libfuzzer_sys::fuzz_target;

fn check_error(e: &str) {
    assert!(!e.is_empty());
    assert!(!e.chars().any(char::is_control), "{e:?}");
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match parse_size(&text) {
        Ok(n) => {
            assert_eq!(parse_size(&size_label(n)), Ok(n), "{text:?}");
            let _ = human_bytes(n.into());
        }
        Err(e) => check_error(&e),
    }
    match parse_duration(&text) {
        Ok(d) => {
            let _ = human_age_ms(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        }
        Err(e) => check_error(&e),
    }
});
