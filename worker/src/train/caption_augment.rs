//! Tag-caption augmentation with kohya-ss/sd-scripts' semantics (`shuffle_caption`,
//! `keep_tokens`, `caption_tag_dropout_rate`): the caption is split on `,` into tags, each
//! trimmed, empty ones dropped; the first `keep_tokens` tags stay in place; the rest are
//! shuffled (when `shuffle`) and then each dropped with probability `tag_dropout`; the result
//! is joined with `", "`. With `caption_dropout` (kohya's `caption_dropout_rate`) the whole
//! caption is first replaced by the empty one with that probability, which trains the
//! unconditional path that classifier-free guidance samples from.
//!
//! The randomness is a ChaCha8 stream seeded from `(seed, epoch, item_id)` alone, so an item's
//! caption in an epoch is the same whichever rank draws it and whatever the world size, and a
//! resumed run repeats it exactly.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How captions are augmented (config `data.tag_shuffle`, `data.keep_tokens`,
/// `data.tag_dropout`, `data.caption_dropout`).
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionAugment {
    pub shuffle: bool,
    pub keep_tokens: u32,
    pub tag_dropout: f64,
    pub caption_dropout: f64,
}

/// Distinguishes this stream from any other ChaCha stream seeded from the same triple.
const STREAM_TAG: u64 = u64::from_le_bytes(*b"captions");

fn item_rng(seed: u64, epoch: u64, item_id: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (chunk, value) in key
        .chunks_exact_mut(8)
        .zip([seed, epoch, item_id, STREAM_TAG])
    {
        chunk.copy_from_slice(&value.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

impl CaptionAugment {
    pub fn from_config(data: &arbor_common::config::DataSection) -> Self {
        Self {
            shuffle: data.tag_shuffle,
            keep_tokens: data.keep_tokens,
            tag_dropout: data.tag_dropout,
            caption_dropout: data.caption_dropout,
        }
    }

    /// The caption of `item_id` in `epoch`, augmented.
    pub fn apply(&self, caption: &str, seed: u64, epoch: u64, item_id: u64) -> String {
        let mut rng = item_rng(seed, epoch, item_id);
        // Drawn only when on, so runs without caption dropout keep their shuffles.
        if self.caption_dropout > 0.0 && rng.random::<f64>() < self.caption_dropout {
            return String::new();
        }
        let mut tags: Vec<&str> = caption
            .split(',')
            .map(str::trim)
            .filter(|tag| !tag.is_empty())
            .collect();
        let keep = (self.keep_tokens as usize).min(tags.len());
        let flexible = &mut tags[keep..];
        if self.shuffle {
            flexible.shuffle(&mut rng);
        }
        let dropout = self.tag_dropout.clamp(0.0, 1.0);
        if dropout > 0.0 {
            let mut kept = tags[..keep].to_vec();
            for tag in &tags[keep..] {
                if rng.random::<f64>() >= dropout {
                    kept.push(tag);
                }
            }
            tags = kept;
        }
        tags.join(", ")
    }
}
