// ATen operators that tch 0.26 does not bind, as a C API (src/aten_ops.rs). Tensors are
// `torch::Tensor*` (what tch's Tensor::as_mut_ptr gives). Every function returns 0 on success; on
// failure it returns -1 and, when error_out is not null, stores a malloc'ed message there that
// the caller frees with arbor_c10d_string_free (arbor_c10d.h).
#pragma once

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// One AdamW update of `count` parameters with torch's fused kernel (`torch.optim.AdamW(...,
// fused=True)`): every list holds `count` tensors; `steps` are float32 scalar tensors, each
// incremented by one before the update as torch does. amsgrad and maximize are off.
int arbor_aten_fused_adamw(void* const* parameters, void* const* gradients,
                           void* const* exp_avgs, void* const* exp_avg_sqs,
                           void* const* steps, size_t count, double learning_rate,
                           double beta1, double beta2, double weight_decay, double eps,
                           char** error_out);

// Sets the gradient of each of `count` tensors back to undefined (`zero_grad(set_to_none=True)`).
int arbor_aten_reset_grads(void* const* tensors, size_t count, char** error_out);

// `at::autocast::set_autocast_dtype(device_type, scalar_type)`: the dtype autocast casts to on
// that device type (`torch.autocast(device_type, dtype=...)`). `device_type` is a
// `c10::DeviceType` (0 CPU, 1 CUDA), `scalar_type` a `c10::ScalarType` (tch's Kind numbering:
// 5 Half, 15 BFloat16). Only Half and BFloat16 are accepted.
int arbor_aten_set_autocast_dtype(int device_type, int scalar_type, char** error_out);

// `at::autocast::get_autocast_dtype(device_type)` as a `c10::ScalarType` value in *scalar_type.
int arbor_aten_get_autocast_dtype(int device_type, int* scalar_type, char** error_out);

// The most bytes the CUDA caching allocator has had allocated on `device` since the process
// started (`torch.cuda.max_memory_allocated(device)`), in *peak_bytes. Fails in a build without
// CUDA support (the `nccl` feature) or when `device` is not a visible CUDA device.
int arbor_aten_cuda_max_memory_allocated(int device, long long* peak_bytes, char** error_out);

#ifdef __cplusplus
}
#endif
