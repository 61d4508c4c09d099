//! Long prompts (docs/architecture.md §3): a batch's token ids framed as separately encoded
//! 75-token chunks.
//!
//! The batch length is the longest prompt rounded up to a multiple of 75 (at least one chunk, so
//! an empty prompt is one chunk) and capped at `max_chunks`·75. Shorter prompts are padded (with
//! EOS for SD1), longer ones truncated, and each chunk is framed BOS + 75 + EOS, giving 77·n ids.
//! The unconditional prompt is framed to the same n as the conditional one.

pub use arbor_common::config::PromptLayout;
use tch::{Kind, Tensor};

use crate::error::{Result, WorkerError};
use crate::tokenizer::ClipTokenizer;

/// Tokens of one chunk, without its BOS/EOS frame.
pub const CHUNK_TOKENS: usize = 75;
/// Tokens of one framed chunk: BOS + 75 + EOS, CLIP's context length.
pub const FRAMED_CHUNK_TOKENS: usize = CHUNK_TOKENS + 2;
/// NovelAI's default: 3 chunks, 225 tokens.
pub const DEFAULT_MAX_CHUNKS: usize = 3;

/// The special ids used for framing and how many chunks a prompt may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptFraming {
    pub bos_id: i64,
    pub eos_id: i64,
    pub pad_id: i64,
    pub max_chunks: usize,
}

impl PromptFraming {
    /// The framing of a tokenizer's special ids, with `max_chunks` chunks at most (at least 1).
    pub fn for_tokenizer(tokenizer: &ClipTokenizer, max_chunks: usize) -> Self {
        Self {
            bos_id: tokenizer.bos_id(),
            eos_id: tokenizer.eos_id(),
            pad_id: tokenizer.pad_id(),
            max_chunks: max_chunks.max(1),
        }
    }

    /// The chunk count of a batch whose longest prompt has `longest_tokens` tokens.
    pub fn chunk_count(&self, longest_tokens: usize) -> usize {
        longest_tokens
            .div_ceil(CHUNK_TOKENS)
            .clamp(1, self.max_chunks.max(1))
    }

    /// One prompt's ids (without BOS/EOS) framed as `chunk_count` chunks of 77 ids.
    pub fn frame(&self, ids: &[i64], chunk_count: usize) -> Vec<Vec<i64>> {
        let body_len = chunk_count * CHUNK_TOKENS;
        let mut body: Vec<i64> = ids.iter().copied().take(body_len).collect();
        body.resize(body_len, self.pad_id);
        body.chunks(CHUNK_TOKENS)
            .map(|chunk| {
                let mut framed = Vec::with_capacity(FRAMED_CHUNK_TOKENS);
                framed.push(self.bos_id);
                framed.extend_from_slice(chunk);
                framed.push(self.eos_id);
                framed
            })
            .collect()
    }

    /// A batch of prompts framed to the batch's chunk count.
    pub fn frame_batch(&self, prompts: &[Vec<i64>]) -> FramedBatch {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        self.frame_batch_to(prompts, self.chunk_count(longest))
    }

    /// A batch of prompts framed to `chunk_count` chunks (used for the unconditional prompt).
    pub fn frame_batch_to(&self, prompts: &[Vec<i64>], chunk_count: usize) -> FramedBatch {
        let rows = prompts
            .iter()
            .map(|ids| self.frame(ids, chunk_count).concat())
            .collect();
        FramedBatch { rows, chunk_count }
    }

    /// Conditional and unconditional prompts framed to one chunk count, the larger of the two,
    /// so that classifier-free guidance can combine them.
    pub fn frame_guided(
        &self,
        conditional: &[Vec<i64>],
        unconditional: &[Vec<i64>],
    ) -> (FramedBatch, FramedBatch) {
        let longest = conditional
            .iter()
            .chain(unconditional)
            .map(Vec::len)
            .max()
            .unwrap_or(0);
        let chunk_count = self.chunk_count(longest);
        (
            self.frame_batch_to(conditional, chunk_count),
            self.frame_batch_to(unconditional, chunk_count),
        )
    }
}

/// Framed ids of a batch: each row holds 77·chunk_count ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramedBatch {
    pub rows: Vec<Vec<i64>>,
    pub chunk_count: usize,
}

impl FramedBatch {
    /// The ids as an int64 tensor [B, 77·n].
    pub fn to_tensor(&self) -> Tensor {
        let width = (self.chunk_count * FRAMED_CHUNK_TOKENS) as i64;
        let flat: Vec<i64> = self.rows.concat();
        Tensor::from_slice(&flat)
            .view([self.rows.len() as i64, width])
            .to_kind(Kind::Int64)
    }
}

