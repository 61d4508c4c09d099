//! The collective store: libtorch's TCPStore, hosted by rank 0 at the address the coordinator hands
//! out, reached by every other rank. One store outlives the groups built on it (one per
//! generation, each under its own key prefix).

use std::ffi::CString;
use std::ptr::NonNull;
use std::time::Duration;

use crate::error::C10dError;
use crate::ffi;

/// `host:port` of the TCPStore (`[v6addr]:port` for IPv6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreAddress {
    pub host: String,
    pub port: u16,
}

impl StoreAddress {
    pub fn parse(address: &str) -> Result<Self, C10dError> {
        let invalid = |reason: &str| C10dError::InvalidStoreAddress {
            address: address.to_string(),
            reason: reason.to_string(),
        };
        let Some((host, port)) = address.rsplit_once(':') else {
            return Err(invalid("expected host:port"));
        };
        let host = host
            .strip_prefix('[')
            .and_then(|inner| inner.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(invalid("the host is empty"));
        }
        if host.contains('\0') {
            return Err(invalid("the host contains a NUL byte"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| invalid("the port is not a number from 1 to 65535"))?;
        if port == 0 {
            return Err(invalid("the port is 0"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for StoreAddress {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(formatter, "[{}]:{}", self.host, self.port)
        } else {
            write!(formatter, "{}:{}", self.host, self.port)
        }
    }
}

/// A TCPStore handle: the server on rank 0, a client elsewhere.
pub struct Store {
    raw: NonNull<ffi::RawStore>,
    address: StoreAddress,
    rank: usize,
}

// SAFETY: c10d's TCPStore serialises its operations internally; the handle is only read.
unsafe impl Send for Store {}
// SAFETY: as above; the shim only passes the store to PrefixStore constructors.
unsafe impl Sync for Store {}

impl Store {
    /// Rank 0 hosts the store at `address` (it must be free); other ranks connect to it, retrying
    /// until `timeout`.
    pub fn connect(
        address: &StoreAddress,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<Self, C10dError> {
        let world_size_c = crate::process_group::checked_world_size(rank, world_size)?;
        let timeout_ms = crate::process_group::checked_timeout_ms(timeout)?;
        let host =
            CString::new(address.host.as_str()).map_err(|_| C10dError::InvalidStoreAddress {
                address: address.to_string(),
                reason: "the host contains a NUL byte".to_string(),
            })?;
        let is_server = i32::from(rank == 0);
        let mut error_message = std::ptr::null_mut();
        // SAFETY: host is a valid C string for the call; error_message receives an owned message.
        let raw = unsafe {
            ffi::arbor_c10d_store_new(
                host.as_ptr(),
                address.port,
                is_server,
                world_size_c,
                timeout_ms,
                &mut error_message,
            )
        };
        let Some(raw) = NonNull::new(raw) else {
            // SAFETY: the shim set error_message (or left it null) on failure.
            let message = unsafe { ffi::take_error_message(error_message) };
            return Err(C10dError::StoreConnect {
                address: address.to_string(),
                rank,
                message,
            });
        };
        tracing::debug!(address = %address, rank, world_size, hosting = rank == 0, "c10d store ready");
        Ok(Self {
            raw,
            address: address.clone(),
            rank,
        })
    }

    pub fn address(&self) -> &StoreAddress {
        &self.address
    }

    /// Whether this process hosts the store (rank 0 when it was created).
    pub fn is_host(&self) -> bool {
        self.rank == 0
    }

    pub(crate) fn raw(&self) -> *mut ffi::RawStore {
        self.raw.as_ptr()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: raw came from arbor_c10d_store_new and is freed exactly once.
        unsafe { ffi::arbor_c10d_store_free(self.raw.as_ptr()) };
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Store")
            .field("address", &self.address)
            .field("rank", &self.rank)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_and_port() {
        let address = StoreAddress::parse("10.0.0.7:29500").unwrap();
        assert_eq!(address.host, "10.0.0.7");
        assert_eq!(address.port, 29500);
        assert_eq!(address.to_string(), "10.0.0.7:29500");
        let ipv6 = StoreAddress::parse("[::1]:1234").unwrap();
        assert_eq!(ipv6.host, "::1");
        assert_eq!(ipv6.to_string(), "[::1]:1234");
    }

    #[test]
    fn rejects_bad_addresses_naming_the_problem() {
        for (address, fragment) in [
            ("localhost", "host:port"),
            (":29500", "host is empty"),
            ("host:0", "port is 0"),
            ("host:99999", "port is not a number"),
            ("host:abc", "port is not a number"),
        ] {
            let error = StoreAddress::parse(address).unwrap_err().to_string();
            assert!(error.contains(fragment), "{address}: {error}");
        }
    }
}
