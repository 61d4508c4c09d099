#!/usr/bin/env python3
"""Compares `arbor-worker probe --device D` outputs with the CPU goldens of the parity fixture
(worker/tests/fixtures/make_fixtures.py), for the GPU check (check.sh).

    parity.py --fixtures DIR --probe-out FILE --device cuda [--reference] > result.json

Metrics are the worker's parity tests' (worker/tests/it/model_fixtures.rs): forward outputs by max abs
error (tolerance 1e-4), gradients (`train.grad.*`) by max abs error relative to
max(|golden|.max(), 1e-4) (tolerance 1e-3). Those tolerances hold CPU against CPU. On a GPU,
PyTorch itself departs from its CPU results (cuDNN convolutions run in TF32 by default, in
libtorch as in PyTorch; other kernels sum in other orders), so with --reference the fixture's own
generator (make_fixtures.compute_goldens, with the node's diffusers/transformers loading the
fixture model) runs on the device and on the CPU, and a name passes when arbor's error against
the golden is within the CPU tolerance or within 4x PyTorch's device effect for that name (its
device output against its own CPU output; never more than 100x the tolerance). The node's
packages may load the fixture differently from the versions that made it (transformers 5.0
reads a 5.2x CLIP checkpoint's keys otherwise): such names are listed as `reference_skew` and
loosen nothing. Prints one JSON line; exit status 1 when a name fails or is missing.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

FORWARD_ATOL = 1e-4
GRAD_RTOL = 1e-3
GRAD_SCALE_FLOOR = 1e-4
REFERENCE_FACTOR = 4.0
CEILING_FACTOR = 100.0


def error_of(name, actual, golden):
    if tuple(actual.shape) != tuple(golden.shape):
        return math.inf
    if golden.numel() == 0:
        return 0.0
    difference = (actual.double() - golden.double()).abs().max().item()
    if name.startswith("train.grad."):
        return difference / max(golden.abs().max().item(), GRAD_SCALE_FLOOR)
    return difference


def tolerance_of(name):
    return GRAD_RTOL if name.startswith("train.grad.") else FORWARD_ATOL


def reference_outputs(fixtures: Path, device: str):
    """The fixture generator's outputs for the same inputs, computed on `device`."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    here = Path(__file__).resolve().parent
    # the bundle carries the fixture script beside this one; in the repository it is in worker/
    sys.path[:0] = [str(here), str(here.parents[1] / "worker" / "tests" / "fixtures")]
    from make_fixtures import compute_goldens

    model = fixtures / "model"
    text_encoder = CLIPTextModel.from_pretrained(str(model / "text_encoder")).eval().to(device)
    unet = UNet2DConditionModel.from_pretrained(str(model / "unet")).eval().to(device)
    vae = AutoencoderKL.from_pretrained(str(model / "vae")).eval().to(device)
    scheduler = DDPMScheduler.from_pretrained(str(model / "scheduler"))
    inputs = {name: tensor.to(device) for name, tensor in load_file(str(fixtures / "inputs.safetensors")).items()}
    outputs = compute_goldens(text_encoder, unet, vae, scheduler, inputs)
    return {name: tensor.detach().to("cpu") for name, tensor in outputs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--fixtures", type=Path, required=True)
    parser.add_argument("--probe-out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reference", action="store_true", help="also run PyTorch on --device")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file

    goldens = load_file(str(args.fixtures / "goldens.safetensors"))
    actual = load_file(str(args.probe_out))
    reference, reference_cpu = {}, {}
    reference_error = None
    if args.reference:
        try:
            reference = reference_outputs(args.fixtures, args.device)
            reference_cpu = reference if args.device == "cpu" else reference_outputs(args.fixtures, "cpu")
        except Exception as error:  # the comparison still stands on the CPU tolerances
            reference, reference_cpu = {}, {}
            reference_error = f"{type(error).__name__}: {error}"
    skew = sorted(
        name for name in reference_cpu
        if name in goldens and error_of(name, reference_cpu[name], goldens[name]) > tolerance_of(name)
    )
    missing = sorted(set(goldens) - set(actual))
    failures = []
    worst = {"forward": (0.0, None), "gradient": (0.0, None)}
    worst_reference = {"forward": 0.0, "gradient": 0.0}
    for name in sorted(set(goldens) & set(actual)):
        kind = "gradient" if name.startswith("train.grad.") else "forward"
        error = error_of(name, actual[name], goldens[name])
        tolerance = tolerance_of(name)
        allowed = tolerance
        if name in reference and name in reference_cpu:
            device_effect = error_of(name, reference[name], reference_cpu[name])
            worst_reference[kind] = max(worst_reference[kind], device_effect)
            allowed = min(max(tolerance, REFERENCE_FACTOR * device_effect), CEILING_FACTOR * tolerance)
        if error > worst[kind][0] or worst[kind][1] is None:
            worst[kind] = (error, name)
        if not error <= allowed:
            failures.append({"name": name, "error": error, "allowed": allowed})
    result = {
        "device": args.device,
        "compared": len(set(goldens) & set(actual)),
        "goldens": len(goldens),
        "missing": missing,
        "failures": failures[:20],
        "failure_count": len(failures),
        "worst_forward_abs_error": worst["forward"][0],
        "worst_forward_name": worst["forward"][1],
        "worst_gradient_rel_error": worst["gradient"][0],
        "worst_gradient_name": worst["gradient"][1],
        "train_loss": float(actual["train.loss"].item()) if "train.loss" in actual else None,
        "golden_train_loss": float(goldens["train.loss"].item()) if "train.loss" in goldens else None,
        "pytorch_same_device": bool(reference),
        "pytorch_worst_forward_abs_error": worst_reference["forward"] if reference else None,
        "pytorch_worst_gradient_rel_error": worst_reference["gradient"] if reference else None,
        "reference_error": reference_error,
        "reference_skew": skew[:20],
        "reference_skew_count": len(skew),
        "ok": not missing and not failures,
    }
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
