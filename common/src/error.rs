//! The error type of `arbor-common`.

use thiserror::Error;

/// Everything `arbor-common` can refuse. Messages are lowercase and name the offending field.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CommonError {
    /// A bucket, plan or sampler parameter is out of range.
    #[error("invalid parameter `{field}`: {reason}")]
    InvalidParameter { field: &'static str, reason: String },
    /// A `job.toml` value that does not deserialise (an unknown key, a wrong type, a name
    /// outside its choices), with its dotted key.
    #[error("invalid config value `{path}`: {reason}")]
    InvalidConfig { path: String, reason: String },
    /// An image size that cannot be bucketed or cropped (a zero dimension).
    #[error(
        "invalid image size {width}x{height} for item {item_id}: width and height must be positive"
    )]
    InvalidImageSize {
        item_id: u64,
        width: u32,
        height: u32,
    },
    /// Two manifest records share an id.
    #[error("duplicate item id {id} (manifest lines {first_line} and {second_line})")]
    DuplicateId {
        id: u64,
        first_line: usize,
        second_line: usize,
    },
    /// More kept items than a 32-bit position index can address.
    #[error("too many items: {count} exceeds the supported maximum of {max}")]
    TooManyItems { count: u64, max: u64 },
    /// A rank outside `0..world_size`.
    #[error("rank {rank} is out of range for world size {world_size}")]
    RankOutOfRange { rank: u32, world_size: u32 },
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> CommonError {
    CommonError::InvalidParameter {
        field,
        reason: reason.into(),
    }
}
