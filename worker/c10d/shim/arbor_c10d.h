// C API of arbor's c10d shim: libtorch's TCPStore, PrefixStore and ProcessGroupGloo (and
// ProcessGroupNCCL when compiled with ARBOR_C10D_NCCL) behind a few functions that never throw.
//
// Every function that can fail takes `char** error_out`: on failure it returns a null pointer or a
// non-zero status and stores a malloc'ed, NUL-terminated message there, which the caller frees
// with arbor_c10d_string_free. Tensors are `torch::Tensor*` (what tch's Tensor::as_mut_ptr gives).
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct arbor_c10d_store arbor_c10d_store;
typedef struct arbor_c10d_group arbor_c10d_group;

enum arbor_c10d_backend { ARBOR_C10D_BACKEND_GLOO = 0, ARBOR_C10D_BACKEND_NCCL = 1 };
enum arbor_c10d_reduction { ARBOR_C10D_REDUCTION_SUM = 0, ARBOR_C10D_REDUCTION_MEAN = 1 };

void arbor_c10d_string_free(char* message);

// 1 when this shim was compiled with ProcessGroupNCCL, else 0.
int arbor_c10d_has_nccl(void);

// The TCPStore at host:port; is_server != 0 hosts it (rank 0), otherwise connects to it.
arbor_c10d_store* arbor_c10d_store_new(const char* host, uint16_t port, int is_server,
                                       int world_size, int64_t timeout_ms, char** error_out);
void arbor_c10d_store_free(arbor_c10d_store* store);

// A process group over PrefixStore(prefix, store). The store may be freed afterwards (the group
// keeps its own reference).
arbor_c10d_group* arbor_c10d_group_new(arbor_c10d_store* store, const char* prefix, int backend,
                                       int rank, int world_size, int64_t timeout_ms,
                                       char** error_out);
void arbor_c10d_group_free(arbor_c10d_group* group);

// All-reduces `count` tensors in place (one collective over a flattened buffer when count > 1
// or a tensor is not contiguous). MEAN divides the sum by the world size.
int arbor_c10d_all_reduce(arbor_c10d_group* group, void* const* tensors, size_t count,
                          int reduction, int64_t timeout_ms, char** error_out);

int arbor_c10d_barrier(arbor_c10d_group* group, int64_t timeout_ms, char** error_out);

// c10d's Reducer (what DistributedDataParallel runs) over `count` parameters: gradients are
// averaged over the group in buckets of at most `bucket_cap_bytes` (the first one 1 MiB), each
// all-reduced from an autograd hook as soon as all its gradients are ready, so communication
// overlaps the rest of the backward pass. `find_unused` != 0 lets parameters outside a step's
// graph take part (DDP's find_unused_parameters). The reducer keeps its own references to the
// group and the parameters.
typedef struct arbor_c10d_reducer arbor_c10d_reducer;
arbor_c10d_reducer* arbor_c10d_reducer_new(arbor_c10d_group* group, void* const* parameters,
                                           size_t count, int64_t bucket_cap_bytes,
                                           int find_unused, char** error_out);
void arbor_c10d_reducer_free(arbor_c10d_reducer* reducer);
// Arms the reducer for the next backward pass from `outputs` (the loss): that pass averages the
// gradients. A backward pass without it leaves them local (gradient accumulation).
int arbor_c10d_reducer_prepare(arbor_c10d_reducer* reducer, void* const* outputs, size_t count,
                               char** error_out);

#ifdef __cplusplus
}
#endif
