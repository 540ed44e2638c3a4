//! Programs that do nothing, for `cargo xtask bench`'s floors: the cost of
//! the traps alone at heapbpf's probe points, with and without return probes,
//! as plain uprobes and uretprobes or as uprobe sessions.

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

#[uprobe]
pub fn noop_enter(_ctx: ProbeContext) -> u32 {
    0
}

#[uretprobe]
pub fn noop_return(_ctx: RetProbeContext) -> u32 {
    0
}

// Session programs are not `#[uprobe]`: its wrapper returns 0 whatever the
// function returns, and a session reads the entry half's return value.

/// A session whose entry half declines the return half.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn noop_session_entry(_regs: *mut core::ffi::c_void) -> u32 {
    1
}

/// A session whose entry half asks for the return half (which runs this
/// program again; its return value is ignored there).
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub fn noop_session_return(_regs: *mut core::ffi::c_void) -> u32 {
    0
}
