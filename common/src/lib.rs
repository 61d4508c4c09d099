//! `arbor-common`: the libtorch-free core of arbor.
//!
//! The modules follow the data flow of one epoch (docs/architecture.md §2):
//! [`buckets`] (the resolution table) → [`assign`] (image → bucket, pruning) → [`permutation`]
//! (the keyed epoch order) → [`plan`] (trim and strided shards, elastic re-shards) →
//! [`sampler`] (per-rank bucket lists, catch-all and batch draws) → [`crop`] (how each image
//! fits its bucket). [`manifest`] reads the dataset's JSON Lines manifest and [`stream`] holds
//! the counter-based random streams everything above draws from. [`accumulation`] holds the
//! gradient accumulation windows and the checkpoint schedule they constrain. [`logging`] sets up
//! every binary's log output (format, colour, filter).

pub mod accumulation;
pub mod assign;
pub mod buckets;
pub mod config;
pub mod config_choice;
pub mod crop;
pub mod error;
pub mod learning_rate;
pub mod logging;
pub mod manifest;
pub mod permutation;
pub mod plan;
pub mod sampler;
pub mod stream;
pub mod summary;
pub mod validation;

pub use error::CommonError;
