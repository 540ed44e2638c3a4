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
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya_obj::btf::{Btf, BtfKind};

use super::sys;
use heapbpf_common::kfunc_call;

/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;
/// The kfuncs session programs call, by placeholder helper number.
const KFUNCS: [(i32, &str); 2] = [
    (kfunc_call::SESSION_IS_RETURN, "bpf_session_is_return"),
    (kfunc_call::SESSION_COOKIE, "bpf_session_cookie"),
];

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
        let own_progs = sys::prog_array(unwind.len() as u32)
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
            let fd = sys::load_session_program(name, &insns, &license)?;
            programs.insert(name, fd);
        }
        for (slot, name) in unwind.iter().enumerate() {
            let fd = programs[name].as_raw_fd() as u32;
            sys::set_slot(own_progs.as_fd(), slot as u32, fd)
                .map_err(|e| format!("cannot install the session stack walk: {e}"))?;
        }
        Ok(Sessions {
            programs,
            _unwind_progs: own_progs,
        })
    }

    /// The loaded session programs (for their run statistics).
    pub fn programs(&self) -> impl Iterator<Item = (&'static str, std::os::fd::BorrowedFd<'_>)> {
        self.programs.iter().map(|(name, fd)| (*name, fd.as_fd()))
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
        sys::uprobe_session_link(prog.as_fd(), &path, offset, cookie, pid)
    }
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
