//! Programs that do nothing, for `cargo xtask bench`'s floors: the cost of
//! the traps alone at heapbpf's probe points, with and without return probes.

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
