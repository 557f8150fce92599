"""The data the report embeds, built from a run's tables alone (no model, no trace).

Each builder takes a Run or a `RunTables` (a run folder read a piece at a time, see `report.source`) and returns a
JSON-ready dict, or None when the run lacks the tables it needs. Sizes are bounded by `ReportLimits`, so a 32-layer ×
32-head profile of a 2,000-token prompt still gives a page of a few MB, and so is the memory used to build them:
what covers every prompt (the mean grid, its sink labels, the per-layer curves, the top rows of each table) is
reduced over batches of rows, and the per-prompt views read the rows of their prompts only, one prompt at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sinkscope.report.encode import EXACT_VALUES, pack, plain, round_floats, table_json, table_rows_json
from sinkscope.report.source import RunTables, run_tables
from sinkscope.store import Run

HEAD_KEYS = ["prompt_id", "layer", "head"]

METRICS: dict[str, str] = {
    "sink_mass": "mass on sinks (Σ α over the detector's sinks)",
    "top_alpha": "max α (the strongest key's column mass)",
    "pos0_alpha": "α at position 0",
    "last_row_sink_mass": "last token's attention on sinks",
}
# What each grid metric means and the range it can take, stated under the grid's colour legend.
METRIC_NOTES: dict[str, str] = {
    "sink_mass": "Σ α_k over the keys the detector flags. α_k is key k's attention averaged over the queries that "
                 "see it; a causal map's column means add up to more than 1, so this sum can exceed 1.",
    "top_alpha": "α_k of the head's strongest key, in [0, 1].",
    "pos0_alpha": "α_0, the attention position 0 receives averaged over the queries, in [0, 1].",
    "last_row_sink_mass": "the share of the last token's attention that goes to the detector's sinks, in [0, 1].",
}


@dataclass(frozen=True)
class ReportLimits:
    """Caps on what the page embeds.

    max_grid_prompts: prompts with their own layer × head grid, the first ones (the mean over all prompts is always
        there)
    max_view_prompts: prompts offered in the token view, the first ones
    max_token_values: per-head vectors (layer × head × tokens values, all token-view prompts together); past it a
        prompt is embedded as per-layer means over heads (head selection off), then not at all
    max_tokens: longer prompts get no token view
    max_map_values: attention-map values (query × key) over all embedded heads; the strongest heads first
    max_map_tokens: longest prompt whose maps are shown
    max_table_rows: rows per table (the top ones by α for `keys`)
    """

    max_grid_prompts: int = 16
    max_view_prompts: int = 16
    max_token_values: int = 4_000_000
    max_tokens: int = 4096
    max_map_values: int = 1_000_000
    max_map_tokens: int = 64
    max_table_rows: int = 500


def prompt_tokens(keys: pd.DataFrame) -> dict[int, list[str]]:
    """Each prompt's tokens, from the keys table (one (layer, head) pair suffices)."""
    first = keys[(keys["layer"] == keys["layer"].min()) & (keys["head"] == keys["head"].min())]
    first = first.sort_values(["prompt_id", "position"])
    return {int(pid): [str(t) for t in group["token"]] for pid, group in first.groupby("prompt_id")}


def _sinks(keys: pd.DataFrame) -> pd.Series:
    """The detector's sink flags (all False for a keys table without a `sink` column)."""
    if "sink" not in keys:
        return pd.Series(False, index=keys.index)
    return keys["sink"].fillna(False).astype(bool)


def _quote(token: str) -> str:
    return repr(str(token))


def head_metrics(keys: pd.DataFrame) -> pd.DataFrame:
    """Per prompt × layer × head: sink_mass, top_alpha, pos0_alpha and (with last_row) last_row_sink_mass."""
    group = [keys["prompt_id"], keys["layer"], keys["head"]]
    sink = _sinks(keys)
    frame = pd.DataFrame({
        "sink_mass": keys["alpha"].where(sink, 0.0).groupby(group).sum(),
        "top_alpha": keys["alpha"].groupby(group).max(),
    })
    frame.index.names = HEAD_KEYS
    pos0 = keys[keys["position"] == 0].set_index(HEAD_KEYS)["alpha"]
    frame["pos0_alpha"] = pos0.reindex(frame.index)
    if "last_row" in keys:
        frame["last_row_sink_mass"] = keys["last_row"].where(sink, 0.0).groupby(group).sum()
    return frame.reset_index()


