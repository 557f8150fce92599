"""The data the report embeds, built from a run folder's tables alone (no model, no trace).

Each builder returns a JSON-ready dict, or None when the run lacks the tables it needs. Sizes are bounded by
`ReportLimits`, so a 32-layer × 32-head profile of a 2,000-token prompt still gives a page of a few MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sinkscope.report.encode import EXACT_VALUES, pack, plain, round_floats, table_json
from sinkscope.store import Run

HEAD_KEYS = ["prompt_id", "layer", "head"]

METRICS: dict[str, str] = {
    "sink_mass": "mass on sinks (Σ α over the detector's sinks)",
    "top_alpha": "max α (the strongest key's column mass)",
    "pos0_alpha": "α at position 0",
    "last_row_sink_mass": "last token's attention on sinks",
}


@dataclass(frozen=True)
class ReportLimits:
    """Caps on what the page embeds.

    max_grid_prompts: prompts with their own layer × head grid (the mean over all prompts is always there)
    max_view_prompts: prompts offered in the token view
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


def _table(run: Run, name: str) -> pd.DataFrame | None:
    frame = run.tables.get(name)
    return frame if frame is not None and len(frame) else None


def _shape(frame: pd.DataFrame) -> tuple[int, int]:
    return int(frame["layer"].max()) + 1, int(frame["head"].max()) + 1


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


def _mean_sink_labels(keys: pd.DataFrame, n_prompts: int, top: int = 3) -> dict[tuple[int, int], str]:
    """(layer, head) → the most frequent sinks over prompts: "'The'@0 in 4/4 prompts, mean α 0.471"."""
    flagged = keys.loc[_sinks(keys), ["layer", "head", "position", "token", "alpha"]]
    if flagged.empty:
        return {}
    stats = flagged.groupby(["layer", "head", "position", "token"])["alpha"].agg(["size", "mean"]).reset_index()
    stats = stats.sort_values(["layer", "head", "size", "mean"], ascending=[True, True, False, False])
    out: dict[tuple[int, int], list[str]] = {}
    for layer, head, pos, tok, size, mean in stats.groupby(["layer", "head"]).head(top).itertuples(index=False):
        out.setdefault((int(layer), int(head)), []).append(
            f"{_quote(tok)}@{int(pos)} in {int(size)}/{n_prompts}, α {mean:.3f}")
    return {k: "; ".join(v) for k, v in out.items()}


def grid_data(run: Run, limits: ReportLimits) -> dict[str, Any] | None:
    """Layer × head sink strength: the mean over prompts and one grid per prompt, each metric a flat [L·H] list,
    with hover labels naming the sinks."""
    keys = _table(run, "keys")
    if keys is None:
        return _grid_from_heads(run, limits)
    L, H = _shape(keys)
    metrics = head_metrics(keys)
    names = [m for m in METRICS if m in metrics]
    prompt_ids = sorted(int(p) for p in metrics["prompt_id"].unique())
    shown = prompt_ids[: limits.max_grid_prompts]
    labels = _sink_labels(keys[keys["prompt_id"].isin(shown)])
    views = [_grid_view("mean over prompts" if len(prompt_ids) > 1 else f"prompt {prompt_ids[0]}",
                        metrics.groupby(["layer", "head"])[names].mean().reset_index(), names, L, H,
                        _mean_sink_labels(keys, len(prompt_ids)) if len(prompt_ids) > 1
                        else {k[1:]: v for k, v in labels.items()}, None if len(prompt_ids) > 1 else prompt_ids[0])]
    if len(prompt_ids) > 1:
        for pid in shown:
            sub = metrics[metrics["prompt_id"] == pid]
            views.append(_grid_view(f"prompt {pid}", sub, names, L, H,
                                    {k[1:]: v for k, v in labels.items() if k[0] == pid}, pid))
    return {"L": L, "H": H, "metrics": [{"name": m, "label": METRICS[m]} for m in names], "views": views,
            "n_prompts": len(prompt_ids)}


def _grid_view(label: str, frame: pd.DataFrame, names: list[str], L: int, H: int,
               sinks: dict[tuple[int, int], str], prompt_id: int | None) -> dict[str, Any]:
    idx = frame["layer"].to_numpy() * H + frame["head"].to_numpy()
    values = {}
    for name in names:
        arr = np.full(L * H, np.nan)
        arr[idx] = frame[name].to_numpy(dtype=np.float64)
        values[name] = round_floats(arr)
    tips = [sinks.get((layer, head), "") for layer in range(L) for head in range(H)]
    return {"label": label, "prompt_id": prompt_id, "values": values, "sinks": tips}


