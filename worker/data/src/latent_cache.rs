//! The latent cache (docs/architecture.md §2 "Latent cache"): VAE latent distributions of
//! whole cover-resized images, shared by every worker through an object store location.
//!
//! Layout under the cache root:
//!
//! ```text
//! v1/packs/<pack>.safetensors   many latents per object: one F16 tensor [2·C, h, w] per entry
//!                               (mean channels, then log-variance channels), named by its key
//! v1/index/<pack>.json          the pack's entries: key, byte range in the pack, shape and the
//!                               cover-resized size the latent was encoded from
//! ```
//!
//! A pack is written before its index, and both are single `put`s (atomic on every store:
//! `object_store`'s local file system writes a temporary file and renames it), so a writer
//! killed mid-write leaves at most a pack no index names, never a half entry. Pack names start
//! with the writer's clock in nanoseconds, so a reader lists only the indexes written since its
//! last read (minus [`LISTING_OVERLAP`] for clock skew between writers) and reads those it has
//! not read yet ([`LatentCache::refresh`]): a refresh costs one short listing however large the
//! cache is, and readers refresh whenever they miss (at most every [`MISS_REFRESH_INTERVAL`]).
//!
//! An entry's key ([`cache_key`]) is a SHA-256 of what its latent depends on: the image's
//! content (its object's ETag, or size and modification time where a store has none), the
//! bucket, the resize policy ([`RESIZE_POLICY`]) and a digest of the VAE's weights. A changed
//! image, bucket or VAE never finds a stale entry; an image that did not change finds its old
//! one, whichever dataset or job wrote it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::error::DataError;
use crate::store::DatasetStore;

/// The layout version: the folder every object of this layout lives under.
pub const CACHE_LAYOUT: &str = "v1";
/// How an image becomes the encoded pixels (part of every key): cover resize with
/// fast_image_resize's Lanczos3, cut to a multiple of 8 at the right and bottom edges.
pub const RESIZE_POLICY: &str = "cover-lanczos3-floor8";
/// Index objects named this much before the newest one read are listed again on a refresh: a
/// writer whose clock is behind by less than this is never missed.
pub const LISTING_OVERLAP: Duration = Duration::from_secs(60);
/// A lookup that misses re-reads the index first unless it was read this recently.
pub const MISS_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// The `format` field of every index object.
const INDEX_FORMAT: &str = "arbor-latent-cache/v1";

/// The key of the latent of an image with content `content_tag` in a `bucket_width x
/// bucket_height` bucket, encoded by the VAE whose weights digest to `vae_digest`: 64 hex digits.
pub fn cache_key(
    content_tag: &str,
    bucket_width: u32,
    bucket_height: u32,
    vae_digest: &str,
) -> String {
    let mut hasher = Sha256::new();
    for part in [
        INDEX_FORMAT,
        content_tag,
        &format!("{bucket_width}x{bucket_height}"),
        RESIZE_POLICY,
        vae_digest,
    ] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// One entry of a pack's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheEntry {
    /// [`cache_key`].
    pub key: String,
    /// The latent's bytes in the pack object: `offset..offset + length`.
    pub offset: u64,
    pub length: u64,
    /// `[2·C, h, w]`: the latent channels' means, then their log-variances.
    pub shape: [u32; 3],
    /// The cover-resized size the latent was encoded from (before the cut to a multiple of 8):
    /// the crop offsets of every epoch are drawn in it.
    pub resized_width: u32,
    pub resized_height: u32,
}

/// The index object of one pack.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PackIndex {
    format: String,
    /// The pack object, relative to the cache root.
    pack: String,
    /// The element type of every entry (`F16`).
    dtype: String,
    entries: Vec<CacheEntry>,
}

/// An entry found in the cache, with the pack that holds it.
#[derive(Debug, Clone)]
pub struct LocatedEntry {
    pub pack: Arc<str>,
    pub entry: CacheEntry,
}

/// A freshly encoded latent to write.
#[derive(Debug, Clone)]
pub struct NewLatent {
    pub key: String,
    /// `[2·C, h, w]`.
    pub shape: [u32; 3],
    pub resized_width: u32,
    pub resized_height: u32,
    /// Little-endian f16 values, `2·C·h·w` of them.
    pub data: Vec<u8>,
}