def _sink_labels(keys: pd.DataFrame, top: int = 3) -> dict[tuple[int, int, int], str]:
    """(prompt, layer, head) → "'The'@0 0.471, '.'@13 0.250 (+2 more)" for the detector's sinks, strongest first."""
    flagged = keys.loc[_sinks(keys), [*HEAD_KEYS, "position", "token", "alpha"]]
    if flagged.empty:
        return {}
    flagged = flagged.sort_values([*HEAD_KEYS, "alpha"], ascending=[True, True, True, False])
    counts = flagged.groupby(HEAD_KEYS).size()
    labels: dict[tuple[int, int, int], list[str]] = {}
    for pid, layer, head, pos, tok, alpha in flagged.groupby(HEAD_KEYS).head(top).itertuples(index=False):
        labels.setdefault((int(pid), int(layer), int(head)), []).append(f"{_quote(tok)}@{int(pos)} {alpha:.3f}")
    out = {}
    for key, parts in labels.items():
        more = int(counts[key]) - len(parts)
        out[key] = ", ".join(parts) + (f" (+{more} more)" if more > 0 else "")
    return out


def _sink_stats(keys: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, head, position, token) among the detector's sinks: how many (`size`) and their α's `sum`."""
    flagged = keys.loc[_sinks(keys), ["layer", "head", "position", "token", "alpha"]]
    return flagged.groupby(["layer", "head", "position", "token"])["alpha"].agg(["size", "sum"])


def _mean_sink_labels(stats: pd.DataFrame, n_prompts: int, top: int = 3) -> dict[tuple[int, int], str]:
    """(layer, head) → the most frequent sinks over prompts: "'The'@0 in 4/4 prompts, mean α 0.471" (stats: the
    `_sink_stats` of every prompt)."""
    if stats.empty:
        return {}
    stats = stats.sort_index().reset_index()
    stats["mean"] = stats["sum"] / stats["size"]
    stats = stats.sort_values(["layer", "head", "size", "mean"], ascending=[True, True, False, False])
    out: dict[tuple[int, int], list[str]] = {}
    rows = stats.groupby(["layer", "head"]).head(top)[["layer", "head", "position", "token", "size", "mean"]]
    for layer, head, pos, tok, size, mean in rows.itertuples(index=False):
        out.setdefault((int(layer), int(head)), []).append(
            f"{_quote(tok)}@{int(pos)} in {int(size)}/{n_prompts}, α {mean:.3f}")
    return {k: "; ".join(v) for k, v in out.items()}


def _add(total: Any, part: Any) -> Any:
    """Running sums of pandas objects aligned on their index (a label missing on one side counts as 0)."""
    return part if total is None else total.add(part, fill_value=0)


@dataclass
class KeysSummary:
    """What the report needs of the `keys` table, reduced over all its rows a chunk of whole prompts at a time.

    L, H: layers and heads; columns: the table's columns; names: the grid metrics it allows; n_prompts: prompts in it,
    lowest: the smallest prompt id
    prompt_ids: the prompts with per-prompt views (the first ones, or the ones asked for), ascending
    metrics: `head_metrics` of those prompts; flagged: their sink rows (for `_sink_labels`)
    mean: per (layer, head), each metric's mean over all prompts; stats: `_sink_stats` of all prompts
    """

    L: int
    H: int
    columns: list[str]
    names: list[str]
    n_prompts: int
    lowest: int
    prompt_ids: list[int]
    metrics: pd.DataFrame
    flagged: pd.DataFrame
    mean: pd.DataFrame
    stats: pd.DataFrame


def keys_summary(run: Run | RunTables, limits: ReportLimits, prompts: Sequence[int] | None = None
                 ) -> KeysSummary | None:
    """The `keys` table's summary (None without one): one pass over its rows, holding a chunk of whole prompts and
    running sums. Per-prompt views go to `prompts` (those present), else to the first max(max_grid_prompts,
    max_view_prompts) prompts."""
    tables = run_tables(run)
    if not tables.has("keys"):
        return None
    columns = tables.columns("keys")
    read = [c for c in (*HEAD_KEYS, "position", "token", "alpha", "sink", "last_row") if c in columns]
    wanted = None if prompts is None else {int(p) for p in prompts}
    keep = max(limits.max_grid_prompts, limits.max_view_prompts)

    def reduce(chunks: Iterable[pd.DataFrame]) -> KeysSummary:
        L = H = n_prompts = 0
        lowest: int | None = None
        first: list[int] = []
        sums = counts = stats = None
        kept_metrics: list[pd.DataFrame] = []
        kept_flagged: list[pd.DataFrame] = []
        names: list[str] = []
        for chunk in chunks:
            if chunk.empty:
                continue
            L, H = max(L, int(chunk["layer"].max()) + 1), max(H, int(chunk["head"].max()) + 1)
            ids = [int(p) for p in np.unique(chunk["prompt_id"].to_numpy())]
            n_prompts += len(ids)
            lowest = ids[0] if lowest is None else min(lowest, ids[0])
            if wanted is None:
                first = sorted({*first, *ids})[:keep]
            else:
                first = sorted({*first, *(p for p in ids if p in wanted)})
            metrics = head_metrics(chunk)
            names = [m for m in METRICS if m in metrics]
            by = metrics.groupby(["layer", "head"])[names]
            sums, counts = _add(sums, by.sum()), _add(counts, by.count())
            part = _sink_stats(chunk)
            stats = part if stats is None else pd.concat([stats, part]).groupby(level=[0, 1, 2, 3]).sum()
            mine = metrics["prompt_id"].isin(first)
            if mine.any():
                kept_metrics.append(metrics[mine])
                kept_flagged.append(chunk.loc[chunk["prompt_id"].isin(first) & _sinks(chunk)])
        metrics = pd.concat(kept_metrics, ignore_index=True) if kept_metrics else pd.DataFrame(columns=HEAD_KEYS)
        flagged = pd.concat(kept_flagged, ignore_index=True) if kept_flagged else pd.DataFrame(columns=read)
        return KeysSummary(
            L=L, H=H, columns=columns, names=names, n_prompts=n_prompts, lowest=lowest or 0, prompt_ids=first,
            metrics=metrics[metrics["prompt_id"].isin(first)], flagged=flagged[flagged["prompt_id"].isin(first)],
            mean=(sums / counts).reset_index() if sums is not None else pd.DataFrame(columns=["layer", "head"]),
            stats=stats if stats is not None else pd.DataFrame(columns=["size", "sum"]))

    return tables.by_prompt("keys", read, reduce)


def _limited(what: str, shown: Sequence[int], n_prompts: int, first: bool) -> str:
    """The page's statement of which prompts a per-prompt view covers ("" when it covers them all)."""
    if len(shown) >= n_prompts:
        return ""
    which = f"the first {len(shown):,}" if first else "prompts " + ", ".join(str(p) for p in shown)
    return (f"{what} {which} of {n_prompts:,} prompts. Others: sinkscope report RUN --prompt-ids 20-35 "
            "(write_report(RUN, prompts=[ids]) in Python).")


