//! ATen operators tch 0.26 does not bind, through the shim (shim/arbor_aten.cpp):
//!
//! - [`fused_adamw`]: `torch._fused_adamw_`, the single-kernel AdamW that
//!   `torch.optim.AdamW(fused=True)` runs (CPU, CUDA; f32, f16, bf16). One pass over each
//!   parameter instead of about ten operator calls, which matters for the hundreds of small
//!   tensors of a UNet.
//! - [`reset_grads`]: `zero_grad(set_to_none=True)`, torch's default: the next backward pass
//!   writes fresh gradients instead of adding into zeroed ones, and a parameter outside the graph
//!   keeps no gradient (so AdamW skips it, as torch does).
//! - [`set_autocast_dtype`]: `torch.autocast(device_type, dtype=...)`'s dtype (tch's `autocast`
//!   has no dtype, and libtorch's CUDA default is fp16; the trainer wants bf16).
//! - [`cuda_max_memory_allocated`]: `torch.cuda.max_memory_allocated(device)` (builds with the
//!   `nccl` feature, which compiles the shim with CUDA).

use std::ffi::{c_char, c_int, c_longlong, c_void};

use tch::{Kind, Tensor};

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

/// The device type whose autocast dtype [`set_autocast_dtype`] sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutocastDevice {
    Cpu,
    Cuda,
}

impl AutocastDevice {
    /// `c10::DeviceType`'s value.
    fn device_type(self) -> c_int {
        match self {
            AutocastDevice::Cpu => 0,
            AutocastDevice::Cuda => 1,
        }
    }
}

/// `c10::ScalarType`'s values of the two autocast dtypes.
const SCALAR_TYPE_HALF: c_int = 5;
const SCALAR_TYPE_BFLOAT16: c_int = 15;

/// Sets the dtype that autocast regions on `device` cast to (process-wide, as
/// `at::autocast::set_autocast_dtype`). Only `Kind::Half` and `Kind::BFloat16` are accepted.
pub fn set_autocast_dtype(device: AutocastDevice, kind: Kind) -> Result<(), C10dError> {
    let scalar_type = match kind {
        Kind::Half => SCALAR_TYPE_HALF,
        Kind::BFloat16 => SCALAR_TYPE_BFLOAT16,
        other => {
            return Err(C10dError::InvalidArgument {
                field: "autocast dtype",
                reason: format!("expected Half or BFloat16, got {other:?}"),
            })
        }
    };
    let mut error_message: *mut c_char = std::ptr::null_mut();
    // SAFETY: plain integer arguments; the shim validates them before the call.
    let status = unsafe {
        ffi::arbor_aten_set_autocast_dtype(device.device_type(), scalar_type, &mut error_message)
    };
    check(status, error_message, "setting the autocast dtype", 0)
}

/// The dtype autocast regions on `device` cast to now (`None`: neither Half nor BFloat16).
pub fn autocast_dtype(device: AutocastDevice) -> Result<Option<Kind>, C10dError> {
    let mut scalar_type: c_int = -1;
    let mut error_message: *mut c_char = std::ptr::null_mut();
    // SAFETY: scalar_type outlives the call, which writes it on success only.
    let status = unsafe {
        ffi::arbor_aten_get_autocast_dtype(
            device.device_type(),
            &mut scalar_type,
            &mut error_message,
        )
    };
    check(status, error_message, "reading the autocast dtype", 0)?;
    Ok(match scalar_type {
        SCALAR_TYPE_HALF => Some(Kind::Half),
        SCALAR_TYPE_BFLOAT16 => Some(Kind::BFloat16),
        _ => None,
    })
}

/// The most bytes the CUDA caching allocator has had allocated on `cuda:device` since the
/// process started. An error in a build without CUDA support (no `nccl` feature).
pub fn cuda_max_memory_allocated(device: usize) -> Result<u64, C10dError> {
    let device = c_int::try_from(device).map_err(|_| C10dError::InvalidArgument {
        field: "cuda device",
        reason: format!("{device} is out of range"),
    })?;
    let mut peak_bytes: c_longlong = 0;
    let mut error_message: *mut c_char = std::ptr::null_mut();
    // SAFETY: peak_bytes outlives the call, which writes it on success only.
    let status = unsafe {
        ffi::arbor_aten_cuda_max_memory_allocated(device, &mut peak_bytes, &mut error_message)
    };
    check(status, error_message, "reading the CUDA peak memory", 0)?;
    Ok(u64::try_from(peak_bytes).unwrap_or(0))
}
