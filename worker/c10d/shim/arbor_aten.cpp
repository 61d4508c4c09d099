// See arbor_aten.h; errors follow guarded.h.

#include "arbor_aten.h"
#include "guarded.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#ifdef ARBOR_C10D_NCCL
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace {

std::vector<at::Tensor> tensor_list(void* const* tensors, size_t count, const char* what) {
  TORCH_CHECK(count == 0 || tensors != nullptr, what, " list is null");
  std::vector<at::Tensor> list;
  list.reserve(count);
  for (size_t index = 0; index < count; ++index) {
    TORCH_CHECK(tensors[index] != nullptr, what, " ", index, " is null");
    const at::Tensor& tensor = *static_cast<at::Tensor*>(tensors[index]);
    TORCH_CHECK(tensor.defined(), what, " ", index, " is undefined");
    list.push_back(tensor);
  }
  return list;
}

}  // namespace

extern "C" {

int arbor_aten_fused_adamw(void* const* parameters, void* const* gradients,
                           void* const* exp_avgs, void* const* exp_avg_sqs,
                           void* const* steps, size_t count, double learning_rate,
                           double beta1, double beta2, double weight_decay, double eps,
                           char** error_out) {
  bool ok = guarded(error_out, [&] {
    if (count == 0) {
      return;
    }
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> parameter_list = tensor_list(parameters, count, "parameter");
    std::vector<at::Tensor> gradient_list = tensor_list(gradients, count, "gradient");
    std::vector<at::Tensor> exp_avg_list = tensor_list(exp_avgs, count, "exp_avg");
    std::vector<at::Tensor> exp_avg_sq_list = tensor_list(exp_avg_sqs, count, "exp_avg_sq");
    std::vector<at::Tensor> step_list = tensor_list(steps, count, "step");
    at::_foreach_add_(step_list, 1);
    at::_fused_adamw_(parameter_list, gradient_list, exp_avg_list, exp_avg_sq_list, {}, step_list,
                      learning_rate, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                      /*maximize=*/false);
  });
  return ok ? 0 : -1;
}

int arbor_aten_reset_grads(void* const* tensors, size_t count, char** error_out) {
  bool ok = guarded(error_out, [&] {
    for (at::Tensor& tensor : tensor_list(tensors, count, "tensor")) {
      tensor.mutable_grad().reset();
    }
  });
  return ok ? 0 : -1;
}

int arbor_aten_set_autocast_dtype(int device_type, int scalar_type, char** error_out) {
  bool ok = guarded(error_out, [&] {
    auto device = static_cast<c10::DeviceType>(device_type);
    TORCH_CHECK(device == c10::DeviceType::CPU || device == c10::DeviceType::CUDA,
                "autocast device type ", device_type, " is neither CPU (0) nor CUDA (1)");
    auto dtype = static_cast<c10::ScalarType>(scalar_type);
    TORCH_CHECK(dtype == c10::ScalarType::Half || dtype == c10::ScalarType::BFloat16,
                "autocast dtype ", scalar_type, " is neither Half (5) nor BFloat16 (15)");
    at::autocast::set_autocast_dtype(device, dtype);
  });
  return ok ? 0 : -1;
}

int arbor_aten_get_autocast_dtype(int device_type, int* scalar_type, char** error_out) {
  bool ok = guarded(error_out, [&] {
    TORCH_CHECK(scalar_type != nullptr, "scalar_type is null");
    auto device = static_cast<c10::DeviceType>(device_type);
    TORCH_CHECK(device == c10::DeviceType::CPU || device == c10::DeviceType::CUDA,
                "autocast device type ", device_type, " is neither CPU (0) nor CUDA (1)");
    *scalar_type = static_cast<int>(at::autocast::get_autocast_dtype(device));
  });
  return ok ? 0 : -1;
}

int arbor_aten_cuda_max_memory_allocated(int device, long long* peak_bytes, char** error_out) {
  bool ok = guarded(error_out, [&] {
    TORCH_CHECK(peak_bytes != nullptr, "peak_bytes is null");
#ifdef ARBOR_C10D_NCCL
    int count = static_cast<int>(c10::cuda::device_count());
    TORCH_CHECK(device >= 0 && device < count, "cuda:", device, " is not one of the ", count,
                " visible CUDA devices");
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
    *peak_bytes = static_cast<long long>(
        stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak);
#else
    (void)device;
    TORCH_CHECK(false, "this build has no CUDA support (build arbor-worker with --features nccl)");
#endif
  });
  return ok ? 0 : -1;
}

}  // extern "C"
