"""Seed sweeps of the averaging toy and the tables that set them beside seed 003's numbers.

Two experiments: the success rate over initial tag values c (seed 003 rebuttal, Appendix B table: 4/10, 3/10,
0/10 for c = 10, 6, 1) and the [SEP2] task with 2 vs 1 heads per layer (rebuttal: 1 head, 0/15 converge).
`save_toy` writes any toy command's results as a run folder through `sinkscope.store`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sinkscope.progress import Progress
from sinkscope.store import Content, Run, make_manifest, save_run
from sinkscope.toy.averaging import (
    AveragingBatch,
    TaskConfig,
    ToyConfig,
    TrainConfig,
    TrainResult,
    check_mechanism,
    check_mechanism_sep2,
    make_batch,
    rebuttal_config,
    train,
)

# seed 003 rebuttal: "Success Rate (R^2 >= 0.99)" over 10 runs per initial c.
PAPER_SUCCESS = {10.0: "4/10", 6.0: "3/10", 1.0: "0/10"}
# seed 003 rebuttal: 2 heads reach low loss with the hypothesised heads (no count given); 1 head: 0 of 15.
PAPER_SEP2 = {2: "low loss, mechanism as hypothesised (count n/r)", 1: "0/15 converge"}

Row = dict[str, float | int | bool | None]


def check_batch(task: TaskConfig, data_seed: int = 0, n: int = 512) -> AveragingBatch:
    """Held-out batch for mechanism checks: seed data_seed + 2, disjoint from train (+0) and test (+1)."""
    return make_batch(n, task, seed=data_seed + 2)


def run_one(cfg: ToyConfig, train_config: TrainConfig, r2_min: float = 0.99) -> Row:
    """Train one model, check its mechanism on a held-out batch, return one flat row.

    converged = held-out R^2 >= r2_min; success = converged and the mechanism check passed.
    """
    task = TaskConfig(sep2=cfg.sep2)
    res = train(cfg, train_config, task)
    row: Row = {
        "c_init": cfg.c_init, "n_heads": cfg.n_heads, "seed": train_config.seed, "r2": res.r2, "loss": res.loss,
        "c_final": res.c, "seconds": res.seconds,
    }
    batch = check_batch(task, train_config.data_seed)
    if cfg.sep2:
        rep2 = check_mechanism_sep2(res.model, batch)
        row.update(catch=rep2.catch_ok, release=rep2.release_ok, mechanism=rep2.passed)
    else:
        rep = check_mechanism(res.model, batch)
        row.update(catch=rep.catch, tag_ve=rep.tag_ve, release_tv=rep.release_tv,
                   release_outside=rep.release_outside, mechanism=rep.passed)
    row["converged"] = res.r2 >= r2_min
    row["success"] = bool(row["converged"] and row["mechanism"])
    return row


def _init_worker() -> None:
    torch.set_num_threads(1)


def run_seeds(
    model_configs: Sequence[ToyConfig], seeds: Sequence[int], train_config: TrainConfig | None = None,
    r2_min: float = 0.99, n_jobs: int = 1, progress: Progress | None = None,
) -> pd.DataFrame:
    """`run_one` for every (config, seed) pair, config-major; n_jobs > 1 runs them in worker processes.
    progress: called as progress("training runs", done, total) as runs finish (in order)."""
    train_config = train_config or TrainConfig()
    jobs = [(cfg, replace(train_config, seed=seed), r2_min) for cfg in model_configs for seed in seeds]
    if n_jobs <= 1:
        rows = _collect((run_one(*job) for job in jobs), len(jobs), progress)
    else:
        with ProcessPoolExecutor(n_jobs, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
            rows = _collect(pool.map(run_one, *zip(*jobs, strict=True)), len(jobs), progress)
    return pd.DataFrame(rows)


def _collect(results: Iterable[Row], total: int, progress: Progress | None) -> list[Row]:
    rows = []
    for row in results:
        rows.append(row)
        if progress is not None:
            progress("training runs", len(rows), total)
    return rows


def success_rate(
    c_values: Sequence[float] = (10.0, 6.0, 1.0), seeds: Sequence[int] = range(10),
    train_config: TrainConfig | None = None, n_jobs: int = 1, progress: Progress | None = None,
) -> pd.DataFrame:
    """One-[SEP] task, paper model, one run per (initial c, seed): the per-run table."""
    return run_seeds([ToyConfig(c_init=c) for c in c_values], seeds, train_config, n_jobs=n_jobs, progress=progress)


def sep2_experiment(
    heads: Sequence[int] = (2, 1), seeds: Sequence[int] = range(15), c_init: float = 10.0,
    train_config: TrainConfig | None = None, n_jobs: int = 1, progress: Progress | None = None,
) -> pd.DataFrame:
    """[SEP2] task, rebuttal model with `heads` heads of dimension 3 per layer: the per-run table."""
    return run_seeds([rebuttal_config(h, c_init) for h in heads], seeds, train_config, n_jobs=n_jobs,
                     progress=progress)


def _count(s: pd.Series) -> str:
    return f"{int(s.sum())}/{len(s)}"


def success_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Paper vs ours per initial c: success = R^2 >= 0.99 and mechanism present."""
    out = runs.groupby("c_init", sort=False).agg(
        converged=("converged", _count), mechanism=("mechanism", _count), success=("success", _count),
        median_r2=("r2", "median"),
    ).reset_index()
    out.insert(1, "paper", [PAPER_SUCCESS.get(float(c), "-") for c in out["c_init"]])
    out["c_init"] = [f"{c:g}" for c in out["c_init"]]
    return out


