//! `arbor-data`: the libtorch-free data path (docs/architecture.md §2 "Image fit", §7), used by
//! both binaries.
//!
//! - [`store`] opens a dataset root given as a plain path, `file://`, `s3://`, `gs://` or `az://`
//!   URL through `object_store`, with credentials from the usual environment variables.
//! - [`indexer`] walks a dataset root and produces manifest records: [`item_id`] gives each file a
//!   stable id, [`image_header`] reads sizes from headers only (EXIF orientation applied),
//!   [`caption`] reads sidecar captions, and [`skip_reason`] names every file that was not used.
//! - [`batch_loader`] fetches, decodes ([`decode`]; JPEGs through libjpeg-turbo, [`turbojpeg`],
//!   downscaled in the DCT domain when the bucket allows), fits ([`fit`]) and assembles batches of
//!   f32 CHW pixels in [-1, 1] with per-item crop metadata; [`prefetcher`] runs it ahead of the
//!   consumer on a worker pool.
//! - [`latent_cache`] keeps VAE latent distributions of whole cover-resized images in an object
//!   store, shared by every worker; [`latent_batch`] loads a batch through it (cached latents, or
//!   the pixels to encode, each with its epoch's crop in latent space).

pub mod batch_loader;
pub mod caption;
pub mod contact_sheet;
pub mod decode;
pub mod error;
pub mod exif_orientation;
pub mod fit;
pub mod image_header;
pub mod indexer;
pub mod item_id;
pub mod latent_batch;
pub mod latent_cache;
pub mod prefetcher;
pub mod skip_reason;
pub mod store;
pub mod turbojpeg;

pub use error::DataError;
