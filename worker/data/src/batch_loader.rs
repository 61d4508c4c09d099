//! The batch loader the worker trains from: given the items of one batch, the bucket
//! resolution, the seed and the epoch, it fetches the bytes with bounded concurrency and
//! retries, decodes ([`crate::decode`]), fits each image to the bucket ([`crate::fit`]) and
//! returns f32 CHW pixels in [-1, 1] plus per-item crop metadata.
//!
//! An item that fails keeps the batch's shape: its slot repeats the first item of the same
//! batch that loaded (or is zero, mid-gray, when none did), and the failure is returned with
//! the item's id and key and counted in [`LoaderStats`]. Nothing on the input can panic it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arbor_common::crop::{cover_geometry, crop_offset, CropOffset, LatentGeometry, LATENT_FACTOR};
use bytes::Bytes;
use tokio::sync::Semaphore;
use tracing::warn;

use crate::decode::{decode_rgb_covering_reusing, DecodeError, DecodedImage};
use crate::error::{invalid, DataError};
use crate::fit::{fit_rgb8, rgb8_to_chw_f32};
use crate::store::DatasetStore;
use crate::turbojpeg::JpegScale;

/// Pillow's default `MAX_IMAGE_PIXELS`: larger images are refused as decompression bombs.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderOptions {
    /// Object fetches in flight at once.
    pub fetch_concurrency: usize,
    /// Decode-and-resize jobs at once (the worker pool's size).
    pub decode_threads: usize,
    /// Images with more pixels are refused before decoding.
    pub max_pixels: u64,
    /// Attempts per fetch (transient store errors are retried; "not found" is not). Remote
    /// stores also retry each request a few times inside `object_store`.
    pub fetch_attempts: u32,
    /// Delay before the first retry, doubled for each further one.
    pub retry_backoff: Duration,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self {
            fetch_concurrency: 32,
            decode_threads: std::thread::available_parallelism().map_or(1, |count| count.get()),
            max_pixels: DEFAULT_MAX_PIXELS,
            fetch_attempts: 2,
            retry_backoff: Duration::from_millis(100),
        }
    }
}

impl LoaderOptions {
    pub fn validate(&self) -> Result<(), DataError> {
        if self.fetch_concurrency == 0 {
            return Err(invalid("fetch_concurrency", "must be at least 1"));
        }
        if self.decode_threads == 0 {
            return Err(invalid("decode_threads", "must be at least 1"));
        }
        if self.fetch_attempts == 0 {
            return Err(invalid("fetch_attempts", "must be at least 1"));
        }
        if self.max_pixels == 0 {
            return Err(invalid("max_pixels", "must be at least 1"));
        }
        Ok(())
    }
}

/// One item to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadItem {
    pub id: u64,
    /// The object key relative to the dataset root.
    pub key: String,
}

/// One batch to load: all items go to the same bucket resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRequest {
    pub items: Vec<LoadItem>,
    pub bucket_width: u32,
    pub bucket_height: u32,
    pub seed: u64,
    pub epoch: u64,
}

/// What fills one slot of a batch, and how it was cut (SDXL-style size and crop conditioning
/// wants the original size and the crop offsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemCrop {
    /// The requested item.
    pub id: u64,
    /// The item whose pixels fill the slot: `id` itself, another item of the batch when `id`
    /// failed, or `None` (zeros) when every item of the batch failed.
    pub loaded_id: Option<u64>,
    /// The upright size of the loaded image (after EXIF orientation).
    pub original_width: u32,
    pub original_height: u32,
    /// The cover-resized size the crop was taken from.
    pub resized_width: u32,
    pub resized_height: u32,
    /// The crop's top-left corner in the resized image.
    pub crop_x: u32,
    pub crop_y: u32,
}

/// Why an item could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadFailure {
    /// The object could not be fetched (after retries).
    Fetch(String),
    /// The bytes could not be decoded (not an image, truncated, over the pixel cap).
    Decode(DecodeError),
    /// The image could not be fitted to the bucket.
    Fit(String),
}

