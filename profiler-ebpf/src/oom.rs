//! The OOM killer's choice (`oom:mark_victim`): when it picks a traced
//! process, user space is told at once so it can write the last snapshot of
//! its heap.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};

use crate::maps::{OOM_VICTIMS, TARGETS};

/// Offset of `int pid` in the tracepoint record, after the 8 bytes of
/// common fields (stable since the tracepoint was added in 4.x).
const PID_OFFSET: usize = 8;

#[tracepoint]
pub fn oom_mark_victim(ctx: TracePointContext) -> u32 {
    // SAFETY: reads the tracepoint record through the checked helper.
    let Ok(pid) = (unsafe { ctx.read_at::<i32>(PID_OFFSET) }) else {
        return 0;
    };
    let pid = pid as u32;
    if TARGETS.get_ptr(pid).is_some() {
        // SAFETY: the helper takes no arguments and touches no memory of ours.
        let now = unsafe { bpf_ktime_get_ns() };
        let _ = OOM_VICTIMS.insert(pid, now, 0);
    }
    0
}
