//! The epoch permutation: a keyed bijection over `0..len` (docs/architecture.md §2 "Epoch plan").
//!
//! Algorithm `arbor-feistel-v1`, a pure function of `(seed, epoch, segment)` and `len`:
//!
//! - The domain is `0..2^(2h)` where `2h` is the smallest even bit count `>= 2` with
//!   `2^(2h) >= len`; a value `x` splits into `left = x >> h` and `right = x & (2^h - 1)`.
//! - Six round keys `k_0..k_5` are the first six `next_u64` values of the
//!   [`StreamDomain::Permutation`] stream for `(seed, epoch, segment)` (see [`crate::stream`]).
//! - Each round maps `(left, right)` to `(right, left ^ (splitmix64(right ^ k_r) & (2^h - 1)))`,
//!   a balanced Feistel network, so the six rounds form a bijection of the domain.
//! - Cycle-walking: `apply(i)` encrypts `i` repeatedly until the value is `< len`. Because the
//!   network permutes the whole domain, this restricts it to a bijection of `0..len`; since the
//!   domain is less than four times `len`, the expected number of walks is below four.
//!
//! Any single index is computed in O(1) without materialising the permutation, so one rank's
//! shard of a billion-item epoch needs no memory for the others.

use crate::stream::{splitmix64, RandomStream, StreamDomain};

const ROUNDS: usize = 6;

/// A keyed bijection of `0..len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeistelPermutation {
    len: u64,
    half_bits: u32,
    half_mask: u64,
    round_keys: [u64; ROUNDS],
}

impl FeistelPermutation {
    /// The permutation of `0..len` for `(seed, epoch, segment)`. The epoch's first plan uses
    /// segment 0; an elastic re-shard uses the generation that computed it.
    pub fn new(len: u64, seed: u64, epoch: u64, segment: u64) -> Self {
        let mut stream = RandomStream::new(StreamDomain::Permutation, &[seed, epoch, segment]);
        let round_keys = std::array::from_fn(|_| stream.next_u64());
        let needed_bits = (64 - len.saturating_sub(1).leading_zeros()).max(2);
        let half_bits = needed_bits.div_ceil(2);
        Self {
            len,
            half_bits,
            half_mask: (1u64 << half_bits) - 1,
            round_keys,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The image of `index`, which must be below `len`.
    #[inline]
    pub fn apply(&self, index: u64) -> u64 {
        debug_assert!(index < self.len, "index {index} out of 0..{}", self.len);
        let mut value = index;
        loop {
            value = self.encrypt(value);
            if value < self.len {
                return value;
            }
        }
    }

    #[inline]
    fn encrypt(&self, value: u64) -> u64 {
        let mut left = value >> self.half_bits;
        let mut right = value & self.half_mask;
        for key in self.round_keys {
            let mixed = splitmix64(right ^ key) & self.half_mask;
            (left, right) = (right, left ^ mixed);
        }
        (left << self.half_bits) | right
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_a_bijection_for_awkward_lengths() {
        for len in [0u64, 1, 2, 3, 4, 5, 15, 16, 17, 63, 64, 65, 1000, 4097] {
            let permutation = FeistelPermutation::new(len, 42, 1, 0);
            let mut seen = vec![false; len as usize];
            for index in 0..len {
                let image = permutation.apply(index);
                assert!(image < len);
                assert!(!seen[image as usize], "len {len}: {image} hit twice");
                seen[image as usize] = true;
            }
        }
    }

    #[test]
    fn depends_on_seed_epoch_and_segment() {
        let order = |seed, epoch, segment| {
            let permutation = FeistelPermutation::new(1000, seed, epoch, segment);
            (0..1000).map(|i| permutation.apply(i)).collect::<Vec<_>>()
        };
        let base = order(42, 0, 0);
        assert_eq!(base, order(42, 0, 0));
        assert_ne!(base, order(43, 0, 0));
        assert_ne!(base, order(42, 1, 0));
        assert_ne!(base, order(42, 0, 1));
        assert_ne!(base, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn positions_spread_evenly() {
        // Where the first tenth of the domain lands should be spread over the whole range.
        let permutation = FeistelPermutation::new(100_000, 7, 3, 0);
        let mut deciles = [0u32; 10];
        for index in 0..10_000 {
            deciles[(permutation.apply(index) / 10_000) as usize] += 1;
        }
        for count in deciles {
            assert!((800..1200).contains(&count), "deciles {deciles:?}");
        }
    }
}
