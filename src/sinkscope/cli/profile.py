"""`sinkscope profile`, `explain` and `demo`: thin front ends over `sinkscope.analyses.profile` and `.explain`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sinkscope.cli.options import (
    BatchSizeOpt,
    CalibrationOpt,
    DeviceOpt,
    DtypeOpt,
    HeadsOpt,
    LayersOpt,
    MethodOpt,
    MinQueriesOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    PickleOpt,
    PromptOpt,
    PromptsOpt,
    ThresholdOpt,
    TrustOpt,
    console,
    described,
    err_console,
    gather_prompts,
    load,
    method_params,
    parse_selection,
    progress_bars,
    user_errors,
)
from sinkscope.errors import SinkscopeError

if TYPE_CHECKING:
    from sinkscope.models import LoadedModel

AVERAGED = "; their last-token attention is averaged"
TopKOpt = Annotated[int, typer.Option("--top-k", min=1, help="How many top tokens to list")]
MAP_PROMPTS = 8
MapsOpt = Annotated[int, typer.Option(
    "--maps", min=0, help="With --out: keep the full attention maps of the first N prompts of ≤ 64 tokens (L·H·n² "
    "rows each), shown when a head is clicked in the report; 0 keeps none")]


def _calibrated(loaded: LoadedModel, calibration: Path | None) -> Any:
    """A context that applies a saved ACT calibration to every forward pass (or does nothing)."""
    from contextlib import nullcontext

    if calibration is None:
        return nullcontext()
    from sinkscope.analyses.calibrate import Calibration
    from sinkscope.capture import intervene

    interventions = Calibration.load(calibration).interventions()
    return intervene(loaded.model, *interventions) if interventions else nullcontext()


def excluded_line(min_queries: int, excluded: int) -> str:
    """The summary line that states the column detectors' minimum of queries and what it left out."""
    if not min_queries:
        return "column detector: every key read (--min-queries 0)"
    return (f"column detector: keys seen by fewer than min({min_queries}, 10% of the prompt's tokens) queries are "
            f"ignored — {excluded} key(s) excluded (--min-queries 0 keeps them)")