/// Running totals of a cache handle, shared by clones.
#[derive(Debug, Default)]
struct CacheStats {
    hits: AtomicU64,
    misses: AtomicU64,
    written: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    bad_indexes: AtomicU64,
}

/// A snapshot of a cache handle's totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheTotals {
    /// Items whose latent was read from the cache.
    pub hits: u64,
    /// Items that were not in the cache (and were decoded and encoded).
    pub misses: u64,
    /// Latents this handle wrote.
    pub written: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Index objects that could not be read or parsed (skipped; their packs are not used).
    pub bad_indexes: u64,
}

/// What a handle has read of the index.
#[derive(Debug, Default)]
struct IndexListing {
    /// Index objects read (or skipped as bad), by path.
    read: HashSet<String>,
    /// The largest time stamp (nanoseconds) among their names.
    newest_nanos: u64,
    /// When the last refresh ran.
    refreshed_at: Option<Instant>,
}

/// A handle on a cache root. Cheap to clone; clones share the index and the totals.
#[derive(Clone)]
pub struct LatentCache {
    store: DatasetStore,
    entries: Arc<RwLock<HashMap<String, LocatedEntry>>>,
    listing: Arc<tokio::sync::Mutex<IndexListing>>,
    stats: Arc<CacheStats>,
}

impl LatentCache {
    /// Opens the cache at `location` (a path, created when missing, or an object store URL, as
    /// a dataset root). Nothing is read until [`LatentCache::refresh`].
    pub fn open(location: &str) -> Result<Self, DataError> {
        if !location.contains("://") {
            std::fs::create_dir_all(location).map_err(|error| DataError::InvalidLocation {
                location: location.to_owned(),
                reason: format!("cannot create the latent cache folder: {error}"),
            })?;
        }
        Ok(Self::from_store(DatasetStore::open(location)?))
    }

    pub fn from_store(store: DatasetStore) -> Self {
        Self {
            store,
            entries: Arc::new(RwLock::new(HashMap::new())),
            listing: Arc::new(tokio::sync::Mutex::new(IndexListing::default())),
            stats: Arc::new(CacheStats::default()),
        }
    }

    pub fn location(&self) -> &str {
        self.store.location()
    }

    /// Reads the index objects written since the last refresh; returns how many entries the
    /// handle now knows. An index that cannot be read or parsed is skipped with a warning and
    /// counted.
    pub async fn refresh(&self) -> Result<usize, DataError> {
        let mut listing = self.listing.lock().await;
        self.refresh_locked(&mut listing).await
    }

    /// [`LatentCache::refresh`] unless the last one ran less than `interval` ago.
    pub async fn refresh_if_older_than(&self, interval: Duration) -> Result<usize, DataError> {
        let mut listing = self.listing.lock().await;
        if listing
            .refreshed_at
            .is_some_and(|at| at.elapsed() < interval)
        {
            return Ok(self.len());
        }
        self.refresh_locked(&mut listing).await
    }