def grid_data(run: Run | RunTables, limits: ReportLimits, keys: KeysSummary | None = None,
              prompts: Sequence[int] | None = None) -> dict[str, Any] | None:
    """Layer × head sink strength: the mean over all prompts and one grid per prompt (the first `max_grid_prompts`,
    or `prompts`), each metric a flat [L·H] list, with hover labels naming the sinks."""
    tables = run_tables(run)
    keys = keys or keys_summary(tables, limits, prompts)
    if keys is None:
        return _grid_from_heads(tables)
    L, H, names = keys.L, keys.H, keys.names
    n = keys.n_prompts
    shown = keys.prompt_ids if prompts is not None else keys.prompt_ids[: limits.max_grid_prompts]
    labels = _sink_labels(keys.flagged[keys.flagged["prompt_id"].isin(shown)])
    if n > 1:
        mean_view = _grid_view("mean over prompts", keys.mean, names, L, H, _mean_sink_labels(keys.stats, n), None)
    else:
        mean_view = _grid_view(f"prompt {keys.lowest}", keys.mean, names, L, H, {k[1:]: v for k, v in labels.items()},
                               keys.lowest)
    views = [mean_view]
    if n > 1:
        for pid in shown:
            sub = keys.metrics[keys.metrics["prompt_id"] == pid]
            views.append(_grid_view(f"prompt {pid}", sub, names, L, H,
                                    {k[1:]: v for k, v in labels.items() if k[0] == pid}, pid))
    out = {"L": L, "H": H, "metrics": _metric_json(names), "views": views, "n_prompts": n}
    limited = _limited("The mean is over all prompts; grids of single prompts are embedded for", shown, n,
                       prompts is None) if n > 1 else ""
    if limited:
        out["limited"] = limited
    return out


