//! The worker's integration tests, as one test binary: every one links libtorch, and one binary
//! links it once (issue 15). Each module was a test binary of its own; the support modules are
//! shared by several of them. Run one with `cargo test --workspace --test it -- MODULE::`.
//!
//! Tests that re-run this binary as another process name their helper test by its full name
//! (`ddp_equivalence::peer_entry`, an ignored test: testkit/src/peer.rs), and tests that need the
//! machine to themselves take `e2e_support::one_job_at_a_time()`.

mod e2e_support;
mod hypernetwork_fixtures;
mod model_fixtures;
mod training_support;

mod batch_independence;
mod checkpoint_store;
mod clip_parity;
mod ddp_equivalence;
mod ddpm_parity;
mod hypernetwork_parity;
mod hypernetwork_probe;
mod hypernetwork_pt_format;
mod hypernetwork_shallow_penalty;
mod latent_cache;
mod lora;
mod loss_curve;
mod probe_parity;
mod resume_equivalence;
mod sampler_parity;
mod tokenizer_parity;
mod train_pieces;
mod train_step_parity;
mod trainer;
mod training_e2e;
mod unet_parity;
mod vae_parity;
mod weights_io;
