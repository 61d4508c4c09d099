//! Which c10d process group implements the collectives.

use std::str::FromStr;

use crate::error::C10dError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// ProcessGroupGloo: CPU tensors; a dead peer fails the collective and the group can be
    /// rebuilt in-process under a new prefix.
    Gloo,
    /// ProcessGroupNCCL (cargo feature `nccl`): CUDA tensors; after a failure, restart the process.
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }

    /// Whether this build of the shim contains the backend.
    pub fn is_available(self) -> bool {
        match self {
            Backend::Gloo => true,
            // SAFETY: a pure query with no arguments.
            Backend::Nccl => unsafe { crate::ffi::arbor_c10d_has_nccl() != 0 },
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = C10dError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "gloo" => Ok(Backend::Gloo),
            "nccl" => Ok(Backend::Nccl),
            other => Err(C10dError::InvalidArgument {
                field: "backend",
                reason: format!("unknown backend {other:?} (expected \"gloo\" or \"nccl\")"),
            }),
        }
    }
}