def _grid_from_heads(run: Run, limits: ReportLimits) -> dict[str, Any] | None:
    """Fallback for runs with a heads table but no keys table: sink_alpha and top_alpha per head."""
    heads = _table(run, "heads")
    if heads is None or not {"layer", "head"} <= set(heads.columns):
        return None
    names = [c for c in ("sink_alpha", "top_alpha") if c in heads]
    if not names:
        return None
    frame = heads.rename(columns={"sink_alpha": "sink_mass"})
    names = ["sink_mass" if n == "sink_alpha" else n for n in names]
    L, H = _shape(frame)
    tips = {}
    if "sink_tokens" in frame:
        for layer, head, text in frame[["layer", "head", "sink_tokens"]].itertuples(index=False):
            tips.setdefault((int(layer), int(head)), str(text))
    mean = frame.groupby(["layer", "head"])[names].mean().reset_index()
    return {"L": L, "H": H, "metrics": [{"name": m, "label": METRICS[m]} for m in names],
            "views": [_grid_view("mean over prompts", mean, names, L, H, tips, None)], "n_prompts": None}


def token_data(run: Run, limits: ReportLimits) -> dict[str, Any] | None:
    """Per-head last-token rows (or column mass α when rows were not captured) for the token view.

    Interactive mode (`keys` table): the page aggregates the chosen layers × heads and applies detect-mask-
    renormalise itself. Static mode (`tokens` table of `explain`): before/after/sink as computed in Python.
    """
    keys = _table(run, "keys")
    if keys is None:
        return _static_tokens(run)
    stat = "last_row" if "last_row" in keys else "alpha"
    L, H = _shape(keys)
    tokens = prompt_tokens(keys)
    texts = _prompt_texts(run)
    prompts, notes, used = [], [], 0
    chosen = sorted(tokens)[: limits.max_view_prompts]
    groups = dict(iter(keys[keys["prompt_id"].isin(chosen)].groupby("prompt_id")))
    for pid in chosen:
        n = len(tokens[pid])
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
        sub = groups[pid]
        arr = np.zeros((L, H, n))
        arr[sub["layer"].to_numpy(), sub["head"].to_numpy(), sub["position"].to_numpy()] = sub[stat].to_numpy()
        if layout == "layer":
            arr = arr.mean(axis=1)
        used += size
        prompts.append({"prompt_id": pid, "text": texts.get(pid, ""), "tokens": tokens[pid], "layout": layout,
                        "rows": pack(arr, exact=size <= EXACT_VALUES)})
    if not prompts:
        return {"mode": "none", "notes": notes}
    params = run.manifest.get("parameters", {}) or {}
    return {"mode": "interactive", "stat": stat, "L": L, "H": H, "prompts": prompts, "notes": notes,
            "run_method": params.get("method"), "default": {"layers": "-1", "heads": "all", "method": "zscore",
                                                            "threshold": 2.0}}


def _prompt_texts(run: Run) -> dict[int, str]:
    prompts = _table(run, "prompts")
    if prompts is None or "text" not in prompts:
        return {}
    return {int(p): str(t) for p, t in zip(prompts["prompt_id"], prompts["text"], strict=True)}


def _static_tokens(run: Run) -> dict[str, Any] | None:
    table = _table(run, "tokens")
    if table is None or not {"token", "before", "after"} <= set(table.columns):
        return None
    prompts = []
    for pid, group in table.groupby(table["prompt_id"] if "prompt_id" in table else np.zeros(len(table), int)):
        group = group.sort_values("position") if "position" in group else group
        prompts.append({
            "prompt_id": int(pid), "text": "", "tokens": [str(t) for t in group["token"]],
            "before": round_floats(group["before"].to_numpy(), 6), "after": round_floats(group["after"].to_numpy(), 6),
            "sinks": [bool(s) for s in group["sink"]] if "sink" in group else [False] * len(group),
        })
    params = run.manifest.get("parameters", {}) or {}
    described = {k: params[k] for k in ("method", "layers", "heads") if k in params}
    return {"mode": "static", "prompts": prompts, "notes": [], "described": plain(described)}


LAYER_CURVES: dict[str, str] = {
    "head_share": "share of heads with a sink",
    "sink_share": "share of heads with α₀ > ε",
    "pos0_alpha": "α at position 0",
    "alpha0": "α at position 0",
    "top_other_alpha": "largest α at another position",
}


