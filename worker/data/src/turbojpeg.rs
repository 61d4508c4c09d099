//! libjpeg-turbo through its TurboJPEG 2 C API (Debian's `libturbojpeg0-dev`): JPEG headers and
//! decompression with DCT-domain downscaling. Decoding at a scaling factor `M/8` runs a reduced
//! `M x M` inverse DCT per 8x8 block, so colour conversion, upsampling and everything after
//! touch `(M/8)^2` of the pixels; only the entropy decoding costs the same as a full decode.
//!
//! Only the few functions arbor needs are bound. Each thread keeps one decompressor handle.
//!
//! Why not the `turbojpeg` crate: its bindings (`turbojpeg-sys` 1.x) target the TurboJPEG 3 API
//! (`tj3*`), which Debian bookworm's libjpeg-turbo 2.1 (the workers' base image) lacks, so it
//! would have to build its bundled copy with cmake and nasm on every fresh machine and image.
//! The seven TurboJPEG 2 calls below link the distribution's library instead.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uchar, c_ulong, c_void, CStr};
use std::sync::OnceLock;

type TjHandle = *mut c_void;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct TjScalingFactor {
    num: c_int,
    denom: c_int,
}

#[link(name = "turbojpeg")]
extern "C" {
    fn tjInitDecompress() -> TjHandle;
    fn tjDestroy(handle: TjHandle) -> c_int;
    fn tjDecompressHeader3(
        handle: TjHandle,
        jpeg_buf: *const c_uchar,
        jpeg_size: c_ulong,
        width: *mut c_int,
        height: *mut c_int,
        jpeg_subsamp: *mut c_int,
        jpeg_colorspace: *mut c_int,
    ) -> c_int;
    fn tjDecompress2(
        handle: TjHandle,
        jpeg_buf: *const c_uchar,
        jpeg_size: c_ulong,
        dst_buf: *mut c_uchar,
        width: c_int,
        pitch: c_int,
        height: c_int,
        pixel_format: c_int,
        flags: c_int,
    ) -> c_int;
    fn tjGetScalingFactors(num_scaling_factors: *mut c_int) -> *mut TjScalingFactor;
    fn tjGetErrorStr2(handle: TjHandle) -> *mut c_char;
    fn tjGetErrorCode(handle: TjHandle) -> c_int;
}

const TJPF_RGB: c_int = 0;
const TJPF_CMYK: c_int = 11;
const TJCS_CMYK: c_int = 3;
const TJCS_YCCK: c_int = 4;
const TJERR_WARNING: c_int = 0;
/// Refuse progressive files with an unreasonable number of scans (a CPU-exhaustion attack).
const TJFLAG_LIMITSCANS: c_int = 32768;
/// The accurate integer inverse DCT (the default, named so that it stays the default).
const TJFLAG_ACCURATEDCT: c_int = 4096;

/// A scaling factor `numerator / denominator` libjpeg-turbo decodes at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegScale {
    pub numerator: u32,
    pub denominator: u32,
}

impl JpegScale {
    pub const FULL: JpegScale = JpegScale {
        numerator: 1,
        denominator: 1,
    };

    /// `ceil(dimension * numerator / denominator)`, the size libjpeg-turbo decodes to.
    pub fn scaled(self, dimension: u32) -> u32 {
        let scaled = (u64::from(dimension) * u64::from(self.numerator))
            .div_ceil(u64::from(self.denominator));
        scaled as u32
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.numerator) / f64::from(self.denominator)
    }

    pub fn is_full(self) -> bool {
        self.numerator == self.denominator
    }
}

/// The colour model of a JPEG's samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JpegColorModel {
    /// YCbCr, RGB or grayscale: libjpeg-turbo converts to RGB itself.
    Rgb,
    /// CMYK or YCCK: decoded to (Adobe-inverted) CMYK, converted by the caller.
    Cmyk,
}