def _grid_view(label: str, frame: pd.DataFrame, names: list[str], L: int, H: int,
               sinks: dict[tuple[int, int], str], prompt_id: int | None) -> dict[str, Any]:
    idx = frame["layer"].to_numpy(dtype=np.int64) * H + frame["head"].to_numpy(dtype=np.int64)
    values = {}
    for name in names:
        arr = np.full(L * H, np.nan)
        arr[idx] = frame[name].to_numpy(dtype=np.float64)
        values[name] = round_floats(arr)
    tips = [sinks.get((layer, head), "") for layer in range(L) for head in range(H)]
    return {"label": label, "prompt_id": prompt_id, "values": values, "sinks": tips}


def _grid_from_heads(tables: RunTables) -> dict[str, Any] | None:
    """Fallback for runs with a heads table but no keys table: sink_alpha and top_alpha per head (mean over rows)."""
    if not tables.has("heads", ["layer", "head"]):
        return None
    columns = tables.columns("heads")
    found = [c for c in ("sink_alpha", "top_alpha") if c in columns]
    if not found:
        return None
    names = ["sink_mass" if n == "sink_alpha" else n for n in found]
    L = H = 0
    sums = counts = None
    tips: dict[tuple[int, int], str] = {}
    read = ["layer", "head", *found, *(["sink_tokens"] if "sink_tokens" in columns else [])]
    for batch in tables.batches("heads", read):
        if batch.empty:
            continue
        frame = batch.rename(columns={"sink_alpha": "sink_mass"})
        L, H = max(L, int(frame["layer"].max()) + 1), max(H, int(frame["head"].max()) + 1)
        by = frame.groupby(["layer", "head"])[names]
        sums, counts = _add(sums, by.sum()), _add(counts, by.count())
        if "sink_tokens" in frame:
            firsts = frame.drop_duplicates(["layer", "head"])[["layer", "head", "sink_tokens"]]
            for layer, head, text in firsts.itertuples(index=False):
                tips.setdefault((int(layer), int(head)), str(text))
    mean = (sums / counts).reset_index()
    return {"L": L, "H": H, "metrics": _metric_json(names),
            "views": [_grid_view("mean over prompts", mean, names, L, H, tips, None)], "n_prompts": None}


def _metric_json(names: Sequence[str]) -> list[dict[str, str]]:
    return [{"name": m, "label": METRICS[m], "note": METRIC_NOTES.get(m, "")} for m in names]


