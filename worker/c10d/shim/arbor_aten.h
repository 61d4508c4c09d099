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

#ifdef __cplusplus
}
#endif
