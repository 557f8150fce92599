"""`sinkscope dormant`: active and dormant heads across input domains, with the value-state drain and the residual
peak of the sink (Guo et al. 2024), as a run folder of tables and a heat map."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

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
    SeedOpt,
    TrustOpt,
    console,
    described,
    err_console,
    load,
    progress_bars,
    read_prompts,
    user_errors,
)
from sinkscope.errors import SinkscopeError

MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=2, max=1_000_000,
                                           help="Cut each prompt to this many tokens")]
ExcerptCharsOpt = Annotated[int, typer.Option(min=20, max=100_000, help="Characters of each Tiny Shakespeare excerpt")]


def save_with_figures(out: Path, tables: dict[str, Any], command: str, loaded: Any, params: dict[str, Any],
                      summary: dict[str, Any], overwrite: bool, figures: dict[str, Callable[[Path], Any]]) -> None:
    """Write the run folder; `figures` ({file name: draw(path)}) are drawn in a scratch folder and saved with the
    tables, so the manifest lists them with their checksums (the report embeds them)."""
    import tempfile

    from sinkscope.analyses.profile import model_manifest
    from sinkscope.store import Run, make_manifest, save_run

    manifest = make_manifest(command, model_manifest(loaded), {**params, "figures": list(figures)})
    manifest["summary"] = summary
    with tempfile.TemporaryDirectory(prefix="sinkscope-figures-") as scratch:
        files: dict[str, Path] = {}
        for name, draw in figures.items():
            files[name] = Path(scratch) / name
            draw(files[name])
        save_run(out, Run(tables=tables, manifest=manifest), overwrite=overwrite, files=files)
    console.print(f"wrote {out}/ ({', '.join([*tables, *files])} + manifest.json)")


def parse_domains(specs: list[str] | None) -> dict[str, list[str]]:
    """--domain NAME=FILE (repeatable) → name → the file's prompts (one per line, or JSONL with a text field)."""
    domains: dict[str, list[str]] = {}
    for spec in specs or []:
        name, sep, file = spec.partition("=")
        if not sep or not name.strip() or not file.strip():
            raise SinkscopeError(f"--domain '{spec}': pass NAME=FILE, e.g. --domain code=prompts/code.txt")
        if name.strip() in domains:
            raise SinkscopeError(f"--domain names '{name.strip()}' twice")
        texts = [t for t in read_prompts(Path(file.strip()))[0] if t.strip()]
        if not texts:
            raise SinkscopeError(f"--domain {name.strip()}: {file.strip()} holds no prompts")
        domains[name.strip()] = texts
    return domains


