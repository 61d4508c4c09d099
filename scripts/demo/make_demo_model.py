#!/usr/bin/env python3
"""Builds a small Stable Diffusion 1.x-topology model with random weights, offline.

    make_demo_model.py OUT_DIR [--preset demo|tiny] [--seed S]

writes a diffusers folder (model_index.json, tokenizer/, text_encoder/, unet/, vae/, scheduler/)
and then OUT_DIR/COMPLETE holding the preset, and prints the preset's facts as JSON on its last
line (the hypernetwork sizes a job needs: the cross-attention width and the attention block
widths). No hub download happens: the components come from diffusers/transformers configs with
random init, and the tokenizer is CLIP's real 49408-token BPE derived from open-clip-torch's
bpe_simple_vocab_16e6.txt.gz (the same derivation as worker/tests/fixtures/make_fixtures.py).

Presets (SD1 topology scaled down: CrossAttn down blocks then a plain one, mirrored up blocks; a
VAE with 4 blocks, so latents are 1/8 of the image size as in SD1):
    demo  UNet widths (32, 64, 64), 2 layers per block, CLIP width 48 (3 layers); for images of
          about 128x128 on a CPU
    tiny  UNet widths (32, 32, 32), 1 layer per block, CLIP width 16 (2 layers); for the
          multi-process tests on 32..128-pixel images
An existing complete folder of the same preset and seed is left as it is.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "worker" / "tests" / "fixtures"))
from make_fixtures import BOS, EOS, write_clip_vocab  # noqa: E402

PRESETS = {
    "demo": {
        "unet_widths": (32, 64, 64),
        "unet_layers_per_block": 2,
        "clip_width": 48,
        "clip_layers": 3,
        "vae_widths": (16, 32, 32, 32),
        "vae_groups": 16,
    },
    "tiny": {
        "unet_widths": (32, 32, 32),
        "unet_layers_per_block": 1,
        "clip_width": 16,
        "clip_layers": 2,
        "vae_widths": (8, 16, 16, 16),
        "vae_groups": 8,
    },
}


def build(out_dir: Path, preset_name: str, seed: int):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    preset = PRESETS[preset_name]
    scratch = out_dir.parent / f".{out_dir.name}.tokenizer-src"
    write_clip_vocab(scratch)
    tokenizer = CLIPTokenizer(
        vocab=str(scratch / "vocab.json"),
        merges=str(scratch / "merges.txt"),
        pad_token="<|endoftext|>",
    )
    tokenizer.model_max_length = 77

    torch.manual_seed(seed)
    clip_width = preset["clip_width"]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=clip_width,
            intermediate_size=2 * clip_width,
            num_hidden_layers=preset["clip_layers"],
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=clip_width,
            bos_token_id=BOS,
            eos_token_id=EOS,
            pad_token_id=1,
        )
    ).eval()

    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=preset["unet_widths"],
        layers_per_block=preset["unet_layers_per_block"],
        attention_head_dim=8,
        cross_attention_dim=clip_width,
        norm_num_groups=32,
    ).eval()

    vae_widths = preset["vae_widths"]
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_widths),
        up_block_types=("UpDecoderBlock2D",) * len(vae_widths),
        block_out_channels=vae_widths,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=preset["vae_groups"],
        sample_size=128,
        scaling_factor=0.18215,
    ).eval()

    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        (scratch / name).unlink()
    scratch.rmdir()


def facts(preset_name: str, seed: int):
    preset = PRESETS[preset_name]
    widths = sorted(set(preset["unet_widths"][:2]))  # the widths of the CrossAttn blocks
    return {
        "preset": preset_name,
        "seed": seed,
        "version": 1,
        "cross_attention_dim": preset["clip_width"],
        # A1111 picks a hypernetwork module by the context width: the cross-attention width
        # covers every cross-attention layer, the block widths every self-attention layer.
        "hypernetwork_sizes": [preset["clip_width"]] + [w for w in widths if w != preset["clip_width"]],
        "vae_scale_factor": 2 ** (len(preset["vae_widths"]) - 1),
        "latent_multiple": 2 ** (len(preset["unet_widths"]) - 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    wanted = facts(args.preset, args.seed)
    stamp = args.out_dir / "COMPLETE"
    if stamp.exists() and json.loads(stamp.read_text() or "null") == wanted:
        print(f"model already in {args.out_dir}", file=sys.stderr)
    else:
        if stamp.exists():
            stamp.unlink()
        build(args.out_dir, args.preset, args.seed)
        stamp.write_text(json.dumps(wanted))
        print(f"wrote the {args.preset} model to {args.out_dir}", file=sys.stderr)
    print(json.dumps(wanted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
