"""`sinkscope toy ...`: the averaging toy of seed 003 §7 from the command line (thin layer over the Python API)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sinkscope.cli.options import (
    OneLineErrors,
    OutPathOpt,
    OverwriteOpt,
    SeedOpt,
    described,
    progress_bars,
    renamed,
    user_errors,
)
from sinkscope.errors import SinkscopeError

if TYPE_CHECKING:
    import pandas as pd

    from sinkscope.toy.averaging import ToyConfig

app = typer.Typer(cls=OneLineErrors, help="The synthetic averaging task where catch-tag-release emerges (seed 003 §7).",
                  no_args_is_help=True)


def _one_thread() -> None:
    """The toy's tensors are tiny: one thread per process is fastest (and leaves cores for --jobs workers)."""
    import torch

    torch.set_num_threads(1)


Seed = described(SeedOpt, " (model initialisation; first seed of a sweep).")
Out = described(OutPathOpt, ": a run folder (Parquet tables, other files + manifest.json).")
Epochs = Annotated[int, typer.Option(min=1, help="Training epochs over the 8,192 training sequences.")]
Jobs = Annotated[int, typer.Option(min=1, help="Worker processes for the seed sweep.")]
MAX_HEADS = 64  # heads of dimension 2 on sequences of 16: more heads than that is not this toy any more
Heads = Annotated[int | None, typer.Option("--n-heads", min=1, max=MAX_HEADS,
                                           help="Heads per layer (default: 1 for sep, 2 for sep2).")]
HeadsAlias = Annotated[int | None, typer.Option("--heads", min=1, max=MAX_HEADS, hidden=True)]
CHECK_BATCH = 512  # sinkscope.toy.experiments.check_batch's held-out sequences, spelled out to keep --help fast
THEOREM_C = "4,6,8,10,12,15,20,25,30"  # sinkscope.toy.averaging.DEFAULT_THEOREM_C, spelled out to keep --help fast


def _floats(text: str, option: str) -> list[float]:
    """Comma-separated finite numbers, at least one."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise SinkscopeError(f"{option} {text!r}: pass comma-separated numbers, e.g. 10,6,1")
    return values


def _ints(text: str, option: str, low: int, high: int) -> list[int]:
    """Comma-separated integers in [low, high], at least one."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(low <= v <= high for v in values):
        raise SinkscopeError(f"{option} {text!r}: pass comma-separated integers from {low} to {high}, e.g. 2,1")
    return values


def _check_jobs(jobs: int) -> None:
    cpus = os.cpu_count() or 1
    if jobs > cpus:
        raise SinkscopeError(f"--jobs {jobs}: this machine has {cpus} CPUs; pass at most that many")


def _history(losses: list[float]) -> pd.DataFrame:
    """The training loss per epoch as a table."""
    import pandas as pd

    return pd.DataFrame({"epoch": range(1, len(losses) + 1), "loss": losses})


def _check_out(out: Path | None, command: str, overwrite: bool) -> None:
    """Refuse, before any training, an --out that `save_toy` would refuse afterwards: a file, or the run folder of
    another command (without --overwrite). Reads only; the folder is created and written by `save_toy`."""
    if out is None or overwrite:
        return
    from sinkscope.store import RunFolder

    if out.exists() and not out.is_dir():
        raise SinkscopeError(f"--out {out} is a file; pass a folder")
    found = RunFolder(out, f"toy {command}").recorded() if out.is_dir() else None
    if found is not None and found.get("command") != f"toy {command}":
        raise SinkscopeError(f"{out} holds a `{found.get('command')}` run; pass another --out or --overwrite")


def _model_config(task: str, c: float, heads: int | None) -> ToyConfig:
    from sinkscope.toy.averaging import ToyConfig, rebuttal_config

    if task == "sep":
        return ToyConfig(c_init=c) if heads in (None, 1) else ToyConfig(c_init=c, n_heads=heads, d_head=2,
                                                                        out_proj=True)
    if task == "sep2":
        return rebuttal_config(heads or 2, c)
    raise SinkscopeError(f"--task {task!r}: use 'sep' or 'sep2'")


