//! Stable item ids: the same file keeps its id across re-indexing.
//!
//! The id of an item is the first 8 bytes (big-endian) of the SHA-256 of its key relative to the
//! dataset root (with `/` separators), with the top bit cleared so the id also fits a signed
//! 64-bit column. It depends on nothing but the key: re-indexing a grown dataset, or the same
//! dataset copied to another bucket, gives every old file its old id. Two keys hashing to the
//! same id are detected by the indexer and reported (the later key in sorted order is skipped).

use sha2::{Digest, Sha256};

/// The stable id of the item stored at `relative_key`.
pub fn item_id(relative_key: &str) -> u64 {
    let digest = Sha256::digest(relative_key.as_bytes());
    let mut first_eight = [0u8; 8];
    first_eight.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first_eight) & 0x7fff_ffff_ffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fixed_functions_of_the_key() {
        // Python: int.from_bytes(sha256(b"images/0001.png").digest()[:8], "big") & (2**63 - 1).
        // Pinned so that a change of scheme (which would renumber every dataset) is caught.
        let id = item_id("images/0001.png");
        assert_eq!(id, 5201963614228245827);
        assert_eq!(id, item_id("images/0001.png"));
        assert_ne!(id, item_id("images/0002.png"));
        assert_ne!(id, item_id("Images/0001.png"));
        assert!(id < (1 << 63));
    }
}
