//! The dataset manifest (docs/architecture.md §7): JSON Lines, one record per item.
//!
//! ```json
//! {"id": 17, "key": "images/0017.png", "width": 832, "height": 1216, "caption": "1girl, red dress"}
//! ```
//!
//! A broken line is reported with its line number and skipped; a duplicate id is an error that
//! names the id, since two items sharing an id would break the "nothing twice" guarantee.
//!
//! An optional first line says where the images are, for a manifest written outside its image
//! folder (`arbor index DS --out elsewhere/manifest.jsonl`):
//!
//! ```json
//! {"image_root": "/data/ds"}
//! ```
//!
//! Keys are then relative to that folder or object-store prefix instead of the manifest's own
//! folder (a job's `data.root` still wins over both).

use std::collections::HashMap;
use std::io::BufRead;

use serde::{Deserialize, Serialize};

use crate::error::CommonError;

/// One item of the dataset.
/// Unknown fields are ignored, so manifests that carry extra columns (scores, hashes) load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    /// Stable item id: the same file keeps its id across re-indexing.
    pub id: u64,
    /// Object key or path of the image, relative to the dataset root.
    pub key: String,
    /// Width in pixels after EXIF orientation.
    pub width: u32,
    /// Height in pixels after EXIF orientation.
    pub height: u32,
    /// The caption (tags or prose).
    #[serde(default)]
    pub caption: String,
}

/// A manifest line that could not be used, with its 1-based line number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManifestLineError {
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for ManifestLineError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "manifest line {}: {}", self.line, self.reason)
    }
}

/// The records of a manifest plus the lines that were skipped.
#[derive(Debug, Default)]
pub struct Manifest {
    /// Where the keys are relative to, from the header line; `None` means the manifest's
    /// folder.
    pub image_root: Option<String>,
    pub records: Vec<ManifestRecord>,
    pub skipped_lines: Vec<ManifestLineError>,
}

/// The optional first line of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestHeader {
    /// The folder (absolute) or object-store prefix that the keys are relative to.
    pub image_root: String,
}

impl ManifestHeader {
    /// The header as a manifest line, without the newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a header serializes")
    }

    /// The header of `line` when it is one: a JSON object with an `image_root` field.
    fn parse(line: &str) -> Option<Result<Self, String>> {
        let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
        value.get("image_root")?;
        Some(serde_json::from_value(value).map_err(|error| format!("invalid header: {error}")))
    }
}

/// Parses one manifest line. Blank lines are `Ok(None)`.
pub fn parse_manifest_line(line: &str) -> Result<Option<ManifestRecord>, String> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    let record: ManifestRecord =
        serde_json::from_str(trimmed).map_err(|error| format!("invalid record: {error}"))?;
    if record.width == 0 || record.height == 0 {
        return Err(format!(
            "item {} has a zero size {}x{}",
            record.id, record.width, record.height
        ));
    }
    Ok(Some(record))
}

