//! Reading whole hash maps with `BPF_MAP_LOOKUP_BATCH` (aya 0.14 has no
//! batched reads). Besides being one syscall per chunk instead of two per
//! entry, it is the only safe way to read a map that a busy target changes
//! all the time: the kernel's cursor is a bucket index, while a
//! `get_next_key` walk restarts from the first key when its current key is
//! deleted under it, counting entries twice or never ending.
use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Every (key, value) of a hash map whose entries are plain data (`K`, `V`
/// are `#[repr(C)]` integers only, so any bytes the kernel writes are valid).
pub fn lookup_all<K: Copy + aya::Pod, V: Copy + aya::Pod>(
    map: BorrowedFd<'_>,
) -> io::Result<Vec<(K, V)>> {
    let mut chunk = 4096usize;
    let mut out = Vec::new();
    // The cursor: a bucket index for hash maps; generously sized.
    let mut in_token = [0u8; 64];
    let mut out_token = [0u8; 64];
    let mut first = true;
    loop {
        // SAFETY: K and V are Pod: all-zero bytes are valid values.
        let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; chunk];
        let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; chunk];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { in_token.as_ptr() as u64 },
            out_batch: out_token.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: attr points to buffers of `chunk` keys and values and two
        // cursor buffers, all alive for the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (ret < 0).then(io::Error::last_os_error);
        let n = (attr.count as usize).min(chunk);
        match err.as_ref().and_then(|e| e.raw_os_error()) {
            // A bucket holds more entries than the chunk: retry bigger.
            Some(libc::ENOSPC) => {
                chunk *= 4;
                continue;
            }
            Some(libc::ENOENT) | None => {}
            Some(_) => return Err(err.unwrap_or_else(io::Error::last_os_error)),
        }
        out.extend(keys.into_iter().zip(values).take(n));
        if err.is_some() {
            // ENOENT: that was the last batch.
            return Ok(out);
        }
        in_token = out_token;
        first = false;
    }
}