def token_data(run: Run | RunTables, limits: ReportLimits, keys: KeysSummary | None = None,
               prompts: Sequence[int] | None = None) -> dict[str, Any] | None:
    """Per-head last-token rows (or column mass α when rows were not captured) for the token view, for the first
    `max_view_prompts` prompts (or `prompts`), read a prompt at a time.

    Interactive mode (`keys` table): the page aggregates the chosen layers × heads and applies detect-mask-
    renormalise itself. Static mode (`tokens` table of `explain`): before/after/sink as computed in Python.
    """
    tables = run_tables(run)
    keys = keys or keys_summary(tables, limits, prompts)
    if keys is None:
        return _static_tokens(tables)
    stat = "last_row" if "last_row" in keys.columns else "alpha"
    L, H = keys.L, keys.H
    chosen = keys.prompt_ids if prompts is not None else keys.prompt_ids[: limits.max_view_prompts]
    texts = _prompt_texts(tables, chosen)
    prompts_out, notes, used = [], [], 0
    for pid in chosen:
        sub = tables.read("keys", ["prompt_id", "layer", "head", "position", "token", stat], prompt_ids=[pid])
        tokens = prompt_tokens(sub)[pid]
        n = len(tokens)
        if n > limits.max_tokens:
            notes.append(f"prompt {pid} ({n} tokens) is longer than the token view's {limits.max_tokens}")
            continue
        if used + L * H * n <= limits.max_token_values:
            layout, size = "head", L * H * n
        elif used + L * n <= limits.max_token_values:
            layout, size = "layer", L * n
            notes.append(f"prompt {pid}: per-layer means only (head selection off) to keep the page small")
        else:
            notes.append(f"prompt {pid} left out of the token view to keep the page small")
            continue
        arr = np.zeros((L, H, n))
        arr[sub["layer"].to_numpy(), sub["head"].to_numpy(), sub["position"].to_numpy()] = sub[stat].to_numpy()
        if layout == "layer":
            arr = arr.mean(axis=1)
        used += size
        prompts_out.append({"prompt_id": pid, "text": texts.get(pid, ""), "tokens": tokens, "layout": layout,
                            "rows": pack(arr, exact=size <= EXACT_VALUES)})
    limited = _limited("The token view holds", chosen, keys.n_prompts, prompts is None)
    if not prompts_out:
        return {"mode": "none", "notes": notes, **({"limited": limited} if limited else {})}
    params = tables.manifest.get("parameters", {}) or {}
    out = {"mode": "interactive", "stat": stat, "L": L, "H": H, "prompts": prompts_out, "notes": notes,
           "run_method": params.get("method"), "detectors": detector_json(),
           "default": {"layers": "-1", "heads": "all", "method": "zscore", "threshold": 2.0}}
    if limited:
        out["limited"] = limited
    return out


def detector_json() -> list[dict[str, Any]]:
    """The registered detectors as the token view offers them: name, statistic (row / column), the threshold
    parameter and its default, and the one-line description `sinkscope detectors` prints."""
    from sinkscope.detect import get_detector, list_detectors

    out = []
    for name in list_detectors():
        d = get_detector(name)
        numeric = [(k, v) for k, v in d.params.items() if isinstance(v, int | float) and not isinstance(v, bool)]
        param, value = numeric[0] if numeric else ("", None)
        out.append({"name": name, "statistic": d.statistic, "returns": d.returns, "param": param, "value": value,
                    "description": f"{d.doc} ({d.source})"})
    return out


def _prompt_texts(tables: RunTables, prompt_ids: Sequence[int]) -> dict[int, str]:
    if not tables.has("prompts", ["prompt_id", "text"]) or not prompt_ids:
        return {}
    prompts = tables.read("prompts", ["prompt_id", "text"], prompt_ids=prompt_ids)
    return {int(p): str(t) for p, t in zip(prompts["prompt_id"], prompts["text"], strict=True)}


def _static_tokens(tables: RunTables) -> dict[str, Any] | None:
    if not tables.has("tokens", ["token", "before", "after"]):
        return None
    table = tables.read("tokens")
    prompts = []
    for pid, group in table.groupby(table["prompt_id"] if "prompt_id" in table else np.zeros(len(table), int)):
        group = group.sort_values("position") if "position" in group else group
        prompts.append({
            "prompt_id": int(pid), "text": "", "tokens": [str(t) for t in group["token"]],
            "before": round_floats(group["before"].to_numpy(), 6), "after": round_floats(group["after"].to_numpy(), 6),
            "sinks": [bool(s) for s in group["sink"]] if "sink" in group else [False] * len(group),
        })
    params = tables.manifest.get("parameters", {}) or {}
    described = {k: params[k] for k in ("method", "layers", "heads") if k in params}
    return {"mode": "static", "prompts": prompts, "notes": [], "described": plain(described)}


LAYER_CURVES: dict[str, str] = {
    "head_share": "share of heads with a sink",
    "sink_share": "share of heads with α₀ > ε",
    "pos0_alpha": "α at position 0",
    "alpha0": "α at position 0",
    "top_other_alpha": "largest α at another position",
}


