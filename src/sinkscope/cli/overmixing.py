"""`sinkscope overmixing`: how far a perturbation of one token spreads, layer by layer, with the sink intact and
masked (Barbero et al. 2025), beside each layer's representation entropy, BOS sink rate and BOS norm
(Queipo-de-Llano et al. 2025), as a run folder of tables and a figure."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from sinkscope.cli.dormant import ExcerptCharsOpt, MaxTokensOpt, save_with_figures
from sinkscope.cli.options import (
    DATA_HELP,
    BatchSizeOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    LimitOpt,
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


@user_errors
def overmixing_command(
    model: ModelOpt,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="Take the prompts from a shared data set instead: a classification set's texts (sinkscope "
                          "datasets) or tiny_shakespeare excerpts")] = None,
    data: described(DataOpt, DATA_HELP) = None,
    limit: described(LimitOpt, " prompts of --dataset (a seeded draw, as eval draws)") = 16,
    seed: described(SeedOpt, " of the perturbation's direction and of the draw from --dataset") = 0,
    position: Annotated[int, typer.Option(min=0, max=1_000_000, help="The perturbed token's position")] = 1,
    epsilon: Annotated[float, typer.Option(
        "--epsilon", help="The perturbation's size ε, relative to the RMS norm of the token embeddings")] = 0.01,
    sink: Annotated[int, typer.Option(min=0, max=1_000_000, help="The sink key masked in the second condition")] = 0,
    sink_threshold: Annotated[float, typer.Option(
        help="α₀ above which a head counts in the BOS sink rate (Gu et al. 2024: 0.3)")] = 0.3,
    max_tokens: MaxTokensOpt = 128,
    excerpt_chars: ExcerptCharsOpt = 600,
    out: described(OutOpt, ", with the figure overmixing.png") = None,
    overwrite: OverwriteOpt = False,
    no_figures: NoFiguresOpt = False,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Over-mixing (Barbero et al. 2025): the relative change ‖Δh_j‖/‖h_j‖ of every later token when one token's
    embedding is perturbed, per layer, with the sink intact and masked; beside it each layer's representation entropy,
    BOS sink rate and ‖h₀‖ / median ‖h_j‖ (Queipo-de-Llano et al. 2025)."""
    from sinkscope.analyses.overmixing import overmixing

    if not epsilon > 0:
        raise SinkscopeError(f"--epsilon {epsilon}: pass a positive perturbation size")
    if not 0 < sink_threshold < 1:
        raise SinkscopeError(f"--sink-threshold {sink_threshold}: pass a share in (0, 1)")
    if position == sink:
        raise SinkscopeError(f"--position {position} is the --sink itself; perturb another token")
    file_bad: list[tuple[int, str]] = []
    if dataset is not None:
        if prompt or prompts is not None:
            raise SinkscopeError("pass either --dataset or --prompt/--prompts, not both")
        from sinkscope.analyses.dormant import domain_names, load_domains

        texts = next(iter(load_domains(domain_names(dataset)[:1], data, limit, seed, excerpt_chars).values()))
    else:
        texts, file_bad = gather_prompts(prompt, prompts)
    loaded = load(model, device, dtype, trust_remote_code, allow_pickle)
    with progress_bars() as update:
        result = overmixing(loaded, texts, position=position, eps=epsilon, sink=sink, sink_threshold=sink_threshold,
                            seed=seed, max_tokens=max_tokens, batch_size=batch_size, progress=update)
    _print_summary(result, loaded)
    skipped = dict(result.skipped)
    skipped.update(dict(file_bad))
    for i, why in sorted(skipped.items())[:5]:
        err_console.print(f"[yellow]skipped[/] prompt {i + 1}: {why}", highlight=False)
    if out is not None:
        from sinkscope.report.figures.overmixing import plot_overmixing

        layers = result.tables["layers"]
        figures = {} if no_figures else {
            "overmixing.png": lambda path: plot_overmixing(layers, path, loaded.info.name, position)}
        params = {**result.params, "dataset": dataset}
        save_with_figures(out, result.tables, "overmixing", loaded, params, result.summary, overwrite, figures)


def _print_summary(result: Any, loaded: Any) -> None:
    from rich.table import Table

    from sinkscope.cli.render import print_table

    p, s = result.params, result.summary
    console.print(f"{loaded.info.name}: {p['n_prompts']} prompt(s), token {p['position']} perturbed by ε = {p['eps']} "
                  f"(‖δ‖ = {p['delta_norm']:.3g}); spread = mean ‖Δh_j‖/‖h_j‖ over the later tokens; sink rate = "
                  f"share of heads with α₀ > {p['sink_threshold']}")
    layers = result.tables["layers"]
    wide = layers.pivot(index="layer", columns="condition")
    table = Table(title="per layer: the sink intact | masked (position " + str(p["sink"]) + ")")
    for col in ("layer", "spread", "spread masked", "entropy", "entropy masked", "sink rate", "sink rate masked",
                "‖h₀‖/median", "masked"):
        table.add_column(col, justify="right")
    for layer, row in wide.iterrows():
        cells = [str(layer)]
        for column, spec in (("spread_mean", ".3g"), ("entropy", ".3f"), ("sink_rate", ".2f"), ("bos_ratio", ".1f")):
            cells += [_fmt(row.get((column, c)), spec) for c in ("intact", "masked")]
        table.add_row(*cells)
    print_table(console, table)  # split in two when the terminal is narrow
    if "masked_over_intact" in s:
        console.print(f"last layer: masking the sink multiplies the spread by {s['masked_over_intact']:.2f}")


def _fmt(x: Any, spec: str) -> str:
    return "" if x is None or x != x else format(float(x), spec)
