//! Uprobe sessions: one program runs at an allocator call's entry and, only
//! when its entry half asks for it, again at the call's return. A call that
//! sampling skips then costs one trap instead of two (Linux 6.13+).
//!
//! aya 0.14 can neither load a program with the `BPF_TRACE_UPROBE_SESSION`
//! attach type nor link the kfunc such a program calls
//! (`bpf_session_is_return`), nor create `uprobe_multi` links. This module
//! does those steps itself, beside aya: it relocates the session programs of
//! heapbpf's object against the maps aya created (with aya-obj, the
//! relocation code aya itself runs), rewrites the placeholder calls
//! ([`heapbpf_common::kfunc_call`]) into kfunc calls, loads the programs,
//! and attaches each to a function of one process with a
//! `uprobe_multi` link. The link is the probe: dropping it detaches.
//! Kernels without sessions fail [`Sessions::load`]; heapbpf then places
//! plain uprobe + uretprobe pairs.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya_obj::btf::{Btf, BtfKind};
use heapbpf_common::kfunc_call;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// `enum bpf_attach_type` (uapi/linux/bpf.h, Linux 6.13).
const BPF_TRACE_UPROBE_SESSION: u32 = 57;
/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
/// The kfuncs session programs call, by placeholder helper number.
const KFUNCS: [(i32, &str); 2] = [
    (kfunc_call::SESSION_IS_RETURN, "bpf_session_is_return"),
    (kfunc_call::SESSION_COOKIE, "bpf_session_cookie"),
];

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

/// `union bpf_attr` for `BPF_MAP_UPDATE_ELEM`.
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

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
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
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = sys_bpf(cmd, attr)?;
    // SAFETY: the kernel returned a new file descriptor that nobody owns yet.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Session programs loaded into the kernel, by name.
pub struct Sessions {
    programs: HashMap<&'static str, OwnedFd>,
    /// The session twin of `UNWIND_PROGS` (see [`Sessions::load`]).
    _unwind_progs: OwnedFd,
}

impl Sessions {
    /// Loads the programs `names` of `object` (whose maps `ebpf` created).
    /// The error says why sessions cannot be used here.
    ///
    /// A program may only tail-call programs of its own type and attach
    /// type, so the session programs get their own copy of the stack walk
    /// (`unwind` programs, loaded here as session programs too) in their own
    /// program array, which takes the place of `unwind_progs` in their code.
    pub fn load(
        object: &[u8],
        ebpf: &aya::Ebpf,
        names: &[&'static str],
        unwind_progs: &str,
        unwind: [&'static str; 2],
    ) -> Result<Self, String> {
        let btf = Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {e}"))?;
        let mut kfuncs = Vec::new();
        for (placeholder, name) in KFUNCS {
            let id = btf
                .id_by_type_name_kind(name, BtfKind::Func)
                .map_err(|_| format!("the kernel has no {name} (uprobe sessions: Linux 6.13)"))?;
            kfuncs.push((placeholder, id));
        }
        let mut obj = aya_obj::Object::parse(object).map_err(|e| e.to_string())?;
        let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
        let maps = obj.maps.clone();
        let own_progs = prog_array(unwind.len() as u32)
            .map_err(|e| format!("cannot create a program array: {e}"))?;
        let mut fds = Vec::new();
        for name in maps.keys() {
            let fd = if name == unwind_progs {
                own_progs.as_raw_fd()
            } else {
                let map = ebpf
                    .map(name)
                    .ok_or_else(|| format!("aya created no map {name}"))?;
                super::map_fd(map)
                    .map_err(|e| format!("map {name}: {e}"))?
                    .as_raw_fd()
            };
            fds.push((name.as_str(), fd));
        }
        obj.relocate_maps(
            fds.iter().map(|&(name, fd)| (name, fd, &maps[name])),
            &text_sections,
        )
        .map_err(|e| e.to_string())?;
        obj.relocate_calls(&text_sections)
            .map_err(|e| e.to_string())?;
        let license = CString::new(obj.license.as_bytes()).unwrap_or_else(|_| c"GPL".into());
        let mut programs = HashMap::new();
        for &name in names.iter().chain(&unwind) {
            let function = obj
                .programs
                .get(name)
                .and_then(|p| obj.functions.get(&p.function_key()))
                .ok_or_else(|| format!("the eBPF object has no program {name}"))?;
            let mut insns = function.instructions.clone();
            link_kfuncs(&mut insns, &kfuncs);
            let fd = load_program(name, &insns, &license)?;
            programs.insert(name, fd);
        }
        for (slot, name) in unwind.iter().enumerate() {
            let fd = programs[name].as_raw_fd() as u32;
            set_slot(&own_progs, slot as u32, fd)
                .map_err(|e| format!("cannot install the session stack walk: {e}"))?;
        }
        Ok(Sessions {
            programs,
            _unwind_progs: own_progs,
        })
    }

    /// Runs program `name` at entry (and, when it asks, at return) of the
    /// function at file offset `offset` of `path`, in process `pid` only;
    /// the program reads `cookie` with `bpf_get_attach_cookie`.
    pub fn attach(
        &self,
        name: &str,
        path: &Path,
        offset: u64,
        cookie: u64,
        pid: u32,
    ) -> io::Result<OwnedFd> {
        let prog = self
            .programs
            .get(name)
            .ok_or_else(|| io::Error::other(format!("no session program {name}")))?;
        let path = CString::new(path.as_os_str().as_bytes())?;
        let offsets = [offset];
        let cookies = [cookie];
        let mut attr = LinkCreateAttr {
            prog_fd: prog.as_fd().as_raw_fd() as u32,
            attach_type: BPF_TRACE_UPROBE_SESSION,
            path: path.as_ptr() as u64,
            offsets: offsets.as_ptr() as u64,
            cookies: cookies.as_ptr() as u64,
            cnt: 1,
            pid,
            ..Default::default()
        };
        bpf(BPF_LINK_CREATE, &mut attr)
    }
}

fn prog_array(entries: u32) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_PROG_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: entries,
        map_flags: 0,
    };
    bpf(BPF_MAP_CREATE, &mut attr)
}

fn set_slot(array: &OwnedFd, slot: u32, prog_fd: u32) -> io::Result<()> {
    let mut attr = MapUpdateAttr {
        map_fd: array.as_raw_fd() as u32,
        key: &slot as *const u32 as u64,
        value: &prog_fd as *const u32 as u64,
        ..Default::default()
    };
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Rewrites every call of a placeholder helper into a call of its kfunc
/// (`kfuncs`: placeholder, BTF id in vmlinux, whose module fd index is 0).
fn link_kfuncs(insns: &mut [aya_obj::generated::bpf_insn], kfuncs: &[(i32, u32)]) {
    for insn in insns {
        if insn.code != CALL || insn.src_reg() != 0 {
            continue;
        }
        if let Some(&(_, id)) = kfuncs.iter().find(|(p, _)| *p == insn.imm) {
            insn.set_src_reg(BPF_PSEUDO_KFUNC_CALL);
            insn.imm = id as i32;
            insn.off = 0;
        }
    }
}

fn load_program(
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
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(fd),
        Err(_) => {
            // Again with the verifier's log, to say why.
            let mut log = vec![0u8; 1 << 20];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let err = match bpf(BPF_PROG_LOAD, &mut attr) {
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
