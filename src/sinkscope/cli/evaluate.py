"""`sinkscope eval`: a thin typer front end over `sinkscope.analyses.evaluate.evaluate` that prints seed 000's Table 2.

Register it on the main app with `app.command("eval")(eval_command)`. This module imports nothing from
`sinkscope.cli.app`, so either side can be imported first.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from sinkscope.analyses.evaluate.datasets import list_datasets
from sinkscope.detect import get_detector, list_detectors
from sinkscope.errors import SinkscopeError

# piped output (a log, a CI run) gets the whole table instead of rich's 80-column default
console = Console(emoji=False, highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, emoji=False, highlight=False)

MAX_SKIP_LINES = 10
MASK_DETECTORS = [name for name in list_detectors() if get_detector(name).returns == "mask"]


def _selection(spec: str | None) -> list[int] | None:
    from sinkscope.cli.app import (
        parse_selection,  # lazily: sinkscope.cli.app imports this module to register the command
    )

    return parse_selection(spec)


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.1%}" if pct else f"{x:.2f}"


def render_table2(summary: pd.DataFrame, methods: list[str], title: str) -> Table:
    """Seed 000 Table 2 with causal alignment: per dataset Acc., then Mismatch/Match before and after each method,
    then Spearman ρ(attention, causal effect) and top-K overlap before and after."""
    variants = ["before", *methods]
    table = Table(title=title, title_justify="left")
    for name in ("Dataset", "n", "Acc."):
        table.add_column(name, justify="left" if name == "Dataset" else "right")
    for metric in ("Mismatch", "Match"):
        for v in variants:
            table.add_column(f"{metric}\n{v}", justify="right")
    for metric in ("ρ causal", "top-K ∩"):
        for v in variants:
            table.add_column(f"{metric}\n{v}", justify="right")
    table.add_column("n\ncausal", justify="right")
    for dataset, group in summary.groupby("dataset", sort=False):
        by = group.set_index("variant")
        first = by.iloc[0]
        cells = [str(dataset), str(int(first["n"])), _fmt(first["accuracy"], pct=True)]
        for metric in ("mismatch", "match", "spearman", "topk_overlap"):
            cells.extend(_fmt(by.loc[v, metric]) if v in by.index else "–" for v in variants)
        cells.append(str(int(first["n_causal"])))
        table.add_row(*cells)
    return table


def eval_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Hub id, local folder, or built-in name")],
    dataset: Annotated[list[str] | None, typer.Option(
        "--dataset", "-d", help=f"Dataset (repeatable): {', '.join(list_datasets())}")] = None,
    all_datasets: Annotated[bool, typer.Option("--all", help="Every dataset of seed 000 Table 1")] = False,
    limit: Annotated[int | None, typer.Option(help="Examples per dataset, drawn with --seed (the paper: 900)")] = None,
    method: Annotated[list[str] | None, typer.Option(
        help=f"Detect-mask-renormalise detector (repeatable; default zscore): {', '.join(MASK_DETECTORS)}")] = None,
    threshold: Annotated[float | None, typer.Option(help="The threshold of the (single) --method")] = None,
    layers: Annotated[str, typer.Option(help="Layers to average: -1 (last), 'all', '0,2', '3-6'")] = "-1",
    heads: Annotated[str, typer.Option(help="Heads to average: 'all', '0,2', '1-3'")] = "all",
    top_k: Annotated[int, typer.Option(help="K of the top-K tokens (seed 000: 10)")] = 10,
    causal: Annotated[bool, typer.Option("--causal/--no-causal", help="Measure each token's causal effect")] = True,
    causal_mode: Annotated[str, typer.Option(
        help="mask: cut attention to the token in every layer; occlude: delete the token")] = "mask",
    causal_limit: Annotated[int | None, typer.Option(
        help="At most this many examples per dataset get causal effects (n forward passes each)")] = None,
    causal_max_tokens: Annotated[int, typer.Option(help="Skip causal effects for longer prompts")] = 256,
    data: Annotated[str | None, typer.Option(
        help="A JSONL/CSV file, a folder of <name>/test.jsonl, or 'hub' (default: ../shared/data, else the Hub)")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --limit sample")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass")] = 8,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Run folder (Parquet tables + manifest.json); a rerun resumes it")] = None,
    device: Annotated[str | None, typer.Option(help="Device, e.g. cpu or cuda")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow code from the repo")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (.bin) checkpoints")] = False,
) -> None:
    """Classification accuracy and attention alignment before/after sink removal (seed 000 Table 2), plus the
    Spearman correlation and top-K overlap between attention and each token's causal effect."""
    try:
        _eval(model, dataset, all_datasets, limit, method, threshold, layers, heads, top_k, causal, causal_mode,
              causal_limit, causal_max_tokens, data, seed, batch_size, out, device, dtype, trust_remote_code,
              allow_pickle)
    except SinkscopeError as err:
        err_console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        hint = " (finished examples are kept: rerun the same command to resume)" if out is not None else ""
        err_console.print(f"[yellow]interrupted[/]{hint}")
        raise typer.Exit(130) from None