/// Splits framed ids [B, 77·n] into n chunk tensors [B, 77], checking the width.
pub fn split_chunks(framed_ids: &Tensor) -> Result<Vec<Tensor>> {
    let size = framed_ids.size();
    let chunk = FRAMED_CHUNK_TOKENS as i64;
    if size.len() != 2 || size[1] == 0 || size[1] % chunk != 0 {
        return Err(WorkerError::Input {
            name: "chunked_input_ids".to_string(),
            message: format!("shape {size:?} is not [batch, 77·n]"),
        });
    }
    Ok(framed_ids.split(chunk, 1))
}

/// Joins per-chunk hidden states [B, 77, D] into the layout's conditioning tensor.
pub fn join_chunk_states(chunk_states: &[Tensor], layout: PromptLayout) -> Tensor {
    match layout {
        PromptLayout::Chunked => Tensor::cat(chunk_states, 1),
        PromptLayout::Kohya => {
            let last = chunk_states.len() - 1;
            let last_len = FRAMED_CHUNK_TOKENS as i64;
            let mut parts = Vec::with_capacity(chunk_states.len() + 2);
            parts.push(chunk_states[0].narrow(1, 0, 1));
            for states in chunk_states {
                parts.push(states.narrow(1, 1, CHUNK_TOKENS as i64));
            }
            parts.push(chunk_states[last].narrow(1, last_len - 1, 1));
            Tensor::cat(&parts, 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAMING: PromptFraming = PromptFraming {
        bos_id: 49406,
        eos_id: 49407,
        pad_id: 49407,
        max_chunks: 3,
    };

    #[test]
    fn chunk_count_rounds_up_and_caps() {
        assert_eq!(FRAMING.chunk_count(0), 1);
        assert_eq!(FRAMING.chunk_count(75), 1);
        assert_eq!(FRAMING.chunk_count(76), 2);
        assert_eq!(FRAMING.chunk_count(150), 2);
        assert_eq!(FRAMING.chunk_count(151), 3);
        assert_eq!(FRAMING.chunk_count(10_000), 3);
    }

    #[test]
    fn frames_pad_with_eos_and_truncate() {
        let ids: Vec<i64> = (1..=80).collect();
        let chunks = FRAMING.frame(&ids, 2);
        assert_eq!(chunks.len(), 2);
        assert!(chunks.iter().all(|chunk| chunk.len() == 77));
        assert_eq!(chunks[0][0], 49406);
        assert_eq!(chunks[0][1..76], (1..=75).collect::<Vec<i64>>()[..]);
        assert_eq!(chunks[0][76], 49407);
        assert_eq!(chunks[1][1..6], [76, 77, 78, 79, 80]);
        assert!(chunks[1][6..].iter().all(|&id| id == 49407));
        let truncated = FRAMING.frame(&(0..300).collect::<Vec<i64>>(), 3);
        assert_eq!(truncated[2][75], 224);
    }

    #[test]
    fn unconditional_prompt_takes_the_conditional_chunk_count() {
        let long: Vec<i64> = vec![5; 160];
        let (conditional, unconditional) = FRAMING.frame_guided(&[long], &[vec![]]);
        assert_eq!(conditional.chunk_count, 3);
        assert_eq!(unconditional.chunk_count, 3);
        assert_eq!(unconditional.rows[0].len(), 231);
    }

    #[test]
    fn kohya_layout_keeps_one_bos_and_one_eos() {
        let states: Vec<Tensor> = (0..2)
            .map(|chunk| {
                Tensor::arange(77, (Kind::Float, tch::Device::Cpu)).view([1, 77, 1])
                    + 100.0 * chunk as f64
            })
            .collect();
        let joined = join_chunk_states(&states, PromptLayout::Kohya);
        assert_eq!(joined.size(), [1, 152, 1]);
        assert_eq!(joined.double_value(&[0, 0, 0]), 0.0);
        assert_eq!(joined.double_value(&[0, 75, 0]), 75.0);
        assert_eq!(joined.double_value(&[0, 76, 0]), 101.0);
        assert_eq!(joined.double_value(&[0, 151, 0]), 176.0);
        let chunked = join_chunk_states(&states, PromptLayout::Chunked);
        assert_eq!(chunked.size(), [1, 154, 1]);
    }

    #[test]
    fn split_refuses_widths_that_are_not_multiples_of_77() {
        let ids = Tensor::zeros([1, 100], (Kind::Int64, tch::Device::Cpu));
        let error = split_chunks(&ids).expect_err("100 is not 77·n");
        assert!(error.to_string().contains("chunked_input_ids"), "{error}");
    }
}