@user_errors
def profile_command(
    model: ModelOpt,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    method: MethodOpt = "column_mass",
    threshold: ThresholdOpt = None,
    min_queries: MinQueriesOpt = None,
    out: described(OutOpt, ", with report.html") = None,
    overwrite: OverwriteOpt = False,
    batch_size: BatchSizeOpt = 8,
    calibration: CalibrationOpt = None,
    maps: MapsOpt = MAP_PROMPTS,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Sinks per layer: the share of heads with a sink, α at position 0, and the sink tokens with their mass."""
    from sinkscope.analyses.profile import profile_in_batches
    from sinkscope.capture import CaptureConfig
    from sinkscope.cli.render import layer_table
    from sinkscope.detect import get_detector

    texts, file_bad = gather_prompts(prompt, prompts)
    params = method_params(method, threshold, min_queries)
    loaded = load(model, device, dtype, trust_remote_code, allow_pickle)
    # a batch's tables at a time: written to --out, or only summarised
    with _calibrated(loaded, calibration), progress_bars() as update:
        summary = profile_in_batches(loaded, texts, method, params, out=out, overwrite=overwrite,
                                     capture=CaptureConfig(), batch_size=batch_size, progress=update, maps=maps)
    skipped = dict(summary.skipped)
    skipped.update(dict(file_bad))
    info = loaded.info
    title = (f"{info.name}: {info.n_layers} layers × {info.n_heads} heads, {summary.n_prompts} prompt(s), "
             f"method {method} {get_detector(method).params | summary.params}")
    console.print(layer_table(summary.layers, title))
    if "min_queries" in summary.params:
        console.print(excluded_line(summary.params["min_queries"], summary.excluded), highlight=False,
                      soft_wrap=True)
    for i, why in sorted(skipped.items()):
        err_console.print(f"[yellow]skipped[/] prompt {i + 1}: {why}", highlight=False)
    if summary.folder is not None:
        from sinkscope.report import write_report

        console.print(f"wrote {summary.folder}/ ({', '.join(summary.rows)} + manifest.json)")
        console.print(f"wrote {write_report(summary.folder)}")


@user_errors
def explain_command(
    model: ModelOpt,
    text: Annotated[str, typer.Option("--text", help="The prompt to explain")],
    method: MethodOpt = "zscore",
    threshold: ThresholdOpt = None,
    layers: described(LayersOpt, AVERAGED) = "-1",
    heads: described(HeadsOpt, AVERAGED) = "all",
    top_k: TopKOpt = 10,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """The prompt's tokens shaded by last-token attention before and after detect-mask-renormalise, with the top-K."""
    from sinkscope.analyses.explain import explain
    from sinkscope.cli.render import print_explanation
    from sinkscope.store import Run, make_manifest, save_run

    params = method_params(method, threshold)
    layer_sel, head_sel = parse_selection(layers), parse_selection(heads)
    loaded = load(model, device, dtype, trust_remote_code, allow_pickle)
    ex = explain(loaded, text, method, params, layers=layer_sel, heads=head_sel)
    print_explanation(console, ex, top_k)
    if out is not None:
        manifest = make_manifest("explain", {"name": loaded.info.name, "model_type": loaded.info.model_type},
                                 {"method": method, **ex.params, "layers": ex.layers, "heads": ex.heads, "text": text})
        folder = save_run(out, Run(tables={"tokens": ex.table()}, manifest=manifest), overwrite=overwrite)
        console.print(f"wrote {folder}/ (tokens + manifest.json)")


DEMO_PROMPTS = [
    "Classify the sentiment of the sentence as positive or negative.\nSentence: the film is a charming, funny "
    "delight from start to finish.\nSentiment:",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Attention sinks are tokens that draw a large share of attention while carrying little meaning.",
    "Question: what is the capital of France? Answer:",
]


@user_errors
def demo_command(
    models: Annotated[str, typer.Option("--models", help="Comma-separated model names")] = "smollm2,minilm",
    out: described(OutOpt, " per model (OUT/NAME/), with report.html") = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Profile and explain a few prompts on real models that install offline (see README); skips missing ones."""
    from sinkscope.analyses.explain import explain
    from sinkscope.analyses.profile import profile
    from sinkscope.cli.render import layer_table, print_explanation
    from sinkscope.models import check_device, parse_dtype
    from sinkscope.store import save_run

    check_device(device)  # the options themselves are wrong for every model: one error, not a skip per model
    parse_dtype(dtype)
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise SinkscopeError("--models is empty: name at least one model (sinkscope models lists them)")
    shown = 0
    for name in names:
        try:
            loaded = load(name, device, dtype, trust_remote_code, allow_pickle)
        except SinkscopeError as err:
            err_console.print(f"[yellow]skipping {name}:[/] {err}", soft_wrap=True)
            continue
        shown += 1
        result = profile(loaded, DEMO_PROMPTS, "column_mass")
        info = loaded.info
        console.rule(f"{name}: {info.n_layers} layers × {info.n_heads} heads ({info.n_kv_heads} KV heads)")
        console.print(layer_table(result.tables["layers"], f"{name}: sinks per layer (column_mass, ε = 0.2)"))
        print_explanation(console, explain(loaded, DEMO_PROMPTS[0], "zscore"), top_k=10)
        if out is not None:
            from sinkscope.analyses.maps import add_maps, capture_maps
            from sinkscope.report import write_report

            run = add_maps(result.run(loaded, command="demo"), capture_maps(loaded, DEMO_PROMPTS))
            folder = save_run(out / name.replace(":", "-"), run, overwrite=overwrite)
            console.print(f"wrote {folder}/ and {write_report(folder)}")
    if not shown:
        raise SinkscopeError(f"none of {', '.join(names)} could be loaded (reasons above); install the built-in "
                             "models with `make models`, or pass --models with others")
