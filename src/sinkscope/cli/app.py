"""The `sinkscope` command: thin typer front ends over the Python API."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from sinkscope.capture import CaptureConfig
from sinkscope.detect import DETECTORS, get_detector, list_detectors
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel, list_builtins, load_model

app = typer.Typer(
    help="Measure, explain and remove attention sinks in transformer models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(emoji=False, highlight=False)
err_console = Console(stderr=True, emoji=False, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Print a SinkscopeError as one line on stderr and exit with status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SinkscopeError as err:
            err_console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Hub id, local folder, or built-in name (sinkscope models)")
]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write a run folder (Parquet tables + manifest.json)")]
DeviceOpt = Annotated[str | None, typer.Option(
    help="Device: cpu, cuda, cuda:1, or auto (model parallel: layers spread over every GPU, then CPU, via accelerate)")]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow code from the model repository to run")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (.bin) checkpoints; they can run code")]
ThresholdOpt = Annotated[
    float | None, typer.Option(help="The method's threshold (θ, α, τ or ε; see sinkscope detectors)")
]


def _load(model: str, device: str | None, dtype: str, trust: bool, allow_pickle: bool) -> LoadedModel:
    with console.status(f"loading {model}"):
        return load_model(model, device=device, dtype=dtype, trust_remote_code=trust, allow_pickle=allow_pickle)


def _method_params(method: str, threshold: float | None) -> dict[str, Any]:
    detector = get_detector(method)
    if threshold is None:
        return {}
    first = next(iter(k for k in detector.params if k != "dims"))
    return {first: threshold}


def _calibrated(loaded: LoadedModel, calibration: Path | None) -> Any:
    """A context that applies a saved ACT calibration to every forward pass (or does nothing)."""
    from contextlib import nullcontext

    if calibration is None:
        return nullcontext()
    from sinkscope.analyses.calibrate import Calibration
    from sinkscope.capture import intervene

    interventions = Calibration.load(calibration).interventions()
    return intervene(loaded.model, *interventions) if interventions else nullcontext()


def parse_selection(spec: str | None) -> list[int] | None:
    """'all' or None → None; '-1' → [-1]; '0,2,5' → [0, 2, 5]; '3-6' → [3, 4, 5, 6]."""
    if spec is None or spec == "all":
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise SinkscopeError(f"cannot read the selection '{spec}': use 'all', '-1', '0,2,5' or '3-6'") from None
    return out


def read_prompts(path: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """Prompts from a text file (one per line) or JSONL (a "text" or "prompt" field per line).

    Returns the prompts (unreadable lines become "" so line numbers stay aligned) and (line index, reason) for
    unreadable lines."""
    if not path.exists():
        raise SinkscopeError(f"prompt file {path} does not exist")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if path.suffix != ".jsonl":
        return lines, []
    prompts, bad = [], []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            text = record.get("text", record.get("prompt")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError("no 'text' or 'prompt' string field")
            prompts.append(text)
        except ValueError as err:
            prompts.append("")
            bad.append((i, f"not a JSON object with a text field ({err})"))
    return prompts, bad


def gather_prompts(prompt: list[str] | None, prompts: Path | None) -> tuple[list[str], list[tuple[int, str]]]:
    """--prompt texts followed by the --prompts file's lines, and (index, reason) for unreadable lines."""
    texts = list(prompt or [])
    file_bad: list[tuple[int, str]] = []
    if prompts is not None:
        from_file, bad = read_prompts(prompts)
        file_bad = [(len(texts) + i, why) for i, why in bad]
        texts.extend(from_file)
    if not texts:
        raise SinkscopeError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE (one per line)")
    return texts, file_bad


