//! libtorch's c10d collectives for arbor's worker (docs/architecture.md §5): a TCPStore hosted by
//! rank 0, one PrefixStore per generation (`job/<id>/gen/<g>`), ProcessGroupGloo (CPU) or
//! ProcessGroupNCCL (cargo feature `nccl`), all-reduce and barrier with timeouts, and DDP-style
//! bucketed gradient averaging. The C++ side is a small shim (shim/arbor_c10d.cpp) that turns every
//! C++ exception into an error string. The same shim carries the few ATen operators tch 0.26 does
//! not bind ([`aten_ops`]: the fused AdamW kernel and resetting gradients to undefined).

pub mod aten_ops;
mod backend;
mod error;
mod ffi;
mod gradient_buckets;
mod gradient_reducer;
mod process_group;
mod store;

pub use backend::Backend;
pub use error::C10dError;
pub use gradient_buckets::{is_final_micro_step, GradientBuckets, DEFAULT_BUCKET_CAP_BYTES};
pub use gradient_reducer::GradientReducer;
pub use process_group::{generation_prefix, ProcessGroup, Reduction};
pub use store::{Store, StoreAddress};
