"""`profile`: sinks per prompt, layer and head with any registered detector, as tidy tables."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from sinkscope.capture import CaptureConfig, Trace, run_capture, tokenize
from sinkscope.detect import detect, get_detector
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel
from sinkscope.store import Run, make_manifest


@dataclass
class ProfileResult:
    """The trace, the sink mask and the tables of one profile run."""

    trace: Trace
    sinks: torch.Tensor  # [P, L, H, N] bool
    method: str
    params: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def run(self, loaded: LoadedModel, command: str = "profile") -> Run:
        params = {"method": self.method, **self.params, "capture": self.trace.info.get("capture")}
        manifest = make_manifest(command, model_manifest(loaded), params)
        return Run(tables=self.tables, manifest=manifest)

    def _repr_html_(self) -> str:
        """A notebook view: the per-layer table and a layer × head grid of the mass on sinks (mean over prompts)."""
        return profile_html(self)


def model_manifest(loaded: LoadedModel) -> dict[str, Any]:
    info = loaded.info
    return {"name": info.name, "model_type": info.model_type, "revision": info.revision, "dtype": info.dtype,
            "n_layers": info.n_layers, "n_heads": info.n_heads, "n_kv_heads": info.n_kv_heads,
            "adds_bos": info.adds_bos}


def sink_mask(trace: Trace, method: str = "column_mass", **params: Any) -> torch.Tensor:
    """Apply a detector to every prompt × layer × head. Returns a bool mask [P, L, H, N].

    Column detectors read the column mass α_k (`trace.key_mass`); row detectors read the last token's attention
    row. `sink_rate` flags, per head, the keys with α_k > ε (its per-key rate is in the `sink_rate` table).
    """
    detector = get_detector(method)
    valid = trace.valid_keys()[:, None, None, :]  # [P, 1, 1, N]
    if detector.statistic == "row":
        return detect(method, trace.last_rows(), valid=valid, **params)
    if detector.returns == "rate":
        detect(method, trace.key_mass, valid=valid, **params)  # validates the parameters
        eps = float(params.get("eps", detector.params["eps"]))
        return (trace.key_mass > eps) & valid
    return detect(method, trace.key_mass, valid=valid, **params)


def profile(
    loaded: LoadedModel,
    prompts: str | Sequence[str],
    method: str = "column_mass",
    params: Mapping[str, Any] | None = None,
    *,
    capture: CaptureConfig | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> ProfileResult:
    """Capture `prompts` (one string is one prompt), detect sinks with `method`, and build the tables.

    Prompts that are empty or longer than the context are skipped and listed in `result.skipped`
    (and the `skipped` table); if none is usable, SinkscopeError.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    params = dict(params or {})
    get_detector(method)
    ids, bad = tokenize(loaded, prompts)  # each prompt is tokenised once, here
    good = [i for i, seq in enumerate(ids) if seq is not None]
    if not good:
        reasons = "; ".join(f"prompt {i + 1}: {why}" for i, why in bad[:3])
        raise SinkscopeError(f"no usable prompt ({reasons})" if bad else "no prompts given")
    trace = run_capture(loaded, [ids[i] for i in good], capture or CaptureConfig(), batch_size=batch_size,
                        progress=progress, texts=[prompts[i] for i in good])
    sinks = sink_mask(trace, method, **params)
    result = ProfileResult(trace=trace, sinks=sinks, method=method, params=params, skipped=bad)
    result.tables = build_tables(trace, sinks, prompt_ids=good, method=method, params=params)
    result.tables["skipped"] = pd.DataFrame(
        {"prompt_id": [i for i, _ in bad], "reason": [why for _, why in bad]}
    ).astype({"prompt_id": "int64", "reason": "object"})
    return result


def build_tables(
    trace: Trace,
    sinks: torch.Tensor,
    prompt_ids: Sequence[int] | None = None,
    method: str = "column_mass",
    params: Mapping[str, Any] | None = None,
) -> dict[str, pd.DataFrame]:
    """Tidy tables: `keys` (prompt × layer × head × key), `heads`, `layers`, `prompts`; for sink_rate, `sink_rate`."""
    ids = list(prompt_ids) if prompt_ids is not None else list(range(trace.n_prompts))
    tables = {
        "keys": key_table(trace, sinks, ids),
        "heads": head_table(trace, sinks, ids),
        "prompts": pd.DataFrame({"prompt_id": ids, "text": trace.prompts, "n_tokens": trace.lengths.tolist()}),
    }
    tables["layers"] = layer_summary(tables["heads"], tables["keys"])
    if method == "sink_rate":
        tables["sink_rate"] = sink_rate_table(trace, ids, **dict(params or {}))
    return tables


