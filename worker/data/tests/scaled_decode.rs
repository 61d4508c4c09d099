//! The DCT-scaled JPEG path (libjpeg-turbo decoding at 1/2, 1/4 or 1/8 when the bucket allows)
//! against the full-resolution path (the `image` crate's decoder, then the same fit): the same
//! output geometry and crop metadata, visually the same pixels, EXIF orientation and CMYK
//! handled, and a JPEG libjpeg-turbo only decodes with a warning left to the full path.

mod support;

use std::path::Path;

use arbor_common::crop::{cover_geometry, crop_offset};
use arbor_data::batch_loader::{decode_and_fit, jpeg_decode_scales, DEFAULT_MAX_PIXELS};
use arbor_data::decode::{decode_rgb, decode_rgb_covering, DecodeError, DecodedImage};
use arbor_data::fit::fit_rgb8;
use arbor_testkit::make_corpus;

const SEED: u64 = 42;

fn make_scaled_corpus(out: &Path) {
    make_corpus("scaled", out);
}

/// The reference: full-resolution decode by the `image` crate, then the same fit.
fn full_path_fit(bytes: &[u8], item_id: u64, bucket: (u32, u32)) -> (Vec<u8>, (u32, u32)) {
    let image = decode_rgb(bytes, DEFAULT_MAX_PIXELS).unwrap();
    let size = (image.width, image.height);
    let geometry = cover_geometry(item_id, image.width, image.height, bucket.0, bucket.1).unwrap();
    let offset = crop_offset(SEED, 0, item_id, &geometry);
    let rgb = fit_rgb8(
        &DecodedImage::full(image),
        &geometry,
        offset,
        bucket.0,
        bucket.1,
    )
    .unwrap();
    (rgb, size)
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let total: u64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    total as f64 / a.len() as f64
}

/// The decode scale the loader picks for `bytes` in `bucket`.
fn chosen_scale(bytes: &[u8], item_id: u64, bucket: (u32, u32)) -> f64 {
    let decoded = decode_rgb_covering(
        bytes,
        DEFAULT_MAX_PIXELS,
        jpeg_decode_scales(),
        |width, height| {
            cover_geometry(item_id, width, height, bucket.0, bucket.1)
                .ok()
                .map(|geometry| (geometry.resized_width, geometry.resized_height))
        },
    )
    .unwrap();
    // Never smaller than the cover size.
    let geometry = cover_geometry(
        item_id,
        decoded.full_width,
        decoded.full_height,
        bucket.0,
        bucket.1,
    )
    .unwrap();
    assert!(
        decoded.image.width >= geometry.resized_width
            && decoded.image.height >= geometry.resized_height,
        "decoded {}x{} is below the cover size {}x{}",
        decoded.image.width,
        decoded.image.height,
        geometry.resized_width,
        geometry.resized_height
    );
    decoded.scale.as_f64()
}

#[test]
fn scaled_decode_matches_the_full_path_in_geometry_and_pixels() {
    let corpus = tempfile::tempdir().unwrap();
    make_scaled_corpus(corpus.path());
    // (file, bucket, the scale the cover size allows, mean |difference| bound in 8-bit levels)
    let cases = [
        ("photo_420.jpg", (768, 512), 0.5, 1.5),
        ("photo_420.jpg", (384, 256), 0.25, 1.5),
        ("photo_420.jpg", (192, 128), 0.125, 2.0),
        ("photo_420.jpg", (1600, 1088), 1.0, 1.0),
        ("photo_444.jpg", (320, 448), 0.25, 1.5),
        ("progressive.jpg", (768, 576), 0.5, 1.5),
        ("cmyk.jpg", (832, 576), 0.5, 1.5),
        ("gray.jpg", (384, 384), 0.25, 1.5),
        ("quadrants_o6.jpg", (768, 384), 0.5, 1.5),
        ("quadrants_o3.jpg", (384, 192), 0.25, 1.5),
    ];
    for (key, bucket, expected_scale, bound) in cases {
        let bytes = std::fs::read(corpus.path().join(key)).unwrap();
        let id = arbor_data::item_id::item_id(key);
        let context = format!("{key} in {}x{}", bucket.0, bucket.1);
        assert_eq!(
            chosen_scale(&bytes, id, bucket),
            expected_scale,
            "{context}: decode scale"
        );
        let (reference, full_size) = full_path_fit(&bytes, id, bucket);
        let fitted =
            decode_and_fit(&bytes, DEFAULT_MAX_PIXELS, id, bucket.0, bucket.1, SEED, 0).unwrap();
        let geometry = cover_geometry(id, full_size.0, full_size.1, bucket.0, bucket.1).unwrap();
        let offset = crop_offset(SEED, 0, id, &geometry);
        let crop = fitted.crop;
        assert_eq!(
            (crop.original_width, crop.original_height),
            full_size,
            "{context}"
        );
        assert_eq!(
            (crop.resized_width, crop.resized_height),
            (geometry.resized_width, geometry.resized_height),
            "{context}"
        );
        assert_eq!(
            (crop.crop_x, crop.crop_y),
            (offset.x, offset.y),
            "{context}"
        );
        assert_eq!(fitted.rgb.len(), reference.len(), "{context}");
        let difference = mean_abs_diff(&fitted.rgb, &reference);
        assert!(
            difference <= bound,
            "{context}: mean |difference| {difference:.3} over {bound}"
        );
    }
}

