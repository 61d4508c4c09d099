//! Counter-based random streams.
//!
//! Every random decision arbor makes (the epoch permutation's round keys, the per-rank bucket
//! shuffles and batch draws, the crop offsets) comes from a stream that is a pure function of a
//! *domain* and a short tuple of integers such as `(seed, epoch, rank)`. Any epoch, rank or item
//! can therefore be reproduced on its own, without replaying what came before it.
//!
//! The construction is fixed so that plans stay reproducible across releases (`arbor-stream-v1`):
//!
//! 1. **Key derivation.** `state = domain tag`; for each part `p` in order,
//!    `state = splitmix64(state ^ p)` where `splitmix64(x)` is the SplitMix64 output function
//!    applied to `x + 0x9E3779B97F4A7C15` (wrapping). The 32-byte ChaCha seed is the
//!    little-endian bytes of four further values `state_i = splitmix64(state_{i-1})`.
//! 2. **Generator.** ChaCha8 (`rand_chacha::ChaCha8Rng`, whose output is value-stable), read
//!    64 bits at a time with `next_u64`.
//! 3. **Bounded integers.** `below(n)` is Lemire's multiply-and-reject method: take the high 64
//!    bits of `x * n` (128-bit product), rejecting `x` while the low 64 bits are below
//!    `(2^64 - n) mod n`. It is unbiased.
//! 4. **Shuffles.** Fisher-Yates from the back: for `i` from `len - 1` down to `1`, swap element
//!    `i` with element `below(i + 1)`.
//!
//! `rand`'s own `shuffle` and `random_range` are deliberately not used: their algorithms are not
//! promised to stay the same across `rand` releases.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The purpose of a stream. The discriminant is mixed into the key, so streams of different
/// domains never coincide even for equal integer tuples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum StreamDomain {
    /// Round keys of the epoch permutation: `(seed, epoch, segment)`.
    Permutation = 0x7065_726d_7574_6531,
    /// The per-rank sampler's bucket shuffles and batch draws: `(seed, epoch, segment, rank)`.
    Sampler = 0x7361_6d70_6c65_7231,
    /// Crop offsets: `(seed, epoch, item id)`.
    Crop = 0x6372_6f70_6f66_6631,
    /// Caption tag shuffling and dropout: `(seed, epoch, item id)`.
    Caption = 0x6361_7074_696f_6e31,
    /// Held-out validation items: `(item id)` alone, so a grown dataset keeps its split.
    Validation = 0x7661_6c69_6461_7431,
}

/// SplitMix64's output function applied to `x + golden gamma`.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Folds a domain and a tuple of integers into one 64-bit key (step 1 of the module docs).
pub fn derive_key(domain: StreamDomain, parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(domain as u64, |state, part| splitmix64(state ^ part))
}

/// A deterministic random stream; see the module docs for the exact construction.
#[derive(Debug, Clone)]
pub struct RandomStream {
    generator: ChaCha8Rng,
}

impl RandomStream {
    /// The stream of `domain` for the integer tuple `parts`.
    pub fn new(domain: StreamDomain, parts: &[u64]) -> Self {
        let mut state = derive_key(domain, parts);
        let mut seed = [0u8; 32];
        for chunk in seed.chunks_exact_mut(8) {
            state = splitmix64(state);
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        Self {
            generator: ChaCha8Rng::from_seed(seed),
        }
    }

    /// The next raw 64-bit value.
    pub fn next_u64(&mut self) -> u64 {
        self.generator.next_u64()
    }

    /// A uniform integer in `0..bound`. `bound` must be positive.
    pub fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0, "below(0) has no valid result");
        let mut product = u128::from(self.next_u64()) * u128::from(bound);
        let mut low = product as u64;
        if low < bound {
            let threshold = bound.wrapping_neg() % bound;
            while low < threshold {
                product = u128::from(self.next_u64()) * u128::from(bound);
                low = product as u64;
            }
        }
        (product >> 64) as u64
    }

    /// A uniform f64 in `[0, 1)` built from the top 53 bits of one draw.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Shuffles `items` in place with Fisher-Yates from the back.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for index in (1..items.len()).rev() {
            let other = self.below(index as u64 + 1) as usize;
            items.swap(index, other);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_pure_functions_of_their_key() {
        let mut first = RandomStream::new(StreamDomain::Sampler, &[42, 3, 0, 1]);
        let mut second = RandomStream::new(StreamDomain::Sampler, &[42, 3, 0, 1]);
        let mut other_rank = RandomStream::new(StreamDomain::Sampler, &[42, 3, 0, 2]);
        let mut other_domain = RandomStream::new(StreamDomain::Crop, &[42, 3, 0, 1]);
        let a: Vec<u64> = (0..8).map(|_| first.next_u64()).collect();
        let b: Vec<u64> = (0..8).map(|_| second.next_u64()).collect();
        let c: Vec<u64> = (0..8).map(|_| other_rank.next_u64()).collect();
        let d: Vec<u64> = (0..8).map(|_| other_domain.next_u64()).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn stream_values_are_pinned_across_releases() {
        // A change here changes every plan ever made: bump the documented version instead.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        let mut stream = RandomStream::new(StreamDomain::Permutation, &[42, 0, 0]);
        let first = stream.next_u64();
        let mut again = RandomStream::new(StreamDomain::Permutation, &[42, 0, 0]);
        assert_eq!(first, again.next_u64());
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut stream = RandomStream::new(StreamDomain::Crop, &[7]);
        let mut counts = [0u32; 6];
        for _ in 0..60_000 {
            let value = stream.below(6);
            assert!(value < 6);
            counts[value as usize] += 1;
        }
        for count in counts {
            assert!((9_000..11_000).contains(&count), "counts {counts:?}");
        }
        assert_eq!(stream.below(1), 0);
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut stream = RandomStream::new(StreamDomain::Sampler, &[1, 2, 3]);
        let mut items: Vec<u32> = (0..1000).collect();
        stream.shuffle(&mut items);
        assert_ne!(items, (0..1000).collect::<Vec<_>>());
        items.sort_unstable();
        assert_eq!(items, (0..1000).collect::<Vec<_>>());
    }
}
