#!/usr/bin/env python3
"""The size of arbor's exports/lora.safetensors for SD1.5, computed from the UNet's and CLIP's
shapes (built on torch's meta device: nothing is allocated, nothing is downloaded).

    .venv/bin/python bench/lora_size/lora_size.py [--rank 16] [--conv-rank R]
        [--targets attention,feed_forward,projections,resnet_conv] [--text-encoder]
        [--dtype fp16|bf16|fp32]

kohya's layout: per adapted layer lora_down [r, in(, k, k)], lora_up [out, r(, 1, 1)] and a 0-dim
alpha, all in the save dtype; 3x3 convs (resnet_conv) use --conv-rank.
"""
import argparse

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

# SD1.5's unet/config.json (runwayml/stable-diffusion-v1-5), the fields that shape the layers.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
)
# openai/clip-vit-large-patch14's text config.
SD15_CLIP = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, max_position_embeddings=77)


def unet_role(name, module):
    if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        return None
    if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
        return "attention"
    if ".ff.net." in name:
        return "feed_forward"
    if name.endswith(("proj_in", "proj_out")) and ".attentions." in name:
        return "projections"
    if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3) and (
        ".resnets." in name or "samplers" in name
    ) and name.endswith(("conv1", "conv2", "conv")):
        return "resnet_conv"
    return None


def lora_elements(module, rank):
    if isinstance(module, torch.nn.Linear):
        return rank * (module.in_features + module.out_features)
    kernel = module.kernel_size[0] * module.kernel_size[1]
    return rank * (module.in_channels * kernel + module.out_channels)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--conv-rank", type=int)
    parser.add_argument("--targets", default="attention")
    parser.add_argument("--text-encoder", action="store_true")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    args = parser.parse_args()
    targets = set(args.targets.split(","))
    conv_rank = args.conv_rank or args.rank
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        clip = CLIPTextModel(SD15_CLIP)
    modules = elements = 0
    for name, module in unet.named_modules():
        role = unet_role(name, module)
        if role in targets:
            rank = conv_rank if role == "resnet_conv" else args.rank
            modules += 1
            elements += lora_elements(module, rank)
    if args.text_encoder:
        for name, module in clip.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                modules += 1
                elements += lora_elements(module, args.rank)
    width = 4 if args.dtype == "fp32" else 2
    size = elements * width + modules * width
    print(f"{modules} modules, {elements:,} LoRA parameters, {size / 2**20:.2f} MiB of tensors "
          f"in {args.dtype} (targets {','.join(sorted(targets))}, rank {args.rank}"
          f"{', text encoder' if args.text_encoder else ''})")


if __name__ == "__main__":
    main()
