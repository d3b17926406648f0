"""
A scaled-down version of the paper's table on the built-in dataset: CLIP, FLIP and GDM-FLIP pre-trained with train.py's
built-in defaults, then each masked model tuned unmasked, reported as masked inference / unmasked inference / after
tuning (zero-shot top-1 on the test split), mean +- std over seeds.

    python repro.py --ratios 0.5 0.75 0.9 --seeds 0 1 2                       # centred subjects (~1 h 40 min on 2 CPU cores)
    python repro.py --layout uniform --ratios 0.5 --seeds 0 1 2               # the control: subjects anywhere

Every run lives in <log-dir>/<layout>-<method>-<ratio>-s<seed>; a finished run is not trained again, so an interrupted
experiment continues where it stopped. Curves: python visualize.py curves logs/repro/*/metrics.jsonl
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TUNE_SAMPLES = 4000  # unmasked tuning: a fifth of an epoch, ~5% of pre-training (the paper tuned ~1% of 30 epochs)


def final_eval(run_dir):
    """The last evaluation record of a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "zeroshot_top1" in r][-1]


def train(run_dir, *flags):
    """train.py in a subprocess, unless the run already finished (its final checkpoint exists)."""
    log_dir, name = os.path.split(run_dir)
    if not os.path.exists(os.path.join(run_dir, "checkpoints", "epoch_latest.pt")):
        cmd = [sys.executable, os.path.join(HERE, "train.py"), "--log-dir", log_dir, "--name", name, *map(str, flags)]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return final_eval(run_dir)


def run_one(args, method, mask, ratio, seed):
    """(masked, unmasked, tuned) zero-shot top-1 of one pre-training run and its unmasked tuning."""
    run_dir = os.path.join(args.log_dir, f"{args.layout}-{method}-{ratio:g}-s{seed}")
    pre = train(run_dir, "--mask", mask, "--ratio", ratio, "--seed", seed, "--builtin-layout", args.layout)
    if mask == "none":
        return None, pre["zeroshot_top1"], None
    tuned = train(run_dir + "-tuned", "--pretrained", os.path.join(run_dir, "checkpoints", "epoch_latest.pt"),
                  "--mask", "none", "--seed", seed, "--builtin-layout", args.layout, "--epochs", 1,
                  "--train-num-samples", TUNE_SAMPLES, "--lr", args.tune_lr, "--warmup", 3)
    return pre["zeroshot_masked_top1"], pre["zeroshot_top1"], tuned["zeroshot_top1"]


def mean_std(values):
    """'mean +- std' in percent over seeds, '-' where a column does not apply."""
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.1f}" + (f" +- {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def table(rows):
    """rows: {label: [(masked, unmasked, tuned) per seed]} -> a Markdown table in the paper's format."""
    lines = ["| method | masked inference | unmasked inference | after tuning |", "|---|---|---|---|"]
    for label, results in rows.items():
        lines.append(f"| {label} | " + " | ".join(mean_std(column) for column in zip(*results)) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", default="centered", choices=["centered", "uniform"], help="built-in dataset layout")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9], help="masking ratios")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (initialisation, data order, masks)")
    p.add_argument("--tune-lr", type=float, default=1e-4, help="peak learning rate of the unmasked tuning")
    p.add_argument("--log-dir", default="logs/repro", help="where the runs go")
    args = p.parse_args(argv)
    rows = {"CLIP": [run_one(args, "clip", "none", 0.0, s) for s in args.seeds]}
    for ratio in args.ratios:
        for label, method, mask in [("FLIP", "flip", "random"), ("GDM-FLIP", "gdmflip", "gaussian")]:
            rows[f"{label} {ratio:.0%}"] = [run_one(args, method, mask, ratio, s) for s in args.seeds]
    print(f"\nzero-shot top-1 (%) on the built-in test split, {args.layout} layout, seeds {args.seeds}:\n")
    print(table(rows))


if __name__ == "__main__":
    main()
