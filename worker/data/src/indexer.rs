//! The dataset indexer behind `arbor index`: walks a dataset root, reads each image's size from
//! its header (EXIF orientation applied) and its sidecar caption, and produces manifest records
//! with stable ids, plus the list of every file it could not use with its reason.

use std::collections::{HashMap, HashSet};

use arbor_common::manifest::ManifestRecord;
use futures::StreamExt;

use crate::batch_loader::DEFAULT_MAX_PIXELS;
use crate::caption::{decode_caption, sidecar_keys, CaptionError};
use crate::error::{invalid, DataError};
use crate::image_header::{read_header, HeaderError};
use crate::item_id::item_id;
use crate::skip_reason::{SkipReason, SkippedFile};
use crate::store::DatasetStore;

/// File extensions (lowercase) treated as images.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "jfif", "png", "webp", "gif", "bmp", "tif", "tiff",
];

/// Indexer settings.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// Objects read at once.
    pub concurrency: usize,
    /// Images with more pixels are skipped as `too_many_pixels`.
    pub max_pixels: u64,
    /// Sidecar caption extensions, tried in order.
    pub caption_extensions: Vec<String>,
    /// Skip images without a caption (`missing_caption`); otherwise index them with an empty
    /// caption and count them.
    pub require_captions: bool,
    /// Bytes read first for the header; the whole object is read only when they do not suffice
    /// (a large EXIF block, or a WebP whose EXIF chunk is at the end).
    pub header_probe_bytes: u64,
}

impl Default for IndexOptions {
    fn default() -> Self {
        Self {
            concurrency: 32,
            max_pixels: DEFAULT_MAX_PIXELS,
            caption_extensions: vec!["txt".to_owned(), "caption".to_owned()],
            require_captions: true,
            header_probe_bytes: 64 * 1024,
        }
    }
}

impl IndexOptions {
    pub fn validate(&self) -> Result<(), DataError> {
        if self.concurrency == 0 {
            return Err(invalid("concurrency", "must be at least 1"));
        }
        if self.max_pixels == 0 {
            return Err(invalid("max_pixels", "must be at least 1"));
        }
        if self.caption_extensions.is_empty() {
            return Err(invalid(
                "caption_extensions",
                "must name at least one extension",
            ));
        }
        if self.header_probe_bytes < 1024 {
            return Err(invalid("header_probe_bytes", "must be at least 1024"));
        }
        Ok(())
    }
}

/// The result of indexing: records sorted by key, and every skipped file sorted by key.
#[derive(Debug, Clone, Default)]
pub struct IndexOutcome {
    pub records: Vec<ManifestRecord>,
    pub skipped: Vec<SkippedFile>,
    /// Image files found (written + skipped).
    pub images_found: usize,
    /// Records written with an empty caption because none was found (only when captions are
    /// not required).
    pub uncaptioned: Vec<String>,
}

/// Progress of a running index: images done out of images found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexProgress {
    pub done: usize,
    pub total: usize,
}

/// Whether a key names an image by its extension.
pub fn is_image_key(key: &str) -> bool {
    let file_name = key.rsplit('/').next().unwrap_or(key);
    match file_name.rsplit_once('.') {
        Some((stem, extension)) if !stem.is_empty() => {
            let extension = extension.to_ascii_lowercase();
            IMAGE_EXTENSIONS.contains(&extension.as_str())
        }
        _ => false,
    }
}

enum ItemOutcome {
    Record {
        record: ManifestRecord,
        captioned: bool,
    },
    Skipped(SkippedFile),
}

/// Indexes every image under the store's root. Only a failure to list the root is an error;
/// every per-file problem is a [`SkippedFile`].
pub async fn index_dataset(
    store: &DatasetStore,
    options: &IndexOptions,
    progress: &(dyn Fn(IndexProgress) + Send + Sync),
) -> Result<IndexOutcome, DataError> {
    options.validate()?;
    let listing = store.list_keys().await?;
    let all_keys: HashSet<&str> = listing.iter().map(|(key, _)| key.as_str()).collect();
    let images: Vec<(&str, u64)> = listing
        .iter()
        .filter(|(key, _)| is_image_key(key))
        .map(|(key, size)| (key.as_str(), *size))
        .collect();
    let total = images.len();
    progress(IndexProgress { done: 0, total });
    let mut outcomes: Vec<ItemOutcome> = Vec::with_capacity(total);
    let mut stream = futures::stream::iter(images.iter().copied())
        .map(|(key, size)| index_one(store, options, &all_keys, key, size))
        .buffer_unordered(options.concurrency);
    while let Some(outcome) = stream.next().await {
        outcomes.push(outcome);
        progress(IndexProgress {
            done: outcomes.len(),
            total,
        });
    }
    drop(stream);

    let mut outcome = IndexOutcome {
        images_found: total,
        ..IndexOutcome::default()
    };
    let mut records = Vec::new();
    for item in outcomes {
        match item {
            ItemOutcome::Record { record, captioned } => {
                if !captioned {
                    outcome.uncaptioned.push(record.key.clone());
                }
                records.push(record);
            }
            ItemOutcome::Skipped(skipped) => outcome.skipped.push(skipped),
        }
    }
    let (kept, collisions) = drop_id_collisions(records);
    outcome.records = kept;
    outcome.skipped.extend(collisions);
    outcome
        .skipped
        .sort_by(|left, right| left.key.cmp(&right.key));
    outcome.uncaptioned.sort();
    Ok(outcome)
}

