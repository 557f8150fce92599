"""Reproduce the averaging-toy tables of seed 003 (not run in CI): success rate over initial c, and [SEP2] heads.

Usage: PYTHONPATH=src python scripts/toy_experiments.py [--jobs N] [--out DIR]
Prints each table beside the paper's numbers, and the wall-clock time of each experiment.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from sinkscope.toy.averaging import TrainConfig
from sinkscope.toy.experiments import format_table, sep2_experiment, sep2_table, success_rate, success_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--out", type=Path, default=None, help="directory for the per-run CSV files")
    parser.add_argument("--only", choices=["success", "sep2"], default=None, help="run one experiment only")
    parser.add_argument("--c-values", default="10,6,1")
    parser.add_argument("--seeds", type=int, default=10, help="runs per c (paper: 10)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--sep2-heads", default="2,1")
    parser.add_argument("--sep2-seeds", type=int, default=15, help="runs per head count (paper: 15)")
    parser.add_argument("--sep2-epochs", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.jobs} jobs")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)

    if args.only in (None, "success"):
        start = time.perf_counter()
        c_values = [float(c) for c in args.c_values.split(",")]
        runs = success_rate(c_values, range(args.seeds), TrainConfig(epochs=args.epochs), n_jobs=args.jobs)
        print("\nSuccess rate, one [SEP] (success = R^2 >= 0.99 and catch-tag-release present)")
        print(format_table(success_table(runs)))
        print(f"{len(runs)} runs, {time.perf_counter() - start:.0f} s wall, {runs['seconds'].sum():.0f} s of training")
        if args.out is not None:
            runs.to_csv(args.out / "success_rate_runs.csv", index=False)

    if args.only in (None, "sep2"):
        start = time.perf_counter()
        heads = [int(h) for h in args.sep2_heads.split(",")]
        runs = sep2_experiment(heads, range(args.sep2_seeds), train_config=TrainConfig(epochs=args.sep2_epochs),
                               n_jobs=args.jobs)
        print(f"\n[SEP2], {args.sep2_epochs} epochs (converged = R^2 >= 0.99; mechanism = the rebuttal's head roles)")
        print(format_table(sep2_table(runs)))
        print(f"{len(runs)} runs, {time.perf_counter() - start:.0f} s wall, {runs['seconds'].sum():.0f} s of training")
        if args.out is not None:
            runs.to_csv(args.out / f"sep2_runs_{args.sep2_epochs}ep.csv", index=False)


if __name__ == "__main__":
    main()
