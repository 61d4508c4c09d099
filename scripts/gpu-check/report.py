#!/usr/bin/env python3
"""Figures of the GPU check (check.sh) from the files its phases leave behind.

    report.py run --metrics RUN_DIR/metrics.jsonl --warmup N --bsz B [--flops FLOPS.json]
                  [--peak-tflops 989] [--gpus 1] [--smi SMI.csv] [--min-timed-steps 50]
        arbor's run from metrics.jsonl (one record per optimizer step, rank 0): images/s over the
        timed range (records after the warm-up, between the first and the last step that is a
        multiple of the phase-timing interval, where the trainer waited for the device: images
        of the steps in between / the unix_time span), the step-time split (mean of
        phase_seconds over the timed steps that carry it), the data-wait share, the peak of
        peak_memory_bytes, the peak of nvidia-smi's memory.used samples, MFU (the UNet's
        training FLOPs of each step's bucket x its images, over the span, / (GPUs x peak)) and
        whether every loss is finite. One JSON line; exit status 1 when a loss is not finite or
        fewer than --min-timed-steps steps were timed.

    report.py compare --arbor RUN.json --diffusers DIFFUSERS.json
        the ratio of images/s, arbor / diffusers. One JSON line.

    report.py summary KIND FILE.json
        one line of text for the check's table (KIND: machine, parity, tiny, run, diffusers,
        compare, multi).

    report.py buckets --metrics FILE --warmup N
        the image sizes (WxH) of the timed steps in order, comma-separated (for the baseline).
"""

import argparse
import json
import math
import statistics
import sys

PHASES = ["data_wait", "encode", "forward", "backward", "all_reduce", "optimizer"]
GIB = 1024**3


def read_records(path):
    records = []
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    records.sort(key=lambda record: record["step"])
    # a regrouped run may repeat steps: keep the last record of each
    by_step = {record["step"]: record for record in records}
    return [by_step[step] for step in sorted(by_step)]


def latent_key(bucket):
    width, height = (int(v) for v in bucket.split("x"))
    return f"{height // 8}x{width // 8}"


def timed_range(records, warmup, every):
    """The records after the warm-up between two synchronised steps (multiples of `every`)."""
    after = [record for record in records if record["step"] >= warmup]
    if every > 0:
        synced = [record for record in after if record["step"] % every == 0]
        if len(synced) >= 2:
            first, last = synced[0], synced[-1]
            return first, [record for record in after if first["step"] < record["step"] <= last["step"]]
    if len(after) < 2:
        return None, []
    return after[0], after[1:]


def run(args):
    records = read_records(args.metrics)
    flops = {}
    if args.flops:
        with open(args.flops) as handle:
            flops = json.load(handle).get("flops_per_image", {})
    losses = [record.get("loss") for record in records]
    finite = bool(records) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses)
    first, timed = timed_range(records, args.warmup, args.every)
    result = {
        "steps": len(records),
        "last_step": records[-1]["step"] if records else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_finite": finite,
        "world_size": records[-1].get("world_size") if records else None,
        "buckets": sorted({record.get("bucket", "?") for record in records}),
        "timed_steps": len(timed),
    }
    if first is not None and timed:
        world = records[-1].get("world_size") or 1
        images_per_step = args.bsz * world
        span = timed[-1]["unix_time"] - first["unix_time"]
        images = images_per_step * len(timed)
        result["timed_from_step"] = first["step"]
        result["timed_to_step"] = timed[-1]["step"]
        result["timed_seconds"] = span
        result["images_per_second"] = images / span if span > 0 else None
        result["data_wait_fraction_median"] = statistics.median(
            record.get("data_wait_fraction", 0.0) for record in timed
        )
        phased = [record["phase_seconds"] for record in timed if record.get("phase_seconds")]
        result["phase_steps"] = len(phased)
        if phased:
            means = {name: statistics.fmean(p.get(name, 0.0) for p in phased) for name in PHASES}
            total = sum(means.values())
            result["phase_seconds_mean"] = means
            result["phase_step_seconds"] = total
            result["phase_share"] = {name: value / total for name, value in means.items()} if total else {}
            result["data_wait_share"] = means["data_wait"] / total if total else None
        keys = [latent_key(record.get("bucket", "512x512")) for record in timed]
        if flops and all(key in flops for key in keys) and span > 0:
            total_flops = sum(flops[key] * images_per_step for key in keys)
            result["model_tflops_per_second"] = total_flops / span / 1e12
            result["mfu"] = total_flops / span / (args.peak_tflops * 1e12 * args.gpus)
            result["flops_per_image_512"] = flops.get("64x64")
        elif flops:
            result["mfu_note"] = f"no FLOP count for latent shapes {sorted(set(keys) - set(flops))}"
    peaks = [record["peak_memory_bytes"] for record in records if record.get("peak_memory_bytes")]
    if peaks:
        result["peak_memory_bytes"] = max(peaks)
    if args.smi:
        used = []
        try:
            with open(args.smi) as handle:
                for line in handle:
                    parts = [part.strip() for part in line.split(",")]
                    if parts and parts[-1].replace(".", "").isdigit():
                        used.append(float(parts[-1]))
        except OSError:
            pass
        if used:
            result["smi_peak_memory_mib"] = max(used)
            result["smi_samples"] = len(used)
    ok = finite and len(timed) >= args.min_timed_steps
    result["ok"] = ok
    print(json.dumps(result))
    return 0 if ok else 1


def compare(args):
    with open(args.arbor) as handle:
        arbor = json.loads(handle.read().strip().splitlines()[-1])
    with open(args.diffusers) as handle:
        diffusers = json.loads(handle.read().strip().splitlines()[-1])
    a, d = arbor.get("images_per_second"), diffusers.get("images_per_second")
    ratio = a / d if a and d else None
    print(json.dumps({"arbor_images_per_second": a, "diffusers_images_per_second": d, "ratio": ratio}))
    return 0


