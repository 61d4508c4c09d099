//! The error type of `arbor-runtime`.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("invalid coordinator address `{address}`: {reason}")]
    InvalidAddress { address: String, reason: String },
    #[error("coordinator call `{call}` failed: {status}")]
    Rpc {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("could not reach the coordinator at {address} within {seconds}s: {last_error}")]
    Unreachable {
        address: String,
        seconds: u64,
        last_error: String,
    },
    #[error("invalid job config from the coordinator: {0}")]
    Config(#[from] arbor_common::CommonError),
    #[error("invalid shard from the coordinator: {0}")]
    InvalidShard(String),
    #[error("trainer failed: {0}")]
    Trainer(String),
    #[error("invalid token: {0}")]
    Token(String),
    #[error("flag `{flag}`: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("starting {command}: {message}")]
    Spawn { command: String, message: String },
    #[error("{0}")]
    LocalRanks(String),
    #[error("restarting the worker process ({program}): {message}")]
    Restart { program: String, message: String },
    #[error("the coordinator says the {0}")]
    JobFailed(String),
}
