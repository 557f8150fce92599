"""`sinkscope toy ...`: the averaging toy of seed 003 §7 from the command line (thin layer over the Python API)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sinkscope.cli.options import OutPathOpt, SeedOpt, described, renamed, user_errors

if TYPE_CHECKING:
    from sinkscope.toy.averaging import ToyConfig

app = typer.Typer(help="The synthetic averaging task where catch-tag-release emerges (seed 003 §7).",
                  no_args_is_help=True)


def _one_thread() -> None:
    """The toy's tensors are tiny: one thread per process is fastest (and leaves cores for --jobs workers)."""
    import torch

    torch.set_num_threads(1)


Seed = described(SeedOpt, " (model initialisation; first seed of a sweep).")
Out = described(OutPathOpt, ": a folder.")
Epochs = Annotated[int, typer.Option(help="Training epochs over the 8,192 training sequences.")]
Jobs = Annotated[int, typer.Option(help="Worker processes for the seed sweep.")]
Heads = Annotated[int | None, typer.Option("--n-heads", help="Heads per layer (default: 1 for sep, 2 for sep2).")]
HeadsAlias = Annotated[int | None, typer.Option("--heads", hidden=True)]
THEOREM_C = "4,6,8,10,12,15,20,25,30"  # sinkscope.toy.averaging.DEFAULT_THEOREM_C, spelled out to keep --help fast


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _model_config(task: str, c: float, heads: int | None) -> ToyConfig:
    from sinkscope.toy.averaging import ToyConfig, rebuttal_config

    if task == "sep":
        return ToyConfig(c_init=c) if heads in (None, 1) else ToyConfig(c_init=c, n_heads=heads, d_head=2,
                                                                        out_proj=True)
    if task == "sep2":
        return rebuttal_config(heads or 2, c)
    raise typer.BadParameter(f"--task must be 'sep' or 'sep2', got {task!r}")


@app.command()
@user_errors
def theorem(
    c_values: Annotated[str, typer.Option(help="Comma-separated tag values c.")] = THEOREM_C,
    n_sequences: Annotated[int, typer.Option("--n-sequences", help="Sequences to evaluate the loss on.")] = 4096,
    seed: Seed = 0,
    out: Out = None,
    n: Annotated[int | None, typer.Option("--n", hidden=True)] = None,
) -> None:
    """Loss of the hand-built catch-tag-release solution as the tag value c grows: one 'c loss' pair per line."""
    from sinkscope.toy.averaging import theorem_losses

    _one_thread()
    rows = theorem_losses(_floats(c_values), n=renamed(n_sequences, n), seed=seed)
    lines = ["c loss", *(f"{c:g} {loss:.6e}" for c, loss in rows)]
    typer.echo("\n".join(lines))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "theorem.txt").write_text("\n".join(lines) + "\n")


