"""Storage of arbor's latent cache, computed from the shapes and the index format
(worker/data/src/latent_cache.rs): bytes per cached item for SD1.5 (4 latent channels, stored as
mean and log-variance in f16) at a few buckets and source aspect ratios, and the size of the
JSON index per 10^6 items.

    python bench/latent_cache/storage.py
"""

import hashlib
import json
import math

LATENT_CHANNELS = 4  # SD1.x's VAE
BYTES_PER_VALUE = 2  # f16


def encoded_size(width, height, bucket_width, bucket_height):
    """The cover-resized size cut to a multiple of 8 (common/src/crop.rs, LatentGeometry)."""
    scale = max(bucket_width / width, bucket_height / height)
    resized = (max(bucket_width, round(width * scale)), max(bucket_height, round(height * scale)))
    return resized, (resized[0] // 8 * 8, resized[1] // 8 * 8)


def entry_bytes(encoded):
    return 2 * LATENT_CHANNELS * (encoded[0] // 8) * (encoded[1] // 8) * BYTES_PER_VALUE


def index_entry(number, resized, encoded, offset):
    key = hashlib.sha256(str(number).encode()).hexdigest()
    length = entry_bytes(encoded)
    return {
        "key": key,
        "offset": offset,
        "length": length,
        "shape": [2 * LATENT_CHANNELS, encoded[1] // 8, encoded[0] // 8],
        "resized_width": resized[0],
        "resized_height": resized[1],
    }


def main():
    print("bytes per cached item (SD1.5, f16 mean + logvar):")
    for bucket in [(512, 512), (768, 512)]:
        for source in [bucket, (4032, 3024), (1080, 1920)]:
            resized, encoded = encoded_size(*source, *bucket)
            print(
                f"  bucket {bucket[0]}x{bucket[1]}, image {source[0]}x{source[1]}: "
                f"encoded {encoded[0]}x{encoded[1]}, {entry_bytes(encoded)} bytes "
                f"({entry_bytes(encoded) / 1024:.1f} KiB)"
            )
    # One pack per batch of 32 latents, as the trainer writes them: the index objects' bytes.
    items = 10_000
    per_pack = 32
    total = 0
    for first in range(0, items, per_pack):
        entries = []
        offset = 8 + 4096
        for number in range(first, min(items, first + per_pack)):
            resized, encoded = encoded_size(4032, 3024, 512, 512)
            entries.append(index_entry(number, resized, encoded, offset))
            offset += entries[-1]["length"]
        index = {
            "format": "arbor-latent-cache/v1",
            "pack": f"v1/packs/{1_700_000_000_000_000_000 + first:020}-e0-r0-b{first}-1234-5678.safetensors",
            "dtype": "F16",
            "entries": entries,
        }
        total += len(json.dumps(index, separators=(",", ":")))
    per_million = total / items * 1e6
    print(
        f"index: {total / items:.0f} bytes per item, {per_million / 2**20:.0f} MiB per 10^6 items "
        f"({math.ceil(1e6 / per_pack)} index objects of {per_pack} entries)"
    )


if __name__ == "__main__":
    main()