/// What a JPEG's frame header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegHeader {
    /// The stored size (before EXIF orientation).
    pub width: u32,
    pub height: u32,
    pub color_model: JpegColorModel,
}

/// Why libjpeg-turbo refused a JPEG. A warning (for example a truncated entropy-coded segment)
/// still means the output is not the image as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurboJpegError {
    pub message: String,
    pub warning_only: bool,
}

impl std::fmt::Display for TurboJpegError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.message)
    }
}

struct Decompressor {
    handle: TjHandle,
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: `handle` came from tjInitDecompress and is destroyed exactly once.
        unsafe {
            tjDestroy(self.handle);
        }
    }
}

impl Decompressor {
    fn error(&self) -> TurboJpegError {
        // SAFETY: `handle` is a live TurboJPEG handle; the returned string is owned by it (or
        // static) and copied before the next call.
        let (message, code) = unsafe {
            let message = tjGetErrorStr2(self.handle);
            let message = if message.is_null() {
                "unknown libjpeg-turbo error".to_owned()
            } else {
                CStr::from_ptr(message).to_string_lossy().into_owned()
            };
            (message, tjGetErrorCode(self.handle))
        };
        TurboJpegError {
            message,
            warning_only: code == TJERR_WARNING,
        }
    }
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
}

fn with_decompressor<T>(
    work: impl FnOnce(&Decompressor) -> Result<T, TurboJpegError>,
) -> Result<T, TurboJpegError> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            // SAFETY: plain constructor; a null handle is checked below.
            let handle = unsafe { tjInitDecompress() };
            if handle.is_null() {
                return Err(TurboJpegError {
                    message: "cannot create a libjpeg-turbo decompressor".to_owned(),
                    warning_only: false,
                });
            }
            *slot = Some(Decompressor { handle });
        }
        match slot.as_ref() {
            Some(decompressor) => work(decompressor),
            None => unreachable!("the decompressor was just created"),
        }
    })
}

/// The scaling factors at or below 1 that libjpeg-turbo decodes at, largest first.
pub fn scaling_factors() -> &'static [JpegScale] {
    static FACTORS: OnceLock<Vec<JpegScale>> = OnceLock::new();
    FACTORS.get_or_init(|| {
        let mut count: c_int = 0;
        // SAFETY: returns a pointer to a static table of `count` entries (or null).
        let table = unsafe { tjGetScalingFactors(&mut count) };
        if table.is_null() || count <= 0 {
            return vec![JpegScale::FULL];
        }
        // SAFETY: `table` points at `count` initialised factors that live for the program.
        let factors = unsafe { std::slice::from_raw_parts(table, count as usize) };
        let mut scales: Vec<JpegScale> = factors
            .iter()
            .filter(|factor| factor.num > 0 && factor.denom > 0 && factor.num <= factor.denom)
            .map(|factor| JpegScale {
                numerator: factor.num as u32,
                denominator: factor.denom as u32,
            })
            .collect();
        scales.sort_by(|a, b| b.as_f64().total_cmp(&a.as_f64()));
        scales.dedup_by(|a, b| a.as_f64() == b.as_f64());
        if scales.first() != Some(&JpegScale::FULL) {
            scales.insert(0, JpegScale::FULL);
        }
        scales
    })
}

/// Reads the frame header of `bytes`.
pub fn read_header(bytes: &[u8]) -> Result<JpegHeader, TurboJpegError> {
    with_decompressor(|decompressor| {
        let (mut width, mut height, mut subsampling, mut colorspace) = (0, 0, 0, 0);
        // SAFETY: `bytes` is a live slice of the given length; the out-pointers are locals.
        let status = unsafe {
            tjDecompressHeader3(
                decompressor.handle,
                bytes.as_ptr(),
                bytes.len() as c_ulong,
                &mut width,
                &mut height,
                &mut subsampling,
                &mut colorspace,
            )
        };
        if status != 0 {
            return Err(decompressor.error());
        }
        if width <= 0 || height <= 0 {
            return Err(TurboJpegError {
                message: format!("jpeg header has a zero size {width}x{height}"),
                warning_only: false,
            });
        }
        let color_model = if colorspace == TJCS_CMYK || colorspace == TJCS_YCCK {
            JpegColorModel::Cmyk
        } else {
            JpegColorModel::Rgb
        };
        Ok(JpegHeader {
            width: width as u32,
            height: height as u32,
            color_model,
        })
    })
}

