//! The crate's error type: every variant names the operation that failed.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum C10dError {
    #[error("invalid store address {address:?}: {reason}")]
    InvalidStoreAddress { address: String, reason: String },
    #[error("invalid process group argument {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("backend {backend} is not compiled into this build: {reason}")]
    BackendUnavailable {
        backend: &'static str,
        reason: String,
    },
    #[error("store {address} (rank {rank}): {message}")]
    StoreConnect {
        address: String,
        rank: usize,
        message: String,
    },
    #[error("creating the {backend} group {prefix:?} (rank {rank} of {world_size}): {message}")]
    GroupCreate {
        backend: &'static str,
        prefix: String,
        rank: usize,
        world_size: usize,
        message: String,
    },
    #[error("all-reduce of {tensor_count} tensors in group {prefix:?} (rank {rank}, timeout {timeout:?}): {message}")]
    AllReduce {
        prefix: String,
        rank: usize,
        tensor_count: usize,
        timeout: Duration,
        message: String,
    },
    #[error("barrier in group {prefix:?} (rank {rank}, timeout {timeout:?}): {message}")]
    Barrier {
        prefix: String,
        rank: usize,
        timeout: Duration,
        message: String,
    },
    #[error("gradient reducer of {parameter_count} parameters in group {prefix:?} (rank {rank}): {message}")]
    Reducer {
        prefix: String,
        rank: usize,
        parameter_count: usize,
        message: String,
    },
    #[error("{operation} of {tensor_count} tensors: {message}")]
    AtenOp {
        operation: &'static str,
        tensor_count: usize,
        message: String,
    },
    #[error("gradient averaging: parameter {parameter_index} has no gradient (call backward first; every rank must produce every gradient)")]
    MissingGradient { parameter_index: usize },
    #[error("gradient averaging: parameter {parameter_index} has {reason}, but the buckets were planned for {expected}")]
    ParameterMismatch {
        parameter_index: usize,
        reason: String,
        expected: String,
    },
}
