//! ATen operators tch 0.26 does not bind, through the shim (shim/arbor_aten.cpp):
//!
//! - [`fused_adamw`]: `torch._fused_adamw_`, the single-kernel AdamW that
//!   `torch.optim.AdamW(fused=True)` runs (CPU, CUDA; f32, f16, bf16). One pass over each
//!   parameter instead of about ten operator calls, which matters for the hundreds of small
//!   tensors of a UNet.
//! - [`reset_grads`]: `zero_grad(set_to_none=True)`, torch's default: the next backward pass
//!   writes fresh gradients instead of adding into zeroed ones, and a parameter outside the graph
//!   keeps no gradient (so AdamW skips it, as torch does).

use std::ffi::{c_char, c_void};

use tch::Tensor;

use crate::error::C10dError;
use crate::ffi;

/// The tensors of one fused AdamW update: the i-th entry of each list belongs to parameter i.
pub struct FusedAdamWTensors<'a> {
    pub parameters: &'a [Tensor],
    pub gradients: &'a [Tensor],
    pub exp_avgs: &'a [Tensor],
    pub exp_avg_sqs: &'a [Tensor],
    /// float32 scalar step counts, incremented by one before the update.
    pub steps: &'a [Tensor],
}

/// AdamW's hyper-parameters for [`fused_adamw`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusedAdamWHyperParameters {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// The shim's `torch::Tensor*` of each tensor. The C++ side updates the tensors' storage (and
/// autograd metadata) through them, like tch's own in-place operators on a shallow clone.
pub(crate) fn pointers(tensors: &[Tensor]) -> Vec<*mut c_void> {
    tensors
        .iter()
        .map(|tensor| tensor.as_ptr().cast_mut().cast::<c_void>())
        .collect()
}

fn check(
    status: i32,
    error_message: *mut c_char,
    operation: &'static str,
    tensor_count: usize,
) -> Result<(), C10dError> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: on failure the shim stored a message it allocated (or null) in error_message.
    let message = unsafe { ffi::take_error_message(error_message) };
    Err(C10dError::AtenOp {
        operation,
        tensor_count,
        message,
    })
}

/// One AdamW update of every parameter in `tensors` with torch's fused kernel. All lists must
/// have the same length, and the i-th tensors the same shape, dtype and device.
pub fn fused_adamw(
    tensors: &FusedAdamWTensors<'_>,
    hyper_parameters: FusedAdamWHyperParameters,
) -> Result<(), C10dError> {
    let count = tensors.parameters.len();
    let lengths = [
        tensors.gradients.len(),
        tensors.exp_avgs.len(),
        tensors.exp_avg_sqs.len(),
        tensors.steps.len(),
    ];
    if lengths.iter().any(|&length| length != count) {
        return Err(C10dError::InvalidArgument {
            field: "fused_adamw tensors",
            reason: format!(
                "{count} parameters but {} gradients, {} exp_avgs, {} exp_avg_sqs and {} steps",
                lengths[0], lengths[1], lengths[2], lengths[3]
            ),
        });
    }
    let (parameters, gradients) = (pointers(tensors.parameters), pointers(tensors.gradients));
    let (exp_avgs, exp_avg_sqs) = (pointers(tensors.exp_avgs), pointers(tensors.exp_avg_sqs));
    let steps = pointers(tensors.steps);
    let FusedAdamWHyperParameters {
        learning_rate,
        beta1,
        beta2,
        weight_decay,
        eps,
    } = hyper_parameters;
    let mut error_message: *mut c_char = std::ptr::null_mut();
    // SAFETY: every pointer is a live tch tensor borrowed for the call; the lists hold `count`.
    let status = unsafe {
        ffi::arbor_aten_fused_adamw(
            parameters.as_ptr(),
            gradients.as_ptr(),
            exp_avgs.as_ptr(),
            exp_avg_sqs.as_ptr(),
            steps.as_ptr(),
            count,
            learning_rate,
            beta1,
            beta2,
            weight_decay,
            eps,
            &mut error_message,
        )
    };
    check(status, error_message, "fused adamw", count)
}

/// Sets the gradient of every tensor back to undefined.
pub fn reset_grads(tensors: &[Tensor]) -> Result<(), C10dError> {
    let pointers = pointers(tensors);
    let mut error_message: *mut c_char = std::ptr::null_mut();
    // SAFETY: every pointer is a live tch tensor borrowed for the call.
    let status = unsafe {
        ffi::arbor_aten_reset_grads(pointers.as_ptr(), pointers.len(), &mut error_message)
    };
    check(status, error_message, "resetting gradients", tensors.len())
}
