#!/usr/bin/env python3
"""Builds a Stable Diffusion 1.x diffusers folder with random weights, offline (no hub), for the
GPU check (check.sh): diffusers (carried by the bundle) + transformers (on the node).

    make_model.py OUT_DIR --tokenizer DIR [--preset sd15|tiny] [--device cuda|cpu] [--seed S]

sd15: SD1.5's own component configs (runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/
      (CLIP ViT-L/14's text tower), scheduler/), written out literally below; 860 M UNet
      parameters, saved in fp32 as safetensors (about 4.3 GB in all).
tiny: the same topology scaled down for the CPU smoke run (UNet widths 32/32/32, CLIP width 16).

The tokenizer is the vocab.json + merges.txt folder the bundle carries (CLIP's 49408-token BPE,
derived by worker/tests/fixtures/make_fixtures.py). Weights are initialised on --device (fast on a
GPU) and saved from there. Prints one JSON line of facts (parameter counts, seconds).
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# SD1.5's unet/config.json (diffusers 0.6 era keys; the rest are diffusers' defaults).
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

# SD1.5's vae/config.json.
SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}

# SD1.5's text_encoder/config.json (openai/clip-vit-large-patch14's text model).
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# SD1.5's scheduler/scheduler_config.json.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SD15_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": [None, None],
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def tiny_configs():
    unet = dict(SD15_UNET)
    unet.update(
        block_out_channels=[32, 32, 32],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
        cross_attention_dim=16,
        sample_size=16,
    )
    vae = dict(SD15_VAE)
    vae.update(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=128)
    text = dict(SD15_TEXT)
    text.update(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    return unet, vae, text


def build(out_dir: Path, tokenizer_dir: Path, preset: str, device: str, seed: int):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset == "sd15":
        unet_config, vae_config, text_config = SD15_UNET, SD15_VAE, SD15_TEXT
    else:
        unet_config, vae_config, text_config = tiny_configs()
    staging = out_dir.parent / f".{out_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    counts = {}
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        counts[name] = sum(parameter.numel() for parameter in module.parameters())
        module.save_pretrained(str(staging / name), safe_serialization=True)
    (staging / "scheduler").mkdir()
    (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2))
    (staging / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tokenizer_dir / name, staging / "tokenizer" / name)
    (staging / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            },
            indent=2,
        )
    )
    (staging / "model_index.json").write_text(json.dumps(SD15_MODEL_INDEX, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with vocab.json + merges.txt")
    parser.add_argument("--preset", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    counts = build(args.out_dir, args.tokenizer, args.preset, args.device, args.seed)
    print(json.dumps({"preset": args.preset, "parameters": counts, "seconds": round(time.time() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