@user_errors
def dormant_command(
    model: ModelOpt,
    datasets: Annotated[str | None, typer.Option(
        "--datasets", help="Shared data sets as domains, comma-separated: the nine classification sets (sinkscope "
                           "datasets) and tiny_shakespeare, or 'all' (default: all, unless --domain is given)")] = None,
    domain: Annotated[list[str] | None, typer.Option(
        "--domain", help="A domain of your own: NAME=FILE, a prompt file (one per line, or JSONL); repeatable")] = None,
    data: described(DataOpt, DATA_HELP) = None,
    limit: described(LimitOpt, " prompts per data set (a seeded draw, as eval draws)") = 16,
    seed: described(SeedOpt, " of the draw from each data set") = 0,
    max_tokens: MaxTokensOpt = 128,
    min_tokens: Annotated[int, typer.Option(
        min=0, max=1_000_000, help="Leave out prompts shorter than this; with --max-tokens the same, every domain is "
                                   "compared at one length (σ falls as prompts grow)")] = 0,
    sink: Annotated[int, typer.Option(help="The sink key's position (0; negative counts from the end, e.g. -1 for an "
                                           "encoder's [SEP])")] = 0,
    dormant_share: Annotated[float, typer.Option(
        min=0, max=1, help="σ (mean attention on the sink) at or above which a head with a small output is dormant")
                             ] = 0.9,
    output_ratio: Annotated[float, typer.Option(
        help="‖o‖ / mean ‖v_j‖ at or below which a head's output counts as small")] = 0.5,
    active_share: Annotated[float, typer.Option(min=0, max=1, help="σ below which a head is active")] = 0.5,
    excerpt_chars: ExcerptCharsOpt = 600,
    out: described(OutOpt, ", with the heat map head_domains.png") = None,
    overwrite: OverwriteOpt = False,
    no_figures: NoFiguresOpt = False,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Active and dormant heads per domain (Guo et al. 2024): per head the sink share, the value-state drain
    ‖v_sink‖ / mean ‖v_j‖, the output norm and the sink's residual norm, on each domain; the heads dormant in one
    domain and active in another."""
    from sinkscope.analyses.dormant import domain_names, head_domains, load_domains

    if min_tokens > max_tokens:
        raise SinkscopeError(f"--min-tokens {min_tokens} is above --max-tokens {max_tokens}")
    if output_ratio <= 0:
        raise SinkscopeError(f"--output-ratio {output_ratio}: pass a positive ratio")
    if not 0 < active_share <= dormant_share:
        raise SinkscopeError(f"--active-share {active_share} must be above 0 and at most --dormant-share "
                             f"{dormant_share}")
    own = parse_domains(domain)
    names = domain_names(datasets) if datasets is not None or not own else []
    domains = load_domains(names, data, limit, seed, excerpt_chars) if names else {}
    clash = set(domains) & set(own)
    if clash:
        raise SinkscopeError(f"--domain {sorted(clash)[0]} is also a name in --datasets; rename it")
    domains.update(own)
    loaded = load(model, device, dtype, trust_remote_code, allow_pickle)
    if loaded.info.is_causal and sink < 0:
        raise SinkscopeError(f"--sink {sink}: {loaded.info.name} is a decoder, whose sink is a position ≥ 0 that later "
                             "queries see")
    with progress_bars() as update:
        result = head_domains(loaded, domains, sink=sink, dormant_share=dormant_share, output_ratio=output_ratio,
                              active_share=active_share, max_tokens=max_tokens, min_tokens=min_tokens,
                              batch_size=batch_size,
                              progress=update)
    _print_summary(result, loaded)
    for name, bad in result.skipped.items():
        for i, why in bad[:3]:
            err_console.print(f"[yellow]skipped[/] {name} prompt {i + 1}: {why}", highlight=False)
    if out is not None:
        from sinkscope.report.figures.dormant import plot_head_domains

        heads, switch = result.tables["head_domains"], result.tables["domain_switch"]
        figures = {} if no_figures else {
            "head_domains.png": lambda path: plot_head_domains(heads, switch, path, loaded.info.name)}
        save_with_figures(out, result.tables, "dormant", loaded, result.params, result.summary, overwrite, figures)


def _print_summary(result: Any, loaded: Any) -> None:
    from rich.table import Table

    info, s, p = loaded.info, result.summary, result.params
    console.print(f"{info.name}: {info.n_layers} layers × {info.n_heads} heads, sink at position {p['sink']}; dormant "
                  f"= σ ≥ {p['dormant_share']} and ‖o‖/mean‖v_j‖ ≤ {p['output_ratio']}, active = σ < "
                  f"{p['active_share']}")
    table = Table(title="heads per domain (ρ_v = ‖v_sink‖ / mean ‖v_j‖; peak = max over layers of ‖h_sink‖ / median)")
    for col in ("domain", "prompts", "dormant", "mixed", "active", "ρ_v dormant", "ρ_v active", "peak", "at layer"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for name, d in s["domains"].items():
        table.add_row(name, str(p["n_prompts"][name]), str(d["dormant"]), str(d["mixed"]), str(d["active"]),
                      _fmt(d["value_ratio_dormant"]), _fmt(d["value_ratio_active"]), _fmt(d["peak_ratio"], ".1f"),
                      "" if d["peak_layer"] is None else str(d["peak_layer"]))
    console.print(table)
    switch = result.tables["domain_switch"]
    if switch.empty:
        console.print(f"no head is dormant in one domain and active in another ({s['n_heads']} heads)")
        return
    top = Table(title=f"{len(switch)} head(s) dormant in one domain and active in another (largest σ range first)")
    for col in ("layer", "head", "dormant in", "active in", "σ min", "σ max"):
        top.add_column(col, justify="right" if col in ("layer", "head", "σ min", "σ max") else "left")
    for row in switch.head(12).itertuples():
        top.add_row(str(row.layer), str(row.head), row.dormant_in, row.active_in, _fmt(row.share_min),
                    _fmt(row.share_max))
    console.print(top)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)