@app.command("train")
@user_errors
def train_cmd(
    task: Annotated[str, typer.Option(help="'sep' (one [SEP]) or 'sep2' (rebuttal variant).")] = "sep",
    c: Annotated[float, typer.Option(help="Initial tag value c of the [SEP] embedding.")] = 10.0,
    n_heads: Heads = None,
    seed: Seed = 9,
    epochs: Epochs = 50,
    out: Out = None,
    heads: HeadsAlias = None,
) -> None:
    """Train one model; print held-out R^2, loss, the final c and the mechanism check."""
    import torch

    from sinkscope.toy.averaging import TaskConfig, TrainConfig, check_mechanism, check_mechanism_sep2, train
    from sinkscope.toy.experiments import check_batch

    _one_thread()
    cfg = _model_config(task, c, renamed(n_heads, heads))
    tc = TrainConfig(seed=seed, epochs=epochs)
    res = train(cfg, tc)
    batch = check_batch(TaskConfig(sep2=cfg.sep2), tc.data_seed)
    report = check_mechanism_sep2(res.model, batch) if cfg.sep2 else check_mechanism(res.model, batch)
    c_final = "learned embedding" if res.c is None else f"{res.c:.4f}"
    typer.echo(f"r2 {res.r2:.4f}\nloss {res.loss:.3e}\nc {c_final}\nseconds {res.seconds:.1f}")
    for key, value in asdict(report).items():
        typer.echo(f"{key} {value}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"config": asdict(cfg), "state_dict": res.model.state_dict()}, out / "model.pt")
        summary = {"model": asdict(cfg), "train": asdict(tc), "r2": res.r2, "loss": res.loss, "c": res.c,
                   "history": res.history, "mechanism": asdict(report)}
        (out / "result.json").write_text(json.dumps(summary, indent=2))


@app.command("success-rate")
@user_errors
def success_rate_cmd(
    c_values: Annotated[str, typer.Option(help="Comma-separated initial tag values c.")] = "10,6,1",
    seeds: Annotated[int, typer.Option(help="Runs per c (seeds seed .. seed+seeds-1).")] = 10,
    seed: Seed = 0,
    epochs: Epochs = 50,
    jobs: Jobs = 1,
    out: Out = None,
) -> None:
    """Success rate (R^2 >= 0.99 and mechanism present) per initial c, beside seed 003's table."""
    from sinkscope.toy.averaging import TrainConfig
    from sinkscope.toy.experiments import format_table, success_rate, success_table

    _one_thread()
    start = time.perf_counter()
    runs = success_rate(_floats(c_values), range(seed, seed + seeds), TrainConfig(epochs=epochs), n_jobs=jobs)
    typer.echo(format_table(success_table(runs)))
    typer.echo(f"({len(runs)} runs in {time.perf_counter() - start:.0f} s)")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        runs.to_csv(out / "success_rate_runs.csv", index=False)


@app.command()
@user_errors
def sep2(
    n_heads: Annotated[str, typer.Option("--n-heads", help="Comma-separated heads per layer to compare.")] = "2,1",
    seeds: Annotated[int, typer.Option(help="Runs per head count (seeds seed .. seed+seeds-1).")] = 15,
    seed: Seed = 0,
    c: Annotated[float, typer.Option(help="Initial scale of the [SEP]/[SEP2] embeddings.")] = 10.0,
    epochs: Epochs = 50,
    jobs: Jobs = 1,
    out: Out = None,
    heads: Annotated[str | None, typer.Option("--heads", hidden=True)] = None,
) -> None:
    """[SEP2] task: 2 vs 1 heads per layer (converged = R^2 >= 0.99), beside the rebuttal's result."""
    from sinkscope.toy.averaging import TrainConfig
    from sinkscope.toy.experiments import format_table, sep2_experiment, sep2_table

    _one_thread()
    start = time.perf_counter()
    runs = sep2_experiment(_ints(renamed(n_heads, heads)), range(seed, seed + seeds), c, TrainConfig(epochs=epochs),
                           n_jobs=jobs)
    typer.echo(format_table(sep2_table(runs)))
    typer.echo(f"({len(runs)} runs in {time.perf_counter() - start:.0f} s)")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        runs.to_csv(out / "sep2_runs.csv", index=False)


@app.command()
@user_errors
def plot(
    task: Annotated[str, typer.Option(help="'sep' or 'sep2'.")] = "sep",
    c: Annotated[float, typer.Option(help="Initial tag value c.")] = 10.0,
    n_heads: Heads = None,
    seed: Seed = 9,
    epochs: Epochs = 50,
    example: Annotated[int, typer.Option(help="Which held-out sequence to draw.")] = 0,
    out: described(OutPathOpt, ": the folder of the PNG.") = Path("toy_plots"),
    heads: HeadsAlias = None,
) -> None:
    """Train one model and draw its layer-1 and layer-2 attention patterns (seed 003 Fig. 7 style)."""
    from sinkscope.report.figures.toy import plot_attention
    from sinkscope.toy.averaging import TaskConfig, TrainConfig, train
    from sinkscope.toy.experiments import check_batch

    _one_thread()
    cfg = _model_config(task, c, renamed(n_heads, heads))
    res = train(cfg, TrainConfig(seed=seed, epochs=epochs))
    batch = check_batch(TaskConfig(sep2=cfg.sep2))
    path = plot_attention(res.model, batch, example, out / f"attention_{task}_c{c:g}_seed{seed}.png")
    typer.echo(f"r2 {res.r2:.4f}\nwrote {path}")
