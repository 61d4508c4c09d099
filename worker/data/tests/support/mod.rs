//! Pixel readers shared by arbor-data's integration tests (the corpus generator and the
//! virtualenv's tools are arbor-testkit's).

// Each test binary of this folder uses a part of this module.
#![allow(dead_code)]

use arbor_data::batch_loader::Batch;

/// The RGB8 value of pixel (x, y) of slot `index`, read back from CHW f32 in [-1, 1].
pub fn pixel(batch: &Batch, index: usize, x: u32, y: u32) -> [u8; 3] {
    let values = batch.item_pixels(index);
    let plane = (batch.bucket_width * batch.bucket_height) as usize;
    let offset = (y * batch.bucket_width + x) as usize;
    let read = |channel: usize| {
        let value = values[channel * plane + offset];
        assert!((-1.0..=1.0).contains(&value), "value {value} out of range");
        ((value + 1.0) * 127.5).round() as u8
    };
    [read(0), read(1), read(2)]
}

pub fn assert_close(actual: [u8; 3], expected: [u8; 3], tolerance: u8, context: &str) {
    for channel in 0..3 {
        let difference = actual[channel].abs_diff(expected[channel]);
        assert!(
            difference <= tolerance,
            "{context}: got {actual:?}, expected {expected:?} (tolerance {tolerance})"
        );
    }
}
