#!/usr/bin/env python3
"""PyTorch/PEFT baseline of one LoRA training step (forward, backward, AdamW) of a small
SD-topology UNet on CPU, as diffusers' examples/text_to_image/train_text_to_image_lora.py trains
it: the UNet frozen (unet.requires_grad_(False)), a PEFT LoraConfig(r=rank, lora_alpha=rank,
init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]) added with
unet.add_adapter, the LoRA parameters the only trainable ones, fresh noise and one random
timestep per sample each step, DDPMScheduler.add_noise, F.mse_loss(model_pred.float(),
target.float()) against the noise (epsilon), backward, optimizer.step, zero_grad. PyTorch's
fastest ordinary settings: torch.optim.AdamW(fused=True) (torch's fused CPU kernel, as arbor's
AdamW uses), diffusers' SDPA attention processor (AttnProcessor2_0). The diffusers script's
gradient clipping (max_grad_norm) and learning-rate scheduler are left out, as on arbor's side.
After the timed steps, --profile-steps more steps are timed phase by phase: forward (noise, UNet,
loss), backward, and optimizer.step + zero_grad.

arbor's `cargo bench -p arbor-worker --bench lora_step` runs this script with the same UNet
config, shapes, LoRA rank and thread count, and prints both timings side by side.

    lora_step.py --config UNET_CONFIG.json --rank 16 --batch 2 --size 32 --context-len 77 \
        --steps 10 --warmup 3 --threads 2 [--profile-steps 3]

prints one JSON line: {"median_ms":…, "mean_ms":…, "min_ms":…, "times_ms":[…], "steps":…,
"loss":…, "lora_modules":…, "lora_parameters":…, "lora_parameter_tensors":…,
"unet_parameter_tensors":…}, and with --profile-steps "forward_ms":…, "backward_ms":…,
"optimizer_ms":… (medians)
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train_step"))

from sd_bench_unet import build_unet, random_batch, sd1_scheduler  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--context-len", type=int, default=77)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--profile-steps", type=int, default=0)
    parser.add_argument(
        "--save-to",
        help="write the UNet's initial weights (DIR/unet.safetensors) and the batch "
        "(DIR/batch.safetensors: latents, context) and exit, so arbor's side trains the same "
        "weights on the same batch",
    )
    args = parser.parse_args()

    from peft import LoraConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet, config = build_unet(args.config)
    initial_weights = {name: tensor.detach().clone() for name, tensor in unet.state_dict().items()}
    noise_scheduler = sd1_scheduler()
    unet.requires_grad_(False)
    unet_lora_config = LoraConfig(
        r=args.rank,
        lora_alpha=args.rank,
        init_lora_weights="gaussian",
        target_modules=["to_k", "to_q", "to_v", "to_out.0"],
    )
    unet.add_adapter(unet_lora_config)
    lora_layers = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    lora_modules = sum(1 for name, _ in unet.named_modules() if name.endswith(".lora_A.default"))
    optimizer = torch.optim.AdamW(
        lora_layers, lr=args.lr, weight_decay=args.weight_decay, fused=True
    )
    latents, _, encoder_hidden_states, _ = random_batch(
        config, args.batch, args.size, args.size, args.context_len, seed=1
    )
    if args.save_to:
        from safetensors.torch import save_file

        save_file(
            {name: tensor.contiguous() for name, tensor in initial_weights.items()},
            os.path.join(args.save_to, "unet.safetensors"),
        )
        save_file(
            {"latents": latents.contiguous(), "context": encoder_hidden_states.contiguous()},
            os.path.join(args.save_to, "batch.safetensors"),
        )
        print(json.dumps({"saved": args.save_to}))
        return 0

    def forward():
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)
        ).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")

    def step():
        loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    def profiled_step():
        start = time.perf_counter()
        loss = forward()
        forward_end = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        optimizer_end = time.perf_counter()
        return [
            (forward_end - start) * 1000.0,
            (backward_end - forward_end) * 1000.0,
            (optimizer_end - backward_end) * 1000.0,
        ]

    for _ in range(args.warmup):
        step()
    times = []
    loss = 0.0
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        times.append((time.perf_counter() - start) * 1000.0)
    phases = [profiled_step() for _ in range(args.profile_steps)]
    profile = {}
    if phases:
        for index, name in enumerate(["forward_ms", "backward_ms", "optimizer_ms"]):
            profile[name] = statistics.median(phase[index] for phase in phases)
    print(
        json.dumps(
            {
                "median_ms": statistics.median(times),
                "mean_ms": statistics.fmean(times),
                "min_ms": min(times),
                "times_ms": times,
                "steps": args.steps,
                "loss": loss,
                "lora_modules": lora_modules,
                "lora_parameters": sum(parameter.numel() for parameter in lora_layers),
                "lora_parameter_tensors": len(lora_layers),
                "unet_parameter_tensors": sum(
                    1 for parameter in unet.parameters() if not parameter.requires_grad
                ),
                **profile,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