def curve_data(run: Run) -> dict[str, Any] | None:
    """Per-layer curves: sink share and α at position 0 (`layers`, as written by profile or the mechanisms
    analysis), and ‖h‖ at position 0 against the median elsewhere (`norms`: layer, position, norm; by `depth`
    when the table has one, e.g. sites between sublayers)."""
    charts = []
    layers = _table(run, "layers")
    if layers is None and _table(run, "heads") is not None and "n_sinks" in run.tables["heads"]:
        heads = run.tables["heads"]
        layers = heads.groupby("layer")["n_sinks"].apply(lambda s: float((s > 0).mean())).rename("head_share")
        layers = layers.reset_index()
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
    norms = _table(run, "norms")
    if norms is not None and {"layer", "position", "norm"} <= set(norms.columns):
        x = "depth" if "depth" in norms else "layer"
        first = norms[norms["position"] == 0].groupby(x)["norm"].mean()
        series = [{"name": "‖h‖ at position 0", "x": first.index.tolist(), "y": round_floats(first.to_numpy())}]
        others = norms[norms["position"] > 0]
        if len(others):
            keys = [c for c in ("prompt_id", x) if c in others]
            rest = others.groupby(keys)["norm"].median().groupby(x).mean()
            series.append({"name": "median ‖h‖ at other positions", "x": rest.index.tolist(),
                           "y": round_floats(rest.to_numpy())})
        charts.append({"id": "norms", "title": "Hidden-state norm per layer", "xlabel": x, "ylabel": "‖h‖",
                       "series": series, "ymin": 0.0})
    return {"charts": charts} if charts else None


def map_data(run: Run, limits: ReportLimits) -> dict[str, Any] | None:
    """Full attention maps from a `maps` table (prompt_id, layer, head, query, key, weight), for prompts of at most
    `max_map_tokens` tokens, as many heads as `max_map_values` allows (the strongest heads by max α first)."""
    maps = _table(run, "maps")
    if maps is None or not {*HEAD_KEYS, "query", "key", "weight"} <= set(maps.columns):
        return None
    keys = _table(run, "keys")
    tokens = prompt_tokens(keys) if keys is not None else {}
    strength = head_metrics(keys).set_index(HEAD_KEYS)["top_alpha"] if keys is not None else None
    out: dict[str, Any] = {}
    used, budget = 0, limits.max_map_values
    exact = min(len(maps), budget) <= EXACT_VALUES  # one row per map value
    for pid, group in maps.groupby("prompt_id"):
        n = int(max(group["query"].max(), group["key"].max())) + 1
        if n > limits.max_map_tokens or used + n * n > budget:
            continue
        L, H = int(group["layer"].max()) + 1, int(group["head"].max()) + 1
        arr = np.zeros((L, H, n, n))
        arr[group["layer"].to_numpy(), group["head"].to_numpy(), group["query"].to_numpy(),
            group["key"].to_numpy()] = group["weight"].to_numpy()
        pairs = [(layer, head) for layer, head in group[["layer", "head"]].drop_duplicates().itertuples(index=False)]
        if strength is not None:
            pairs.sort(key=lambda lh: -float(strength.get((pid, lh[0], lh[1]), 0.0)))
        heads = {}
        for layer, head in pairs:
            if used + n * n > budget:
                break
            heads[f"{int(layer)},{int(head)}"] = pack(arr[layer, head], exact=exact)
            used += n * n
        out[str(int(pid))] = {"n": n, "tokens": tokens.get(int(pid), [str(i) for i in range(n)]), "heads": heads}
    return {"prompts": out} if out else None


def table_data(run: Run, limits: ReportLimits) -> list[dict[str, Any]]:
    """Every table of the run (except `maps`), capped at `max_table_rows` rows (the top ones by α for `keys`)."""
    out = []
    for name, frame in run.tables.items():
        if name == "maps":
            continue
        out.append({"name": name, **table_json(frame, limits.max_table_rows, sort_by="alpha")})
    return out


def overview_data(run: Run) -> dict[str, Any]:
    """Model, command, time, parameters and table sizes from the manifest."""
    m = run.manifest or {}
    model = m.get("model", {}) or {}
    return plain({
        "model": model.get("name", ""),
        "layers": model.get("n_layers"),
        "heads": model.get("n_heads"),
        "kv_heads": model.get("n_kv_heads"),
        "command": m.get("command", ""),
        "created": m.get("created", ""),
        "parameters": {k: v for k, v in (m.get("parameters", {}) or {}).items() if k != "capture"},
        "tables": {name: len(frame) for name, frame in run.tables.items()},
        "versions": m.get("versions", {}),
    })