impl std::fmt::Display for LoadFailure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadFailure::Fetch(detail) => write!(formatter, "fetch failed: {detail}"),
            LoadFailure::Decode(error) => error.fmt(formatter),
            LoadFailure::Fit(detail) => write!(formatter, "fit failed: {detail}"),
        }
    }
}

/// An item that failed, with its id and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemFailure {
    pub id: u64,
    pub key: String,
    pub reason: LoadFailure,
}

impl std::fmt::Display for ItemFailure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "item {} `{}`: {}",
            self.id, self.key, self.reason
        )
    }
}

/// A loaded batch: `pixels` holds `len * 3 * bucket_height * bucket_width` f32 values, item by
/// item, each in CHW order and in [-1, 1].
#[derive(Debug, Clone)]
pub struct Batch {
    pub bucket_width: u32,
    pub bucket_height: u32,
    pub pixels: Vec<f32>,
    pub items: Vec<ItemCrop>,
    pub failures: Vec<ItemFailure>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Values per item: `3 * bucket_height * bucket_width`.
    pub fn item_len(&self) -> usize {
        3 * self.bucket_width as usize * self.bucket_height as usize
    }

    /// The CHW pixels of slot `index`.
    pub fn item_pixels(&self, index: usize) -> &[f32] {
        let length = self.item_len();
        &self.pixels[index * length..(index + 1) * length]
    }
}

/// Running totals of a loader, shared by clones.
#[derive(Debug, Default)]
pub struct LoaderStats {
    pub items_loaded: AtomicU64,
    pub items_failed: AtomicU64,
    /// Sum over loaded items of the pixels cut away by the crop (docs/architecture.md §2).
    pub cropped_pixels: AtomicU64,
    pub bytes_fetched: AtomicU64,
}

/// A snapshot of [`LoaderStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoaderTotals {
    pub items_loaded: u64,
    pub items_failed: u64,
    pub cropped_pixels: u64,
    pub bytes_fetched: u64,
}

impl LoaderTotals {
    /// Mean pixels cropped per loaded item.
    pub fn mean_cropped_pixels(&self) -> f64 {
        if self.items_loaded == 0 {
            return 0.0;
        }
        self.cropped_pixels as f64 / self.items_loaded as f64
    }
}

/// One image fitted to its bucket: interleaved RGB8 at the bucket size, and how it was cut.
#[derive(Debug, Clone)]
pub struct FittedItem {
    pub rgb: Vec<u8>,
    pub crop: ItemCrop,
    /// Pixels cut away by the crop (the larger excess dimension of the resized image).
    pub cropped_pixels: u32,
}

/// Loads batches from one dataset root. Cheap to clone; clones share the concurrency limits
/// and the statistics.
#[derive(Clone)]
pub struct BatchLoader {
    store: DatasetStore,
    options: LoaderOptions,
    fetch_slots: Arc<Semaphore>,
    decode_slots: Arc<Semaphore>,
    stats: Arc<LoaderStats>,
}

impl BatchLoader {
    pub fn new(store: DatasetStore, options: LoaderOptions) -> Result<Self, DataError> {
        options.validate()?;
        Ok(Self {
            store,
            fetch_slots: Arc::new(Semaphore::new(options.fetch_concurrency)),
            decode_slots: Arc::new(Semaphore::new(options.decode_threads)),
            options,
            stats: Arc::new(LoaderStats::default()),
        })
    }

    pub fn options(&self) -> &LoaderOptions {
        &self.options
    }

    pub fn totals(&self) -> LoaderTotals {
        LoaderTotals {
            items_loaded: self.stats.items_loaded.load(Ordering::Relaxed),
            items_failed: self.stats.items_failed.load(Ordering::Relaxed),
            cropped_pixels: self.stats.cropped_pixels.load(Ordering::Relaxed),
            bytes_fetched: self.stats.bytes_fetched.load(Ordering::Relaxed),
        }
    }

