//! The coordinator server: membership and epoch progress ([`membership`]), the persisted
//! state ([`job_state`]) and ledger ([`ledger`]) in the run directory ([`run_store`]), the gRPC service ([`service`]), the token
//! check ([`auth`]) and metrics ([`metrics`]).

pub mod auth;
pub mod job_state;
pub mod ledger;
pub mod membership;
pub mod metrics;
pub mod run_store;
pub mod service;