/// Sorts records by key and drops every record whose id an earlier key already has, reporting
/// it as an `id_collision` that names both keys (so the earlier key keeps its id on re-index).
pub fn drop_id_collisions(
    mut records: Vec<ManifestRecord>,
) -> (Vec<ManifestRecord>, Vec<SkippedFile>) {
    records.sort_by(|left, right| left.key.cmp(&right.key));
    let mut key_of_id: HashMap<u64, String> = HashMap::with_capacity(records.len());
    let mut kept = Vec::with_capacity(records.len());
    let mut collisions = Vec::new();
    for record in records {
        if let Some(first_key) = key_of_id.get(&record.id) {
            collisions.push(SkippedFile {
                key: record.key.clone(),
                reason: SkipReason::IdCollision,
                detail: format!("id {} is already used by `{first_key}`", record.id),
            });
            continue;
        }
        key_of_id.insert(record.id, record.key.clone());
        kept.push(record);
    }
    (kept, collisions)
}

async fn index_one(
    store: &DatasetStore,
    options: &IndexOptions,
    all_keys: &HashSet<&str>,
    key: &str,
    size: u64,
) -> ItemOutcome {
    match index_one_checked(store, options, all_keys, key, size).await {
        Ok(outcome) => outcome,
        Err((reason, detail)) => ItemOutcome::Skipped(SkippedFile {
            key: key.to_owned(),
            reason,
            detail,
        }),
    }
}

async fn index_one_checked(
    store: &DatasetStore,
    options: &IndexOptions,
    all_keys: &HashSet<&str>,
    key: &str,
    size: u64,
) -> Result<ItemOutcome, (SkipReason, String)> {
    if size == 0 {
        return Err((SkipReason::ZeroBytes, "the object is empty".to_owned()));
    }
    let unreadable = |error: object_store::Error| (SkipReason::UnreadableObject, error.to_string());
    let head = store
        .get_head(key, options.header_probe_bytes)
        .await
        .map_err(unreadable)?;
    if head.is_empty() {
        return Err((SkipReason::ZeroBytes, "the object is empty".to_owned()));
    }
    let mut header = read_header(&head);
    let needs_whole_object = match &header {
        Err(_) => true,
        Ok(found) => found.format == image::ImageFormat::WebP,
    };
    if needs_whole_object && (head.len() as u64) < size {
        let whole = store.get(key).await.map_err(unreadable)?;
        header = read_header(&whole);
    }
    let header = header.map_err(|error| match error {
        HeaderError::NotAnImage(detail) => (SkipReason::NotAnImage, detail),
        HeaderError::Corrupt(detail) => (SkipReason::CorruptHeader, detail),
    })?;
    if header.width == 0 || header.height == 0 {
        return Err((
            SkipReason::InvalidSize,
            format!("image has a zero size {}x{}", header.width, header.height),
        ));
    }
    let pixels = u64::from(header.width) * u64::from(header.height);
    if pixels > options.max_pixels {
        return Err((
            SkipReason::TooManyPixels,
            format!(
                "{}x{} = {pixels} pixels is over the cap of {}",
                header.width, header.height, options.max_pixels
            ),
        ));
    }
    let caption_key = sidecar_keys(key, &options.caption_extensions)
        .into_iter()
        .find(|candidate| all_keys.contains(candidate.as_str()));
    let caption = match &caption_key {
        None if options.require_captions => {
            return Err((
                SkipReason::MissingCaption,
                format!(
                    "no sidecar caption ({})",
                    sidecar_keys(key, &options.caption_extensions).join(" or ")
                ),
            ))
        }
        None => None,
        Some(caption_key) => {
            let bytes = store.get(caption_key).await.map_err(|error| {
                (
                    SkipReason::UnreadableObject,
                    format!("caption `{caption_key}`: {error}"),
                )
            })?;
            let text = decode_caption(&bytes).map_err(|error| match error {
                CaptionError::NotUtf8 { .. } => (
                    SkipReason::CaptionNotUtf8,
                    format!("caption `{caption_key}`: {error}"),
                ),
            })?;
            Some(text)
        }
    };
    Ok(ItemOutcome::Record {
        captioned: caption.is_some(),
        record: ManifestRecord {
            id: item_id(key),
            key: key.to_owned(),
            width: header.width,
            height: header.height,
            caption: caption.unwrap_or_default(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_keys_by_extension() {
        assert!(is_image_key("a/b.JPG"));
        assert!(is_image_key("x.webp"));
        assert!(!is_image_key("a/b.txt"));
        assert!(!is_image_key("a/.png"));
        assert!(!is_image_key("png"));
    }

    #[test]
    fn colliding_ids_keep_the_first_key_and_report_the_second() {
        let record = |id, key: &str| ManifestRecord {
            id,
            key: key.to_owned(),
            width: 1,
            height: 1,
            caption: String::new(),
        };
        let (kept, collisions) = drop_id_collisions(vec![
            record(5, "b.png"),
            record(7, "c.png"),
            record(5, "a.png"),
        ]);
        let kept_keys: Vec<&str> = kept.iter().map(|record| record.key.as_str()).collect();
        assert_eq!(kept_keys, vec!["a.png", "c.png"]);
        assert_eq!(collisions.len(), 1);
        assert_eq!(collisions[0].key, "b.png");
        assert_eq!(collisions[0].reason, SkipReason::IdCollision);
        assert_eq!(collisions[0].detail, "id 5 is already used by `a.png`");
    }
}