@app.command()
@user_errors
def profile(
    model: ModelOpt,
    prompt: Annotated[list[str] | None, typer.Option(help="A prompt (repeat for several)")] = None,
    prompts: Annotated[Path | None, typer.Option(help="File with one prompt per line (.txt) or JSONL")] = None,
    method: Annotated[str, typer.Option(help=f"Detector: {', '.join(list_detectors())}")] = "column_mass",
    threshold: ThresholdOpt = None,
    out: OutOpt = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass")] = 8,
    calibration: Annotated[Path | None, typer.Option(help="Apply an ACT calibration (sinkscope calibrate)")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Sinks per layer: the share of heads with a sink, α at position 0, and the sink tokens with their mass."""
    from sinkscope.analyses.profile import profile as run_profile
    from sinkscope.cli.render import layer_table
    from sinkscope.store import save_run

    texts, file_bad = gather_prompts(prompt, prompts)
    params = _method_params(method, threshold)
    loaded = _load(model, device, dtype, trust_remote_code, allow_pickle)
    with _calibrated(loaded, calibration):
        result = run_profile(loaded, texts, method, params, capture=CaptureConfig(), batch_size=batch_size,
                             progress=True)
    skipped = dict(result.skipped)
    skipped.update(dict(file_bad))
    info = loaded.info
    title = (f"{info.name}: {info.n_layers} layers × {info.n_heads} heads, {result.trace.n_prompts} prompt(s), "
             f"method {method} {get_detector(method).params | params}")
    console.print(layer_table(result.tables["layers"], title))
    for i, why in sorted(skipped.items()):
        err_console.print(f"[yellow]skipped[/] prompt {i + 1}: {why}", highlight=False)
    if out is not None:
        from sinkscope.report import write_report

        folder = save_run(out, result.run(loaded))
        console.print(f"wrote {folder}/ ({', '.join(result.tables)} + manifest.json)")
        console.print(f"wrote {write_report(folder)}")


@app.command()
@user_errors
def explain(
    model: ModelOpt,
    text: Annotated[str, typer.Option(help="The prompt to explain")],
    method: Annotated[str, typer.Option(help=f"Detector: {', '.join(list_detectors())}")] = "zscore",
    threshold: ThresholdOpt = None,
    layers: Annotated[str, typer.Option(help="Layers to average: -1 (last), 'all', '0,2', '3-6'")] = "-1",
    heads: Annotated[str, typer.Option(help="Heads to average: 'all', '0,2', '1-3'")] = "all",
    top_k: Annotated[int, typer.Option(help="How many top tokens to list")] = 10,
    out: OutOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """The prompt's tokens shaded by last-token attention before and after detect-mask-renormalise, with the top-K."""
    from sinkscope.analyses.explain import explain as run_explain
    from sinkscope.cli.render import print_explanation
    from sinkscope.store import Run, make_manifest, save_run

    params = _method_params(method, threshold)
    loaded = _load(model, device, dtype, trust_remote_code, allow_pickle)
    ex = run_explain(loaded, text, method, params, layers=parse_selection(layers), heads=parse_selection(heads))
    print_explanation(console, ex, top_k)
    if out is not None:
        manifest = make_manifest("explain", {"name": loaded.info.name, "model_type": loaded.info.model_type},
                                 {"method": method, **ex.params, "layers": ex.layers, "heads": ex.heads, "text": text})
        folder = save_run(out, Run(tables={"tokens": ex.table()}, manifest=manifest))
        console.print(f"wrote {folder}/ (tokens + manifest.json)")


DEMO_PROMPTS = [
    "Classify the sentiment of the sentence as positive or negative.\nSentence: the film is a charming, funny "
    "delight from start to finish.\nSentiment:",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Attention sinks are tokens that draw a large share of attention while carrying little meaning.",
    "Question: what is the capital of France? Answer:",
]


@app.command()
@user_errors
def demo(
    models: Annotated[str, typer.Option(help="Comma-separated model names")] = "smollm2,minilm",
    out: OutOpt = None,
) -> None:
    """Profile and explain a few prompts on real models that install offline (see README); skips missing ones."""
    from sinkscope.analyses.explain import explain as run_explain
    from sinkscope.analyses.profile import profile as run_profile
    from sinkscope.cli.render import layer_table, print_explanation
    from sinkscope.store import save_run

    for name in [m.strip() for m in models.split(",") if m.strip()]:
        try:
            loaded = _load(name, None, "float32", False, False)
        except SinkscopeError as err:
            err_console.print(f"[yellow]skipping {name}:[/] {err}")
            continue
        result = run_profile(loaded, DEMO_PROMPTS, "column_mass")
        info = loaded.info
        console.rule(f"{name}: {info.n_layers} layers × {info.n_heads} heads ({info.n_kv_heads} KV heads)")
        console.print(layer_table(result.tables["layers"], f"{name}: sinks per layer (column_mass, ε = 0.2)"))
        print_explanation(console, run_explain(loaded, DEMO_PROMPTS[0], "zscore"), top_k=10)
        if out is not None:
            from sinkscope.analyses.maps import add_maps, capture_maps
            from sinkscope.report import write_report

            run = add_maps(result.run(loaded, command="demo"), capture_maps(loaded, DEMO_PROMPTS))
            folder = save_run(out / name.replace(":", "-"), run)
            console.print(f"wrote {folder}/ and {write_report(folder)}")


def read_text(path: Path) -> str:
    """A text file, or a JSONL file whose `text` fields are joined with blank lines."""
    if not path.exists():
        raise SinkscopeError(f"text file {path} does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for i, line in enumerate(raw.splitlines()):
        try:
            texts.append(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError):
            raise SinkscopeError(f"{path} line {i + 1} is not a JSON object with a 'text' field") from None
    return "\n\n".join(texts)


@app.command()
@user_errors
def stream(
    model: ModelOpt,
    text: Annotated[Path, typer.Option(help="Text file (or JSONL with a text field) to score")],
    sink: Annotated[int, typer.Option(help="Initial tokens kept in the cache")] = 4,
    window: Annotated[int, typer.Option(help="Recent tokens kept in the cache")] = 256,
    max_tokens: Annotated[int, typer.Option(help="Score the first N tokens of the text")] = 1024,
    out: OutOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Perplexity with the full KV cache, StreamingLLM's sinks + window, and window only, side by side."""
    import pandas as pd
    from rich.table import Table

    from sinkscope.analyses.profile import profile as run_profile
    from sinkscope.analyses.stream import compare, perplexity
    from sinkscope.store import Run, make_manifest, save_run

    loaded = _load(model, device, dtype, trust_remote_code, allow_pickle)
    ids = loaded.tokenizer(read_text(text))["input_ids"][:max_tokens]
    budget = sink + window
    if len(ids) <= budget + 1:
        raise SinkscopeError(f"the text has {len(ids)} tokens: it needs more than sink + window = {budget} to evict")
    sinks = run_profile(loaded, [loaded.tokenizer.decode(ids[:256])], "column_mass").tables["layers"]
    results = compare(loaded, ids, sink, window, progress=True)
    table = Table(title=f"{loaded.info.name}: {len(ids)} tokens, cache budget {budget} ({sink} sinks + {window})",
                  title_justify="left")
    for col in ("cache", "ppl (all)", f"ppl (tokens ≥ {budget}, after eviction)"):
        table.add_column(col, justify="left" if col == "cache" else "right")
    rows = []
    for r in results:
        after = perplexity(r.nll[budget:])
        rows.append({"policy": r.policy, "sink": sink, "window": window, "ppl": r.perplexity, "ppl_after": after})
        table.add_row(r.policy, f"{r.perplexity:.2f}", f"{after:.2f}")
    console.print(table)
    strong = sinks[sinks["pos0_alpha"] > 0.2]["layer"].tolist()
    console.print(f"position-0 sink (α₀ > 0.2) in {len(strong)}/{len(sinks)} layers; mean α₀ over layers "
                  f"{sinks['pos0_alpha'].mean():.2f}" + ("" if strong else " — the model has no first-token sink, "
                  "so this comparison tests StreamingLLM's precondition rather than its result"))
    if out is not None:
        tokens = pd.DataFrame({f"nll_{r.policy}": r.nll.numpy() for r in results})
        tokens.insert(0, "position", range(1, len(ids)))
        manifest = make_manifest("stream", {"name": loaded.info.name}, {"sink": sink, "window": window,
                                 "text": str(text), "n_tokens": len(ids)})
        folder = save_run(out, Run({"perplexity": pd.DataFrame(rows), "tokens": tokens, "layers": sinks}, manifest))
        console.print(f"wrote {folder}/")


@app.command("models")
def models_cmd() -> None:
    """List the built-in model names (any Hub id or local folder also works)."""
    for name in list_builtins():
        console.print(name, highlight=False)


@app.command()
def detectors() -> None:
    """List the sink detectors with their formula, defaults and source."""
    for name in list_detectors():
        d = DETECTORS[name]
        console.print(f"[bold]{name}[/] ({d.statistic}, {d.returns}) {dict(d.params)}: {d.doc} — {d.source}",
                      highlight=False)


def _mount_subapps() -> None:
    from sinkscope.cli.report import report_command

    app.command("report")(user_errors(report_command))
    from sinkscope.cli.mechanisms import mechanisms_command
    from sinkscope.cli.train import plot_trace, train_lm

    app.command("train-lm")(user_errors(train_lm))
    app.command("plot-trace")(user_errors(plot_trace))
    from sinkscope.cli.tags import probe_command, tags_command, tags_sensitivity_command

    app.command("tags")(tags_command)
    app.command("tags-sensitivity")(tags_sensitivity_command)
    app.command("probe")(probe_command)
    from sinkscope.cli.evaluate import eval_command

    app.command("eval")(user_errors(eval_command))
    from sinkscope.cli.mitigation import bench_mitigation_command, calibrate_command

    app.command("calibrate")(user_errors(calibrate_command))
    app.command("bench-mitigation")(user_errors(bench_mitigation_command))
    from sinkscope.cli.sweep import sweep_command
    app.command("sweep")(user_errors(sweep_command))

    app.command("mechanisms")(mechanisms_command)
    try:
        from sinkscope.cli.toy import app as toy_app
    except ImportError:
        return
    app.add_typer(toy_app, name="toy", help="The synthetic averaging task of seed 003 (catch, tag, release)")


_mount_subapps()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