    /// Loads one batch. Only an invalid request (a zero bucket dimension) is an error; item
    /// failures are in [`Batch::failures`]. Must run inside a multi-threaded tokio runtime.
    pub async fn load_batch(&self, request: &BatchRequest) -> Result<Batch, DataError> {
        let (bucket_width, bucket_height) = (request.bucket_width, request.bucket_height);
        if bucket_width == 0 || bucket_height == 0 {
            return Err(invalid(
                "bucket",
                format!("bucket {bucket_width}x{bucket_height} has a zero dimension"),
            ));
        }
        let tasks: Vec<_> = request
            .items
            .iter()
            .map(|item| {
                let loader = self.clone();
                let item = item.clone();
                let (seed, epoch) = (request.seed, request.epoch);
                tokio::spawn(async move {
                    loader
                        .load_item(&item, bucket_width, bucket_height, seed, epoch)
                        .await
                })
            })
            .collect();
        let mut results = Vec::with_capacity(tasks.len());
        for task in tasks {
            let result = match task.await {
                Ok(result) => result,
                Err(join_error) => Err(LoadFailure::Fit(format!("load task failed: {join_error}"))),
            };
            results.push(result);
        }
        Ok(self.assemble(request, results))
    }

    fn assemble(
        &self,
        request: &BatchRequest,
        results: Vec<Result<FittedItem, LoadFailure>>,
    ) -> Batch {
        let plane_values = 3 * request.bucket_width as usize * request.bucket_height as usize;
        let mut pixels = vec![0.0f32; plane_values * results.len()];
        let substitute = results.iter().find_map(|result| result.as_ref().ok());
        let mut items = Vec::with_capacity(results.len());
        let mut failures = Vec::new();
        for (slot, (item, result)) in request.items.iter().zip(&results).enumerate() {
            let output = &mut pixels[slot * plane_values..(slot + 1) * plane_values];
            match result {
                Ok(loaded) => {
                    rgb8_to_chw_f32(&loaded.rgb, output);
                    items.push(loaded.crop);
                    self.stats.items_loaded.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .cropped_pixels
                        .fetch_add(u64::from(loaded.cropped_pixels), Ordering::Relaxed);
                }
                Err(reason) => {
                    warn!(item_id = item.id, key = %item.key, reason = %reason, "item failed to load; its slot repeats another item");
                    self.stats.items_failed.fetch_add(1, Ordering::Relaxed);
                    failures.push(ItemFailure {
                        id: item.id,
                        key: item.key.clone(),
                        reason: reason.clone(),
                    });
                    match substitute {
                        Some(other) => {
                            rgb8_to_chw_f32(&other.rgb, output);
                            items.push(ItemCrop {
                                id: item.id,
                                ..other.crop
                            });
                        }
                        None => items.push(ItemCrop {
                            id: item.id,
                            loaded_id: None,
                            original_width: 0,
                            original_height: 0,
                            resized_width: request.bucket_width,
                            resized_height: request.bucket_height,
                            crop_x: 0,
                            crop_y: 0,
                        }),
                    }
                }
            }
        }
        Batch {
            bucket_width: request.bucket_width,
            bucket_height: request.bucket_height,
            pixels,
            items,
            failures,
        }
    }

    async fn load_item(
        &self,
        item: &LoadItem,
        bucket_width: u32,
        bucket_height: u32,
        seed: u64,
        epoch: u64,
    ) -> Result<FittedItem, LoadFailure> {
        let bytes = self.fetch(&item.key).await?;
        let max_pixels = self.options.max_pixels;
        let item_id = item.id;
        self.in_decode_pool(move || {
            decode_and_fit(
                &bytes,
                max_pixels,
                item_id,
                bucket_width,
                bucket_height,
                seed,
                epoch,
            )
        })
        .await
    }

