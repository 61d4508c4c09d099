#!/usr/bin/env python3
"""Python baselines of arbor's loader benchmark, on one core.

Reads a jobs file (JSON Lines: path, resized_width, resized_height, crop_x, crop_y,
bucket_width, bucket_height — the same geometry arbor uses) and does, per image:

  pillow   the typical training-script loader: open -> convert('RGB') -> resize(LANCZOS) to the
           cover size -> crop -> numpy f32 CHW in [-1, 1]
  opencv   imread with IMREAD_REDUCED_COLOR_{2,4,8} (DCT-domain downscaling, the largest factor
           that stays at or above the cover size) -> resize(INTER_AREA) -> crop -> BGR to RGB ->
           f32 CHW in [-1, 1]

Prints one JSON line: {"method", "images", "seconds", "images_per_second"}.
"""
import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def to_chw(rgb):
    return (rgb.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


def load_pillow(job):
    from PIL import Image

    with Image.open(job["path"]) as image:
        image = image.convert("RGB")
        image = image.resize((job["resized_width"], job["resized_height"]), Image.Resampling.LANCZOS)
        x, y = job["crop_x"], job["crop_y"]
        image = image.crop((x, y, x + job["bucket_width"], y + job["bucket_height"]))
        return to_chw(np.asarray(image))


def load_opencv(job):
    import cv2

    width, height = job["width"], job["height"]
    flag = cv2.IMREAD_COLOR
    for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if width // factor >= job["resized_width"] and height // factor >= job["resized_height"]:
            flag = reduced
            break
    image = cv2.imread(job["path"], flag)
    image = cv2.resize(image, (job["resized_width"], job["resized_height"]), interpolation=cv2.INTER_AREA)
    x, y = job["crop_x"], job["crop_y"]
    image = image[y : y + job["bucket_height"], x : x + job["bucket_width"]]
    return to_chw(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=["pillow", "opencv"])
    parser.add_argument("jobs")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if args.method == "opencv":
        import cv2

        cv2.setNumThreads(1)
    load = load_pillow if args.method == "pillow" else load_opencv
    with open(args.jobs) as handle:
        jobs = [json.loads(line) for line in handle if line.strip()]
    load(jobs[0])  # warm-up: imports and first-call setup
    started = time.perf_counter()
    checksum = 0.0
    for _ in range(args.rounds):
        for job in jobs:
            batch = load(job)
            assert batch.shape == (3, job["bucket_height"], job["bucket_width"]), batch.shape
            checksum += float(batch[0, 0, 0])
    seconds = time.perf_counter() - started
    images = len(jobs) * args.rounds
    print(json.dumps({"method": args.method, "images": images, "seconds": seconds, "images_per_second": images / seconds}))


if __name__ == "__main__":
    main()