def sep2_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Paper vs ours per number of heads: converged (R^2 >= 0.99), layer-1 sink roles, layer-2 averaging roles,
    both (mechanism), and converged with the mechanism (success)."""
    out = runs.groupby("n_heads", sort=False).agg(
        converged=("converged", _count), catch=("catch", _count), release=("release", _count),
        mechanism=("mechanism", _count), success=("success", _count),
        median_r2=("r2", "median"),
    ).reset_index()
    out.insert(1, "paper", [PAPER_SEP2.get(int(h), "-") for h in out["n_heads"]])
    return out


def format_table(table: pd.DataFrame) -> str:
    """Plain fixed-width text, floats with 4 decimals."""
    return table.to_string(index=False, float_format=lambda x: f"{x:.4f}")


def trained_files(res: TrainResult, model_config: ToyConfig, train_config: TrainConfig, report: Any
                  ) -> dict[str, bytes | dict[str, Any]]:
    """`model.pt` (config + state dict) and `result.json` (configs, R^2, loss, c, history, mechanism report) of
    one trained model, for `save_toy(..., files=...)`."""
    state = io.BytesIO()
    torch.save({"config": asdict(model_config), "state_dict": res.model.state_dict()}, state)
    summary = {"model": asdict(model_config), "train": asdict(train_config), "r2": res.r2, "loss": res.loss,
               "c": res.c, "history": res.history, "mechanism": asdict(report)}
    return {"model.pt": state.getvalue(), "result.json": summary}


def save_toy(out: str | Path, command: str, tables: Mapping[str, pd.DataFrame], parameters: Mapping[str, Any],
             files: Mapping[str, Content] | None = None, *, seed: int | None = None, overwrite: bool = False
             ) -> Path:
    """Write a `sinkscope toy <command>` result as a run folder (`sinkscope.store.save_run`): the tables as Parquet,
    `files` as given, and a manifest whose command is `toy <command>` — atomically, refusing another command's
    folder unless `overwrite`."""
    manifest = make_manifest(f"toy {command}", {"name": "averaging"}, dict(parameters), seed)
    return save_run(out, Run(dict(tables), manifest), files=files, overwrite=overwrite)