def _eval(model: str, dataset: list[str] | None, all_datasets: bool, limit: int | None, method: list[str] | None,
          threshold: float | None, layers: str, heads: str, top_k: int, causal: bool, causal_mode: str,
          causal_limit: int | None, causal_max_tokens: int, data: str | None, seed: int, batch_size: int,
          out: Path | None, device: str | None, dtype: str, trust_remote_code: bool, allow_pickle: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sinkscope.analyses.evaluate.run import evaluate
    from sinkscope.models import load_model
    from sinkscope.store import save_run

    names = list_datasets() if all_datasets else list(dataset or [])
    if not names:
        raise SinkscopeError("no dataset: pass --dataset NAME (repeatable) or --all")
    methods = list(method or ["zscore"])
    params: dict[str, dict[str, float]] = {}
    if threshold is not None:
        if len(methods) != 1:
            raise SinkscopeError("--threshold sets the threshold of one --method; give a single --method with it")
        first = next(k for k in get_detector(methods[0]).params if k != "dims")
        params[methods[0]] = {first: threshold}
    layer_sel, head_sel = _selection(layers), _selection(heads)
    if layer_sel == [-1]:
        layer_sel = None  # the default, the last layer, under one name so that resumed runs match
    with console.status(f"loading {model}"):
        loaded = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                            allow_pickle=allow_pickle)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done, total=total)

        result = evaluate(
            loaded, names, data=data, limit=limit, methods=methods, method_params=params, layers=layer_sel,
            heads=head_sel, k=top_k, causal=causal, causal_mode=causal_mode, causal_limit=causal_limit,
            causal_max_tokens=causal_max_tokens, seed=seed, batch_size=batch_size, out=out, progress=progress,
        )
    where = f"layers {'last' if layer_sel is None else layer_sel}, heads {'all' if head_sel is None else head_sel}"
    title = (f"{loaded.info.name}: accuracy and attention alignment before/after detect-mask-renormalise "
             f"(K = {top_k}; last-token attention, {where})")
    console.print(render_table2(result.summary, methods, title))
    console.print(
        f"Match / Mismatch: share of the prompt's task keywords among the top-{top_k} attended tokens, mean over "
        f"correct / wrong predictions (seed 000 Table 2). ρ causal: Spearman(attention, causal effect) per example; "
        f"top-K ∩: |top-{top_k} attention ∩ top-{top_k} causal| / {top_k}; causal effect = drop in the predicted "
        f"label's log-probability when the token is {'masked in every layer' if causal_mode == 'mask' else 'deleted'}."
    )
    summary = result.summary
    for m in methods:
        ms = summary.loc[summary["variant"] == m, "dmr_ms"]
        if len(ms):
            console.print(f"detect-mask-renormalise ({m}): {ms.mean():.3f} ms per example (mean over datasets)")
    skipped = result.tables["skipped"]
    for row in skipped.head(MAX_SKIP_LINES).itertuples():
        err_console.print(f"[yellow]skipped[/] {row.dataset} {row.reason}", highlight=False)
    if len(skipped) > MAX_SKIP_LINES:
        more = f" (see {out}/skipped.parquet)" if out is not None else ""
        err_console.print(f"[yellow]… and {len(skipped) - MAX_SKIP_LINES} more skipped rows[/]{more}")
    if out is not None:
        folder = save_run(out, result.run(loaded))
        console.print(f"wrote {folder}/ ({', '.join(result.tables)} + manifest.json)")
