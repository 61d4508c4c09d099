#!/usr/bin/env python3
"""Generates the data path's test and benchmark corpora (committed, run by the tests and the bench).

  make_corpus.py odd OUT      the odd-file corpus of arbor-data's tests: EXIF orientations 1-8,
                              alpha, CMYK, 16-bit, palette, grayscale, WebP, exact bucket size, 1x1,
                              zero bytes, not an image, truncated header and body, a decompression
                              bomb, BOM/CRLF, .caption, non-UTF-8 and missing captions.
  make_corpus.py bench OUT --count N [--seed S]
                              N photo-like JPEGs (quality 90) of about 1 to 6 megapixels with varied
                              aspect ratios, for the loader benchmark.
  make_corpus.py scaled OUT   larger JPEGs for the DCT-scaled decode tests: photo-like RGB
                              (4:2:0 and 4:4:4), EXIF orientations 6 and 3 of a quadrant pattern,
                              CMYK, grayscale, progressive, and a truncated one.
"""
import argparse
import os
import struct
import zlib

import numpy as np
from PIL import Image

# Upright reference of the orientation cases: 64x32, quadrants red | green over blue | white,
# blocks aligned to JPEG's 8x8/16x16 grid so compression keeps the colours.
QUADRANTS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]

# The transpose that turns the upright image into what is stored with EXIF orientation k
# (the inverse of what a viewer applies on display).
STORED_FROM_UPRIGHT = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def upright_reference():
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:16, :32] = QUADRANTS[0]
    pixels[:16, 32:] = QUADRANTS[1]
    pixels[16:, :32] = QUADRANTS[2]
    pixels[16:, 32:] = QUADRANTS[3]
    return Image.fromarray(pixels, "RGB")


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def caption(out, key, text="a caption"):
    stem = os.path.splitext(key)[0]
    write(os.path.join(out, stem + ".txt"), text.encode("utf-8"))


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width, height):
    """A valid PNG header announcing width x height 8-bit grayscale, with one tiny IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def make_odd(out):
    upright = upright_reference()
    for orientation, transpose in STORED_FROM_UPRIGHT.items():
        stored = upright if transpose is None else upright.transpose(transpose)
        exif = Image.Exif()
        exif[0x0112] = orientation
        key = f"orientation/o{orientation}.jpg"
        path = os.path.join(out, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        stored.save(path, quality=95, subsampling=0, exif=exif.tobytes())
        caption(out, key, f"orientation {orientation}")

    # Alpha: left half opaque red, a half-transparent blue band, the rest fully transparent.
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (255, 0, 0, 255)
    rgba[:, 16:20] = (0, 0, 255, 128)
    Image.fromarray(rgba, "RGBA").save(os.path.join(out, "alpha.png"))
    caption(out, "alpha.png")

    # CMYK JPEG: pure cyan, which is RGB (0, 255, 255).
    Image.new("CMYK", (32, 32), (255, 0, 0, 0)).save(os.path.join(out, "cmyk.jpg"), quality=95)
    caption(out, "cmyk.jpg")

    # 16-bit grayscale gradient along x: value 2048*x + 255 (8-bit: round(value / 257)).
    gray16 = np.tile((np.arange(32, dtype=np.uint16) * 8 * 256 + 255), (16, 1))
    Image.fromarray(gray16.astype(np.uint16)).save(os.path.join(out, "gray16.png"))
    caption(out, "gray16.png")
    # 16-bit RGB (written by hand: Pillow has no 16-bit RGB mode): R=0xFFFF, G=0x8000, B=0.
    rows = b"".join(b"\x00" + b"\xff\xff\x80\x00\x00\x00" * 16 for _ in range(16))
    rgb16 = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 16, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )
    write(os.path.join(out, "rgb16.png"), rgb16)
    caption(out, "rgb16.png")

    palette = Image.new("P", (24, 24), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    palette.save(os.path.join(out, "palette.png"))
    caption(out, "palette.png")

    Image.new("L", (40, 24), 77).save(os.path.join(out, "gray.jpg"), quality=95)
    caption(out, "gray.jpg")
    Image.new("RGB", (48, 40), (30, 60, 90)).save(os.path.join(out, "image.webp"), lossless=True)
    caption(out, "image.webp")

    rng = np.random.default_rng(7)
    exact = rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)
    Image.fromarray(exact, "RGB").save(os.path.join(out, "exact_64x128.png"))
    caption(out, "exact_64x128.png")
    Image.new("RGB", (1, 1), (200, 100, 50)).save(os.path.join(out, "one_pixel.png"))
    caption(out, "one_pixel.png")
    os.makedirs(os.path.join(out, "nested/deeper"), exist_ok=True)
    Image.new("RGB", (20, 20), (1, 2, 3)).save(os.path.join(out, "nested/deeper/UPPER.PNG"), format="PNG")
    caption(out, "nested/deeper/UPPER.PNG", "nested")

    # Bad files.
    write(os.path.join(out, "zero.png"), b"")
    caption(out, "zero.png")
    write(os.path.join(out, "not_image.jpg"), b"this is a text file, not a JPEG\n")
    caption(out, "not_image.jpg")
    full = bomb_png(16, 16)
    write(os.path.join(out, "truncated_header.png"), full[:20])
    caption(out, "truncated_header.png")
    body = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = os.path.join(out, "truncated_body.png")
    Image.fromarray(body, "RGB").save(path)
    with open(path, "rb") as handle:
        data = handle.read()
    write(path, data[: len(data) // 2])
    caption(out, "truncated_body.png")
    write(os.path.join(out, "bomb.png"), bomb_png(30000, 30000))
    caption(out, "bomb.png")

    # Captions.
    Image.new("RGB", (16, 16), (9, 9, 9)).save(os.path.join(out, "bom_crlf.png"))
    write(os.path.join(out, "bom_crlf.txt"), b"\xef\xbb\xbf1girl, red dress\r\nsmiling\r\n")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(os.path.join(out, "caption_ext.png"))
    write(os.path.join(out, "caption_ext.caption"), "from .caption".encode("utf-8"))
    Image.new("RGB", (16, 16), (9, 9, 9)).save(os.path.join(out, "bad_caption.png"))
    write(os.path.join(out, "bad_caption.txt"), "caf\u00e9".encode("latin-1"))
    Image.new("RGB", (16, 16), (9, 9, 9)).save(os.path.join(out, "no_caption.png"))
    # A non-image file that must be ignored, not reported.
    write(os.path.join(out, "README.md"), b"not part of the dataset\n")


def make_bench(out, count, seed):
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    for index in range(count):
        megapixels = rng.uniform(1.0, 6.0)
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        width = max(64, int(round((megapixels * 1e6 * aspect) ** 0.5)))
        height = max(64, int(round(megapixels * 1e6 / width)))
        # Photo-like content: smooth colour fields plus mild grain.
        coarse = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        image = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
        grain = rng.normal(0, 6, (height, width, 1)).astype(np.int16)
        pixels = np.clip(np.asarray(image, np.int16) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(os.path.join(out, f"img_{index:04d}.jpg"), quality=90)


def photo_like(rng, width, height):
    coarse = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    image = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, (height, width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(np.asarray(image, np.int16) + grain, 0, 255).astype(np.uint8), "RGB")


def make_scaled(out):
    rng = np.random.default_rng(11)
    os.makedirs(out, exist_ok=True)
    photo_like(rng, 2400, 1600).save(os.path.join(out, "photo_420.jpg"), quality=90)
    photo_like(rng, 1500, 2100).save(os.path.join(out, "photo_444.jpg"), quality=90, subsampling=0)
    photo_like(rng, 2048, 1536).save(os.path.join(out, "progressive.jpg"), quality=90, progressive=True)
    # Orientation: the upright image is a 1600x800 quadrant pattern (red | green over blue | white).
    upright = np.zeros((800, 1600, 3), np.uint8)
    upright[:400, :800] = QUADRANTS[0]
    upright[:400, 800:] = QUADRANTS[1]
    upright[400:, :800] = QUADRANTS[2]
    upright[400:, 800:] = QUADRANTS[3]
    upright = Image.fromarray(upright, "RGB")
    for orientation in (3, 6):
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = upright.transpose(STORED_FROM_UPRIGHT[orientation])
        stored.save(os.path.join(out, f"quadrants_o{orientation}.jpg"), quality=95, exif=exif.tobytes())
    photo_like(rng, 1800, 1200).convert("CMYK").save(os.path.join(out, "cmyk.jpg"), quality=95)
    photo_like(rng, 1600, 1600).convert("L").save(os.path.join(out, "gray.jpg"), quality=90)
    path = os.path.join(out, "truncated.jpg")
    photo_like(rng, 1600, 1200).save(path, quality=90)
    with open(path, "rb") as handle:
        data = handle.read()
    write(path, data[: len(data) * 2 // 3])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["odd", "bench", "scaled"])
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=48)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.kind == "odd":
        make_odd(args.out)
    elif args.kind == "scaled":
        make_scaled(args.out)
    else:
        make_bench(args.out, args.count, args.seed)


if __name__ == "__main__":
    main()