@app.command()
@user_errors
def theorem(
    c_values: Annotated[str, typer.Option(help="Comma-separated tag values c.")] = THEOREM_C,
    n_sequences: Annotated[int, typer.Option("--n-sequences", min=1, max=10**7,
                                             help="Sequences to evaluate the loss on.")] = 4096,
    seed: Seed = 0,
    out: Out = None,
    overwrite: OverwriteOpt = False,
    n: Annotated[int | None, typer.Option("--n", min=1, max=10**7, hidden=True)] = None,
) -> None:
    """Loss of the hand-built catch-tag-release solution as the tag value c grows: one 'c loss' pair per line."""
    import pandas as pd

    from sinkscope.toy.averaging import theorem_losses
    from sinkscope.toy.experiments import save_toy

    _check_out(out, "theorem", overwrite)
    _one_thread()
    values, n_sequences = _floats(c_values, "--c-values"), renamed(n_sequences, n)
    rows = theorem_losses(values, n=n_sequences, seed=seed)
    lines = ["c loss", *(f"{c:g} {loss:.6e}" for c, loss in rows)]
    typer.echo("\n".join(lines))
    if out is not None:
        table = pd.DataFrame(rows, columns=["c", "loss"])
        save_toy(out, "theorem", {"theorem": table}, {"c_values": values, "n_sequences": n_sequences},
                 {"theorem.txt": "\n".join(lines) + "\n"}, seed=seed, overwrite=overwrite)


@app.command("train")
@user_errors
def train_cmd(
    task: Annotated[str, typer.Option(help="'sep' (one [SEP]) or 'sep2' (rebuttal variant).")] = "sep",
    c: Annotated[float, typer.Option(help="Initial tag value c of the [SEP] embedding.")] = 10.0,
    n_heads: Heads = None,
    seed: Seed = 9,
    epochs: Epochs = 50,
    out: Out = None,
    overwrite: OverwriteOpt = False,
    heads: HeadsAlias = None,
) -> None:
    """Train one model; print held-out R^2, loss, the final c and the mechanism check."""
    from sinkscope.toy.averaging import TaskConfig, TrainConfig, check_mechanism, check_mechanism_sep2, train
    from sinkscope.toy.experiments import check_batch, save_toy, trained_files

    _check_out(out, "train", overwrite)
    _one_thread()
    cfg = _model_config(task, c, renamed(n_heads, heads))
    tc = TrainConfig(seed=seed, epochs=epochs)
    with progress_bars() as update:
        res = train(cfg, tc, progress=update)
    batch = check_batch(TaskConfig(sep2=cfg.sep2), tc.data_seed)
    report = check_mechanism_sep2(res.model, batch) if cfg.sep2 else check_mechanism(res.model, batch)
    c_final = "learned embedding" if res.c is None else f"{res.c:.4f}"
    typer.echo(f"r2 {res.r2:.4f}\nloss {res.loss:.3e}\nc {c_final}\nseconds {res.seconds:.1f}")
    for key, value in asdict(report).items():
        typer.echo(f"{key} {value}")
    if out is not None:
        save_toy(out, "train", {"history": _history(res.history)},
                 {"task": task, "model": asdict(cfg), "train": asdict(tc)}, trained_files(res, cfg, tc, report),
                 seed=seed, overwrite=overwrite)


