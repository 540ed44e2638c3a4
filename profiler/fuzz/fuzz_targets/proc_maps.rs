//! `/proc/PID/maps` parsing: never a panic; what parses prints back to a
//! line that parses the same.
#![no_main]

use heapbpf::procfs::{parse_maps, to_target_view};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut maps = parse_maps(&text);
    for m in &maps {
        let _ = (m.is_file(), m.is_exec(), m.file_name(), m.map_file(1));
        let line = format!(
            "{:x}-{:x} {} {:08x} {} {} {}",
            m.start, m.end, m.perms, m.offset, m.dev, m.inode, m.path
        );
        assert_eq!(parse_maps(&line), vec![m.clone()], "{line:?}");
    }
    to_target_view(&mut maps, Some("/var/lib/container/root"));
    to_target_view(&mut maps, Some("/"));
});
