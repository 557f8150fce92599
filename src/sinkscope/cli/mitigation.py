"""`sinkscope calibrate` and `sinkscope bench-mitigation`: thin front ends over `sinkscope.analyses.calibrate`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sinkscope.cli.options import (
    DATA_HELP,
    BatchSizeOpt,
    CalibrationOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    LayersOpt,
    LimitOpt,
    MethodsOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    PickleOpt,
    SeedOpt,
    ThresholdOpt,
    TrustOpt,
    check_selection,
    console,
    described,
    load,
    parse_selection,
    progress_bars,
    user_errors,
)
from sinkscope.errors import SinkscopeError

if TYPE_CHECKING:
    import pandas as pd
    from rich.table import Table

DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="Dataset (sinkscope datasets lists them)")]
DatasetsOpt = Annotated[list[str], typer.Option("--dataset", "-d", help="Dataset (repeatable; sinkscope datasets "
                                                                         "lists them)")]
SampleSeedOpt = described(SeedOpt, " of the example sample")


def _examples(dataset: str, data: str | None, n: int, seed: int, causal_limit: int | None = None) -> Any:
    """The spec, the seeded sample of n examples, and the ids that get causal effects (as `sinkscope eval` picks)."""
    from sinkscope.analyses.evaluate.datasets import get_spec, load_examples, sample
    from sinkscope.analyses.evaluate.run import causal_subset

    spec = get_spec(dataset)
    loaded_rows = load_examples(spec, data)
    for skipped in loaded_rows.skipped[:5]:
        console.print(f"[yellow]skipped[/] row {skipped.row}: {skipped.reason}")
    return spec, sample(loaded_rows.examples, n, seed), causal_subset(loaded_rows.examples, causal_limit, seed)


@user_errors
def calibrate_command(
    model: ModelOpt,
    dataset: DatasetOpt = "sst2",
    data: described(DataOpt, DATA_HELP) = None,
    calib: Annotated[int, typer.Option(help="Calibration examples used for the head search")] = 50,
    heldout: Annotated[int, typer.Option(help="Held-out examples for the reported accuracy change")] = 100,
    beta: Annotated[float, typer.Option(help="ACT's scale for attention to sinks")] = 0.4,
    threshold: described(ThresholdOpt, "; here act's threshold on the causal column mean") = 0.1,
    layers: described(LayersOpt, "; the layers searched") = "all",
    top_layers: Annotated[int, typer.Option(min=1, help="Layers kept after the layer stage")] = 3,
    save: Annotated[Path, typer.Option(help="Where to write the calibration JSON")] = Path("calibration.json"),
    seed: SampleSeedOpt = 0,
    batch_size: BatchSizeOpt = 8,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """ACT's head search: find the heads whose calibration raises accuracy, report the held-out change, save them."""
    import pandas as pd

    from sinkscope.analyses.calibrate import accuracy, search_heads
    from sinkscope.store import Run, make_manifest, save_run

    if calib < 1 or heldout < 1:
        raise SinkscopeError("--calib and --heldout must be positive")
    layer_sel = parse_selection(layers)
    loaded = load(model, device, dtype, trust_remote_code, allow_pickle)
    check_selection(layer_sel, loaded.info.n_layers, "--layers")
    spec, examples, _ = _examples(dataset, data, calib + heldout, seed)
    if len(examples) < calib + 1:
        raise SinkscopeError(f"{dataset} has only {len(examples)} usable examples for --calib {calib}")
    calib_set, held = examples[:calib], examples[calib:]
    console.print(f"ACT head search on {len(calib_set)} calibration examples, {len(held)} held out")

    n_layers = len(layer_sel) if layer_sel is not None else loaded.info.n_layers
    totals = {"layer": n_layers, "head": min(top_layers, n_layers) * loaded.info.n_heads}  # heads: at most
    done = dict.fromkeys(totals, 0)
    with progress_bars() as update:

        def show(row: dict) -> None:
            where = f"L{row['layer']}" + ("" if row["head"] < 0 else f" h{row['head']}")
            console.print(f"  {row['stage']:5} {where:8} {row['accuracy']:.1%} ({row['gain']:+.1%}) "
                          f"{row['seconds']:.0f}s")
            done[row["stage"]] = done.get(row["stage"], 0) + 1
            update(f"ACT search: {row['stage']} trials", done[row["stage"]], totals.get(row["stage"]))

        result = search_heads(loaded, spec, calib_set, beta=beta, threshold=threshold, layers=layer_sel,
                              top_layers=top_layers, batch_size=batch_size, on_trial=show)
    before = accuracy(loaded, spec, held, batch_size=batch_size)
    after = accuracy(loaded, spec, held, result.interventions(), batch_size) if result.heads else before
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
        save_run(out, Run({"summary": summary, "search": pd.DataFrame(result.search)}, manifest), overwrite=overwrite)


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.1%}"