def _token_frame(trace: Trace, ids: Sequence[int]) -> pd.DataFrame:
    rows = [(pid, pos, tok) for pid, toks in zip(ids, trace.tokens, strict=True) for pos, tok in enumerate(toks)]
    return pd.DataFrame(rows, columns=["prompt_id", "position", "token"])


def key_table(trace: Trace, sinks: torch.Tensor, ids: Sequence[int]) -> pd.DataFrame:
    """One row per prompt × layer × head × key position: α_k (`alpha`), its sum and query count, the last token's
    attention to the key (`last_row`) and whether the detector flagged it (`sink`)."""
    P, L, H, N = trace.key_mass.shape
    p, l, h, k = np.meshgrid(np.arange(P), np.arange(L), np.arange(H), np.arange(N), indexing="ij")
    keep = (k < trace.lengths.numpy()[p]).ravel()
    frame = pd.DataFrame({
        "prompt_id": np.asarray(ids)[p.ravel()[keep]],
        "layer": l.ravel()[keep],
        "head": h.ravel()[keep],
        "position": k.ravel()[keep],
        "alpha": trace.key_mass.numpy().ravel()[keep],
        "mass_sum": trace.key_mass_sum.numpy().ravel()[keep],
        "n_queries": trace.key_count[:, :, None, :].expand(P, L, H, N).numpy().ravel()[keep].astype("int64"),
        "sink": sinks.numpy().ravel()[keep],
    })
    if trace.rows is not None:
        frame["last_row"] = trace.last_rows().numpy().ravel()[keep]
    tokens = _token_frame(trace, ids)
    frame = frame.merge(tokens, on=["prompt_id", "position"], how="left")
    first = ["prompt_id", "layer", "head", "position", "token"]
    return frame[first + [c for c in frame.columns if c not in first]]


def head_table(trace: Trace, sinks: torch.Tensor, ids: Sequence[int]) -> pd.DataFrame:
    """One row per prompt × layer × head: number of sinks, the strongest key by α, the mass on sinks."""
    P, L, H, _ = trace.key_mass.shape
    valid = trace.valid_keys()[:, None, None, :]
    alpha = trace.key_mass.masked_fill(~valid, -1.0)
    top_alpha, top_pos = alpha.max(-1)
    n_sinks = sinks.sum(-1)
    sink_alpha = (trace.key_mass * sinks).sum(-1)
    p, l, h = np.meshgrid(np.arange(P), np.arange(L), np.arange(H), indexing="ij")
    frame = pd.DataFrame({
        "prompt_id": np.asarray(ids)[p.ravel()],
        "layer": l.ravel(),
        "head": h.ravel(),
        "n_sinks": n_sinks.numpy().ravel().astype("int64"),
        "sink_alpha": sink_alpha.numpy().ravel(),
        "top_position": top_pos.numpy().ravel(),
        "top_alpha": top_alpha.numpy().ravel(),
    })
    frame["top_token"] = [trace.tokens[pi][pos] for pi, pos in zip(p.ravel(), frame["top_position"], strict=True)]
    sink_tokens = []
    for pi, li, hi in zip(p.ravel(), l.ravel(), h.ravel(), strict=True):
        positions = torch.nonzero(sinks[pi, li, hi]).flatten().tolist()
        sink_tokens.append(" ".join(f"{pos}:{trace.tokens[pi][pos]!r}" for pos in positions))
    frame["sink_tokens"] = sink_tokens
    if trace.rows is not None:
        last = trace.last_rows()
        frame["last_row_sink_mass"] = (last * sinks).sum(-1).numpy().ravel()
    if trace.entropy is not None:
        idx = (trace.lengths - 1)[:, None, None, None].expand(P, L, H, 1)
        frame["last_entropy"] = trace.entropy.gather(-1, idx).squeeze(-1).numpy().ravel()
    if trace.sink_share is not None:
        share = trace.sink_share.sum(-1) / trace.lengths[:, None, None]
        frame["learned_sink_share"] = share.numpy().ravel()
    return frame


