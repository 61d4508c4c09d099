//! A c10d process group (ProcessGroupGloo or ProcessGroupNCCL) over a PrefixStore of the job's
//! TCPStore: all-reduce and barrier, each with a timeout, each failure a [`C10dError`].

use std::ffi::{c_void, CString};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use tch::Tensor;

use crate::backend::Backend;
use crate::error::C10dError;
use crate::ffi;
use crate::store::{Store, StoreAddress};

/// The store key prefix of one generation of a job's group: `job/<id>/gen/<g>`.
pub fn generation_prefix(job_id: &str, generation: u64) -> String {
    format!("job/{job_id}/gen/{generation}")
}

/// How the all-reduce combines the ranks' tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    Sum,
    Mean,
}

pub struct ProcessGroup {
    raw: NonNull<ffi::RawGroup>,
    store: Arc<Store>,
    backend: Backend,
    rank: usize,
    world_size: usize,
    prefix: String,
    timeout: Duration,
}

// SAFETY: the group is used through &mut self only, so from one thread at a time; c10d process
// groups are not tied to the thread that made them.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Connects to (rank 0: hosts) the TCPStore at `store_address` and forms the group under
    /// `prefix` (see [`generation_prefix`]). `timeout` bounds the rendezvous and every collective.
    pub fn new(
        backend: Backend,
        store_address: &str,
        rank: usize,
        world_size: usize,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, C10dError> {
        let address = StoreAddress::parse(store_address)?;
        let store = Arc::new(Store::connect(&address, rank, world_size, timeout)?);
        Self::with_store(store, backend, rank, world_size, prefix, timeout)
    }

    /// Forms a group on an existing store: how a Gloo worker regroups in-process after a
    /// failure, with the new generation's prefix, rank and world size.
    pub fn with_store(
        store: Arc<Store>,
        backend: Backend,
        rank: usize,
        world_size: usize,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, C10dError> {
        let world_size_c = checked_world_size(rank, world_size)?;
        let timeout_ms = checked_timeout_ms(timeout)?;
        if !backend.is_available() {
            return Err(C10dError::BackendUnavailable {
                backend: backend.name(),
                reason: "build arbor-c10d with the `nccl` feature".to_string(),
            });
        }
        let prefix_c = CString::new(prefix).map_err(|_| C10dError::InvalidArgument {
            field: "prefix",
            reason: "contains a NUL byte".to_string(),
        })?;
        let backend_code = match backend {
            Backend::Gloo => ffi::BACKEND_GLOO,
            Backend::Nccl => ffi::BACKEND_NCCL,
        };
        // rank < world_size <= i32::MAX (checked above).
        let rank_c = rank as i32;
        let mut error_message = std::ptr::null_mut();
        // SAFETY: the store pointer is alive (we hold the Arc); prefix_c outlives the call.
        let raw = unsafe {
            ffi::arbor_c10d_group_new(
                store.raw(),
                prefix_c.as_ptr(),
                backend_code,
                rank_c,
                world_size_c,
                timeout_ms,
                &mut error_message,
            )
        };
        let Some(raw) = NonNull::new(raw) else {
            // SAFETY: the shim set error_message (or left it null) on failure.
            let message = unsafe { ffi::take_error_message(error_message) };
            return Err(C10dError::GroupCreate {
                backend: backend.name(),
                prefix: prefix.to_string(),
                rank,
                world_size,
                message,
            });
        };
        tracing::info!(
            backend = backend.name(),
            rank,
            world_size,
            prefix,
            "c10d group formed"
        );
        Ok(Self {
            raw,
            store,
            backend,
            rank,
            world_size,
            prefix: prefix.to_string(),
            timeout,
        })
    }

    /// Averages the tensors across ranks in place: one collective over their flattened
    /// concatenation (all must share a dtype and device), then a division by the world size.
    pub fn all_reduce_mean(&mut self, tensors: &mut [Tensor]) -> Result<(), C10dError> {
        self.all_reduce(tensors, Reduction::Mean)
    }

    /// Sums the tensors across ranks in place (one collective, as [`Self::all_reduce_mean`]).
    pub fn all_reduce_sum(&mut self, tensors: &mut [Tensor]) -> Result<(), C10dError> {
        self.all_reduce(tensors, Reduction::Sum)
    }

    pub fn all_reduce(
        &mut self,
        tensors: &mut [Tensor],
        reduction: Reduction,
    ) -> Result<(), C10dError> {
        let pointers: Vec<*mut c_void> = tensors
            .iter_mut()
            .map(|tensor| tensor.as_mut_ptr().cast::<c_void>())
            .collect();
        let reduction_code = match reduction {
            Reduction::Sum => ffi::REDUCTION_SUM,
            Reduction::Mean => ffi::REDUCTION_MEAN,
        };
        let timeout_ms = checked_timeout_ms(self.timeout)?;
        let mut error_message = std::ptr::null_mut();
        // SAFETY: every pointer is a live torch::Tensor* borrowed mutably for the call.
        let status = unsafe {
            ffi::arbor_c10d_all_reduce(
                self.raw.as_ptr(),
                pointers.as_ptr(),
                pointers.len(),
                reduction_code,
                timeout_ms,
                &mut error_message,
            )
        };
        if status == 0 {
            return Ok(());
        }
        // SAFETY: the shim set error_message (or left it null) on failure.
        let message = unsafe { ffi::take_error_message(error_message) };
        tracing::warn!(rank = self.rank, prefix = %self.prefix, %message, "all-reduce failed");
        Err(C10dError::AllReduce {
            prefix: self.prefix.clone(),
            rank: self.rank,
            tensor_count: tensors.len(),
            timeout: self.timeout,
            message,
        })
    }

    pub fn barrier(&mut self) -> Result<(), C10dError> {
        let timeout_ms = checked_timeout_ms(self.timeout)?;
        let mut error_message = std::ptr::null_mut();
        // SAFETY: raw is a live group.
        let status =
            unsafe { ffi::arbor_c10d_barrier(self.raw.as_ptr(), timeout_ms, &mut error_message) };
        if status == 0 {
            return Ok(());
        }
        // SAFETY: the shim set error_message (or left it null) on failure.
        let message = unsafe { ffi::take_error_message(error_message) };
        tracing::warn!(rank = self.rank, prefix = %self.prefix, %message, "barrier failed");
        Err(C10dError::Barrier {
            prefix: self.prefix.clone(),
            rank: self.rank,
            timeout: self.timeout,
            message,
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The shim's group, for the objects built on it (the gradient reducer).
    pub(crate) fn raw(&self) -> *mut ffi::RawGroup {
        self.raw.as_ptr()
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: raw came from arbor_c10d_group_new and is freed exactly once.
        unsafe { ffi::arbor_c10d_group_free(self.raw.as_ptr()) };
    }
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ProcessGroup")
            .field("backend", &self.backend)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

pub(crate) fn checked_world_size(rank: usize, world_size: usize) -> Result<i32, C10dError> {
    let Ok(world_size_c) = i32::try_from(world_size) else {
        return Err(C10dError::InvalidArgument {
            field: "world_size",
            reason: format!("{world_size} is too large"),
        });
    };
    if world_size_c == 0 {
        return Err(C10dError::InvalidArgument {
            field: "world_size",
            reason: "must be at least 1".to_string(),
        });
    }
    if rank >= world_size {
        return Err(C10dError::InvalidArgument {
            field: "rank",
            reason: format!("rank {rank} is outside world size {world_size}"),
        });
    }
    Ok(world_size_c)
}

pub(crate) fn checked_timeout_ms(timeout: Duration) -> Result<i64, C10dError> {
    let milliseconds = timeout.as_millis();
    if milliseconds == 0 {
        return Err(C10dError::InvalidArgument {
            field: "timeout",
            reason: "must be at least 1 ms".to_string(),
        });
    }
    i64::try_from(milliseconds).map_err(|_| C10dError::InvalidArgument {
        field: "timeout",
        reason: format!("{timeout:?} is too long"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_prefix_has_the_documented_shape() {
        assert_eq!(generation_prefix("demo", 3), "job/demo/gen/3");
    }

    #[test]
    fn rejects_bad_rank_world_size_and_timeout() {
        assert!(checked_world_size(2, 2)
            .unwrap_err()
            .to_string()
            .contains("rank 2 is outside world size 2"));
        assert!(checked_world_size(0, 0)
            .unwrap_err()
            .to_string()
            .contains("world_size"));
        assert!(checked_timeout_ms(Duration::ZERO)
            .unwrap_err()
            .to_string()
            .contains("timeout"));
    }
}
