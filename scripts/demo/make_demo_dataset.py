#!/usr/bin/env python3
"""Generates the demo's dataset: simple, learnable pictures in the kohya layout.

    make_demo_dataset.py OUT_DIR [--count N] [--seed S]

writes OUT_DIR/images/NNNN.png with a sidecar NNNN.txt caption for each image, then OUT_DIR/COMPLETE.
Every picture is one coloured shape (circle, square, triangle or diamond) on a plain or
gradient background, in one of a dozen aspect ratios from 1:3 to 3:1 (so it lands in several
buckets of the demo's scaled-down bucket table), captioned with tags in a fixed order:

    red, circle, large, white background

The same seed always gives the same files; an existing complete folder of the same size and seed
is left as it is.
"""

import argparse
import json
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
}
BACKGROUNDS = {
    "white background": ((250, 250, 250), (250, 250, 250)),
    "black background": ((15, 15, 15), (15, 15, 15)),
    "gradient background": ((90, 160, 230), (240, 220, 180)),
}
SHAPES = ["circle", "square", "triangle", "diamond"]
SIZES = {"small": 0.35, "large": 0.75}
# Width:height ratios; each image is about 176x176 pixels of area, so the demo's buckets
# (max_area 128*128) always downscale.
ASPECTS = [(1, 3), (1, 2), (9, 16), (2, 3), (3, 4), (1, 1), (1, 1), (4, 3), (3, 2), (16, 9), (2, 1), (3, 1)]
TARGET_AREA = 176 * 176


def background(width, height, top, bottom):
    image = Image.new("RGB", (width, height), top)
    if top == bottom:
        return image
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / max(1, height - 1)
        colour = tuple(round(a + (b - a) * t) for a, b in zip(top, bottom))
        draw.line([(0, y), (width, y)], fill=colour)
    return image


def draw_shape(image, shape, colour, scale, rng):
    width, height = image.size
    side = scale * min(width, height)
    # Centre jittered within what keeps the shape inside the picture.
    cx = rng.uniform(side / 2, width - side / 2)
    cy = rng.uniform(side / 2, height - side / 2)
    half = side / 2
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=colour)


def make(out_dir: Path, count: int, seed: int):
    stamp = out_dir / "COMPLETE"
    wanted = {"count": count, "seed": seed, "version": 1}
    if stamp.exists():
        try:
            if json.loads(stamp.read_text()) == wanted:
                print(f"dataset already in {out_dir} ({count} images)")
                return
        except ValueError:
            pass
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for old in images.iterdir():
        old.unlink()
    rng = random.Random(seed)
    per_aspect = {}
    for index in range(count):
        aspect_w, aspect_h = ASPECTS[index % len(ASPECTS)]
        # Slightly varied areas: some images are near a bucket's size, some twice its area.
        area = TARGET_AREA * rng.uniform(0.8, 1.6)
        width = max(16, round(math.sqrt(area * aspect_w / aspect_h)))
        height = max(16, round(width * aspect_h / aspect_w))
        colour_name = rng.choice(list(COLOURS))
        shape = rng.choice(SHAPES)
        size_name = rng.choice(list(SIZES))
        background_name = rng.choice(list(BACKGROUNDS))
        image = background(width, height, *BACKGROUNDS[background_name])
        draw_shape(image, shape, COLOURS[colour_name], SIZES[size_name], rng)
        stem = f"{index:04d}"
        image.save(images / f"{stem}.png", optimize=False)
        (images / f"{stem}.txt").write_text(f"{colour_name}, {shape}, {size_name}, {background_name}\n")
        per_aspect[f"{aspect_w}:{aspect_h}"] = per_aspect.get(f"{aspect_w}:{aspect_h}", 0) + 1
    stamp.write_text(json.dumps(wanted))
    print(f"wrote {count} images with captions to {images} (aspect ratios: {per_aspect})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.count < 1:
        parser.error("--count must be at least 1")
    make(args.out_dir, args.count, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
