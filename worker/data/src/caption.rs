//! Sidecar captions (the kohya layout): `image.png` is captioned by `image.txt` or
//! `image.caption`. UTF-8 only; a byte-order mark and CRLF line ends are tolerated.

/// Why a caption file could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptionError {
    /// The bytes are not UTF-8; `valid_up_to` is the byte offset of the first bad sequence.
    NotUtf8 { valid_up_to: usize },
}

impl std::fmt::Display for CaptionError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaptionError::NotUtf8 { valid_up_to } => {
                write!(
                    formatter,
                    "caption is not UTF-8 (invalid byte at offset {valid_up_to})"
                )
            }
        }
    }
}

/// Decodes a caption file: strips a UTF-8 byte-order mark, turns CRLF and CR into LF and trims
/// surrounding whitespace. Inner line breaks are kept (multi-line captions are the user's choice).
pub fn decode_caption(bytes: &[u8]) -> Result<String, CaptionError> {
    let without_bom = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = std::str::from_utf8(without_bom).map_err(|error| CaptionError::NotUtf8 {
        valid_up_to: error.valid_up_to(),
    })?;
    let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
    Ok(normalized.trim().to_owned())
}

/// The sidecar keys to try for an image key, in order: `dir/name.png` with extensions
/// `["txt", "caption"]` gives `dir/name.txt`, then `dir/name.caption`.
pub fn sidecar_keys(image_key: &str, caption_extensions: &[String]) -> Vec<String> {
    let file_start = image_key.rfind('/').map_or(0, |slash| slash + 1);
    let stem_end = match image_key[file_start..].rfind('.') {
        Some(dot) if dot > 0 => file_start + dot,
        _ => image_key.len(),
    };
    let stem = &image_key[..stem_end];
    caption_extensions
        .iter()
        .map(|extension| format!("{stem}.{}", extension.trim_start_matches('.')))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bom_and_crlf_are_tolerated() {
        let bytes = b"\xEF\xBB\xBF1girl, red dress\r\nsmiling\r\n";
        assert_eq!(decode_caption(bytes).unwrap(), "1girl, red dress\nsmiling");
        assert_eq!(decode_caption(b"  a\rb  ").unwrap(), "a\nb");
        assert_eq!(decode_caption("caf\u{e9}".as_bytes()).unwrap(), "caf\u{e9}");
    }

    #[test]
    fn non_utf8_names_the_offset() {
        let error = decode_caption(b"ok \xff\xfe").unwrap_err();
        assert_eq!(error, CaptionError::NotUtf8 { valid_up_to: 3 });
        assert_eq!(
            error.to_string(),
            "caption is not UTF-8 (invalid byte at offset 3)"
        );
    }

    #[test]
    fn sidecars_replace_the_extension() {
        let extensions = vec!["txt".to_owned(), ".caption".to_owned()];
        assert_eq!(
            sidecar_keys("a/b.c/img.v2.png", &extensions),
            vec!["a/b.c/img.v2.txt", "a/b.c/img.v2.caption"]
        );
        assert_eq!(
            sidecar_keys("a.b/.hidden", &extensions),
            vec!["a.b/.hidden.txt", "a.b/.hidden.caption"]
        );
    }
}