def layer_summary(heads: pd.DataFrame, keys: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """Per layer: share of (prompt, head) pairs with a sink, mean α at position 0, and the most frequent sink tokens
    with their mean α."""
    by_layer = heads.groupby("layer")
    frame = pd.DataFrame({
        "head_share": by_layer["n_sinks"].apply(lambda s: float((s > 0).mean())),
        "mean_sinks": by_layer["n_sinks"].mean(),
        "pos0_alpha": keys[keys["position"] == 0].groupby("layer")["alpha"].mean(),
    })
    flagged = keys[keys["sink"]]
    described = {}
    for layer, group in flagged.groupby("layer"):
        stats = group.groupby(["position", "token"])["alpha"].agg(["size", "mean"]).sort_values("size", ascending=False)
        described[layer] = ", ".join(
            f"{tok!r}@{pos} ({mean:.2f})" for (pos, tok), (_, mean) in stats.head(top).iterrows()
        )
    frame["sink_tokens"] = pd.Series(described, dtype="object")
    frame["sink_tokens"] = frame["sink_tokens"].fillna("")
    return frame.reset_index()


def sink_rate_table(trace: Trace, ids: Sequence[int], **params: Any) -> pd.DataFrame:
    """Per prompt and key position: Gu et al.'s sink rate, the fraction of (layer, head) pairs with α_k > ε."""
    rate = detect("sink_rate", trace.key_mass, valid=trace.valid_keys()[:, None, None, :], **params)  # [P, N]
    tokens = _token_frame(trace, ids)
    tokens["sink_rate"] = [float(rate[i, pos]) for i, pos in zip(
        tokens["prompt_id"].map({pid: i for i, pid in enumerate(ids)}), tokens["position"], strict=True)]
    return tokens


def profile_html(result: ProfileResult) -> str:
    """The per-layer table and a layer × head grid of `sink_alpha` (Σ α over the detector's sinks, mean over
    prompts) as plain HTML: cells coloured by the report's cividis ramp on a fixed 0 → 1 scale, no script."""
    from sinkscope.report.palette import cividis

    layers, heads = result.tables["layers"], result.tables["heads"]
    grid = heads.groupby(["layer", "head"])["sink_alpha"].mean().unstack("head")  # [layer, head]
    cell = "padding:2px 6px;text-align:right"
    rows = "".join(
        f"<tr><td style='{cell}'>{int(r.layer)}</td><td style='{cell}'>{r.head_share:.0%}</td>"
        f"<td style='{cell}'>{r.pos0_alpha:.3f}</td><td style='padding:2px 6px'>{html.escape(r.sink_tokens or '-')}"
        "</td></tr>" for r in layers.itertuples())
    table = ("<table><thead><tr><th>layer</th><th>heads with sink</th><th>α at pos 0</th>"
             f"<th>sink tokens (mean α)</th></tr></thead><tbody>{rows}</tbody></table>")

    def colour(value: float) -> str:
        r, g, b = cividis(value)
        ink = "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"
        return f"background:rgb({r},{g},{b});color:{ink}"

    head_row = "".join(f"<th style='padding:1px 4px'>{int(h)}</th>" for h in grid.columns)
    grid_rows = "".join(
        f"<tr><th style='padding:1px 4px'>{int(layer)}</th>" + "".join(
            f"<td title='layer {int(layer)}, head {int(h)}: {v:.3f}' style='{colour(v)};padding:1px 4px;"
            f"font-size:80%;text-align:right'>{v:.2f}</td>" for h, v in values.items()) + "</tr>"
        for layer, values in grid.iterrows())
    info = result.trace.info
    title = html.escape(f"{info.get('model', '')} profile: {result.trace.n_prompts} prompt(s), method "
                        f"{result.method} {result.params or ''}".strip())
    return (f"<div><p><b>{title}</b></p><div style='display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap'>"
            f"<div>{table}</div><div><table style='border-collapse:collapse'><caption>mass on sinks Σα, layer × "
            f"head (0 → 1)</caption><thead><tr><th>L \\ H</th>{head_row}</tr></thead><tbody>{grid_rows}</tbody>"
            "</table></div></div></div>")
