#!/usr/bin/env python3
"""Draws a JPEG dataset with kohya-style sidecar captions for the GPU check (check.sh), with Pillow.

    make_dataset.py OUT_DIR --count N --shapes 512x512,576x448,448x576,640x384 [--scale 1.0:1.4]
                    [--processes P] [--quality 90]

Image i has the aspect ratio of shape i mod len(shapes) (so each lands in that bucket) and is
drawn at that shape times a random factor from --scale (larger than the bucket, as real data is:
the loader resizes and crops). Each holds a gradient background, a few shapes and some noise
(so JPEG decoding costs about what a photo of that size costs); its caption (NAME.txt) lists
tags. Deterministic in the index. Writes OUT_DIR/images/ and then OUT_DIR/COMPLETE; prints one
JSON line of facts.
"""

import argparse
import json
import os
import random
import sys
import time
from multiprocessing import Pool
from pathlib import Path

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}


def draw(job):
    from PIL import Image, ImageDraw

    index, width, height, out_dir, quality = job
    rng = random.Random(index)
    top = tuple(rng.randrange(256) for _ in range(3))
    bottom = tuple(rng.randrange(256) for _ in range(3))
    # a vertical gradient, made small and resized (fast)
    column = Image.new("RGB", (1, 64))
    for y in range(64):
        t = y / 63
        column.putpixel((0, y), tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    image = column.resize((width, height))
    canvas = ImageDraw.Draw(image)
    tags = []
    for _ in range(rng.randint(2, 5)):
        name, colour = rng.choice(sorted(COLOURS.items()))
        shape = rng.choice(["circle", "square", "triangle"])
        size = rng.randint(min(width, height) // 8, min(width, height) // 2)
        x, y = rng.randrange(width - size), rng.randrange(height - size)
        if shape == "circle":
            canvas.ellipse([x, y, x + size, y + size], fill=colour)
        elif shape == "square":
            canvas.rectangle([x, y, x + size, y + size], fill=colour)
        else:
            canvas.polygon([(x, y + size), (x + size // 2, y), (x + size, y + size)], fill=colour)
        tags.append(f"{name} {shape}")
    noise = Image.effect_noise((width, height), rng.uniform(10, 40)).convert("RGB")
    image = Image.blend(image, noise, 0.15)
    name = f"{index:06d}"
    image.save(out_dir / f"{name}.jpg", quality=quality)
    caption = ", ".join(tags + [rng.choice(["gradient background", "noisy", "abstract"])])
    (out_dir / f"{name}.txt").write_text(caption + "\n")
    return width * height


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--shapes", default="512x512,576x448,448x576,640x384")
    parser.add_argument("--scale", default="1.0:1.4")
    parser.add_argument("--processes", type=int, default=0, help="0: one per core")
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    low, high = (float(v) for v in args.scale.split(":"))
    facts = {"count": args.count, "shapes": args.shapes, "scale": args.scale, "quality": args.quality}
    stamp = args.out_dir / "COMPLETE"
    if stamp.exists() and json.loads(stamp.read_text() or "null") == facts:
        print(json.dumps(dict(facts, reused=True)))
        return 0
    images = args.out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    started = time.time()
    jobs = []
    for index in range(args.count):
        width, height = shapes[index % len(shapes)]
        factor = random.Random(1_000_000 + index).uniform(low, high)
        jobs.append((index, int(width * factor), int(height * factor), images, args.quality))
    processes = args.processes or os.cpu_count() or 1
    with Pool(processes) as pool:
        pixels = sum(pool.imap_unordered(draw, jobs, chunksize=8))
    stamp.write_text(json.dumps(facts))
    size = sum(path.stat().st_size for path in images.glob("*.jpg"))
    print(
        json.dumps(
            dict(
                facts,
                seconds=round(time.time() - started, 1),
                megapixels_mean=round(pixels / args.count / 1e6, 3),
                jpeg_bytes_mean=size // max(1, args.count),
            )
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
