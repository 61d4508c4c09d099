//! Why the membership logic refuses a request. The service maps each one to a gRPC status and
//! to the `arbor_refused_requests_total{reason}` metric in one place
//! ([`MembershipError::code`], [`MembershipError::refusal_reason`]).

/// A refused request, or a failure while serving one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MembershipError {
    #[error("job failed: {0}")]
    JobFailed(String),
    #[error("job finished")]
    JobFinished,
    /// A field that no job could accept (an empty id, a port above 65535, a NaN rate).
    #[error("{field}: {reason}")]
    Malformed { field: String, reason: String },
    /// A field outside what this job's plan allows (a batch past the plan, a future epoch).
    #[error("{field}: {reason}")]
    OutOfRange { field: String, reason: String },
    /// Reported items that differ from what the rank's sampler gives for that batch.
    #[error("{field}: {reason}")]
    LedgerMismatch { field: String, reason: String },
    #[error("unknown worker {0}: join first")]
    UnknownWorker(String),
    #[error("worker {0} is no longer registered")]
    NoLongerRegistered(String),
    #[error("stale generation {generation}: the current generation is {current} ({phase})")]
    StaleGeneration {
        generation: u64,
        current: u64,
        phase: &'static str,
    },
    #[error("worker {worker_id} is not rank {rank} of generation {generation}")]
    WrongRank {
        worker_id: String,
        rank: u32,
        generation: u64,
    },
    #[error("{0}")]
    StaleEpoch(String),
    #[error("no running group to checkpoint: the job is {0}")]
    NotRunning(&'static str),
    #[error("no plan yet")]
    NoPlan,
    /// A checkpoint reported before the ledger holds every batch it covers (the heartbeat that
    /// carries them is still on its way): the worker sends it again.
    #[error("checkpoint_done.batch: checkpoint at batch {batch} but batch {missing} of rank {rank} is not in the ledger yet")]
    LedgerBehind { rank: u32, batch: u64, missing: u64 },
    #[error("{0}")]
    Internal(String),
}

/// The gRPC status code a refusal maps to (the numbers of `tonic::Code`, kept free of tonic
/// here so the logic does not depend on the transport).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    InvalidArgument,
    OutOfRange,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
    Internal,
}

impl MembershipError {
    pub fn malformed(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Malformed {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn out_of_range(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::OutOfRange {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn code(&self) -> RefusalCode {
        match self {
            Self::JobFailed(_) | Self::StaleGeneration { .. } | Self::StaleEpoch(_) => {
                RefusalCode::FailedPrecondition
            }
            Self::NotRunning(_) => RefusalCode::FailedPrecondition,
            Self::JobFinished | Self::OutOfRange { .. } => RefusalCode::OutOfRange,
            Self::Malformed { .. } | Self::LedgerMismatch { .. } => RefusalCode::InvalidArgument,
            Self::UnknownWorker(_) | Self::NoLongerRegistered(_) => RefusalCode::NotFound,
            Self::WrongRank { .. } => RefusalCode::PermissionDenied,
            Self::NoPlan | Self::LedgerBehind { .. } => RefusalCode::Unavailable,
            Self::Internal(_) => RefusalCode::Internal,
        }
    }

    /// The `reason` label of the refusal metric, or `None` for answers that are not a client's
    /// fault (the job ended, no plan yet, an internal failure).
    pub fn refusal_reason(&self) -> Option<&'static str> {
        match self {
            Self::Malformed { .. } => Some("malformed"),
            Self::OutOfRange { .. } => Some("out_of_range"),
            Self::LedgerMismatch { .. } => Some("ledger_mismatch"),
            Self::UnknownWorker(_) => Some("unknown_worker"),
            Self::StaleGeneration { .. } => Some("stale_generation"),
            Self::WrongRank { .. } => Some("wrong_rank"),
            Self::StaleEpoch(_) => Some("stale_epoch"),
            Self::JobFailed(_)
            | Self::JobFinished
            | Self::NoLongerRegistered(_)
            | Self::NotRunning(_)
            | Self::NoPlan
            | Self::LedgerBehind { .. }
            | Self::Internal(_) => None,
        }
    }

    /// Whether the request claimed something false about the job (as opposed to arriving late):
    /// a worker that keeps doing this is dropped from the group.
    pub fn is_lie(&self) -> bool {
        matches!(
            self,
            Self::Malformed { .. } | Self::OutOfRange { .. } | Self::LedgerMismatch { .. }
        )
    }
}