#[test]
fn orientation_survives_the_scaled_decode_pixel_by_pixel() {
    let corpus = tempfile::tempdir().unwrap();
    make_scaled_corpus(corpus.path());
    // The upright image is 1600x800: red | green over blue | white. In a 768x384 bucket the
    // whole image is kept (same aspect), so quadrant centres land at the bucket's quarters.
    for key in ["quadrants_o3.jpg", "quadrants_o6.jpg"] {
        let bytes = std::fs::read(corpus.path().join(key)).unwrap();
        let id = arbor_data::item_id::item_id(key);
        assert!(chosen_scale(&bytes, id, (768, 384)) < 1.0, "{key}");
        let fitted = decode_and_fit(&bytes, DEFAULT_MAX_PIXELS, id, 768, 384, SEED, 0).unwrap();
        assert_eq!(
            (fitted.crop.original_width, fitted.crop.original_height),
            (1600, 800),
            "{key}"
        );
        let at = |x: usize, y: usize| {
            let index = (y * 768 + x) * 3;
            [
                fitted.rgb[index],
                fitted.rgb[index + 1],
                fitted.rgb[index + 2],
            ]
        };
        let expected = [
            ((192, 96), [255, 0, 0]),
            ((576, 96), [0, 255, 0]),
            ((192, 288), [0, 0, 255]),
            ((576, 288), [255, 255, 255]),
        ];
        for ((x, y), colour) in expected {
            support::assert_close(at(x, y), colour, 6, &format!("{key} at ({x}, {y})"));
        }
    }
}

#[test]
fn cmyk_decodes_like_the_image_crate_at_full_scale() {
    let corpus = tempfile::tempdir().unwrap();
    make_scaled_corpus(corpus.path());
    let bytes = std::fs::read(corpus.path().join("cmyk.jpg")).unwrap();
    // A bucket at the full size forces scale 1: libjpeg-turbo's CMYK and the conversion must
    // then match the image crate's decode almost exactly (both use the accurate integer IDCT).
    let id = 7;
    let fitted = decode_and_fit(&bytes, DEFAULT_MAX_PIXELS, id, 1792, 1152, SEED, 0).unwrap();
    let (reference, _) = full_path_fit(&bytes, id, (1792, 1152));
    let difference = mean_abs_diff(&fitted.rgb, &reference);
    assert!(difference < 1.0, "mean |difference| {difference:.3}");
}

#[test]
fn a_jpeg_libjpeg_turbo_only_decodes_with_a_warning_gets_the_full_path_verdict() {
    let corpus = tempfile::tempdir().unwrap();
    make_scaled_corpus(corpus.path());
    let bytes = std::fs::read(corpus.path().join("truncated.jpg")).unwrap();
    let id = 3;
    let through_loader = decode_and_fit(&bytes, DEFAULT_MAX_PIXELS, id, 512, 384, SEED, 0);
    match decode_rgb(&bytes, DEFAULT_MAX_PIXELS) {
        Ok(_) => {
            let (reference, _) = full_path_fit(&bytes, id, (512, 384));
            assert_eq!(through_loader.unwrap().rgb, reference);
        }
        Err(error) => {
            let failure = through_loader.unwrap_err();
            assert_eq!(
                failure.to_string(),
                arbor_data::batch_loader::LoadFailure::Decode(error).to_string()
            );
        }
    }
}

#[test]
fn the_pixel_cap_is_checked_from_the_jpeg_header_before_decoding() {
    let corpus = tempfile::tempdir().unwrap();
    make_scaled_corpus(corpus.path());
    let bytes = std::fs::read(corpus.path().join("photo_420.jpg")).unwrap();
    let error = decode_rgb_covering(&bytes, 1_000_000, jpeg_decode_scales(), |_, _| {
        Some((16, 16))
    })
    .unwrap_err();
    assert_eq!(
        error,
        DecodeError::TooManyPixels {
            width: 2400,
            height: 1600,
            max_pixels: 1_000_000
        }
    );
}
