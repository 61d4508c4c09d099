//! CLIP's byte-level BPE tokenizer, giving the same ids as transformers' CLIPTokenizer.
//!
//! Loaded from a model's `tokenizer/` folder: `tokenizer.json` (what transformers 5 saves) or
//! `vocab.json` + `merges.txt` (what the SD1 repositories ship). The pipeline is the one in CLIP's
//! `tokenizer.json`: NFC, whitespace runs collapsed to one space, lowercase; split with CLIP's
//! pattern; bytes mapped to printable characters; BPE with `</w>` on each word's last symbol.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;
use unicode_normalization::UnicodeNormalization;

use crate::error::{Result, WorkerError};
use crate::json_file::read_json;

/// `<|startoftext|>`, CLIP's BOS.
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// `<|endoftext|>`, CLIP's EOS (and SD1's pad token).
pub const EOS_TOKEN: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";
/// tokenizers' ByteLevel pre-tokenizer (use_regex) splits each piece again with GPT-2's pattern;
/// CLIP pieces hold no whitespace, so its whitespace alternatives never apply. This only changes
/// pieces like a literal `<|endoftext|>` typed in another case (`<|`, `endoftext`, `|>`).
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";
const SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A loaded CLIP BPE tokenizer.
#[derive(Debug)]
pub struct ClipTokenizer {
    vocab: HashMap<String, i64>,
    /// (left id, right id) -> (merge rank, merged id)
    merges: HashMap<(i64, i64), (usize, i64)>,
    byte_to_char: [char; 256],
    split: Regex,
    byte_level_split: Regex,
    whitespace: Regex,
    bos_id: i64,
    eos_id: i64,
    pad_id: i64,
    unk_id: i64,
}

#[derive(Deserialize)]
struct TokenizerJson {
    model: TokenizerJsonModel,
}

#[derive(Deserialize)]
struct TokenizerJsonModel {
    #[serde(rename = "type")]
    kind: String,
    vocab: HashMap<String, i64>,
    merges: Vec<TokenizerJsonMerge>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
}

/// tokenizers writes merges as `"a b"` (older files) or `["a", "b"]` (newer files).
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenizerJsonMerge {
    Joined(String),
    Pair(String, String),
}

#[derive(Deserialize, Default)]
struct TokenizerConfigJson {
    #[serde(default)]
    pad_token: Option<PadToken>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PadToken {
    Plain(String),
    Added { content: String },
}

impl ClipTokenizer {
    /// Loads the tokenizer of a model: `MODEL/tokenizer/` when present, else `MODEL` itself
    /// (a folder holding the tokenizer files directly).
    pub fn from_model_dir(model_dir: &Path) -> Result<Self> {
        let nested = model_dir.join("tokenizer");
        let tokenizer_dir = if nested.is_dir() {
            nested
        } else {
            model_dir.to_path_buf()
        };
        Self::from_tokenizer_dir(&tokenizer_dir)
    }

    /// Loads `vocab.json` + `merges.txt`, or else `tokenizer.json`, from `tokenizer_dir`.
    pub fn from_tokenizer_dir(tokenizer_dir: &Path) -> Result<Self> {
        let vocab_path = tokenizer_dir.join("vocab.json");
        let merges_path = tokenizer_dir.join("merges.txt");
        let json_path = tokenizer_dir.join("tokenizer.json");
        let (vocab, merge_pairs, source) = if vocab_path.is_file() && merges_path.is_file() {
            let vocab: HashMap<String, i64> = read_json(&vocab_path)?;
            let merges_text = std::fs::read_to_string(&merges_path)
                .map_err(WorkerError::io(merges_path.clone()))?;
            let pairs = parse_merges_txt(&merges_text, &merges_path)?;
            (vocab, pairs, merges_path)
        } else if json_path.is_file() {
            let parsed: TokenizerJson = read_json(&json_path)?;
            if parsed.model.kind != "BPE" {
                return Err(tokenizer_error(
                    &json_path,
                    format!(
                        "field `model.type` is {:?}, expected \"BPE\"",
                        parsed.model.kind
                    ),
                ));
            }
            if parsed.model.end_of_word_suffix.as_deref() != Some(END_OF_WORD) {
                return Err(tokenizer_error(
                    &json_path,
                    "field `model.end_of_word_suffix` is not \"</w>\" (not a CLIP tokenizer)",
                ));
            }
            let pairs = parsed
                .model
                .merges
                .into_iter()
                .enumerate()
                .map(|(line, merge)| match merge {
                    TokenizerJsonMerge::Pair(left, right) => Ok((left, right)),
                    TokenizerJsonMerge::Joined(joined) => split_merge(&joined).ok_or_else(|| {
                        tokenizer_error(
                            &json_path,
                            format!("field `model.merges[{line}]` is not two symbols: {joined:?}"),
                        )
                    }),
                })
                .collect::<Result<Vec<_>>>()?;
            (parsed.model.vocab, pairs, json_path)
        } else {
            return Err(tokenizer_error(
                tokenizer_dir,
                "holds neither vocab.json + merges.txt nor tokenizer.json",
            ));
        };
        let config_path = tokenizer_dir.join("tokenizer_config.json");
        let config: TokenizerConfigJson = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            TokenizerConfigJson::default()
        };
        Self::from_parts(vocab, merge_pairs, config, &source)
    }

