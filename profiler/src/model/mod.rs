//! Plain data: the raw snapshot drained from the kernel, its aggregation, and
//! the canonical [`Snapshot`]. No I/O, no kernel, no symbolizer.
mod address;
mod aggregate;
pub mod diff;
mod retired;
mod snapshot;

pub use address::{Address, ParseAddressError};
pub use aggregate::{
    aggregate, sample_weight, KernelData, LiveBlock, RawSnapshot, RawStack, StackAddrs,
    StackCounters,
};
pub use diff::{diff, Diff, DiffEntry, Status};
pub use retired::{RetiredStacks, DEFAULT_RETIRED_KEPT};
pub use snapshot::{
    basename, is_truncated_frame, reaches_root, strip_allocator_frames, truncated_frame, Coverage,
    CoverageWindow, Frame, Kubernetes, MappingInfo, Snapshot, Stack, TargetMeta, Totals, Trigger,
    SNAPSHOT_FORMAT, SNAPSHOT_VERSION, SYMBOLS_DEBUG_FILE, SYMBOLS_NONE, SYMBOLS_PENDING,
    TRUNCATED_FRAME,
};
