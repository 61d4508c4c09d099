// arbor's c10d shim: see arbor_c10d.h. Every entry point catches every C++ exception and turns it
// into an error string; nothing unwinds into Rust.

#include "arbor_c10d.h"
#include "guarded.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#ifdef ARBOR_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <chrono>
#include <memory>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

struct arbor_c10d_store {
  c10::intrusive_ptr<c10d::Store> store;
  std::string host;
};

struct arbor_c10d_group {
  c10::intrusive_ptr<c10d::Backend> backend;
  int world_size;
  int rank;
  bool nccl;
};

struct arbor_c10d_reducer {
  std::unique_ptr<c10d::Reducer> reducer;
};

namespace {

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

// The Gloo transport device: GLOO_SOCKET_IFNAME names an interface (as in PyTorch); a loopback
// store address means a single-machine group on loopback; otherwise the address this machine's
// hostname resolves to.
std::shared_ptr<::gloo::transport::Device> gloo_device(const std::string& store_host) {
  const char* interface_name = std::getenv("GLOO_SOCKET_IFNAME");
  if (interface_name != nullptr && interface_name[0] != '\0') {
    return c10d::ProcessGroupGloo::createDeviceForInterface(interface_name);
  }
  if (is_loopback(store_host)) {
    return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

void wait_for(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout) {
  if (!work->wait(timeout)) {
    TORCH_CHECK(false, "collective did not complete within ", timeout.count(), " ms");
  }
}

}  // namespace

extern "C" {

void arbor_c10d_string_free(char* message) { std::free(message); }

int arbor_c10d_has_nccl(void) {
#ifdef ARBOR_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

arbor_c10d_store* arbor_c10d_store_new(const char* host, uint16_t port, int is_server,
                                       int world_size, int64_t timeout_ms, char** error_out) {
  arbor_c10d_store* result = nullptr;
  guarded(error_out, [&] {
    TORCH_CHECK(host != nullptr, "store host is null");
    TORCH_CHECK(world_size > 0, "world size must be positive, got ", world_size);
    c10d::TCPStoreOptions options;
    options.port = port;
    options.isServer = is_server != 0;
    options.numWorkers = static_cast<std::size_t>(world_size);
    // The store outlives groups (a regroup builds a new group on it): never block on workers.
    options.waitWorkers = false;
    options.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    result = new arbor_c10d_store{std::move(store), std::string(host)};
  });
  return result;
}

void arbor_c10d_store_free(arbor_c10d_store* store) {
  char* ignored = nullptr;
  guarded(&ignored, [&] { delete store; });
  std::free(ignored);
}

arbor_c10d_group* arbor_c10d_group_new(arbor_c10d_store* store, const char* prefix, int backend,
                                       int rank, int world_size, int64_t timeout_ms,
                                       char** error_out) {
  arbor_c10d_group* result = nullptr;
  guarded(error_out, [&] {
    TORCH_CHECK(store != nullptr, "store is null");
    TORCH_CHECK(prefix != nullptr, "prefix is null");
    TORCH_CHECK(world_size > 0, "world size must be positive, got ", world_size);
    TORCH_CHECK(rank >= 0 && rank < world_size, "rank ", rank, " is outside world size ",
                world_size);
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store->store);
    c10::intrusive_ptr<c10d::Backend> group;
    if (backend == ARBOR_C10D_BACKEND_GLOO) {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      options->devices.push_back(gloo_device(store->host));
      group = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, world_size, options);
    } else if (backend == ARBOR_C10D_BACKEND_NCCL) {
#ifdef ARBOR_C10D_NCCL
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      group = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, world_size, options);
#else
      TORCH_CHECK(false, "this build has no NCCL backend (cargo feature `nccl` of arbor-c10d)");
#endif
    } else {
      TORCH_CHECK(false, "unknown backend ", backend);
    }
    result = new arbor_c10d_group{std::move(group), world_size, rank,
                                  backend == ARBOR_C10D_BACKEND_NCCL};
  });
  return result;
}

void arbor_c10d_group_free(arbor_c10d_group* group) {
  char* ignored = nullptr;
  guarded(&ignored, [&] { delete group; });
  std::free(ignored);
}

int arbor_c10d_all_reduce(arbor_c10d_group* group, void* const* tensors, size_t count,
                          int reduction, int64_t timeout_ms, char** error_out) {
  bool ok = guarded(error_out, [&] {
    TORCH_CHECK(group != nullptr, "group is null");
    TORCH_CHECK(reduction == ARBOR_C10D_REDUCTION_SUM || reduction == ARBOR_C10D_REDUCTION_MEAN,
                "unknown reduction ", reduction);
    if (count == 0) {
      return;
    }
    TORCH_CHECK(tensors != nullptr, "tensor list is null");
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> inputs;
    inputs.reserve(count);
    for (size_t index = 0; index < count; ++index) {
      TORCH_CHECK(tensors[index] != nullptr, "tensor ", index, " is null");
      const at::Tensor& tensor = *static_cast<at::Tensor*>(tensors[index]);
      TORCH_CHECK(tensor.defined(), "tensor ", index, " is undefined");
      TORCH_CHECK(inputs.empty() || tensor.scalar_type() == inputs.front().scalar_type(),
                  "tensor ", index, " has dtype ", tensor.scalar_type(), ", tensor 0 has ",
                  inputs.front().scalar_type());
      TORCH_CHECK(inputs.empty() || tensor.device() == inputs.front().device(), "tensor ", index,
                  " is on ", tensor.device(), ", tensor 0 is on ", inputs.front().device());
      inputs.push_back(tensor);
    }
    bool in_place = count == 1 && inputs.front().is_contiguous();
    at::Tensor buffer;
    if (in_place) {
      buffer = inputs.front();
    } else {
      std::vector<at::Tensor> flat_views;
      flat_views.reserve(count);
      for (const auto& tensor : inputs) {
        flat_views.push_back(tensor.reshape({-1}));
      }
      buffer = at::cat(flat_views, 0);
    }
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    options.timeout = timeout;
    std::vector<at::Tensor> work_tensors{buffer};
    wait_for(group->backend->allreduce(work_tensors, options), timeout);
    if (reduction == ARBOR_C10D_REDUCTION_MEAN && group->world_size > 1) {
      buffer.div_(group->world_size);
    }
    if (in_place) {
      return;
    }
    int64_t offset = 0;
    for (auto& tensor : inputs) {
      int64_t numel = tensor.numel();
      tensor.copy_(buffer.narrow(0, offset, numel).view(tensor.sizes()));
      offset += numel;
    }
  });
  return ok ? 0 : 1;
}

int arbor_c10d_barrier(arbor_c10d_group* group, int64_t timeout_ms, char** error_out) {
  bool ok = guarded(error_out, [&] {
    TORCH_CHECK(group != nullptr, "group is null");
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::BarrierOptions options;
    options.timeout = timeout;
    wait_for(group->backend->barrier(options), timeout);
  });
  return ok ? 0 : 1;
}

arbor_c10d_reducer* arbor_c10d_reducer_new(arbor_c10d_group* group, void* const* parameters,
                                           size_t count, int64_t bucket_cap_bytes,
                                           int find_unused, char** error_out) {
  arbor_c10d_reducer* result = nullptr;
  guarded(error_out, [&] {
    TORCH_CHECK(group != nullptr, "group is null");
    TORCH_CHECK(count > 0 && parameters != nullptr, "no parameters");
    TORCH_CHECK(bucket_cap_bytes > 0, "bucket cap must be positive, got ", bucket_cap_bytes);
    std::vector<at::Tensor> params;
    params.reserve(count);
    for (size_t index = 0; index < count; ++index) {
      TORCH_CHECK(parameters[index] != nullptr, "parameter ", index, " is null");
      const at::Tensor& parameter = *static_cast<at::Tensor*>(parameters[index]);
      TORCH_CHECK(parameter.defined() && parameter.requires_grad(), "parameter ", index,
                  " is undefined or does not require a gradient");
      params.push_back(parameter);
    }
    // The Reducer all-reduces through a ProcessGroup: one over this group's backend.
    auto process_group = c10::make_intrusive<c10d::ProcessGroup>(group->rank, group->world_size);
    auto backend_type = group->nccl ? c10d::ProcessGroup::BackendType::NCCL
                                    : c10d::ProcessGroup::BackendType::GLOO;
    auto device_type = group->nccl ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
    process_group->setBackend(device_type, backend_type, group->backend);
    process_group->setDefaultBackend(backend_type);
    // As DistributedDataParallel does: a small first bucket, then buckets of the cap, assigned
    // in parameter order and reduced in reverse (gradients arrive roughly last layer first).
    const int64_t first_bucket_bytes = 1024 * 1024;
    std::vector<size_t> limits{static_cast<size_t>(first_bucket_bytes),
                               static_cast<size_t>(bucket_cap_bytes)};
    std::vector<bool> expect_sparse(count, false);
    auto [bucket_indices, bucket_limits] =
        c10d::compute_bucket_assignment_by_size(params, limits, expect_sparse);
    std::reverse(bucket_indices.begin(), bucket_indices.end());
    std::reverse(bucket_limits.begin(), bucket_limits.end());
    std::vector<int64_t> bucket_cap_list(bucket_limits.begin(), bucket_limits.end());
    auto reducer = std::make_unique<c10d::Reducer>(
        params, std::move(bucket_indices), process_group, expect_sparse, bucket_cap_bytes,
        find_unused != 0, /*gradient_as_bucket_view=*/false,
        std::unordered_map<size_t, std::string>{}, first_bucket_bytes,
        /*skip_all_reduce_unused_params=*/false, /*use_python_reducer=*/false,
        std::move(bucket_cap_list));
    result = new arbor_c10d_reducer{std::move(reducer)};
  });
  return result;
}

void arbor_c10d_reducer_free(arbor_c10d_reducer* reducer) {
  char* ignored = nullptr;
  guarded(&ignored, [&] { delete reducer; });
  std::free(ignored);
}

int arbor_c10d_reducer_prepare(arbor_c10d_reducer* reducer, void* const* outputs, size_t count,
                               char** error_out) {
  bool ok = guarded(error_out, [&] {
    TORCH_CHECK(reducer != nullptr, "reducer is null");
    std::vector<at::Tensor> output_list;
    for (size_t index = 0; index < count; ++index) {
      TORCH_CHECK(outputs[index] != nullptr, "output ", index, " is null");
      output_list.push_back(*static_cast<at::Tensor*>(outputs[index]));
    }
    reducer->reducer->prepare_for_forward();
    reducer->reducer->prepare_for_backward(output_list);
  });
  return ok ? 0 : 1;
}

}  // extern "C"
