#!/usr/bin/env python3
"""Reads a run directory (docs/architecture.md §7) for scripts/demo.sh.

    report.py progress RUN_DIR --total-steps N
        one line: the latest step, the mean loss of the last 10 steps, images/s, checkpoints
    report.py plan < PLAN_JSON
        one line about the output of `arbor plan epoch --json`
    report.py summary RUN_DIR
        where the checkpoints, samples, loss curve, metrics, TensorBoard logs and exports are,
        and the mean loss
        of the first and of the last 10 steps; exits 1 if the run has no metrics, and with
        --require-loss-fall also if the last steps' mean loss is not below the first steps'

metrics.jsonl holds one JSON object per step with at least `step` and `loss`; a record with the
same step written again after a resume replaces the earlier one.
"""

import argparse
import json
import math
import sys
from pathlib import Path

WINDOW = 10


def read_metrics(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    by_step = {}
    if not path.exists():
        return []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if isinstance(record, dict) and "step" in record and "loss" in record:
            by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


def mean(values):
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else float("nan")


def complete_checkpoints(run_dir: Path):
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return [], []
    complete, partial = [], []
    for folder in sorted(root.iterdir(), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1):
        (complete if (folder / "COMPLETE").exists() else partial).append(folder)
    return complete, partial


def images_per_second(record):
    for key in ("images_per_s", "images_per_second", "images/s", "throughput"):
        if key in record:
            return float(record[key])
    return None


def progress(run_dir: Path, total_steps: int):
    records = read_metrics(run_dir)
    if not records:
        print("waiting for the first step (model loading, group forming)")
        return 0
    last = records[-1]
    recent = records[-WINDOW:]
    rate = mean(images_per_second(r) for r in recent if images_per_second(r) is not None)
    complete, _ = complete_checkpoints(run_dir)
    samples = sorted((run_dir / "samples").glob("*.png")) if (run_dir / "samples").is_dir() else []
    parts = [
        f"step {last['step']}/{total_steps}" if total_steps else f"step {last['step']}",
        f"loss {float(last['loss']):.4f} (mean of last {len(recent)}: {mean(r['loss'] for r in recent):.4f})",
    ]
    if "lr" in last:
        parts.append(f"lr {float(last['lr']):.2e}")
    if not math.isnan(rate):
        parts.append(f"{rate:.1f} images/s")
    parts.append(f"{len(complete)} checkpoint(s), {len(samples)} sample grid(s)")
    print(", ".join(parts))
    return 0


def listing(paths, limit=4):
    names = [p.name for p in paths]
    if len(names) > limit:
        names = names[:1] + ["…"] + names[-(limit - 2):]
    return ", ".join(names)


def summary(run_dir: Path, require_loss_fall: bool = False):
    records = read_metrics(run_dir)
    complete, partial = complete_checkpoints(run_dir)
    samples = sorted((run_dir / "samples").glob("*.png"), key=lambda p: (len(p.name), p.name)) if (run_dir / "samples").is_dir() else []
    exports = run_dir / "exports"
    print(f"  run directory  {run_dir}")
    print(f"  metrics        {run_dir / 'metrics.jsonl'}  ({len(records)} steps)")
    loss_png = run_dir / "loss.png"
    print(f"  loss curve     {loss_png}" + ("" if loss_png.exists() else "  (missing)"))
    print(f"  samples        {run_dir / 'samples'}/  ({len(samples)}: {listing(samples)})")
    tensorboard = run_dir / "tensorboard"
    event_files = list(tensorboard.glob("events.out.tfevents.*")) if tensorboard.is_dir() else []
    print(f"  tensorboard    {tensorboard}/  ({len(event_files)} event file(s))")
    print(f"  checkpoints    {run_dir / 'checkpoints'}/  ({len(complete)} complete: {listing(complete)}"
          + (f"; {len(partial)} partial, never resumed" if partial else "") + ")")
    if exports.is_dir():
        for item in sorted(exports.iterdir()):
            size = sum(f.stat().st_size for f in item.rglob("*") if f.is_file()) if item.is_dir() else item.stat().st_size
            print(f"  export         {item}{'/' if item.is_dir() else ''}  ({size / 1e6:.1f} MB)")
    else:
        print(f"  exports        {exports}/  (missing)")
    print(f"  ledger         {run_dir / 'ledger'}/  state: {run_dir / 'state.json'}")
    if not records:
        print("  no metrics were written")
        return 1
    window = min(WINDOW, max(1, len(records) // 2))
    first = mean(r["loss"] for r in records[:window])
    last = mean(r["loss"] for r in records[-window:])
    change = (last - first) / first * 100 if first else float("nan")
    print(f"  loss           mean of the first {window} steps {first:.4f} -> mean of the last {window} steps {last:.4f} ({change:+.0f}%)")
    if require_loss_fall and not last < first:
        print("  the loss did not fall")
        return 1
    return 0


def plan_line(plan):
    print(
        f"{plan['items']} items in {len(plan['bucket_items'])} buckets, {plan['batches_per_rank']} steps "
        f"per epoch per rank, mean aspect error {plan['mean_aspect_error']:.3f}, {plan['pruned']} pruned, "
        f"{plan['trimmed']} trimmed per epoch"
    )
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("progress")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--total-steps", type=int, default=0)
    commands.add_parser("plan")
    s = commands.add_parser("summary")
    s.add_argument("run_dir", type=Path)
    s.add_argument("--require-loss-fall", action="store_true")
    args = parser.parse_args()
    if args.command == "progress":
        return progress(args.run_dir, args.total_steps)
    if args.command == "plan":
        return plan_line(json.load(sys.stdin))
    return summary(args.run_dir, args.require_loss_fall)


if __name__ == "__main__":
    sys.exit(main())
