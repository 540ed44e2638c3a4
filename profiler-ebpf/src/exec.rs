//! A traced process's `exec` (`sched:sched_process_exec`): its old image is
//! gone, a new program runs under the same pid. The old image's figures are
//! kept in `EXECS` for its last snapshot, and the process's state starts
//! afresh, so that every figure counted from here on is the new image's.
//!
//! Attached as a raw tracepoint (no tracefs needed). The tracepoint runs in
//! the exec'ing task once the new image is loaded and before it runs an
//! instruction; the old image's other threads are gone by then, so nothing
//! else updates this state meanwhile, and every block the old image
//! recorded has an earlier time than this exec.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use heapbpf_common::{info_counter, ExecEvent};

use crate::{
    maps::{EXECS, PENDING},
    state::target,
};

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(ctx: RawTracePointContext) -> i32 {
    // The exec'ing thread has taken the process's id (the kernel swaps it
    // in when a thread other than the leader execs).
    let pid_tgid = crate::state::current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(state) = target(tgid) else {
        return 0;
    };
    // SAFETY: the helper takes no arguments and touches no memory of ours.
    let now = unsafe { bpf_ktime_get_ns() };
    // TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm):
    // the id the exec'ing thread had.
    let old_pid = ctx.arg::<u64>(1) as u32;
    // old_pid is the kernel's number, whatever namespace user space sees.
    let leader_replaced = (old_pid != (bpf_get_current_pid_tgid() >> 32) as u32) as u64;
    match EXECS.get_ptr_mut(tgid) {
        Some(seen) => {
            // Exec'd again before user space looked: the image between
            // the two is lost (user space says so).
            // SAFETY: valid map value.
            let seen = unsafe { &mut *seen };
            seen.last_ns = now;
            seen.count += 1;
            seen.leader_replaced |= leader_replaced;
        }
        None => {
            let event = ExecEvent {
                first_ns: now,
                last_ns: now,
                count: 1,
                leader_replaced,
                // SAFETY: valid map value, copied out.
                before: unsafe { *state },
            };
            if EXECS.insert(tgid, event, 0).is_err() {
                // Cannot happen: EXECS holds as many processes as TARGETS.
                // The figures then stay as they are, the old image's and
                // the new one's together.
                return 0;
            }
        }
    }
    // SAFETY: valid map value; no other thread of the process is left.
    let s = unsafe { &mut *state };
    s.allocated_bytes = 0;
    s.allocations = 0;
    s.freed_bytes = 0;
    s.frees = 0;
    s.counters = [0; info_counter::COUNT];
    s.image_ns = now;
    s.generation += 1;
    // A call of the old image's left half-done in this thread's slot (a
    // thread killed in the allocator) would make the new image's first
    // call look nested.
    let _ = PENDING.remove(pid_tgid);
    0
}