def curve_data(run: Run | RunTables) -> dict[str, Any] | None:
    """Per-layer curves: sink share and α at position 0 (`layers`, as written by profile or the mechanisms
    analysis), and ‖h‖ at position 0 against the median elsewhere (`norms`: layer, position, norm; by `depth`
    when the table has one, e.g. sites between sublayers). A `heads` table stands in for `layers`, and `norms` is
    reduced a chunk of whole prompts at a time."""
    tables = run_tables(run)
    charts = []
    layers = tables.read("layers") if tables.has("layers") else None
    if layers is None and tables.has("heads", ["n_sinks"]):
        layers = _head_share(tables)
    if layers is not None and "layer" in layers:
        layers = layers.sort_values("layer")
        shown, series = set(), []
        for col, label in LAYER_CURVES.items():
            if col in layers and label not in shown:
                shown.add(label)
                series.append({"name": label, "x": layers["layer"].tolist(),
                               "y": round_floats(layers[col].to_numpy(dtype=float))})
        if series:
            charts.append({"id": "sinks", "title": "Sinks per layer", "xlabel": "layer", "ylabel": "share / α",
                           "series": series, "ymin": 0.0})
    if tables.has("norms", ["layer", "position", "norm"]):
        charts.append(_norm_chart(tables))
    return {"charts": charts} if charts else None


def _head_share(tables: RunTables) -> pd.DataFrame:
    """Per layer, the share of (prompt, head) rows of `heads` with a sink (n_sinks > 0)."""
    with_sink = rows = None
    for batch in tables.batches("heads", ["layer", "n_sinks"]):
        by = (batch["n_sinks"] > 0).groupby(batch["layer"])
        with_sink, rows = _add(with_sink, by.sum()), _add(rows, by.size())
    share = (with_sink / rows).astype(float).rename("head_share")
    share.index.name = "layer"
    return share.reset_index()


def _norm_chart(tables: RunTables) -> dict[str, Any]:
    columns = tables.columns("norms")
    x = "depth" if "depth" in columns else "layer"
    per_prompt = "prompt_id" in columns

    def reduce(chunks: Iterable[pd.DataFrame]) -> tuple[pd.Series, pd.Series | None]:
        first_sum = first_n = rest_sum = rest_n = None
        for norms in chunks:
            first = norms[norms["position"] == 0].groupby(x)["norm"]
            first_sum, first_n = _add(first_sum, first.sum()), _add(first_n, first.count())
            others = norms[norms["position"] > 0]
            if len(others):
                medians = others.groupby(["prompt_id", x] if per_prompt else [x])["norm"].median().groupby(x)
                rest_sum, rest_n = _add(rest_sum, medians.sum()), _add(rest_n, medians.count())
        first = (first_sum / first_n).sort_index() if first_sum is not None else pd.Series(dtype=float)
        rest = (rest_sum / rest_n).sort_index() if rest_sum is not None else None
        return first, rest

    read = [*(["prompt_id"] if per_prompt else []), x, "position", "norm"]
    first, rest = tables.by_prompt("norms", read, reduce) if per_prompt else reduce([tables.read("norms", read)])
    series = [{"name": "‖h‖ at position 0", "x": first.index.tolist(), "y": round_floats(first.to_numpy())}]
    if rest is not None:
        series.append({"name": "median ‖h‖ at other positions", "x": rest.index.tolist(),
                       "y": round_floats(rest.to_numpy())})
    return {"id": "norms", "title": "Hidden-state norm per layer", "xlabel": x, "ylabel": "‖h‖", "series": series,
            "ymin": 0.0}