    async fn refresh_locked(&self, listing: &mut IndexListing) -> Result<usize, DataError> {
        let index_prefix = self.store.object_path(&format!("{CACHE_LAYOUT}/index"));
        let from_nanos = listing
            .newest_nanos
            .saturating_sub(LISTING_OVERLAP.as_nanos() as u64);
        let offset = self
            .store
            .object_path(&format!("{CACHE_LAYOUT}/index/{from_nanos:020}"));
        let objects: Vec<_> = self
            .object_store()
            .list_with_offset(Some(&index_prefix), &offset)
            .try_collect()
            .await
            .map_err(|source| DataError::Store {
                location: self.store.location().to_owned(),
                source,
            })?;
        for object in objects {
            let name = object.location.to_string();
            if !name.ends_with(".json") || listing.read.contains(&name) {
                continue;
            }
            match self.read_index(&object.location).await {
                Ok(index) => self.remember(index),
                Err(reason) => {
                    warn!(index = %name, reason = %reason, "latent cache index skipped");
                    self.stats.bad_indexes.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Some(nanos) = name_nanos(object.location.filename().unwrap_or_default()) {
                listing.newest_nanos = listing.newest_nanos.max(nanos);
            }
            listing.read.insert(name);
        }
        listing.refreshed_at = Some(Instant::now());
        Ok(self.len())
    }

    fn remember(&self, index: PackIndex) {
        let pack: Arc<str> = Arc::from(index.pack.as_str());
        let mut entries = self.entries.write().expect("cache index lock poisoned");
        for entry in index.entries {
            entries.insert(
                entry.key.clone(),
                LocatedEntry {
                    pack: pack.clone(),
                    entry,
                },
            );
        }
    }

    async fn read_index(&self, path: &Path) -> Result<PackIndex, String> {
        let bytes = self
            .object_store()
            .get(path)
            .await
            .map_err(|error| error.to_string())?
            .bytes()
            .await
            .map_err(|error| error.to_string())?;
        let index: PackIndex = serde_json::from_slice(&bytes).map_err(|error| error.to_string())?;
        if index.format != INDEX_FORMAT {
            return Err(format!(
                "format is `{}`, expected `{INDEX_FORMAT}`",
                index.format
            ));
        }
        if index.dtype != "F16" {
            return Err(format!("dtype is `{}`, expected `F16`", index.dtype));
        }
        for entry in &index.entries {
            let values: u64 = entry.shape.iter().map(|&dim| u64::from(dim)).product();
            if values * 2 != entry.length
                || entry.shape.contains(&0)
                || entry.offset.checked_add(entry.length).is_none()
            {
                return Err(format!(
                    "entry {} has shape {:?} and {} bytes",
                    entry.key, entry.shape, entry.length
                ));
            }
        }
        Ok(index)
    }

    /// Entries known to this handle.
    pub fn len(&self) -> usize {
        self.entries
            .read()
            .expect("cache index lock poisoned")
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry of `key`, if an index read so far has it.
    pub fn lookup(&self, key: &str) -> Option<LocatedEntry> {
        self.entries
            .read()
            .expect("cache index lock poisoned")
            .get(key)
            .cloned()
    }

    /// The f16 bytes of an entry (one ranged read of its pack), counted as a hit.
    pub async fn read(&self, located: &LocatedEntry) -> Result<Bytes, object_store::Error> {
        let path = self.store.object_path(&located.pack);
        let start = located.entry.offset;
        let bytes = self
            .object_store()
            .get_range(&path, start..start + located.entry.length)
            .await?;
        if bytes.len() as u64 != located.entry.length {
            return Err(object_store::Error::Generic {
                store: "latent cache",
                source: format!(
                    "pack `{}` returned {} bytes for entry {}, expected {}",
                    located.pack,
                    bytes.len(),
                    located.entry.key,
                    located.entry.length
                )
                .into(),
            });
        }
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_read
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Counts an item that was not in the cache.
    pub fn count_miss(&self) {
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes `latents` as one pack named `<unix nanoseconds>-<pack_name>` (`pack_name` of
    /// letters, digits, `-` and `_`), then its index, and makes them known to this handle.
    /// Returns the pack's size in bytes.
    pub async fn write_pack(
        &self,
        pack_name: &str,
        latents: &[NewLatent],
    ) -> Result<u64, DataError> {
        if latents.is_empty() {
            return Ok(0);
        }
        if pack_name.is_empty()
            || !pack_name
                .chars()
                .all(|character| character.is_ascii_alphanumeric() || "-_".contains(character))
        {
            return Err(crate::error::invalid(
                "pack_name",
                format!("`{pack_name}` is not a plain name"),
            ));
        }
        let pack_name = format!("{:020}-{pack_name}", unix_nanos());
        let pack = pack_bytes(latents)?;
        let pack_key = format!("{CACHE_LAYOUT}/packs/{pack_name}.safetensors");
        let entries = pack_entries(&pack, latents)?;
        let index = PackIndex {
            format: INDEX_FORMAT.to_owned(),
            pack: pack_key.clone(),
            dtype: "F16".to_owned(),
            entries,
        };
        let index_bytes = serde_json::to_vec(&index)
            .map_err(|error| crate::error::invalid("latent cache index", error.to_string()))?;
        let pack_size = pack.len() as u64;
        let store_error = |source| DataError::Store {
            location: self.store.location().to_owned(),
            source,
        };
        self.object_store()
            .put(&self.store.object_path(&pack_key), PutPayload::from(pack))
            .await
            .map_err(store_error)?;
        let index_key = format!("{CACHE_LAYOUT}/index/{pack_name}.json");
        let index_path = self.store.object_path(&index_key);
        self.object_store()
            .put(&index_path, PutPayload::from(index_bytes))
            .await
            .map_err(store_error)?;
        self.listing
            .lock()
            .await
            .read
            .insert(index_path.to_string());
        self.remember(index);
        self.stats
            .written
            .fetch_add(latents.len() as u64, Ordering::Relaxed);
        self.stats
            .bytes_written
            .fetch_add(pack_size, Ordering::Relaxed);
        Ok(pack_size)
    }

    pub fn totals(&self) -> CacheTotals {
        CacheTotals {
            hits: self.stats.hits.load(Ordering::Relaxed),
            misses: self.stats.misses.load(Ordering::Relaxed),
            written: self.stats.written.load(Ordering::Relaxed),
            bytes_read: self.stats.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.stats.bytes_written.load(Ordering::Relaxed),
            bad_indexes: self.stats.bad_indexes.load(Ordering::Relaxed),
        }
    }

    fn object_store(&self) -> &Arc<dyn ObjectStore> {
        self.store.object_store()
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

/// The time stamp a pack or index name starts with.
fn name_nanos(file_name: &str) -> Option<u64> {
    file_name.split('-').next()?.parse().ok()
}

/// The pack's safetensors bytes: one F16 tensor per latent, named by its key.
fn pack_bytes(latents: &[NewLatent]) -> Result<Vec<u8>, DataError> {
    let mut views = Vec::with_capacity(latents.len());
    let mut seen = HashSet::new();
    for latent in latents {
        if !seen.insert(latent.key.as_str()) {
            return Err(crate::error::invalid(
                "latent",
                format!("key {} appears twice in one pack", latent.key),
            ));
        }
        let shape: Vec<usize> = latent.shape.iter().map(|&dim| dim as usize).collect();
        let view = TensorView::new(Dtype::F16, shape, &latent.data).map_err(|error| {
            crate::error::invalid(
                "latent",
                format!(
                    "key {}: shape {:?} does not fit {} bytes: {error:?}",
                    latent.key,
                    latent.shape,
                    latent.data.len()
                ),
            )
        })?;
        views.push((latent.key.as_str(), view));
    }
    safetensors::tensor::serialize(views.iter().map(|(name, view)| (*name, view)), &None)
        .map_err(|error| crate::error::invalid("latent pack", format!("{error:?}")))
}

/// Where each latent of `latents` lies in `pack` (absolute byte ranges).
fn pack_entries(pack: &[u8], latents: &[NewLatent]) -> Result<Vec<CacheEntry>, DataError> {
    let (header_length, metadata) = SafeTensors::read_metadata(pack)
        .map_err(|error| crate::error::invalid("latent pack", format!("{error:?}")))?;
    let data_start = 8 + header_length as u64;
    let tensors = metadata.tensors();
    latents
        .iter()
        .map(|latent| {
            let info = tensors.get(&latent.key).ok_or_else(|| {
                crate::error::invalid("latent pack", format!("{} is missing", latent.key))
            })?;
            let (start, end) = info.data_offsets;
            Ok(CacheEntry {
                key: latent.key.clone(),
                offset: data_start + start as u64,
                length: (end - start) as u64,
                shape: latent.shape,
                resized_width: latent.resized_width,
                resized_height: latent.resized_height,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_change_with_every_input() {
        let base = cache_key("etag-1", 512, 512, "vae-a");
        assert_eq!(base.len(), 64);
        assert_eq!(base, cache_key("etag-1", 512, 512, "vae-a"));
        assert_ne!(base, cache_key("etag-2", 512, 512, "vae-a"));
        assert_ne!(base, cache_key("etag-1", 576, 512, "vae-a"));
        assert_ne!(base, cache_key("etag-1", 512, 576, "vae-a"));
        assert_ne!(base, cache_key("etag-1", 512, 512, "vae-b"));
        // Length-prefixed parts: moving characters between parts changes the key.
        assert_ne!(cache_key("ab", 1, 1, "c"), cache_key("a", 1, 1, "bc"));
    }
}
