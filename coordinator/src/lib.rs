//! `arbor-coordinator`: the control plane (no libtorch). The `arbor` binary's commands live in
//! [`cli`]; the server in [`server`]; the libtorch-free dry-run worker in [`worker_command`].

pub mod cache_command;
pub mod checkpoint_command;
pub mod cli;
pub mod client_flags;
pub mod coordinator_command;
pub mod dataset;
pub mod dry_run;
pub mod index_command;
pub mod job_config;
pub mod launch_command;
pub mod object_file;
pub mod plan_command;
pub mod plan_flags;
pub mod preview_command;
pub mod server;
pub mod status_command;
pub mod token_flags;
pub mod worker_command;