/// Pixels decoded by [`decompress`].
#[derive(Debug, Clone)]
pub struct DecodedJpeg {
    /// Interleaved RGB8, or CMYK8 as stored for [`JpegColorModel::Cmyk`] files.
    pub pixels: Vec<u8>,
    pub width: u32,
    pub height: u32,
    /// The factor actually decoded at.
    pub scale: JpegScale,
}

/// The factor libjpeg-turbo decodes at when asked for `requested`'s size: the largest factor
/// whose size fits in it (for tiny images a larger factor can give the same size).
pub fn effective_scale(header: &JpegHeader, requested: JpegScale) -> JpegScale {
    let (width, height) = (
        requested.scaled(header.width),
        requested.scaled(header.height),
    );
    scaling_factors()
        .iter()
        .copied()
        .find(|factor| {
            factor.scaled(header.width) <= width && factor.scaled(header.height) <= height
        })
        .unwrap_or(requested)
}

/// Decodes `bytes` (whose header is `header`) at `scale` into interleaved RGB8, or (for CMYK and
/// YCCK files) into interleaved CMYK8 as stored.
pub fn decompress(
    bytes: &[u8],
    header: &JpegHeader,
    scale: JpegScale,
) -> Result<DecodedJpeg, TurboJpegError> {
    decompress_reusing(bytes, header, scale, Vec::new())
}

/// [`decompress`] into `buffer`'s allocation (its contents are discarded): a caller that hands
/// the previous image's pixels back in skips the allocation, the page faults of fresh memory
/// and the zero-filling, since libjpeg-turbo writes every byte of the output itself.
pub fn decompress_reusing(
    bytes: &[u8],
    header: &JpegHeader,
    scale: JpegScale,
    mut buffer: Vec<u8>,
) -> Result<DecodedJpeg, TurboJpegError> {
    let scale = effective_scale(header, scale);
    let (width, height) = (scale.scaled(header.width), scale.scaled(header.height));
    let (pixel_format, channels) = match header.color_model {
        JpegColorModel::Rgb => (TJPF_RGB, 3usize),
        JpegColorModel::Cmyk => (TJPF_CMYK, 4usize),
    };
    let pitch = width as usize * channels;
    let length = pitch * height as usize;
    buffer.clear();
    buffer.reserve_exact(length);
    with_decompressor(|decompressor| {
        // SAFETY: `buffer` has capacity for `pitch * height` bytes, exactly what libjpeg-turbo
        // writes for a `width x height` image of this pixel format and pitch; they are only
        // exposed (by `set_len` below) once it reports that it wrote all of them.
        let status = unsafe {
            tjDecompress2(
                decompressor.handle,
                bytes.as_ptr(),
                bytes.len() as c_ulong,
                buffer.as_mut_ptr(),
                width as c_int,
                pitch as c_int,
                height as c_int,
                pixel_format,
                TJFLAG_ACCURATEDCT | TJFLAG_LIMITSCANS,
            )
        };
        if status != 0 {
            return Err(decompressor.error());
        }
        Ok(())
    })?;
    // SAFETY: the decompression succeeded (no warning either), so every one of the `length`
    // bytes within the reserved capacity has been written.
    unsafe { buffer.set_len(length) };
    Ok(DecodedJpeg {
        pixels: buffer,
        width,
        height,
        scale,
    })
}