    fn from_parts(
        vocab: HashMap<String, i64>,
        merge_pairs: Vec<(String, String)>,
        config: TokenizerConfigJson,
        source: &Path,
    ) -> Result<Self> {
        let lookup = |token: &str| {
            vocab.get(token).copied().ok_or_else(|| {
                tokenizer_error(source, format!("vocabulary has no token {token:?}"))
            })
        };
        let bos_id = lookup(BOS_TOKEN)?;
        let eos_id = lookup(EOS_TOKEN)?;
        let pad_id = match config.pad_token {
            None => eos_id,
            Some(PadToken::Plain(token)) | Some(PadToken::Added { content: token }) => {
                lookup(&token)?
            }
        };
        let mut merges = HashMap::with_capacity(merge_pairs.len());
        for (rank, (left, right)) in merge_pairs.into_iter().enumerate() {
            let merged = format!("{left}{right}");
            let (Some(&left_id), Some(&right_id), Some(&merged_id)) =
                (vocab.get(&left), vocab.get(&right), vocab.get(&merged))
            else {
                return Err(tokenizer_error(
                    source,
                    format!("merge {rank} ({left:?} {right:?}) uses a symbol missing from the vocabulary"),
                ));
            };
            merges
                .entry((left_id, right_id))
                .or_insert((rank, merged_id));
        }
        Ok(Self {
            vocab,
            merges,
            byte_to_char: bytes_to_unicode(),
            split: Regex::new(SPLIT_PATTERN).expect("CLIP split pattern compiles"),
            byte_level_split: Regex::new(BYTE_LEVEL_PATTERN).expect("byte-level pattern compiles"),
            whitespace: Regex::new(r"\s+").expect("whitespace pattern compiles"),
            bos_id,
            eos_id,
            pad_id,
            unk_id: eos_id,
        })
    }

