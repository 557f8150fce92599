"""`sinkscope eval`: a thin front end over `sinkscope.analyses.evaluate.evaluate` that prints seed 000's Table 2."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sinkscope.cli.options import (
    DATA_HELP,
    BatchSizeOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    HeadsOpt,
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
    console,
    described,
    err_console,
    load,
    method_params,
    parse_selection,
    progress_bars,
    user_errors,
)
from sinkscope.errors import SinkscopeError

if TYPE_CHECKING:
    import pandas as pd
    from rich.table import Table

MAX_SKIP_LINES = 10
AVERAGED = "; their last-token attention is averaged"


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.1%}" if pct else f"{x:.2f}"


def render_table2(summary: pd.DataFrame, methods: list[str], title: str) -> Table:
    """Seed 000 Table 2 with causal alignment, one row per dataset and variant (before, then each method) so that it
    fits an 80-column terminal whatever the number of methods: Acc. (on the dataset's first row), Mismatch and Match,
    Spearman ρ(attention, causal effect) and top-K overlap; read before/after down the rows."""
    from rich import box
    from rich.table import Table

    variants = ["before", *methods]
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, collapse_padding=True)
    for name in ("Dataset", "n", "Acc.", "variant", "Mismatch", "Match", "ρ\ncausal", "top-K\n∩", "n\ncausal"):
        wide = max(len(v) for v in variants) if name == "variant" else None  # method names are not cut
        table.add_column(name, justify="left" if name in ("Dataset", "variant") else "right", min_width=wide)
    for dataset, group in summary.groupby("dataset", sort=False):
        by = group.set_index("variant")
        first = by.iloc[0]
        for i, v in enumerate(variants):
            head = [str(dataset), str(int(first["n"])), _fmt(first["accuracy"], pct=True)] if i == 0 else ["", "", ""]
            scores = [_fmt(by.loc[v, m]) if v in by.index else "–" for m in ("mismatch", "match", "spearman",
                                                                              "topk_overlap")]
            table.add_row(*head, v, *scores, str(int(first["n_causal"])) if i == 0 else "",
                          end_section=i == len(variants) - 1)
    return table


@user_errors
def eval_command(
    model: ModelOpt,
    dataset: Annotated[list[str] | None, typer.Option(
        "--dataset", "-d", help="Dataset (repeatable; sinkscope datasets lists them)")] = None,
    all_datasets: Annotated[bool, typer.Option("--all", help="Every dataset of seed 000 Table 1")] = False,
    limit: described(LimitOpt, " examples per dataset, drawn with --seed (the paper: 900)") = None,
    method: described(MethodsOpt, "; detect-mask-renormalise with each (repeatable; default zscore)") = None,
    threshold: described(ThresholdOpt, "; with a single --method") = None,
    layers: described(LayersOpt, AVERAGED) = "-1",
    heads: described(HeadsOpt, AVERAGED) = "all",
    top_k: Annotated[int, typer.Option(min=1, help="K of the top-K tokens (seed 000: 10)")] = 10,
    causal: Annotated[bool, typer.Option("--causal/--no-causal", help="Measure each token's causal effect")] = True,
    causal_mode: Annotated[str, typer.Option(
        help="mask: cut attention to the token in every layer; occlude: delete the token")] = "mask",
    causal_limit: Annotated[int | None, typer.Option(
        min=0, help="At most this many examples per dataset get causal effects (n forward passes each)")] = None,
    causal_max_tokens: Annotated[int, typer.Option(min=1, help="Skip causal effects for longer prompts")] = 256,
    data: described(DataOpt, DATA_HELP) = None,
    seed: described(SeedOpt, " of the --limit sample") = 0,
    batch_size: BatchSizeOpt = 8,
    out: described(OutOpt, "; a rerun resumes it") = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Classification accuracy and attention alignment before/after sink removal (seed 000 Table 2), plus the
    Spearman correlation and top-K overlap between attention and each token's causal effect."""
    from sinkscope.analyses.evaluate.datasets import list_datasets
    from sinkscope.analyses.evaluate.run import evaluate
    from sinkscope.store import save_run

    names = list_datasets() if all_datasets else list(dataset or [])
    if not names:
        raise SinkscopeError("no dataset: pass --dataset NAME (repeatable) or --all")
    methods = list(method or ["zscore"])
    params: dict[str, dict[str, float]] = {}
    if threshold is not None:
        if len(methods) != 1:
            raise SinkscopeError("--threshold sets the threshold of one --method; give a single --method with it")
        params[methods[0]] = method_params(methods[0], threshold)
    layer_sel, head_sel = parse_selection(layers), parse_selection(heads)
    if layer_sel == [-1]:
        layer_sel = None  # the default, the last layer, under one name so that resumed runs match
    loaded = load(model, device, dtype, trust_remote_code, allow_pickle)
    with progress_bars() as progress:
        try:
            result = evaluate(
                loaded, names, data=data, limit=limit, methods=methods, method_params=params, layers=layer_sel,
                heads=head_sel, k=top_k, causal=causal, causal_mode=causal_mode, causal_limit=causal_limit,
                causal_max_tokens=causal_max_tokens, seed=seed, batch_size=batch_size, out=out, progress=progress,
                overwrite=overwrite,
            )
        except KeyboardInterrupt:
            hint = " (finished examples are kept: rerun the same command to resume)" if out is not None else ""
            err_console.print(f"[yellow]interrupted[/]{hint}")
            raise typer.Exit(130) from None
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
