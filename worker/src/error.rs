//! The worker library's error type.

use std::path::PathBuf;

/// Every failure the worker library reports. Messages name the item and the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("io error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid json in {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("libtorch error while {context}: {source}")]
    Torch {
        context: String,
        #[source]
        source: tch::TchError,
    },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("config {path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("weights {path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("missing tensor `{key}` in {source_name} (expected shape {expected:?})")]
    MissingTensor {
        key: String,
        source_name: String,
        expected: Vec<i64>,
    },
    #[error("tensor `{key}` in {source_name} has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        key: String,
        source_name: String,
        expected: Vec<i64>,
        actual: Vec<i64>,
    },
    #[error("invalid input `{name}`: {message}")]
    Input { name: String, message: String },
    #[error("hypernetwork {item}: {message}")]
    Hypernetwork { item: String, message: String },
    #[error("run directory {location}: `{key}`: {message}")]
    RunDir {
        location: String,
        key: String,
        message: String,
    },
    #[error("collective: {0}")]
    Collective(#[from] arbor_c10d::C10dError),
    /// An ATen operator of the shim (`arbor_c10d::aten_ops`) failed.
    #[error("{0}")]
    AtenOp(arbor_c10d::C10dError),
    #[error("data: {0}")]
    Data(#[from] arbor_data::DataError),
    #[error("training: {0}")]
    Training(String),
    /// A `job.toml` value refused by `arbor-common` (it names the field).
    #[error("{0}")]
    JobConfig(#[from] arbor_common::CommonError),
}

impl WorkerError {
    /// Wraps a libtorch error with what the worker was doing.
    pub fn torch(context: impl Into<String>) -> impl FnOnce(tch::TchError) -> WorkerError {
        let context = context.into();
        move |source| WorkerError::Torch { context, source }
    }

    /// Wraps an io error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> WorkerError {
        let path = path.into();
        move |source| WorkerError::Io { path, source }
    }
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
