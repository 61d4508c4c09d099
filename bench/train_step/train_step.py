#!/usr/bin/env python3
"""PyTorch-eager baseline of one diffusion training step (forward, backward, AdamW) of a small
SD-topology UNet on CPU: diffusers' UNet2DConditionModel, DDPMScheduler.add_noise with one
timestep per sample, epsilon MSE loss, torch.optim.AdamW with its defaults (on CPU that is the
for-each-parameter implementation; --fused-adamw uses the fused CPU kernel instead).

arbor's `cargo bench -p arbor-worker --bench train_step` runs this script with the same UNet
config, shapes and thread count, and prints both timings side by side.

    train_step.py --config UNET_CONFIG.json --batch 2 --size 32 --context-len 77 \
        --steps 10 --warmup 3 --threads 2

prints one JSON line: {"median_ms":…, "mean_ms":…, "min_ms":…, "times_ms":[…], "steps":…,
"loss":…, "parameters":…, "parameter_tensors":…}
"""

import argparse
import json
import statistics
import sys
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--context-len", type=int, default=77)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--fused-adamw", action="store_true")
    args = parser.parse_args()

    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(args.config) as handle:
        config = json.load(handle)
    unet = UNet2DConditionModel.from_config(config).train()
    # the same attention kernel as arbor: libtorch's scaled_dot_product_attention
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, fused=args.fused_adamw or None)
    generator = torch.Generator().manual_seed(1)
    channels = config.get("in_channels", 4)
    latents = torch.randn(args.batch, channels, args.size, args.size, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    context = torch.randn(args.batch, args.context_len, config["cross_attention_dim"], generator=generator)
    timesteps = torch.randint(0, 1000, (args.batch,), generator=generator)

    def step():
        optimizer.zero_grad(set_to_none=True)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, context).sample
        loss = torch.nn.functional.mse_loss(prediction, noise, reduction="mean")
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    loss = 0.0
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        times.append((time.perf_counter() - start) * 1000.0)
    print(
        json.dumps(
            {
                "median_ms": statistics.median(times),
                "mean_ms": statistics.fmean(times),
                "min_ms": min(times),
                "times_ms": times,
                "steps": args.steps,
                "loss": loss,
                "parameters": sum(p.numel() for p in unet.parameters()),
                "parameter_tensors": sum(1 for _ in unet.parameters()),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