def fmt_bytes(value):
    return f"{value / GIB:.1f} GiB" if value else "n/a"


def fmt_loss(value):
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)


def summary(args):
    try:
        with open(args.file) as handle:
            lines = handle.read().strip().splitlines()
        data = json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        print("no result")
        return 0
    kind = args.kind
    if kind == "machine":
        print(
            f"{data.get('gpus', '?')} GPU(s): {data.get('gpu_name', 'n/a')}; torch {data.get('torch')} "
            f"(CUDA {data.get('torch_cuda')}); driver {data.get('driver', 'n/a')}"
        )
    elif kind == "parity":
        text = (
            f"{data.get('compared')}/{data.get('goldens')} outputs; worst forward "
            f"{data.get('worst_forward_abs_error', float('nan')):.2e}, worst grad (rel. to max) "
            f"{data.get('worst_gradient_rel_error', float('nan')):.2e}"
        )
        if data.get("pytorch_same_device"):
            text += (
                f"; PyTorch's own device-vs-CPU difference: {data.get('pytorch_worst_forward_abs_error'):.2e} / "
                f"{data.get('pytorch_worst_gradient_rel_error'):.2e}"
            )
        elif data.get("reference_error"):
            text += f"; no PyTorch reference ({data['reference_error'][:80]})"
        if data.get("reference_skew_count"):
            text += f"; the node's packages load {data['reference_skew_count']} fixture output(s) differently ({data['reference_skew'][0]}, …): not used"
        if data.get("failure_count"):
            text += f"; {data['failure_count']} over tolerance, first {data['failures'][0]['name']}"
        if data.get("missing"):
            text += f"; missing {len(data['missing'])}: {data['missing'][0]}"
        print(text)
    elif kind in ("tiny", "multi"):
        print(
            f"world {data.get('world_size')}, {data.get('steps')} steps, loss {fmt_loss(data.get('loss_first'))} -> "
            f"{fmt_loss(data.get('loss_last'))} ({'finite' if data.get('loss_finite') else 'NOT FINITE'})"
        )
    elif kind == "run":
        ips = data.get("images_per_second")
        parts = [f"{ips:.2f} img/s" if ips else "img/s n/a"]
        parts.append(f"{data.get('timed_steps')} timed steps (from step {data.get('timed_from_step')})")
        share = data.get("phase_share")
        if share:
            mean = data["phase_step_seconds"]
            parts.append(
                f"step {mean * 1000:.0f} ms = "
                + " / ".join(f"{name} {share[name] * 100:.1f}%" for name in PHASES)
            )
        else:
            parts.append("no phase_seconds in metrics.jsonl")
        if data.get("data_wait_share") is not None:
            parts.append(f"data wait {data['data_wait_share'] * 100:.2f}%")
        parts.append(f"peak {fmt_bytes(data.get('peak_memory_bytes'))} (torch)")
        if data.get("smi_peak_memory_mib"):
            parts.append(f"{data['smi_peak_memory_mib'] / 1024:.1f} GiB (nvidia-smi)")
        if data.get("mfu") is not None:
            parts.append(
                f"MFU {data['mfu'] * 100:.1f}% ({data['model_tflops_per_second']:.3g} TFLOP/s; UNet "
                f"{(data.get('flops_per_image_512') or 0) / 1e12:.3f} TFLOP/img at 512², counted)"
            )
        parts.append(
            f"loss {fmt_loss(data.get('loss_first'))} -> {fmt_loss(data.get('loss_last'))}"
            + ("" if data.get("loss_finite") else " (NOT FINITE)")
        )
        print("; ".join(parts))
    elif kind == "diffusers":
        ips = data.get("images_per_second")
        means = data.get("phase_seconds_mean") or {}
        total = sum(means.values()) or 1
        print(
            f"{ips:.2f} img/s, step {data.get('step_seconds_mean', 0) * 1000:.0f} ms = "
            + " / ".join(f"{k} {v / total * 100:.1f}%" for k, v in means.items())
            + f"; peak {fmt_bytes(data.get('peak_memory_bytes'))}; loss finite: {data.get('loss_finite')}"
        )
    elif kind == "compare":
        ratio = data.get("ratio")
        print(
            f"arbor / diffusers = {ratio:.3f}x ({data.get('arbor_images_per_second'):.2f} vs "
            f"{data.get('diffusers_images_per_second'):.2f} img/s)"
            if ratio
            else "n/a"
        )
    else:
        print(json.dumps(data)[:200])
    return 0


def buckets(args):
    records = read_records(args.metrics)
    _, timed = timed_range(records, args.warmup, args.every)
    print(",".join(record.get("bucket", "512x512") for record in (timed or records)))
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run")
    one.add_argument("--metrics", required=True)
    one.add_argument("--warmup", type=int, required=True)
    one.add_argument("--bsz", type=int, required=True)
    one.add_argument("--every", type=int, default=10, help="train.time_phases_every")
    one.add_argument("--flops")
    one.add_argument("--peak-tflops", type=float, default=989.0)
    one.add_argument("--gpus", type=int, default=1)
    one.add_argument("--smi")
    one.add_argument("--min-timed-steps", type=int, default=50)
    two = commands.add_parser("compare")
    two.add_argument("--arbor", required=True)
    two.add_argument("--diffusers", required=True)
    three = commands.add_parser("summary")
    three.add_argument("kind")
    three.add_argument("file")
    four = commands.add_parser("buckets")
    four.add_argument("--metrics", required=True)
    four.add_argument("--warmup", type=int, required=True)
    four.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    return {"run": run, "compare": compare, "summary": summary, "buckets": buckets}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