/// Reads a whole manifest. Unreadable or invalid lines are skipped and reported; a duplicate id
/// is an error. I/O errors of the reader itself are reported as a skipped line and end reading.
pub fn read_manifest(reader: impl BufRead) -> Result<Manifest, CommonError> {
    let mut manifest = Manifest::default();
    let mut first_line_of_id: HashMap<u64, usize> = HashMap::new();
    let mut seen_content = false;
    for (index, line) in reader.lines().enumerate() {
        let line_number = index + 1;
        let line = match line {
            Ok(line) => line,
            Err(error) => {
                manifest.skipped_lines.push(ManifestLineError {
                    line: line_number,
                    reason: format!("unreadable line: {error}"),
                });
                if error.kind() == std::io::ErrorKind::InvalidData {
                    continue;
                }
                break;
            }
        };
        if let Some(header) = ManifestHeader::parse(&line) {
            let reason = match header {
                Ok(_) if seen_content => {
                    "a header (`image_root`) is only read on the first line".to_string()
                }
                Ok(header) if header.image_root.trim().is_empty() => {
                    "invalid header: `image_root` is empty".to_string()
                }
                Ok(header) => {
                    seen_content = true;
                    manifest.image_root = Some(header.image_root);
                    continue;
                }
                Err(reason) => reason,
            };
            seen_content = true;
            manifest.skipped_lines.push(ManifestLineError {
                line: line_number,
                reason,
            });
            continue;
        }
        if !line.trim().is_empty() {
            seen_content = true;
        }
        match parse_manifest_line(&line) {
            Ok(None) => {}
            Ok(Some(record)) => {
                if let Some(&first_line) = first_line_of_id.get(&record.id) {
                    return Err(CommonError::DuplicateId {
                        id: record.id,
                        first_line,
                        second_line: line_number,
                    });
                }
                first_line_of_id.insert(record.id, line_number);
                manifest.records.push(record);
            }
            Err(reason) => manifest.skipped_lines.push(ManifestLineError {
                line: line_number,
                reason,
            }),
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_records_and_reports_broken_lines() {
        let text = concat!(
            r#"{"id":1,"key":"a.png","width":512,"height":768,"caption":"x"}"#,
            "\n\nnot json\n",
            r#"{"id":2,"key":"b.png","width":0,"height":768,"caption":""}"#,
            "\n",
            r#"{"id":3,"key":"c.png","width":64,"height":64}"#,
            "\n"
        );
        let manifest = read_manifest(text.as_bytes()).unwrap();
        let ids: Vec<u64> = manifest.records.iter().map(|record| record.id).collect();
        assert_eq!(ids, vec![1, 3]);
        let lines: Vec<usize> = manifest.skipped_lines.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![3, 4]);
        assert!(manifest.skipped_lines[1].reason.contains("zero size"));
    }

    #[test]
    fn a_first_line_header_names_the_image_root_and_a_later_one_is_skipped() {
        let header = ManifestHeader {
            image_root: "/data/ds".to_string(),
        };
        let text = format!(
            "\n{}\n{}\n{}\n",
            header.to_line(),
            r#"{"id":1,"key":"a.png","width":5,"height":5}"#,
            r#"{"image_root":"/elsewhere"}"#
        );
        let manifest = read_manifest(text.as_bytes()).unwrap();
        assert_eq!(manifest.image_root.as_deref(), Some("/data/ds"));
        assert_eq!(manifest.records.len(), 1);
        assert_eq!(manifest.skipped_lines.len(), 1);
        assert_eq!(manifest.skipped_lines[0].line, 4);
        assert!(manifest.skipped_lines[0].reason.contains("first line"));

        let plain = read_manifest(&br#"{"id":1,"key":"a.png","width":5,"height":5}"#[..]).unwrap();
        assert_eq!(plain.image_root, None);

        for bad in [
            r#"{"image_root":""}"#,
            r#"{"image_root":7}"#,
            r#"{"image_root":"/x","extra":1}"#,
        ] {
            let manifest = read_manifest(bad.as_bytes()).unwrap();
            assert_eq!(manifest.image_root, None, "{bad}");
            assert_eq!(manifest.skipped_lines.len(), 1, "{bad}");
            assert!(
                manifest.skipped_lines[0]
                    .reason
                    .starts_with("invalid header"),
                "{bad}: {}",
                manifest.skipped_lines[0].reason
            );
        }
    }

    #[test]
    fn duplicate_ids_name_the_id_and_both_lines() {
        let text = concat!(
            r#"{"id":7,"key":"a.png","width":5,"height":5,"caption":""}"#,
            "\n",
            r#"{"id":7,"key":"b.png","width":5,"height":5,"caption":""}"#,
            "\n"
        );
        let error = read_manifest(text.as_bytes()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "duplicate item id 7 (manifest lines 1 and 2)"
        );
    }
}