@app.command("success-rate")
@user_errors
def success_rate_cmd(
    c_values: Annotated[str, typer.Option(help="Comma-separated initial tag values c.")] = "10,6,1",
    seeds: Annotated[int, typer.Option(min=1, help="Runs per c (seeds seed .. seed+seeds-1).")] = 10,
    seed: Seed = 0,
    epochs: Epochs = 50,
    jobs: Jobs = 1,
    out: Out = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Success rate (R^2 >= 0.99 and mechanism present) per initial c, beside seed 003's table."""
    from sinkscope.toy.averaging import TrainConfig
    from sinkscope.toy.experiments import format_table, save_toy, success_rate, success_table

    _check_out(out, "success-rate", overwrite)
    _one_thread()
    start = time.perf_counter()
    _check_jobs(jobs)
    values, tc = _floats(c_values, "--c-values"), TrainConfig(epochs=epochs)
    with progress_bars() as update:
        runs = success_rate(values, range(seed, seed + seeds), tc, n_jobs=jobs, progress=update)
    table = success_table(runs)
    typer.echo(format_table(table))
    typer.echo(f"({len(runs)} runs in {time.perf_counter() - start:.0f} s)")
    if out is not None:
        save_toy(out, "success-rate", {"success_rate_runs": runs, "success_rate": table},
                 {"c_values": values, "seeds": seeds, "train": asdict(tc)}, seed=seed, overwrite=overwrite)


@app.command()
@user_errors
def sep2(
    n_heads: Annotated[str, typer.Option("--n-heads", help="Comma-separated heads per layer to compare.")] = "2,1",
    seeds: Annotated[int, typer.Option(min=1, help="Runs per head count (seeds seed .. seed+seeds-1).")] = 15,
    seed: Seed = 0,
    c: Annotated[float, typer.Option(help="Initial scale of the [SEP]/[SEP2] embeddings.")] = 10.0,
    epochs: Epochs = 50,
    jobs: Jobs = 1,
    out: Out = None,
    overwrite: OverwriteOpt = False,
    heads: Annotated[str | None, typer.Option("--heads", hidden=True)] = None,
) -> None:
    """[SEP2] task: 2 vs 1 heads per layer (converged = R^2 >= 0.99), beside the rebuttal's result."""
    from sinkscope.toy.averaging import TrainConfig
    from sinkscope.toy.experiments import format_table, save_toy, sep2_experiment, sep2_table

    _check_out(out, "sep2", overwrite)
    _one_thread()
    start = time.perf_counter()
    _check_jobs(jobs)
    head_counts, tc = _ints(renamed(n_heads, heads), "--n-heads", 1, MAX_HEADS), TrainConfig(epochs=epochs)
    with progress_bars() as update:
        runs = sep2_experiment(head_counts, range(seed, seed + seeds), c, tc, n_jobs=jobs, progress=update)
    table = sep2_table(runs)
    typer.echo(format_table(table))
    typer.echo(f"({len(runs)} runs in {time.perf_counter() - start:.0f} s)")
    if out is not None:
        save_toy(out, "sep2", {"sep2_runs": runs, "sep2": table},
                 {"n_heads": head_counts, "seeds": seeds, "c": c, "train": asdict(tc)}, seed=seed,
                 overwrite=overwrite)


@app.command()
@user_errors
def plot(
    task: Annotated[str, typer.Option(help="'sep' or 'sep2'.")] = "sep",
    c: Annotated[float, typer.Option(help="Initial tag value c.")] = 10.0,
    n_heads: Heads = None,
    seed: Seed = 9,
    epochs: Epochs = 50,
    example: Annotated[int, typer.Option(min=0, max=CHECK_BATCH - 1, help="Which held-out sequence to draw.")] = 0,
    out: described(OutPathOpt, ": the run folder of the PNG (+ manifest.json).") = Path("toy_plots"),
    overwrite: OverwriteOpt = False,
    heads: HeadsAlias = None,
) -> None:
    """Train one model and draw its layer-1 and layer-2 attention patterns (seed 003 Fig. 7 style)."""
    import tempfile

    from sinkscope.report.figures.toy import plot_attention
    from sinkscope.toy.averaging import TaskConfig, TrainConfig, train
    from sinkscope.toy.experiments import check_batch, save_toy

    _check_out(out, "plot", overwrite)
    _one_thread()
    cfg = _model_config(task, c, renamed(n_heads, heads))
    tc = TrainConfig(seed=seed, epochs=epochs)
    with progress_bars() as update:
        res = train(cfg, tc, progress=update)
    batch = check_batch(TaskConfig(sep2=cfg.sep2))
    name = f"attention_{task}_c{c:g}_seed{seed}.png"
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_attention(res.model, batch, example, Path(tmp) / name)
        folder = save_toy(out, "plot", {"history": _history(res.history)},
                          {"task": task, "model": asdict(cfg), "train": asdict(tc), "example": example},
                          {name: png.read_bytes()}, seed=seed, overwrite=overwrite)
    typer.echo(f"r2 {res.r2:.4f}\nwrote {folder / name}")
