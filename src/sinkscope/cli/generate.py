"""`sinkscope generate`: a thin front end over `sinkscope.analyses.generate` (sinks of every generated token)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from sinkscope.cli.options import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    NoFiguresOpt,
    OutOpt,
    OverwriteOpt,
    PickleOpt,
    PromptOpt,
    PromptsOpt,
    SeedOpt,
    TrustOpt,
    console,
    described,
    err_console,
    gather_prompts,
    load,
    progress_bars,
    user_errors,
)
from sinkscope.errors import SinkscopeError

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd

    from sinkscope.analyses.generate import GenerateResult

FIGURE = "sink_mass.png"


@user_errors
def generate_command(
    model: ModelOpt,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generate at most this many tokens per prompt")] = 256,
    chat: Annotated[bool, typer.Option(
        "--chat", help="Wrap each prompt in the tokenizer's chat template as a user turn (instruct models)")] = False,
    temperature: Annotated[float, typer.Option(min=0, help="0 decodes greedily; above 0 samples (seeded)")] = 0.0,
    top_k: Annotated[int | None, typer.Option(min=1, help="Sample only among the k most likely tokens")] = None,
    seed: described(SeedOpt, " for sampling") = 0,
    ignore_eos: Annotated[bool, typer.Option(
        "--ignore-eos", help="Keep generating past the end-of-sequence token")] = False,
    sink_threshold: Annotated[float, typer.Option(
        min=0.1, max=0.999, help="A key is a sink of a head's row when it gets more than this share of it "
                                 "(Gu et al. 2025's ε)")] = 0.3,
    secondary_threshold: Annotated[float, typer.Option(
        min=0.001, max=0.999, help="A key after position 0 is a secondary sink of a layer when the later generated "
                                   "tokens give it at least this share of their attention (mean over heads)")] = 0.05,
    min_later: Annotated[int, typer.Option(
        min=1, help="…read from at least this many later generated tokens")] = 16,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    no_figures: NoFiguresOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Sinks during generation: each generated token's attention row per layer and head (first-token share, entropy,
    top keys), and the keys that later tokens keep attending to (secondary sinks)."""
    from sinkscope.analyses.generate import GenerateSettings, generate

    texts, file_bad = gather_prompts(prompt, prompts)
    if file_bad:
        i, why = file_bad[0]
        raise SinkscopeError(f"prompt {i + 1}: {why}")
    settings = GenerateSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                                sink_threshold=sink_threshold, secondary_threshold=secondary_threshold,
                                min_later=min_later, stop_at_eos=not ignore_eos)
    loaded = load(model, device, dtype, trust_remote_code, allow_pickle)
    figures = {} if no_figures else {FIGURE: _draw}
    with progress_bars() as update:
        result = generate(loaded, texts, settings, chat=chat, out=out, overwrite=overwrite, figures=figures,
                          progress=update)
    _print_summary(result, loaded.info.name)
    if out is not None:
        listed = ", ".join(["steps", *result.tables, *figures])
        console.print(f"wrote {out}/ ({listed} + manifest.json)", highlight=False)


def _draw(tables: dict[str, pd.DataFrame], path: Path) -> None:
    """The sink-mass figure of the first prompt."""
    from sinkscope.report.figures.generate import sink_mass_figure
    from sinkscope.report.figures.profile import save_figure

    save_figure(sink_mass_figure(tables["sink_curves"], prompt_id=0), path)


def _print_summary(result: GenerateResult, name: str) -> None:
    """Per prompt: the text, position 0's share by layer band, and the strongest secondary sinks."""
    from rich.table import Table

    tables = result.tables
    for pid, text in enumerate(result.texts):
        gen = tables["generation"].iloc[pid]
        console.rule(f"{name}, prompt {pid}: {gen['n_prompt_tokens']} prompt tokens, {gen['n_generated']} generated "
                     f"(stopped: {gen['stopped']})")
        console.print(text, highlight=False, markup=False, soft_wrap=True)
        layers = tables["layers"][tables["layers"]["prompt_id"] == pid]
        first = layers["first_mass"].to_numpy()
        strong = int((first > result.settings.sink_threshold).sum())
        console.print(f"first-token share of the generated tokens' attention (mean over heads): {first.mean():.3f} "
                      f"over layers, above ε = {result.settings.sink_threshold:g} in {strong}/{len(first)} layers",
                      highlight=False)
        sinks = tables["secondary_sinks"]
        sinks = sinks[sinks["prompt_id"] == pid]
        if sinks.empty:
            console.print(f"no secondary sinks (m ≥ {result.settings.secondary_threshold:g} from ≥ "
                          f"{result.settings.min_later} later tokens)", highlight=False)
            continue
        by_key = (sinks.groupby(["position", "token", "generated"])
                  .agg(layers=("layer", "size"), mass=("mass", "max"), layer=("layer", lambda s: list(s)))
                  .reset_index().sort_values("mass", ascending=False).head(10))
        table = Table(title=f"secondary sinks: {sinks['position'].nunique()} keys in {sinks['layer'].nunique()} "
                            "layers (strongest 10)", title_justify="left")
        for col in ("position", "token", "where", "layers", "max share", "in layers"):
            table.add_column(col, justify="right" if col in ("position", "layers", "max share") else "left")
        for _, row in by_key.iterrows():
            in_layers = sorted(row["layer"])
            shown = ", ".join(map(str, in_layers[:8])) + (" …" if len(in_layers) > 8 else "")
            table.add_row(str(row["position"]), repr(row["token"]), "generated" if row["generated"] else "prompt",
                          str(row["layers"]), f"{row['mass']:.3f}", shown)
        console.print(table)
    if result.folder is None:
        err_console.print("pass --out DIR to keep the per-step tables", highlight=False)