def map_data(run: Run | RunTables, limits: ReportLimits, prompts: Sequence[int] | None = None
             ) -> dict[str, Any] | None:
    """Full attention maps from a `maps` table (prompt_id, layer, head, query, key, weight), for prompts of at most
    `max_map_tokens` tokens (of `prompts` if given), as many heads as `max_map_values` allows (the strongest heads by
    max α first), read a chunk of whole prompts at a time."""
    tables = run_tables(run)
    columns = [*HEAD_KEYS, "query", "key", "weight"]
    if not tables.has("maps", columns):
        return None
    with_keys = tables.has("keys")
    key_columns = [c for c in (*HEAD_KEYS, "position", "token", "alpha", "sink") if with_keys and
                   c in tables.columns("keys")]
    budget = limits.max_map_values
    exact = min(tables.rows("maps"), budget) <= EXACT_VALUES  # one row per map value
    wanted = None if prompts is None else {int(p) for p in prompts}

    def reduce(chunks: Iterable[pd.DataFrame]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        used = 0
        for chunk in chunks:
            for pid, group in chunk.groupby("prompt_id"):
                n = int(max(group["query"].max(), group["key"].max())) + 1
                if n > limits.max_map_tokens or used + n * n > budget or (wanted is not None and pid not in wanted):
                    continue
                tokens: dict[int, list[str]] = {}
                strength = None
                if with_keys:
                    keys = tables.read("keys", key_columns, prompt_ids=[int(pid)])
                    tokens = prompt_tokens(keys) if len(keys) else {}
                    strength = head_metrics(keys).set_index(HEAD_KEYS)["top_alpha"] if len(keys) else None
                L, H = int(group["layer"].max()) + 1, int(group["head"].max()) + 1
                arr = np.zeros((L, H, n, n))
                arr[group["layer"].to_numpy(), group["head"].to_numpy(), group["query"].to_numpy(),
                    group["key"].to_numpy()] = group["weight"].to_numpy()
                pairs = list(group[["layer", "head"]].drop_duplicates().itertuples(index=False, name=None))
                if strength is not None:
                    pairs.sort(key=lambda lh: -float(strength.get((pid, lh[0], lh[1]), 0.0)))
                heads = {}
                for layer, head in pairs:
                    if used + n * n > budget:
                        break
                    heads[f"{int(layer)},{int(head)}"] = pack(arr[layer, head], exact=exact)
                    used += n * n
                out[str(int(pid))] = {"n": n, "tokens": tokens.get(int(pid), [str(i) for i in range(n)]),
                                      "heads": heads}
        return out

    out = tables.by_prompt("maps", columns, reduce)
    return {"prompts": out} if out else None


def table_data(run: Run | RunTables, limits: ReportLimits) -> list[dict[str, Any]]:
    """Every table of the run that has rows (except `maps`), capped at `max_table_rows` rows (the top ones by α for
    `keys`), read a batch at a time. An empty table (no skipped prompts, say) is left out of the page."""
    tables = run_tables(run)
    return [{"name": name, **_table_json(tables, name, limits.max_table_rows, sort_by="alpha")}
            for name in tables.names() if name != "maps" and tables.rows(name) > 0]


def _table_json(tables: RunTables, name: str, max_rows: int, sort_by: str | None) -> dict[str, Any]:
    """`encode.table_json` of a table too large to read whole: its top `max_rows` rows by `sort_by` kept while
    reading it in batches (ties: the earlier rows, as `nlargest`), or its first rows."""
    total = tables.rows(name)
    if total <= max_rows:
        return table_json(tables.read(name), max_rows, sort_by)
    top: pd.DataFrame | None = None
    if sort_by is not None and sort_by in tables.columns(name):
        for batch in tables.batches(name):
            if not pd.api.types.is_numeric_dtype(batch[sort_by]):
                top = None
                break
            best = batch.nlargest(max_rows, sort_by)
            top = best if top is None else pd.concat([top, best], ignore_index=True).nlargest(max_rows, sort_by)
    if top is not None:
        return table_rows_json(top, total, f"top {max_rows} of {total:,} rows by {sort_by}")
    return table_rows_json(tables.head(name, max_rows), total, f"first {max_rows} of {total:,} rows")


def overview_data(run: Run | RunTables) -> dict[str, Any]:
    """Model, command, time, parameters and table sizes from the manifest."""
    tables = run_tables(run)
    m = tables.manifest or {}
    model = m.get("model", {}) or {}
    return plain({
        "model": model.get("name", ""),
        "layers": model.get("n_layers"),
        "heads": model.get("n_heads"),
        "kv_heads": model.get("n_kv_heads"),
        "command": m.get("command", ""),
        "created": m.get("created", ""),
        "parameters": {k: v for k, v in (m.get("parameters", {}) or {}).items() if k != "capture"},
        "tables": {name: tables.rows(name) for name in tables.names()},
        "versions": m.get("versions", {}),
    })
