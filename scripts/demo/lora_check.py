#!/usr/bin/env python3
"""Proves the demo's LoRA loads in diffusers, for scripts/demo.sh.

    lora_check.py --model DIR --lora FILE [--seed S]

DIR is the diffusers folder the lora phase trained on, FILE its exports/lora.safetensors. Writes
a random UNet input (unet.sample [2,4,16,16], unet.timesteps [2] int64,
unet.encoder_hidden_states [2,77,D], D the UNet's cross_attention_dim) to a temporary folder and
runs worker/tests/fixtures/check_lora.py check on it: every kohya module of FILE must resolve to
a Linear/Conv2d of the model, StableDiffusionPipeline.load_lora_weights (peft) must load them all
without a warning, and its UNet output (unfused and fused) must match an independent merge with
kohya's math. Then the LoRA's UNet output must differ from the base model's (a LoRA whose
lora_up weights are still zero would change nothing). Prints one line:

    lora: FILE loads in diffusers (N modules, UNet output changed by X)

and exits 0; otherwise prints what failed and exits 1.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECK_LORA = REPO_ROOT / "worker" / "tests" / "fixtures" / "check_lora.py"


def shown(path: Path) -> str:
    """The path relative to the working directory when it lies below it (demo/runs/...)."""
    relative = os.path.relpath(path.resolve())
    return str(path) if relative.startswith("..") else relative


def write_inputs(model: Path, out: Path, seed: int):
    from safetensors.torch import save_file

    config = json.loads((model / "unet" / "config.json").read_text())
    width = int(config["cross_attention_dim"])
    generator = torch.Generator().manual_seed(seed)
    batch = 2
    save_file(
        {
            "unet.sample": torch.randn(batch, 4, 16, 16, generator=generator),
            "unet.timesteps": torch.tensor([100, 700], dtype=torch.int64),
            "unet.encoder_hidden_states": torch.randn(batch, 77, width, generator=generator),
        },
        str(out),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--lora", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.lora.is_file():
        print(f"lora: {shown(args.lora)} is missing", file=sys.stderr)
        return 1

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="arbor-demo-lora-") as scratch:
        inputs = Path(scratch) / "inputs.safetensors"
        outputs = Path(scratch) / "outputs.safetensors"
        write_inputs(args.model, inputs, args.seed)
        check = subprocess.run(
            [sys.executable, str(CHECK_LORA), "check", "--model", str(args.model), "--lora",
             str(args.lora), "--inputs", str(inputs), "--out", str(outputs)],
            capture_output=True,
            text=True,
        )
        lines = check.stdout.strip().splitlines()
        try:
            report = json.loads(lines[-1]) if lines else None
        except ValueError:
            report = None
        if check.returncode != 0 or report is None:
            problems = [line for line in check.stderr.splitlines() if line.startswith("check_lora:")]
            detail = "; ".join(problems) or (check.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"lora: {shown(args.lora)} did not pass check_lora.py (exit {check.returncode}): {detail}",
                  file=sys.stderr)
            return 1
        out = load_file(str(outputs))

    base = out["base.unet.out"]
    change = (out["diffusers.unet.out"] - base).abs().max().item()
    agreement = report["max_abs_diff"]["unet.out"]["diffusers_vs_reference"]
    if not change > 0:
        print(f"lora: {shown(args.lora)} loads in diffusers ({report['unet_modules']} modules) but leaves "
              "the UNet output unchanged (were its lora_up weights trained?)", file=sys.stderr)
        return 1
    print(
        f"lora: {shown(args.lora)} loads in diffusers ({report['unet_modules']} modules, UNet output "
        f"changed by {change:.2e} max abs, within {agreement:.0e} of kohya's merge)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