def _num(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:.2f}"


@user_errors
def bench_mitigation_command(
    model: ModelOpt,
    dataset: DatasetsOpt,
    data: described(DataOpt, DATA_HELP) = None,
    limit: described(LimitOpt, " examples per dataset, drawn with --seed") = 100,
    calibration: CalibrationOpt = None,
    beta: Annotated[float, typer.Option(help="ACT's β for the all-heads variant")] = 0.4,
    gamma: Annotated[list[float] | None, typer.Option(
        help="Weight on z-score sinks in the forward-pass reweighting (repeatable; 0 = DMR inside the model)")] = None,
    method: described(MethodsOpt, "; for the interpretation-only DMR rows (repeatable; default zscore and "
                                  "entropy_delta)") = None,
    causal_limit: Annotated[int | None, typer.Option(
        min=0, help="Causal ρ and top-K overlap on this many examples (the first of the seeded order, as in eval)")
    ] = None,
    trained_variants: Annotated[str | None, typer.Option(
        "--trained-variants", help="Also train these attention variants of the tiny LM from scratch on one budget "
        "(comma list of softmax, off_by_one, sink_logit, gated) and add them as rows of kind 'training'")] = None,
    train_steps: Annotated[int, typer.Option(min=1, help="Optimizer steps of each trained variant")] = 600,
    train_data: Annotated[Path | None, typer.Option(
        help="Text the variants train on: a .txt/.jsonl file or a folder of */test.jsonl (default: ../shared/data, "
             "sinkscope-tiny's corpus)")] = None,
    train_out: Annotated[Path | None, typer.Option(
        help="Keep the variants' train-lm run folders here (one per variant; reused when run again with the same "
             "settings; default: a temporary folder)")] = None,
    batch_size: BatchSizeOpt = 8,
    seed: SampleSeedOpt = 0,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """One table: accuracy, alignment and cost of no mitigation, position-0 masking, sink reweighting, ACT (all heads,
    searched heads) and detect-mask-renormalise (interpretation only), on the same examples; with
    --trained-variants, training-time mitigations (softmax variants trained from scratch on one budget) beside them."""
    import dataclasses
    import tempfile

    import pandas as pd

    from sinkscope.analyses.calibrate import ALIGNMENT, Calibration, mitigation_benchmark
    from sinkscope.store import Run, make_manifest, save_run

    gammas = gamma if gamma else [0.4]
    alignment = dataclasses.replace(ALIGNMENT, methods=tuple(method) if method else ALIGNMENT.methods,
                                    causal=bool(causal_limit), causal_limit=causal_limit)
    alignment.check()
    variants = _variants(trained_variants)
    text = _train_data(train_data) if variants else None
    loaded = load(model, device, dtype, trust_remote_code, allow_pickle)
    calib = Calibration.load(calibration) if calibration is not None else None
    with tempfile.TemporaryDirectory(prefix="sinkscope-variants-") as tmp:
        trained = _train(variants, text, train_out or Path(tmp), train_steps, seed) if variants else []
        frames = []
        for name in dataset:
            spec, examples, causal_ids = _examples(name, data, limit, seed, causal_limit)
            with progress_bars() as update:
                frames.append(mitigation_benchmark(loaded, spec, examples, calib, beta, batch_size, gammas=gammas,
                                                   alignment=alignment, causal_ids=causal_ids, progress=update))
            if trained:
                from sinkscope.analyses.trained import variant_rows

                frames.append(variant_rows(trained, spec, examples, batch_size))
    table = pd.concat(frames, ignore_index=True)
    if trained:
        order = {name: i for i, name in enumerate(dataset)}
        table = table.sort_values("dataset", key=lambda d: d.map(order), kind="stable").reset_index(drop=True)
    title = "inference-time" + (" and training-time" if trained else "")
    from sinkscope.cli.render import print_table

    print_table(console, render_mitigation_table(table, f"{loaded.info.name}: {title} mitigations (same prompts, "
                                                 f"seed {seed})", alignment.k), keep=2)  # split when too wide
    if out is not None:
        manifest = make_manifest("bench-mitigation", {"name": loaded.info.name},
                                 {"datasets": dataset, "limit": limit, "beta": beta, "gammas": gammas,
                                  "calibration": str(calibration) if calibration else None,
                                  "alignment": alignment.fingerprint(), "batch_size": batch_size,
                                  "trained_variants": variants, "train_steps": train_steps if variants else None,
                                  "train_data": str(text) if variants else None}, seed)
        console.print(f"wrote {save_run(out, Run({'mitigation': table}, manifest), overwrite=overwrite)}/")


def _variants(spec: str | None) -> list[str]:
    from sinkscope.toy.tinylm.variants import check_variant

    names = [v.strip() for v in (spec or "").split(",") if v.strip()]
    for name in names:
        check_variant(name)
    if len(set(names)) < len(names):
        raise SinkscopeError(f"--trained-variants names a variant twice: {spec}")
    return names


def _train_data(path: Path | None) -> Path:
    from sinkscope.analyses.evaluate.datasets import default_data_dir

    text = path or default_data_dir()
    if text is None or not Path(text).exists():
        raise SinkscopeError("--trained-variants needs text to train on: pass --train-data FILE_OR_FOLDER")
    return Path(text)


def _train(variants: list[str], text: Path, out: Path, steps: int, seed: int) -> list:
    from sinkscope.analyses.trained import train_variants

    console.print(f"training {', '.join(variants)} from scratch: {steps} steps each on {text}, seed {seed}")
    return train_variants(variants, text, out, steps, seed,
                          log=lambda msg: console.print(f"  {msg}") if "step" in msg else None)


def render_mitigation_table(table: pd.DataFrame, title: str, k: int = 10) -> Table:
    """The benchmark table for the terminal, with notes on how to read the interpretation-only rows."""
    from rich.table import Table

    view = Table(title=title, title_justify="left", caption_justify="left")
    cols = ["dataset", "method", "n", "accuracy", "changed", "ms/example", "cost ×", "Mismatch", "Match", "ρ",
            f"top-{k}", "n causal", "α₀", "null", "loss"]
    for col in cols:
        view.add_column(col, justify="left" if col in ("dataset", "method") else "right")
    for row in table.itertuples():
        interp = row.kind == "interpretation"
        view.add_row(row.dataset, row.method, str(row.n), f"({row.accuracy:.1%})" if interp else _pct(row.accuracy),
                     "—" if interp else _pct(row.changed_predictions), f"{row.ms_per_example:.0f}",
                     f"{row.cost_vs_none:.2f}", _num(row.mismatch), _num(row.match), _num(row.spearman),
                     _num(row.topk_overlap), str(row.n_causal) if row.n_causal else "—",
                     _num(getattr(row, "sink_share", math.nan)), _num(getattr(row, "null_mass", math.nan)),
                     _num(getattr(row, "loss", math.nan)))
    dmr = table[table["kind"] == "interpretation"]
    notes = [
        "(accuracy): interpretation-only rows (dmr_*) re-read the baseline's attention after the forward pass; they "
        "change no prediction, so accuracy is the baseline's.",
        f"Mismatch / Match: share of the prompt's task keywords among the last token's top-{k} attended tokens (last "
        "layer, mean over heads), on wrong / right predictions; ρ and top-k: Spearman and top-k overlap of that "
        "attention with each token's causal effect, over n causal examples (--causal-limit). The none row scores "
        "the raw attention, dmr_* the attention after detect-mask-renormalise.",
    ]
    if not dmr.empty:
        own = ", ".join(f"{m[4:]} {ms:.2f} ms" for m, ms in dmr.groupby("method", sort=False)["dmr_ms"].mean().items())
        notes.append(f"ms/example of dmr_* rows: the prediction with the last token's attention captured, plus DMR "
                     f"itself ({own} per example).")
    notes.append("α₀ / null / loss: on the prompts, under the method — the attention on position 0 (queries i ≥ 1) and "
                 "on the extra logit (off-by-one, learned sink), mean over queries, layers and heads; next-token "
                 "loss (nats/token).")
    trained = table[table["kind"] == "training"]
    if not trained.empty:
        steps = int(trained.iloc[0].train_steps)
        notes.append(f"trained_*: the tiny LM trained from scratch with that attention variant ({steps}"
                     " steps each, same text, seed and architecture); changed and cost × compare with "
                     "trained_softmax. Held-out text loss: " + ", ".join(
                         f"{m[8:]} {v:.3f}" for m, v in trained.groupby("method", sort=False)["heldout_loss"]
                         .first().items()) + ".")
    notes.append("Times from one run on this machine; compare them within the table only.")
    view.caption = "\n".join(notes)
    return view
