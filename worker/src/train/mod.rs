//! Training (docs/architecture.md §4, §5): the pieces of one optimisation step, in the order a
//! batch meets them, and the trainer that drives them for the worker runtime.
//!
//! batch_inputs → training_model → distributed_step (loss and backward of train_step,
//! all-reduce, clip, AdamW, EMA) → metrics_log and tensorboard → checkpoint / sampling /
//! validation / run_exports, all driven by `trainer`.

pub mod adamw;
pub mod batch_inputs;
pub mod cache_fill;
pub mod cached_latents;
pub mod caption_augment;
pub mod checkpoint;
pub mod distributed_step;
pub mod ema;
pub mod grad_clip;
pub mod loss_curve;
pub mod lr_schedule;
pub mod metrics_log;
pub mod phase_clock;
pub mod run_dir;
pub mod run_exports;
pub mod sample_grid;
pub mod sampling;
pub mod tensorboard;
pub mod train_step;
pub mod trainer;
pub mod training_model;
pub mod validation;
