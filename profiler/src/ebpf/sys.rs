//! The one door to `bpf(2)` for what aya 0.14 cannot do: reading whole
//! hash maps in batches, taking an entry out in one step, reading a program's
//! run statistics, and loading and linking uprobe-session programs
//! (see [`super::uprobe_session`]). Each command's `union bpf_attr` prefix is
//! a `#[repr(C)]` struct here; nothing else in heapbpf calls the syscall.
//!
//! Batched reads: besides being one syscall per chunk instead of two per
//! entry, they are the only safe way to read a map that a busy target changes
//! all the time: the kernel's cursor is a bucket index, while a
//! `get_next_key` walk restarts from the first key when its current key is
//! deleted under it, counting entries twice or never ending.
use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// `enum bpf_attach_type` (uapi/linux/bpf.h, Linux 6.13).
const BPF_TRACE_UPROBE_SESSION: u32 = 57;

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD`; the kernel
/// reads the rest as zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The leading fields of `union bpf_attr` for `BPF_MAP_CREATE`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `union bpf_attr` for `BPF_MAP_UPDATE_ELEM` and the other commands on one
/// element.
#[repr(C)]
#[derive(Default)]
struct MapUpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` of a `uprobe_multi` link.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    _pad: u32,
}

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
        // SAFETY: as above.
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
        let err = call(BPF_MAP_LOOKUP_BATCH, &mut attr).err();
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

/// Deletes `key` from a map; `false` when it was not there.
pub fn delete<K: aya::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<bool> {
    let mut attr = MapUpdateAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        ..Default::default()
    };
    match call(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Takes the value at `key` out of a hash map in one step, so that an
/// update the programs make meanwhile is either in it or still in the map.
pub fn take<K: aya::Pod, V: Copy + aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    // SAFETY: V is Pod: all-zero bytes are a valid value.
    let mut value: V = unsafe { std::mem::zeroed() };
    let mut attr = MapUpdateAttr {
        map_fd: map.as_raw_fd() as u32,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        ..Default::default()
    };
    match call(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes `keys` from a hash map, a few thousand per syscall; keys not
/// there (deleted meanwhile) are skipped.
pub fn delete_batch<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> io::Result<()> {
    for chunk in keys.chunks(8192) {
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        match call(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(_) => {}
            // The kernel stops at the first key that is gone: go on one by one.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                for key in &chunk[(attr.count as usize).min(chunk.len())..] {
                    delete(map, key)?;
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs `bpf(cmd, attr)`.
fn call<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `cmd`,
    // alive for the call; pointers in it point at live buffers of the caller.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// A `bpf(2)` command that returns a new file descriptor.
fn call_fd<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = call(cmd, attr)?;
    // SAFETY: the kernel returned a new file descriptor that nobody owns yet.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// A program's run time and run count (`BPF_ENABLE_STATS`; both 0 while
/// statistics are off), for programs aya did not load.
pub fn prog_run_stats(prog: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // SAFETY: a plain C struct of integers: all-zero bytes are valid.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: size_of::<aya_obj::generated::bpf_prog_info>() as u32,
        info: &mut info as *mut _ as u64,
    };
    call(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok((info.run_time_ns, info.run_cnt))
}

/// A new program array of `entries` slots.
pub fn prog_array(entries: u32) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_PROG_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: entries,
        map_flags: 0,
    };
    call_fd(BPF_MAP_CREATE, &mut attr)
}

/// Puts program `prog_fd` in `slot` of a program array.
pub fn set_slot(array: BorrowedFd<'_>, slot: u32, prog_fd: u32) -> io::Result<()> {
    let mut attr = MapUpdateAttr {
        map_fd: array.as_raw_fd() as u32,
        key: &slot as *const u32 as u64,
        value: &prog_fd as *const u32 as u64,
        ..Default::default()
    };
    call(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Loads a uprobe-session program; a refusal says what the verifier said.
pub fn load_session_program(
    name: &str,
    insns: &[aya_obj::generated::bpf_insn],
    license: &CString,
) -> Result<OwnedFd, String> {
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_KPROBE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type: BPF_TRACE_UPROBE_SESSION,
        ..Default::default()
    };
    match call_fd(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(fd),
        Err(_) => {
            // Again with the verifier's log, to say why.
            let mut log = vec![0u8; 1 << 20];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let err = match call_fd(BPF_PROG_LOAD, &mut attr) {
                Ok(fd) => return Ok(fd),
                Err(e) => e,
            };
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0');
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(format!(
                "the kernel refused session program {name}: {err}; verifier: {}",
                tail.join(" | ")
            ))
        }
    }
}

/// Attaches session program `prog_fd` at file offset `offset` of `path`, in
/// process `pid` only, with an attach cookie. The link is the probe:
/// dropping it detaches.
pub fn uprobe_session_link(
    prog_fd: BorrowedFd<'_>,
    path: &CString,
    offset: u64,
    cookie: u64,
    pid: u32,
) -> io::Result<OwnedFd> {
    let offsets = [offset];
    let cookies = [cookie];
    let mut attr = LinkCreateAttr {
        prog_fd: prog_fd.as_raw_fd() as u32,
        attach_type: BPF_TRACE_UPROBE_SESSION,
        path: path.as_ptr() as u64,
        offsets: offsets.as_ptr() as u64,
        cookies: cookies.as_ptr() as u64,
        cnt: 1,
        pid,
        ..Default::default()
    };
    call_fd(BPF_LINK_CREATE, &mut attr)
}