    /// Runs `work` on the blocking pool once a decode slot is free.
    async fn in_decode_pool<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, LoadFailure> + Send + 'static,
    ) -> Result<T, LoadFailure> {
        let _decode_slot = self
            .decode_slots
            .acquire()
            .await
            .map_err(|error| LoadFailure::Fit(error.to_string()))?;
        match tokio::task::spawn_blocking(work).await {
            Ok(result) => result,
            Err(join_error) => Err(LoadFailure::Fit(format!(
                "decode task failed: {join_error}"
            ))),
        }
    }

    /// What the latent cache keys an item's content by ([`crate::latent_cache::cache_key`]):
    /// its object's ETag, or its size and modification time where the store gives no ETag. One
    /// `head` request, retried like a fetch.
    pub async fn content_tag(&self, key: &str) -> Result<String, LoadFailure> {
        let path = self.store.object_path(key);
        let meta = self
            .with_retries(key, "head request", || {
                self.store.object_store().head(&path)
            })
            .await?;
        Ok(match meta.e_tag {
            Some(etag) => format!("etag:{etag}"),
            None => format!(
                "size:{}:modified:{}",
                meta.size,
                meta.last_modified.timestamp_nanos_opt().unwrap_or_default()
            ),
        })
    }

    /// One image as the latent cache encodes it: decoded, cover-resized to the bucket as a whole
    /// (not cropped) and cut at its right and bottom edges to a multiple of 8; f32 CHW in [-1, 1].
    pub async fn load_for_encoding(
        &self,
        item: &LoadItem,
        bucket_width: u32,
        bucket_height: u32,
    ) -> Result<EncodingPixels, LoadFailure> {
        if bucket_width % LATENT_FACTOR != 0 || bucket_height % LATENT_FACTOR != 0 {
            return Err(LoadFailure::Fit(format!(
                "bucket {bucket_width}x{bucket_height} is not a multiple of {LATENT_FACTOR}"
            )));
        }
        let bytes = self.fetch(&item.key).await?;
        let max_pixels = self.options.max_pixels;
        let item_id = item.id;
        let result = self
            .in_decode_pool(move || {
                decode_for_encoding(&bytes, max_pixels, item_id, bucket_width, bucket_height)
            })
            .await;
        match &result {
            Ok(_) => self.stats.items_loaded.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.items_failed.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    async fn fetch(&self, key: &str) -> Result<Bytes, LoadFailure> {
        let bytes = self
            .with_retries(key, "fetch", || self.store.get(key))
            .await?;
        self.stats
            .bytes_fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// Runs one store request for `key` in a fetch slot, retrying transient errors up to
    /// `fetch_attempts` times with doubling delays ("not found" is not retried).
    async fn with_retries<T, Request, Reply>(
        &self,
        key: &str,
        what: &str,
        mut request: Request,
    ) -> Result<T, LoadFailure>
    where
        Request: FnMut() -> Reply,
        Reply: std::future::Future<Output = Result<T, object_store::Error>>,
    {
        let _fetch_slot = self
            .fetch_slots
            .acquire()
            .await
            .map_err(|error| LoadFailure::Fetch(error.to_string()))?;
        let mut delay = self.options.retry_backoff;
        let mut attempt = 1;
        loop {
            match request().await {
                Ok(reply) => return Ok(reply),
                Err(error @ object_store::Error::NotFound { .. }) => {
                    return Err(LoadFailure::Fetch(error.to_string()))
                }
                Err(error) if attempt >= self.options.fetch_attempts => {
                    return Err(LoadFailure::Fetch(format!(
                        "{error} (after {attempt} attempts)"
                    )))
                }
                Err(error) => {
                    warn!(key, attempt, error = %error, "{what} failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                    attempt += 1;
                }
            }
        }
    }
}

/// The DCT scales JPEGs may be decoded at: libjpeg-turbo's 1/2, 1/4 and 1/8, the factors
/// whose reduced inverse DCTs are SIMD-accelerated (and the ones OpenCV's `IMREAD_REDUCED_*`
/// and Pillow's `draft` use).
pub fn jpeg_decode_scales() -> &'static [JpegScale] {
    const SCALES: [JpegScale; 3] = [
        JpegScale {
            numerator: 1,
            denominator: 2,
        },
        JpegScale {
            numerator: 1,
            denominator: 4,
        },
        JpegScale {
            numerator: 1,
            denominator: 8,
        },
    ];
    &SCALES
}

/// Decodes an image at the smallest DCT scale that still covers its cover-resized size in the
/// bucket (`buffer`: pixels to reuse).
fn decode_covering_bucket(
    bytes: &[u8],
    max_pixels: u64,
    item_id: u64,
    (bucket_width, bucket_height): (u32, u32),
    buffer: Vec<u8>,
) -> Result<DecodedImage, LoadFailure> {
    decode_rgb_covering_reusing(
        bytes,
        max_pixels,
        jpeg_decode_scales(),
        |width, height| {
            cover_geometry(item_id, width, height, bucket_width, bucket_height)
                .ok()
                .map(|geometry| (geometry.resized_width, geometry.resized_height))
        },
        buffer,
    )
    .map_err(LoadFailure::Decode)
}

/// One image cover-resized whole for the latent cache: f32 CHW in [-1, 1] at the geometry's
/// encoded size.
#[derive(Debug, Clone)]
pub struct EncodingPixels {
    pub geometry: LatentGeometry,
    pub pixels: Vec<f32>,
}

/// Decode, orient, convert and cover-resize one image whole, cut to a multiple of 8 (runs on
/// the worker pool).
pub fn decode_for_encoding(
    bytes: &[u8],
    max_pixels: u64,
    item_id: u64,
    bucket_width: u32,
    bucket_height: u32,
) -> Result<EncodingPixels, LoadFailure> {
    let decoded = decode_covering_bucket(
        bytes,
        max_pixels,
        item_id,
        (bucket_width, bucket_height),
        Vec::new(),
    )?;
    let cover = cover_geometry(
        item_id,
        decoded.full_width,
        decoded.full_height,
        bucket_width,
        bucket_height,
    )
    .map_err(|error| LoadFailure::Fit(error.to_string()))?;
    let geometry = LatentGeometry::new(&cover);
    let rgb = fit_rgb8(
        &decoded,
        &cover,
        CropOffset { x: 0, y: 0 },
        geometry.encoded_width,
        geometry.encoded_height,
    )
    .map_err(LoadFailure::Fit)?;
    let mut pixels = vec![0.0f32; rgb.len()];
    rgb8_to_chw_f32(&rgb, &mut pixels);
    Ok(EncodingPixels { geometry, pixels })
}

/// Decoded pixel buffers up to this size are kept for the thread's next image.
const KEPT_DECODE_BUFFER_BYTES: usize = 32 << 20;

thread_local! {
    /// The previous image's decoded pixels, reused by the next decode on this thread.
    static DECODE_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Decode, orient, convert, cover-resize and crop one image (runs on the worker pool).
pub fn decode_and_fit(
    bytes: &[u8],
    max_pixels: u64,
    item_id: u64,
    bucket_width: u32,
    bucket_height: u32,
    seed: u64,
    epoch: u64,
) -> Result<FittedItem, LoadFailure> {
    // The cover size comes from the full-resolution upright size (read from the header), so
    // a JPEG is decoded at the smallest DCT scale that still covers it.
    let decoded = decode_covering_bucket(
        bytes,
        max_pixels,
        item_id,
        (bucket_width, bucket_height),
        DECODE_BUFFER.take(),
    )?;
    let fitted = fit_decoded(&decoded, item_id, bucket_width, bucket_height, seed, epoch);
    if decoded.image.pixels.capacity() <= KEPT_DECODE_BUFFER_BYTES {
        DECODE_BUFFER.set(decoded.image.pixels);
    }
    fitted
}

fn fit_decoded(
    decoded: &DecodedImage,
    item_id: u64,
    bucket_width: u32,
    bucket_height: u32,
    seed: u64,
    epoch: u64,
) -> Result<FittedItem, LoadFailure> {
    let geometry = cover_geometry(
        item_id,
        decoded.full_width,
        decoded.full_height,
        bucket_width,
        bucket_height,
    )
    .map_err(|error| LoadFailure::Fit(error.to_string()))?;
    let offset = crop_offset(seed, epoch, item_id, &geometry);
    let rgb = fit_rgb8(decoded, &geometry, offset, bucket_width, bucket_height)
        .map_err(LoadFailure::Fit)?;
    let crop = ItemCrop {
        id: item_id,
        loaded_id: Some(item_id),
        original_width: decoded.full_width,
        original_height: decoded.full_height,
        resized_width: geometry.resized_width,
        resized_height: geometry.resized_height,
        crop_x: offset.x,
        crop_y: offset.y,
    };
    Ok(FittedItem {
        rgb,
        crop,
        cropped_pixels: geometry.cropped_pixels(),
    })
}
