#!/usr/bin/env python3
"""The GPU check's PyTorch side (check.sh): the UNet's training FLOPs, and diffusers' training step
as examples/text_to_image/train_text_to_image.py takes it.

    diffusers_baseline.py flops --model DIR --shapes 64x64,56x72 [--context 77] [--device meta]
        training FLOPs (forward + backward, weight gradients included) of the model's UNet for one
        image of each latent shape HxW, counted with torch.utils.flop_counter.FlopCounterMode on
        `meta` tensors (shapes only, nothing is computed). One JSON line:
        {"flops_per_image": {"64x64": 2.41e12, …}}

    diffusers_baseline.py train --model DIR --batch B --buckets WxH,WxH,… --warmup W --steps S
        [--device cuda] [--precision bf16|fp32] [--lr 1e-4] [--weight-decay 0.01]
        [--max-grad-norm 1.0] [--time-phases-every 10] [--seed 0]
        train_text_to_image.py's step: the VAE and the text encoder frozen, in bf16 (the
        `weight_dtype` of --mixed_precision bf16; fp32 with --precision fp32); the UNet in fp32
        under torch.autocast(bf16), diffusers' default SDPA attention; latents sampled from the
        VAE's posterior times its scaling factor; DDPMScheduler noise; epsilon MSE in fp32;
        clip_grad_norm_ (--max-grad-norm); torch.optim.AdamW(fused=True), zero_grad(set_to_none).
        Batch i has the image size of --buckets[i mod len] (check.sh passes the sizes arbor's run
        trained, in its order). Pixels and token ids are random tensors already on the device: no
        data loading (arbor's images/s includes its loader). Every --time-phases-every-th step
        synchronises at phase boundaries (encode, forward, backward, optimizer) and reads the loss
        back, as arbor's trainer does. One JSON line: images_per_second over the S timed steps,
        phase means, losses, peak memory.
"""

import argparse
import json
import math
import os
import sys
import time


def parse_shapes(text):
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def flops(args):
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = UNet2DConditionModel.load_config(os.path.join(args.model, "unet"))
    with torch.device(args.device):
        unet = UNet2DConditionModel.from_config(config)
    context_dim = unet.config.cross_attention_dim
    results = {}
    for height, width in parse_shapes(args.shapes):
        sample = torch.randn(1, unet.config.in_channels, height, width, device=args.device)
        context = torch.randn(1, args.context, context_dim, device=args.device)
        timesteps = torch.tensor([500], device=args.device)
        with FlopCounterMode(display=False) as counter:
            out = unet(sample, timesteps, context).sample
            out.float().pow(2).mean().backward()
        results[f"{height}x{width}"] = counter.get_total_flops()
        unet.zero_grad(set_to_none=True)
    print(json.dumps({"flops_per_image": results, "latent_shapes": "HxW", "context_tokens": args.context}))
    return 0


def train(args):
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    device = torch.device(args.device)
    bf16 = args.precision == "bf16"
    weight_dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(args.seed)
    started = time.time()
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(device)
    vae = AutoencoderKL.from_pretrained(args.model, subfolder="vae").to(device, dtype=weight_dtype)
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(args.model, "text_encoder")).to(
        device, dtype=weight_dtype
    )
    noise_scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay, eps=1e-8, fused=True
    )
    load_seconds = time.time() - started
    buckets = parse_shapes(args.buckets)
    vocab = text_encoder.config.vocab_size
    # a few distinct random batches per size, made on the device once
    batches = {}
    for width, height in sorted(set(buckets)):
        batches[(width, height)] = [
            (
                torch.rand(args.batch, 3, height, width, device=device) * 2 - 1,
                torch.randint(0, vocab, (args.batch, 77), device=device),
            )
            for _ in range(2)
        ]

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(index, timed):
        marks = [time.perf_counter()]

        def lap():
            if timed:
                synchronize()
                marks.append(time.perf_counter())

        width, height = buckets[index % len(buckets)]
        pixel_values, input_ids = batches[(width, height)][index % 2]
        with torch.no_grad():
            latents = vae.encode(pixel_values.to(weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
        lap()
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device
        ).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        lap()
        loss.backward()
        lap()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lap()
        phases = None
        if timed:
            phases = {
                name: marks[i + 1] - marks[i]
                for i, name in enumerate(["encode", "forward", "backward", "optimizer"])
            }
        return loss, phases, args.batch

    losses = []
    for index in range(args.warmup):
        loss, _, _ = step(index, False)
    if args.warmup:
        losses.append(loss.item())
    synchronize()
    phase_records = []
    images = 0
    t0 = time.perf_counter()
    for index in range(args.warmup, args.warmup + args.steps):
        timed = args.time_phases_every > 0 and (index + 1) % args.time_phases_every == 0
        loss, phases, count = step(index, timed)
        images += count
        if phases:
            phase_records.append(phases)
            losses.append(loss.item())
    synchronize()
    seconds = time.perf_counter() - t0
    losses.append(loss.item())
    means = {}
    if phase_records:
        for name in phase_records[0]:
            means[name] = sum(record[name] for record in phase_records) / len(phase_records)
    result = {
        "images_per_second": images / seconds,
        "timed_steps": args.steps,
        "timed_seconds": seconds,
        "step_seconds_mean": seconds / max(1, args.steps),
        "phase_seconds_mean": means,
        "phase_steps": len(phase_records),
        "batch": args.batch,
        "buckets": sorted({f"{w}x{h}" for w, h in buckets}),
        "precision": args.precision,
        "losses": losses,
        "loss_finite": all(math.isfinite(value) for value in losses),
        "load_seconds": load_seconds,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        # since the start, as arbor's peak_memory_bytes
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(result))
    return 0 if result["loss_finite"] else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    count = commands.add_parser("flops")
    count.add_argument("--model", required=True)
    count.add_argument("--shapes", required=True, help="latent shapes HxW, comma-separated")
    count.add_argument("--context", type=int, default=77)
    count.add_argument("--device", default="meta")
    step = commands.add_parser("train")
    step.add_argument("--model", required=True)
    step.add_argument("--batch", type=int, required=True)
    step.add_argument("--buckets", required=True, help="image sizes WxH, comma-separated, in step order")
    step.add_argument("--warmup", type=int, default=20)
    step.add_argument("--steps", type=int, default=50)
    step.add_argument("--device", default="cuda")
    step.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    step.add_argument("--lr", type=float, default=1e-4)
    step.add_argument("--weight-decay", type=float, default=0.01)
    step.add_argument("--max-grad-norm", type=float, default=1.0)
    step.add_argument("--time-phases-every", type=int, default=10)
    step.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return flops(args) if args.command == "flops" else train(args)


if __name__ == "__main__":
    sys.exit(main())
