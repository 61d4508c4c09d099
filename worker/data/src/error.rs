//! The error type of `arbor-data`.

use thiserror::Error;

/// Everything `arbor-data` can refuse. Per-file problems of the indexer are not errors but
/// [`crate::skip_reason::SkippedFile`] entries; per-item problems of the loader are
/// [`crate::batch_loader::ItemFailure`] entries. These are the failures of a whole operation.
#[derive(Debug, Error)]
pub enum DataError {
    /// A dataset location that is not a path or a supported URL.
    #[error("invalid dataset location `{location}`: {reason}")]
    InvalidLocation { location: String, reason: String },
    /// The object store could not be opened or listed.
    #[error("object store error for `{location}`: {source}")]
    Store {
        location: String,
        #[source]
        source: object_store::Error,
    },
    /// A loader or indexer option is out of range.
    #[error("invalid parameter `{field}`: {reason}")]
    InvalidParameter { field: &'static str, reason: String },
    /// Bucket geometry refused by `arbor-common`.
    #[error(transparent)]
    Common(#[from] arbor_common::CommonError),
    /// A background load was cancelled or panicked.
    #[error("background load of {what} failed: {reason}")]
    Background { what: String, reason: String },
    /// The async runtime could not be started.
    #[error("cannot start the data runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> DataError {
    DataError::InvalidParameter {
        field,
        reason: reason.into(),
    }
}
