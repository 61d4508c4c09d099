//! Declarations of the C API in shim/arbor_c10d.h and shim/arbor_aten.h (compiled by build.rs).

use std::ffi::{c_char, c_int, c_void};

#[repr(C)]
pub(crate) struct RawStore {
    _private: [u8; 0],
}

#[repr(C)]
pub(crate) struct RawGroup {
    _private: [u8; 0],
}

#[repr(C)]
pub(crate) struct RawReducer {
    _private: [u8; 0],
}

pub(crate) const BACKEND_GLOO: c_int = 0;
pub(crate) const BACKEND_NCCL: c_int = 1;
pub(crate) const REDUCTION_SUM: c_int = 0;
pub(crate) const REDUCTION_MEAN: c_int = 1;

extern "C" {
    pub(crate) fn arbor_c10d_string_free(message: *mut c_char);
    pub(crate) fn arbor_c10d_has_nccl() -> c_int;
    pub(crate) fn arbor_c10d_store_new(
        host: *const c_char,
        port: u16,
        is_server: c_int,
        world_size: c_int,
        timeout_ms: i64,
        error_out: *mut *mut c_char,
    ) -> *mut RawStore;
    pub(crate) fn arbor_c10d_store_free(store: *mut RawStore);
    pub(crate) fn arbor_c10d_group_new(
        store: *mut RawStore,
        prefix: *const c_char,
        backend: c_int,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        error_out: *mut *mut c_char,
    ) -> *mut RawGroup;
    pub(crate) fn arbor_c10d_group_free(group: *mut RawGroup);
    pub(crate) fn arbor_c10d_all_reduce(
        group: *mut RawGroup,
        tensors: *const *mut c_void,
        count: usize,
        reduction: c_int,
        timeout_ms: i64,
        error_out: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn arbor_c10d_reducer_new(
        group: *mut RawGroup,
        parameters: *const *mut c_void,
        count: usize,
        bucket_cap_bytes: i64,
        find_unused: c_int,
        error_out: *mut *mut c_char,
    ) -> *mut RawReducer;
    pub(crate) fn arbor_c10d_reducer_free(reducer: *mut RawReducer);
    pub(crate) fn arbor_c10d_reducer_prepare(
        reducer: *mut RawReducer,
        outputs: *const *mut c_void,
        count: usize,
        error_out: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn arbor_aten_fused_adamw(
        parameters: *const *mut c_void,
        gradients: *const *mut c_void,
        exp_avgs: *const *mut c_void,
        exp_avg_sqs: *const *mut c_void,
        steps: *const *mut c_void,
        count: usize,
        learning_rate: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        error_out: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn arbor_aten_reset_grads(
        tensors: *const *mut c_void,
        count: usize,
        error_out: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn arbor_aten_set_autocast_dtype(
        device_type: c_int,
        scalar_type: c_int,
        error_out: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn arbor_aten_get_autocast_dtype(
        device_type: c_int,
        scalar_type: *mut c_int,
        error_out: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn arbor_aten_cuda_max_memory_allocated(
        device: c_int,
        peak_bytes: *mut std::ffi::c_longlong,
        error_out: *mut *mut c_char,
    ) -> c_int;
    pub(crate) fn arbor_c10d_barrier(
        group: *mut RawGroup,
        timeout_ms: i64,
        error_out: *mut *mut c_char,
    ) -> c_int;
}

/// Takes ownership of a message the shim allocated and returns it as a String (a placeholder when
/// the shim could not allocate one).
///
/// # Safety
/// `message` is null or a pointer the shim returned through an `error_out` argument, not yet freed.
pub(crate) unsafe fn take_error_message(message: *mut c_char) -> String {
    if message.is_null() {
        return "unknown error (no message from the c10d shim)".to_string();
    }
    let text = std::ffi::CStr::from_ptr(message)
        .to_string_lossy()
        .into_owned();
    arbor_c10d_string_free(message);
    text
}
