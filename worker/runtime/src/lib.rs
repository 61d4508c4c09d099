//! `arbor-runtime`: what every worker process runs around its trainer, without libtorch.
//!
//! [`client`] talks to the coordinator; [`runtime`] joins the group, receives the shard, runs
//! the per-rank sampler of `arbor-common`, drives a [`trainer::Trainer`] batch by batch,
//! heartbeats ([`heartbeat`]), checkpoints, and re-joins on a regroup. The GPU worker
//! (`arbor-worker`) plugs its model in as a trainer; `--dry-run` plugs in a trainer that only
//! loads and crops the images. Both load through [`batch_fetch`], which loads announced batches
//! ahead of the step. A worker whose collectives cannot be re-formed in-process (NCCL) replaces
//! itself on a regroup instead ([`restart`]).

pub mod batch_fetch;
pub mod client;
pub mod data_failure_budget;
pub mod error;
pub mod heartbeat;
pub mod restart;
pub mod runtime;
pub mod trainer;
pub mod worker_args;

pub use error::RuntimeError;
