//! Gradient averaging overlapped with the backward pass: c10d's `Reducer`, the engine of
//! PyTorch's DistributedDataParallel, driven from Rust (shim `arbor_c10d_reducer_*`).
//!
//! The reducer registers an autograd hook on every parameter. During a backward pass it was
//! armed for ([`GradientReducer::prepare_for_backward`]), each bucket (the first 1 MiB, then
//! at most the cap, in reverse parameter order) is all-reduced as soon as its last gradient is
//! ready, while autograd computes the earlier layers' gradients; at the end of the pass every
//! gradient holds the mean over the group. A backward pass it was not armed for leaves the
//! gradients local, which is how gradient accumulation skips the all-reduce on non-final
//! micro-steps. A failed collective (a dead peer, the group's timeout) makes the backward pass
//! itself fail with the error.

use std::ffi::{c_char, c_int};
use std::ptr::NonNull;

use tch::Tensor;

use crate::aten_ops::pointers;
use crate::error::C10dError;
use crate::ffi;
use crate::process_group::ProcessGroup;

pub struct GradientReducer {
    raw: NonNull<ffi::RawReducer>,
    prefix: String,
    rank: usize,
    parameter_count: usize,
}

// SAFETY: used through &mut self only; the C++ reducer is not tied to the thread that made it.
unsafe impl Send for GradientReducer {}

impl GradientReducer {
    /// A reducer over `parameters` (leaf tensors that require gradients, the same list in the
    /// same order on every rank) of `group`. `find_unused` lets parameters outside a step's
    /// graph take part (their gradient stays undefined when no rank used them).
    pub fn new(
        group: &ProcessGroup,
        parameters: &[Tensor],
        bucket_cap_bytes: usize,
        find_unused: bool,
    ) -> Result<Self, C10dError> {
        let invalid = |reason: String| C10dError::InvalidArgument {
            field: "gradient reducer",
            reason,
        };
        let bucket_cap = i64::try_from(bucket_cap_bytes)
            .map_err(|_| invalid(format!("bucket cap {bucket_cap_bytes} is too large")))?;
        let raw_parameters = pointers(parameters);
        let mut error_message: *mut c_char = std::ptr::null_mut();
        // SAFETY: the group and every tensor are alive for the call; the reducer keeps its own
        // references to both.
        let raw = unsafe {
            ffi::arbor_c10d_reducer_new(
                group.raw(),
                raw_parameters.as_ptr(),
                raw_parameters.len(),
                bucket_cap,
                c_int::from(find_unused),
                &mut error_message,
            )
        };
        let reducer_error = |message| C10dError::Reducer {
            prefix: group.prefix().to_string(),
            rank: group.rank(),
            parameter_count: parameters.len(),
            message,
        };
        let Some(raw) = NonNull::new(raw) else {
            // SAFETY: on failure the shim stored a message it allocated (or null).
            return Err(reducer_error(unsafe {
                ffi::take_error_message(error_message)
            }));
        };
        Ok(Self {
            raw,
            prefix: group.prefix().to_string(),
            rank: group.rank(),
            parameter_count: parameters.len(),
        })
    }

    /// Arms the reducer for the next backward pass, started from `outputs` (the loss).
    pub fn prepare_for_backward(&mut self, outputs: &[Tensor]) -> Result<(), C10dError> {
        let raw_outputs = pointers(outputs);
        let mut error_message: *mut c_char = std::ptr::null_mut();
        // SAFETY: the reducer is alive (owned by self) and the outputs for the call.
        let status = unsafe {
            ffi::arbor_c10d_reducer_prepare(
                self.raw.as_ptr(),
                raw_outputs.as_ptr(),
                raw_outputs.len(),
                &mut error_message,
            )
        };
        if status == 0 {
            return Ok(());
        }
        Err(C10dError::Reducer {
            prefix: self.prefix.clone(),
            rank: self.rank,
            parameter_count: self.parameter_count,
            // SAFETY: on failure the shim stored a message it allocated (or null).
            message: unsafe { ffi::take_error_message(error_message) },
        })
    }
}

impl Drop for GradientReducer {
    fn drop(&mut self) {
        // SAFETY: the pointer came from arbor_c10d_reducer_new and is freed once, here.
        unsafe { ffi::arbor_c10d_reducer_free(self.raw.as_ptr()) };
    }
}
