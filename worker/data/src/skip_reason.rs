//! Why a file of the dataset was not indexed: every skip carries the key and a reason, is
//! counted by reason, and goes to the report (docs/architecture.md §7: never a crash, never
//! silent).

use std::collections::BTreeMap;

use serde::Serialize;

/// The reasons a file is skipped. The snake_case names are the report's stable vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The object is empty.
    ZeroBytes,
    /// The bytes are not any image format arbor decodes (whatever the extension says).
    NotAnImage,
    /// An image whose header is cut short or corrupt, so its size cannot be read.
    CorruptHeader,
    /// The image has a zero width or height.
    InvalidSize,
    /// The pixel count is over the cap (a decompression bomb or simply too large).
    TooManyPixels,
    /// The object (image or caption) could not be read from the store.
    UnreadableObject,
    /// The caption file is not UTF-8.
    CaptionNotUtf8,
    /// No sidecar caption exists and captions are required.
    MissingCaption,
    /// Two keys hash to the same stable id; the later key (sorted order) is skipped.
    IdCollision,
}

impl SkipReason {
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::ZeroBytes => "zero_bytes",
            SkipReason::NotAnImage => "not_an_image",
            SkipReason::CorruptHeader => "corrupt_header",
            SkipReason::InvalidSize => "invalid_size",
            SkipReason::TooManyPixels => "too_many_pixels",
            SkipReason::UnreadableObject => "unreadable_object",
            SkipReason::CaptionNotUtf8 => "caption_not_utf8",
            SkipReason::MissingCaption => "missing_caption",
            SkipReason::IdCollision => "id_collision",
        }
    }
}

/// One file that was not indexed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedFile {
    /// The image key relative to the dataset root.
    pub key: String,
    pub reason: SkipReason,
    /// A human-readable detail (the decoder's message, the colliding key, …).
    pub detail: String,
}

/// Skips counted by reason, in the enum's order.
pub fn counts_by_reason(skipped: &[SkippedFile]) -> BTreeMap<SkipReason, usize> {
    let mut counts = BTreeMap::new();
    for file in skipped {
        *counts.entry(file.reason).or_insert(0) += 1;
    }
    counts
}

/// `"3 skipped (2 not_an_image, 1 zero_bytes)"`, or `"0 skipped"`.
pub fn skip_summary(skipped: &[SkippedFile]) -> String {
    let counts = counts_by_reason(skipped);
    if counts.is_empty() {
        return "0 skipped".to_owned();
    }
    let parts: Vec<String> = counts
        .iter()
        .map(|(reason, count)| format!("{count} {}", reason.name()))
        .collect();
    format!("{} skipped ({})", skipped.len(), parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_by_reason() {
        let skip = |key: &str, reason| SkippedFile {
            key: key.to_owned(),
            reason,
            detail: String::new(),
        };
        let skipped = vec![
            skip("a", SkipReason::NotAnImage),
            skip("b", SkipReason::ZeroBytes),
            skip("c", SkipReason::NotAnImage),
        ];
        assert_eq!(
            skip_summary(&skipped),
            "3 skipped (1 zero_bytes, 2 not_an_image)"
        );
        assert_eq!(skip_summary(&[]), "0 skipped");
        assert_eq!(
            serde_json::to_string(&skipped[0]).unwrap(),
            r#"{"key":"a","reason":"not_an_image","detail":""}"#
        );
    }
}
