#!/usr/bin/env python3
"""PyTorch-eager baseline of one diffusion training step (forward, backward, AdamW) of a small
SD-topology UNet on CPU: diffusers' UNet2DConditionModel, DDPMScheduler.add_noise with one
timestep per sample, epsilon MSE loss, torch.optim.AdamW(fused=True) (torch's fused CPU kernel,
as arbor's AdamW uses; --single-tensor-adamw runs torch's CPU default instead, the single-tensor
implementation, parameter by parameter and op by op).

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
    parser.add_argument(
        "--single-tensor-adamw",
        action="store_true",
        help="torch's unfused CPU default (foreach=False) instead of fused=True",
    )
    args = parser.parse_args()

    from sd_bench_unet import build_unet, diffusion_loss, random_batch, sd1_scheduler

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet, config = build_unet(args.config)
    scheduler = sd1_scheduler()
    if args.single_tensor_adamw:
        optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, foreach=False)
    else:
        optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, fused=True)
    latents, noise, context, timesteps = random_batch(
        config, args.batch, args.size, args.size, args.context_len, seed=1
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = diffusion_loss(unet, scheduler, latents, noise, context, timesteps)
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