    pub fn bos_id(&self) -> i64 {
        self.bos_id
    }

    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    /// The id prompts are padded with: `tokenizer_config.json`'s pad_token, else EOS (SD1).
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The ids of `text` without BOS/EOS, as `CLIPTokenizer(text, add_special_tokens=False)`.
    ///
    /// As in tokenizers, the special tokens are split out of the raw text first; each segment
    /// between them is normalized, split and BPE-encoded on its own.
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        let mut rest = text;
        loop {
            let next_special = [(BOS_TOKEN, self.bos_id), (EOS_TOKEN, self.eos_id)]
                .into_iter()
                .filter_map(|(token, id)| rest.find(token).map(|at| (at, token, id)))
                .min_by_key(|(at, _, _)| *at);
            let Some((at, token, id)) = next_special else {
                self.encode_segment(rest, &mut ids);
                return ids;
            };
            self.encode_segment(&rest[..at], &mut ids);
            ids.push(id);
            rest = &rest[at + token.len()..];
        }
    }

    /// NFC, whitespace runs to one space, lowercase, CLIP's split, the byte-level split, then
    /// BPE per word.
    fn encode_segment(&self, segment: &str, ids: &mut Vec<i64>) {
        let normalized: String = segment.nfc().collect();
        // Per character, as tokenizers' Lowercase does: no final-sigma rule (`str::to_lowercase`
        // would turn a word-final Σ into ς, tokenizers gives σ).
        let normalized: String = self
            .whitespace
            .replace_all(&normalized, " ")
            .chars()
            .flat_map(char::to_lowercase)
            .collect();
        for piece in self.split.find_iter(&normalized) {
            for word in self.byte_level_split.find_iter(piece.as_str()) {
                self.encode_word(word.as_str(), ids);
            }
        }
    }

    /// Byte-level BPE of one pre-tokenized word, lowest-ranked merge first.
    fn encode_word(&self, word: &str, ids: &mut Vec<i64>) {
        let mapped: Vec<char> = word
            .bytes()
            .map(|byte| self.byte_to_char[usize::from(byte)])
            .collect();
        let mut symbols: Vec<i64> = Vec::with_capacity(mapped.len());
        for (index, character) in mapped.iter().enumerate() {
            let mut symbol = character.to_string();
            if index + 1 == mapped.len() {
                symbol.push_str(END_OF_WORD);
            }
            symbols.push(self.vocab.get(&symbol).copied().unwrap_or(self.unk_id));
        }
        loop {
            let best = symbols
                .windows(2)
                .filter_map(|pair| self.merges.get(&(pair[0], pair[1])).map(|m| (m.0, pair)))
                .min_by_key(|(rank, _)| *rank)
                .map(|(_, pair)| (pair[0], pair[1]));
            let Some((left, right)) = best else {
                break;
            };
            let merged_id = self.merges[&(left, right)].1;
            let mut merged = Vec::with_capacity(symbols.len());
            let mut index = 0;
            while index < symbols.len() {
                if index + 1 < symbols.len()
                    && symbols[index] == left
                    && symbols[index + 1] == right
                {
                    merged.push(merged_id);
                    index += 2;
                } else {
                    merged.push(symbols[index]);
                    index += 1;
                }
            }
            symbols = merged;
        }
        ids.extend(symbols);
    }
}

/// GPT-2/CLIP's reversible map from bytes to printable characters.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |byte: u32| {
        (u32::from(b'!')..=u32::from(b'~')).contains(&byte)
            || (0xA1..=0xAC).contains(&byte)
            || (0xAE..=0xFF).contains(&byte)
    };
    let mut table = ['\0'; 256];
    let mut next_unprintable = 0u32;
    for byte in 0u32..256 {
        let code = if printable(byte) {
            byte
        } else {
            next_unprintable += 1;
            255 + next_unprintable
        };
        table[byte as usize] = char::from_u32(code).expect("byte map stays in the BMP");
    }
    table
}

fn split_merge(line: &str) -> Option<(String, String)> {
    let mut parts = line.split(' ');
    let left = parts.next()?;
    let right = parts.next()?;
    if parts.next().is_some() || left.is_empty() || right.is_empty() {
        return None;
    }
    Some((left.to_string(), right.to_string()))
}

fn parse_merges_txt(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.starts_with("#version") && !line.trim().is_empty())
        .map(|(line_index, line)| {
            split_merge(line).ok_or_else(|| {
                tokenizer_error(
                    path,
                    format!("line {} is not two symbols: {line:?}", line_index + 1),
                )
            })
        })
        .collect()
}

fn tokenizer_error(path: &Path, message: impl Into<String>) -> WorkerError {
    WorkerError::Tokenizer {
        path: PathBuf::from(path),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection_onto_printable_characters() {
        let table = bytes_to_unicode();
        let mut seen: Vec<char> = table.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(table[usize::from(b'a')], 'a');
        assert_eq!(table[usize::from(b' ')], 'Ġ');
    }

    #[test]
    fn merges_lines_must_hold_two_symbols() {
        let error = parse_merges_txt("#version: 0.2\ni n\nbroken\n", Path::new("m.txt"))
            .expect_err("a one-symbol line is refused");
        assert!(error.to_string().contains("line 3"), "{error}");
    }
}
