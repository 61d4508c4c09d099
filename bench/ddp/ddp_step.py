#!/usr/bin/env python3
"""PyTorch DDP baseline of one data-parallel diffusion training step on CPU: 2 (--world) ranks
spawned with torch.multiprocessing (no torchrun), init_process_group("gloo") over a TCPStore on
127.0.0.1, diffusers' UNet2DConditionModel (the small SD-topology UNet of
bench/train_step/sd_bench_unet.py) wrapped in DistributedDataParallel with its defaults
(bucket_cap_mb=25, the all-reduce overlapped with backward by c10d's Reducer), epsilon MSE loss,
clip_grad_norm_ (--max-grad-norm, 0 = off) and torch.optim.AdamW (weight decay 0.01,
fused=True: torch's fused kernel on CPU and CUDA, as arbor's AdamW uses). Each rank trains on its
own batch (seeded by rank).

arbor's `cargo bench -p arbor-worker --bench ddp_step` runs this script with the same UNet config,
shapes, thread count and step count, and prints both timings side by side.

    ddp_step.py --config UNET_CONFIG.json --world 2 --batch 2 --size 32 --context-len 77 \
        --steps 10 --warmup 3 --threads 1 [--port P] [--height H --width W]
        [--device cuda [--bf16]]

--device cuda puts rank R on GPU R with backend nccl; --bf16 runs the forward under
torch.autocast(bfloat16) (fp32 weights and optimizer, as diffusers' mixed-precision training);
on CUDA the phase boundaries synchronize the device.

Step times are rank 0's (DDP keeps ranks in lockstep); each step is split into forward,
backward (which includes the overlapped all-reduce) and optimizer (clip + AdamW + zero_grad).
With --compute-only the same steps run under DDP's no_sync() (no all-reduce at all), to show
what the all-reduce costs.

prints one JSON line: {"median_ms":…, "mean_ms":…, "min_ms":…, "times_ms":[…],
"forward_ms":…, "backward_ms":…, "optimizer_ms":… (medians), "steps":…, "loss":…,
"parameters":…, "parameter_tensors":…, "world":…, "threads":…}
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train_step"))

from sd_bench_unet import build_unet, diffusion_loss, random_batch, sd1_scheduler  # noqa: E402


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_main(rank, args, results):
    torch.set_num_threads(args.threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if args.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=rank,
        world_size=args.world,
    )
    # the same weights on every rank (DDP would broadcast rank 0's anyway)
    torch.manual_seed(0)
    unet, config = build_unet(args.config)
    unet = unet.to(device)
    model = torch.nn.parallel.DistributedDataParallel(
        unet, device_ids=[rank] if args.device == "cuda" else None
    )
    scheduler = sd1_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, fused=True)
    latents, noise, context, timesteps = random_batch(
        config, args.batch, args.height, args.width, args.context_len, seed=1 + rank, device=device
    )

    def synchronize():
        if args.device == "cuda":
            torch.cuda.synchronize(device)

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and args.device == "cuda"):
            loss = diffusion_loss(model, scheduler, latents, noise, context, timesteps)
        return loss.float()

    def step():
        started = time.perf_counter()
        if args.compute_only:
            with model.no_sync():
                loss = forward()
                synchronize()
                forward_done = time.perf_counter()
                loss.backward()
        else:
            loss = forward()
            synchronize()
            forward_done = time.perf_counter()
            loss.backward()
        synchronize()
        backward_done = time.perf_counter()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        done = time.perf_counter()
        return value, (
            (done - started) * 1000.0,
            (forward_done - started) * 1000.0,
            (backward_done - forward_done) * 1000.0,
            (done - backward_done) * 1000.0,
        )

    for _ in range(args.warmup):
        step()
    dist.barrier()
    phases = []
    loss = 0.0
    for _ in range(args.steps):
        loss, timing = step()
        phases.append(timing)
    dist.barrier()
    if rank == 0:
        times = [phase[0] for phase in phases]
        results.put(
            {
                "median_ms": statistics.median(times),
                "mean_ms": statistics.fmean(times),
                "min_ms": min(times),
                "times_ms": times,
                "forward_ms": statistics.median(phase[1] for phase in phases),
                "backward_ms": statistics.median(phase[2] for phase in phases),
                "optimizer_ms": statistics.median(phase[3] for phase in phases),
                "steps": args.steps,
                "loss": loss,
                "parameters": sum(p.numel() for p in unet.parameters()),
                "parameter_tensors": sum(1 for _ in unet.parameters()),
                "world": args.world,
                "threads": args.threads,
                "compute_only": args.compute_only,
            }
        )
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="per rank")
    parser.add_argument("--size", type=int, default=None, help="square latents (sets both)")
    parser.add_argument("--height", type=int, default=32, help="latent height")
    parser.add_argument("--width", type=int, default=32, help="latent width")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--context-len", type=int, default=77)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--compute-only", action="store_true")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free one")
    args = parser.parse_args()
    if args.world < 1 or args.steps < 1:
        parser.error("--world and --steps must be at least 1")
    if args.size is not None:
        args.height = args.width = args.size
    if args.port == 0:
        args.port = free_port()

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    processes = [context.Process(target=rank_main, args=(rank, args, results)) for rank in range(args.world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [process.exitcode for process in processes if process.exitcode != 0]
    if failed:
        print(f"ddp_step: a rank exited with {failed}", file=sys.stderr)
        return 1
    if results.empty():
        print("ddp_step: rank 0 reported nothing", file=sys.stderr)
        return 1
    print(json.dumps(results.get()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
