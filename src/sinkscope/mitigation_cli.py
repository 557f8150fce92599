"""`sinkscope calibrate` and `sinkscope bench-mitigation`: thin front ends over `sinkscope.calibrate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from sinkscope.calibrate import Calibration, accuracy, mitigation_benchmark, search_heads
from sinkscope.errors import SinkscopeError
from sinkscope.evaluate.datasets import get_spec, load_examples, sample
from sinkscope.models import load_model
from sinkscope.store import Run, make_manifest, save_run

console = Console(emoji=False, highlight=False)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hub id, local folder, or built-in name")]
DatasetOpt = Annotated[str, typer.Option(help="Dataset name (sst2, sst5, mr, subj, dbpedia, agnews, trec, cb, boolq)")]
DataOpt = Annotated[str | None, typer.Option(help="Data file/folder, or 'hub' (default: ../shared/data or the Hub)")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write a run folder (Parquet tables + manifest)")]


def _examples(dataset: str, data: str | None, n: int, seed: int):
    spec = get_spec(dataset)
    loaded_rows = load_examples(spec, data)
    for skipped in loaded_rows.skipped[:5]:
        console.print(f"[yellow]skipped[/] row {skipped.row}: {skipped.reason}")
    return spec, sample(loaded_rows.examples, n, seed)


def calibrate_command(
    model: ModelOpt,
    dataset: DatasetOpt = "sst2",
    data: DataOpt = None,
    calib: Annotated[int, typer.Option(help="Calibration examples used for the head search")] = 50,
    heldout: Annotated[int, typer.Option(help="Held-out examples for the reported accuracy change")] = 100,
    beta: Annotated[float, typer.Option(help="ACT's scale for attention to sinks")] = 0.4,
    threshold: Annotated[float, typer.Option(help="ACT's sink threshold on the causal column mean")] = 0.1,
    layers: Annotated[str, typer.Option(help="Layers to search: 'all', '0-5', '3,7'")] = "all",
    top_layers: Annotated[int, typer.Option(help="Layers kept after the layer stage")] = 3,
    save: Annotated[Path, typer.Option(help="Where to write the calibration JSON")] = Path("calibration.json"),
    seed: Annotated[int, typer.Option(help="Sampling seed")] = 0,
    out: OutOpt = None,
) -> None:
    """ACT's head search: find the heads whose calibration raises accuracy, report the held-out change, save them."""
    from sinkscope.cli import parse_selection

    if calib < 1 or heldout < 1:
        raise SinkscopeError("--calib and --heldout must be positive")
    loaded = load_model(model)
    spec, examples = _examples(dataset, data, calib + heldout, seed)
    if len(examples) < calib + 1:
        raise SinkscopeError(f"{dataset} has only {len(examples)} usable examples for --calib {calib}")
    calib_set, held = examples[:calib], examples[calib:]
    result = search_heads(loaded, spec, calib_set, beta=beta, threshold=threshold, layers=parse_selection(layers),
                          top_layers=top_layers, progress=True)
    before = accuracy(loaded, spec, held)
    after = accuracy(loaded, spec, held, result.interventions()) if result.heads else before
    path = result.save(save)
    heads = ", ".join(f"L{layer}: {hs}" for layer, hs in sorted(result.heads.items())) or "none helped"
    console.print(f"{loaded.info.name} on {dataset}: calibrated heads {heads} (β = {beta})")
    console.print(f"calibration set ({len(calib_set)}): {result.base_accuracy:.1%} → "
                  f"{(result.calibrated_accuracy or result.base_accuracy):.1%}")
    console.print(f"held-out ({len(held)}): {before:.1%} → {after:.1%} ({after - before:+.1%})")
    console.print(f"wrote {path}")
    if out is not None:
        summary = pd.DataFrame([{"dataset": dataset, "split": "calibration", "n": len(calib_set),
                                 "before": result.base_accuracy, "after": result.calibrated_accuracy},
                                {"dataset": dataset, "split": "heldout", "n": len(held), "before": before,
                                 "after": after}])
        manifest = make_manifest("calibrate", {"name": loaded.info.name},
                                 {"dataset": dataset, "beta": beta, "threshold": threshold, "heads": result.heads},
                                 seed)
        save_run(out, Run({"summary": summary, "search": pd.DataFrame(result.search)}, manifest))


def bench_mitigation_command(
    model: ModelOpt,
    dataset: Annotated[list[str], typer.Option(help="Dataset name (repeatable)")],
    data: DataOpt = None,
    limit: Annotated[int, typer.Option(help="Examples per dataset (fixed seed)")] = 100,
    calibration: Annotated[Path | None, typer.Option(help="ACT calibration JSON from `sinkscope calibrate`")] = None,
    beta: Annotated[float, typer.Option(help="ACT's β for the all-heads variant")] = 0.4,
    seed: Annotated[int, typer.Option(help="Sampling seed")] = 0,
    out: OutOpt = None,
) -> None:
    """One table: accuracy and cost of no mitigation, position-0 masking, ACT on all heads and ACT on searched heads."""
    loaded = load_model(model)
    calib = Calibration.load(calibration) if calibration is not None else None
    frames = []
    for name in dataset:
        spec, examples = _examples(name, data, limit, seed)
        frames.append(mitigation_benchmark(loaded, spec, examples, calib, beta))
    table = pd.concat(frames, ignore_index=True)
    view = Table(title=f"{loaded.info.name}: inference-time mitigations (same prompts, seed {seed})",
                 title_justify="left")
    for col in ("dataset", "method", "n", "accuracy", "changed", "ms/example", "cost ×"):
        view.add_column(col, justify="left" if col in ("dataset", "method") else "right")
    for row in table.itertuples():
        view.add_row(row.dataset, row.method, str(row.n), f"{row.accuracy:.1%}", f"{row.changed_predictions:.1%}",
                     f"{row.ms_per_example:.0f}", f"{row.cost_vs_none:.2f}")
    console.print(view)
    if out is not None:
        manifest = make_manifest("bench-mitigation", {"name": loaded.info.name},
                                 {"datasets": dataset, "limit": limit, "beta": beta,
                                  "calibration": str(calibration) if calibration else None}, seed)
        console.print(f"wrote {save_run(out, Run({'mitigation': table}, manifest))}/")
