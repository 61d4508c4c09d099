//! Where clients get the job token: `ARBOR_TOKEN` or `--token-file`, never a flag value. One
//! definition, shared with the workers ([`arbor_runtime::worker_args::TokenFlags`]).

pub use arbor_runtime::worker_args::TokenFlags;
