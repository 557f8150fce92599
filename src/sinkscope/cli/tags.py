"""`sinkscope tags`, `sinkscope tags-sensitivity`, `sinkscope probe`: catch, tag, release (seed 003) as run folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sinkscope.cli.options import (
    BatchSizeOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    LimitOpt,
    ModelOpt,
    ModelsOpt,
    NoFiguresOpt,
    OutOpt,
    OverwriteOpt,
    PickleOpt,
    PromptOpt,
    PromptsOpt,
    SeedOpt,
    ThresholdOpt,
    TrustOpt,
    console,
    described,
    err_console,
    load,
    progress_bars,
    read_prompts,
    renamed,
    user_errors,
)
from sinkscope.errors import SinkscopeError

if TYPE_CHECKING:
    import pandas as pd

RunOut = described(OutOpt, ", with figures")
EpsThreshold = described(ThresholdOpt, "; here column_mass's ε: key k is a sink of a head if α_k > ε")
PromptLimit = described(LimitOpt, " prompts (the first ones)")
EpsAlias = Annotated[float | None, typer.Option("--eps", hidden=True)]
MaxPromptsAlias = Annotated[int | None, typer.Option("--max-prompts", hidden=True)]


def _texts(prompts: Path | None, prompt: list[str] | None, limit: int | None) -> list[str]:
    texts = list(prompt or [])
    if prompts is not None:
        texts.extend(read_prompts(prompts)[0])
    texts = [t for t in texts if t.strip()]
    if limit is not None:
        if limit < 1:
            raise SinkscopeError("--limit must be at least 1")
        texts = texts[:limit]
    if not texts:
        raise SinkscopeError("no prompts: pass --prompts FILE (one per line) or --prompt TEXT (repeatable)")
    return texts


def _too_long(loaded: Any, texts: list[str]) -> list[str]:
    from sinkscope.capture import validate_prompts

    good, bad = validate_prompts(loaded, texts)
    for i, reason in bad:
        err_console.print(f"skipped prompt {i + 1}: {reason}")
    if not good:
        raise SinkscopeError("no usable prompt left")
    return [texts[i] for i in good]


def _print_table(title: str, frame: pd.DataFrame, limit: int = 12) -> None:
    import pandas as pd
    from rich.table import Table

    table = Table(title=title)
    for col in frame.columns:
        table.add_column(str(col), justify="right" if pd.api.types.is_numeric_dtype(frame[col]) else "left")
    for row in frame.head(limit).astype(object).itertuples(index=False):
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)
                        for v in row])
    console.print(table)


def _save(out: Path, tables: dict[str, pd.DataFrame], command: str, loaded: Any, params: dict[str, Any],
          overwrite: bool, figures: dict[str, Callable[[Path], Any]] | None = None) -> None:
    """Write the run folder; `figures` ({file name: draw(path)}) are drawn in a scratch folder and saved with the
    tables, so the manifest lists them with their checksums (the report embeds them)."""
    import tempfile

    from sinkscope.analyses.profile import model_manifest
    from sinkscope.store import Run, make_manifest, save_run

    run = Run(tables=tables, manifest=make_manifest(command, model_manifest(loaded), params))
    with tempfile.TemporaryDirectory(prefix="sinkscope-figures-") as scratch:
        files: dict[str, Path] = {}
        for name, draw in (figures or {}).items():
            draw(Path(scratch) / name)
            files[name] = Path(scratch) / name
        save_run(out, run, overwrite=overwrite, files=files)
    console.print(f"wrote {out}/ ({', '.join([*tables, *files])} + manifest.json)")


@user_errors
def tags_command(
    model: ModelOpt,
    prompts: PromptsOpt = None,
    prompt: PromptOpt = None,
    out: RunOut = None,
    overwrite: OverwriteOpt = False,
    threshold: EpsThreshold = 0.2,
    limit: PromptLimit = None,
    project: Annotated[bool, typer.Option("--project", help="Map tags through each head's slice of W_O")] = False,
    geometry: Annotated[bool, typer.Option("--geometry/--no-geometry",
                                           help="Tag cosines and tag-residual alignment (needs W_O)")] = True,
    pca_layer: Annotated[int, typer.Option(help="Layer of the PCA view (prompt 1)")] = 2,
    pca_head: Annotated[int, typer.Option(help="Head of the PCA view")] = 0,
    residual_layer: Annotated[int | None, typer.Option(help="Residual stream of the PCA view (default: last)")
                              ] = None,
    top: Annotated[int, typer.Option(min=1, help="Rows of the sink-token taxonomy to print")] = 10,
    no_figures: NoFiguresOpt = False,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
    eps: EpsAlias = None,
    max_prompts: MaxPromptsAlias = None,
) -> None:
    """Catch, tag, release: split every head output into its sink tag and the rest; variance explained per layer
    and head, sink-token taxonomy, tag cosines and the PCA view of one prompt (seed 003)."""
    from sinkscope.analyses.tags import pca_view, tag_statistics
    from sinkscope.report.figures.tags import plot_cosine_histogram, plot_pca

    threshold = renamed(threshold, eps)
    limit = renamed(limit, max_prompts)
    texts = _texts(prompts, prompt, limit)
    loaded = load(model, device, dtype, trust_remote_code, allow_pickle)
    n_layers = loaded.info.n_layers
    if residual_layer is not None and not -(n_layers + 1) <= residual_layer <= n_layers:
        raise SinkscopeError(f"--residual-layer {residual_layer} is out of range: the model has {n_layers} layers, "
                             f"so 0 (the embeddings) to {n_layers} (the last layer's output)")
    texts = _too_long(loaded, texts)
    with progress_bars() as update:
        result = tag_statistics(loaded, texts, threshold, project=project, geometry=geometry,
                                batch_size=batch_size, progress=update)
    view = pca_view(loaded, texts[0], pca_layer, pca_head, residual_layer, threshold)
    tables = {**result.tables, "pca": view}
    heads = result.tables["heads"]
    console.print(f"{loaded.info.name}: {loaded.info.n_layers} layers × {loaded.info.n_heads} heads, "
                  f"{len(texts)} prompt(s), ε = {threshold}; variance explained = Σ⟨õ,t̃⟩/Σ‖õ‖² "
                  f"({'residual space' if project else 'head space'})")
    console.print(f"mean sinks per head {heads['n_sinks'].mean():.3f}; mean variance explained "
                  f"{heads['var_explained'].mean():.3f} (heads with a sink: "
                  f"{heads.loc[heads['n_sinks'] > 0, 'var_explained'].mean():.3f})")
    per_layer = (result.tables["head_summary"].groupby("layer", as_index=False)
                 .agg(n_sinks=("n_sinks", "mean"), var_explained=("var_explained", "mean"),
                      var_projected=("var_projected", "mean")))
    _print_table("per layer (means over heads and prompts)", per_layer, limit=64)
    _print_table(f"top {top} sink tokens", result.tables["taxonomy"], limit=top)
    if geometry:
        cos, align = result.tables["tag_cosines"], result.tables["tag_alignment"]
        if len(cos):
            console.print(f"tag cosines: {len(cos)} pairs, mean |cos| {cos['cosine'].abs().mean():.3f} "
                          f"(same head {cos.loc[cos['kind'] == 'same_head', 'cosine'].abs().mean():.3f}, "
                          f"across heads {cos.loc[cos['kind'] == 'cross_head', 'cosine'].abs().mean():.3f}); "
                          f"tag vs residual of tagged tokens: mean cos {align['cosine'].mean():.3f}")
    if out is not None:
        figures: dict[str, Callable[[Path], Any]] = {}
        if not no_figures:
            figures["pca.png"] = lambda path: plot_pca(view, path)
            if geometry and len(result.tables["tag_cosines"]):
                figures["tag_cosines.png"] = lambda path: plot_cosine_histogram(result.tables["cosine_histogram"], path)
        _save(out, tables, "tags", loaded, {**result.params, "pca_layer": pca_layer, "pca_head": pca_head}, overwrite,
              figures)


@user_errors
def tags_sensitivity_command(
    model: ModelsOpt,
    prompts: PromptsOpt = None,
    prompt: PromptOpt = None,
    out: RunOut = None,
    overwrite: OverwriteOpt = False,
    thresholds: Annotated[str | None, typer.Option(
        "--thresholds", help="column_mass's ε values, comma-separated (default 0.03 … 0.4, 12 values)")] = None,
    limit: PromptLimit = None,
    project: Annotated[bool, typer.Option("--project", help="Variance in residual space (W_O)")] = False,
    no_figures: NoFiguresOpt = False,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
    eps: Annotated[str | None, typer.Option("--eps", hidden=True)] = None,
    max_prompts: MaxPromptsAlias = None,
) -> None:
    """Threshold sensitivity (seed 003 rebuttal): ε → mean number of sinks and mean variance explained, one curve
    per model (repeat --model for several)."""
    import pandas as pd

    from sinkscope.analyses.tags import DEFAULT_EPS_GRID, tag_statistics
    from sinkscope.report.figures.tags import plot_sensitivity

    thresholds = renamed(thresholds, eps)
    limit = renamed(limit, max_prompts)
    try:
        grid = [float(e) for e in thresholds.split(",")] if thresholds else list(DEFAULT_EPS_GRID)
    except ValueError:
        raise SinkscopeError(f"cannot read --thresholds '{thresholds}': use comma-separated numbers like "
                             "0.05,0.1,0.2") from None
    texts0 = _texts(prompts, prompt, limit)
    curves: dict[str, pd.DataFrame] = {}
    frames = []
    loaded = None
    for name in model:
        loaded = load(name, device, dtype, trust_remote_code, allow_pickle)
        texts = _too_long(loaded, texts0)
        with progress_bars() as update:
            result = tag_statistics(loaded, texts, min(grid), eps_grid=grid, project=project,
                                    batch_size=batch_size, progress=update)
        curve = result.tables["sensitivity"]
        curves[name] = curve
        frames.append(curve.assign(model=name))
        _print_table(f"{loaded.info.name}: threshold sensitivity ({len(texts)} prompts)", curve, limit=len(grid))
    table = pd.concat(frames, ignore_index=True)[["model", "eps", "mean_sinks", "mean_var_explained",
                                                  "mean_var_explained_sink_heads", "share_heads_with_sink"]]
    if out is not None and loaded is not None:
        _save(out, {"sensitivity": table}, "tags-sensitivity", loaded,
              {"models": model, "eps_grid": grid, "project": project, "n_prompts": len(texts0)}, overwrite,
              {} if no_figures else {"sensitivity.png": lambda path: plot_sensitivity(curves, path)})


@user_errors
def probe_command(
    model: ModelOpt,
    dataset: Annotated[str, typer.Option(
        "--dataset", "-d", help="geometry_of_truth, azaria_mitchell_true_false, sst2, or a JSONL file with text and "
                                "label")] = "geometry_of_truth",
    limit: described(LimitOpt, " statements (a class-balanced sample drawn with --seed)") = 200,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    threshold: EpsThreshold = 0.2,
    test_size: Annotated[float, typer.Option(help="Held-out share of the fixed split")] = 0.2,
    seed: described(SeedOpt, " of the sample, the split and the probes") = 0,
    c: Annotated[float, typer.Option("--c", help="Inverse L2 regularisation strength of the probes")] = 1.0,
    top: Annotated[int, typer.Option(min=1, help="Best heads to print")] = 10,
    data: described(DataOpt, ": the folder of the statement datasets (default: ../shared/data)") = None,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
    n: Annotated[int | None, typer.Option("--n", hidden=True)] = None,
    eps: EpsAlias = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", hidden=True)] = None,
) -> None:
    """Probes (seed 003 §4): logistic regression on the tag, the non-tag part and the full head output at the final
    token, per head; held-out accuracy and the best heads (high tag, low non-tag accuracy)."""
    from sinkscope.analyses.probes import best_heads, fit_probes, load_statements, probe_accuracy_table
    from sinkscope.analyses.tags import final_token_parts

    limit = renamed(limit, n)
    threshold = renamed(threshold, eps)
    data = renamed(data, data_dir)
    if limit < 1:  # the old spelling --n is not range-checked by typer: the message names --limit
        raise SinkscopeError("--limit must be at least 1")
    if not 0 < test_size < 1:
        raise SinkscopeError("--test-size must be in (0, 1)")
    if c <= 0:
        raise SinkscopeError(f"--c {c}: the inverse regularisation strength must be positive")
    texts, labels = load_statements(dataset, limit, seed=seed, data_dir=data)
    loaded = load(model, device, dtype, trust_remote_code, allow_pickle)
    with progress_bars() as update:
        features = final_token_parts(loaded, texts, threshold, batch_size=batch_size, progress=update)
    with console.status("fitting probes"):
        results = fit_probes(features, labels, test_size=test_size, random_state=seed, C=c)
    best = best_heads(results, top)
    means = results.groupby("part")["test_accuracy"].agg(["mean", "max"])
    console.print(f"{loaded.info.name}: {dataset}, {len(texts)} statements ({int(labels.sum())} positive), "
                  f"test share {test_size}, ε = {threshold}; chance {results['chance'].iloc[0]:.3f}")
    console.print("held-out accuracy over heads: " + ", ".join(
        f"{p} mean {means.loc[p, 'mean']:.3f} / max {means.loc[p, 'max']:.3f}" for p in means.index))
    _print_table(f"best {top} heads (high tag, low non-tag accuracy)", best, limit=top)
    if out is not None:
        _save(out, {"probes": results, "probe_heads": probe_accuracy_table(results), "best_heads": best},
              "probe", loaded, {"dataset": dataset, "n": len(texts), "eps": threshold, "test_size": test_size,
                                "seed": seed, "C": c}, overwrite)
