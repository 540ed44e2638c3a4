//! The perf-map parser (JIT symbols a target writes): never a panic,
//! symbols sorted and found where the map puts them, bounded in count.
#![no_main]

use heapbpf::symbolize::{parse_perf_map, PerfMap};
use libfuzzer_sys::fuzz_target;

fn check(map: &PerfMap) {
    let mut last = None;
    for (start, end, name) in map.iter() {
        assert!(last.is_none_or(|l| l < start), "sorted, one symbol a start");
        last = Some(start);
        assert!(start <= end);
        let expected = (start < end).then_some(name);
        assert_eq!(map.symbol(start), expected);
        assert!(!name.contains('\n'));
    }
}

fuzz_target!(|data: &[u8]| {
    let map = parse_perf_map(&String::from_utf8_lossy(data));
    check(&map);
    let mut bounded = PerfMap::default();
    let used = bounded.extend_from(data, 16);
    assert!(used <= data.len() as u64);
    assert!(bounded.len() <= 16);
    check(&bounded);
    // Read in two parts (as a growing file is), the same symbols.
    let cut = data.len() / 2;
    let mut parts = PerfMap::default();
    let first = parts.extend_from(&data[..cut], usize::MAX) as usize;
    parts.extend_from(&data[first..], usize::MAX);
    let mut whole = PerfMap::default();
    whole.extend_from(data, usize::MAX);
    assert_eq!(parts.iter().collect::<Vec<_>>(), whole.iter().collect::<Vec<_>>());
});
