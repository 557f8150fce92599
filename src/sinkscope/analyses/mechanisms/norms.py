"""Hidden-state norms per site and position, where the position-0 sink forms, and cross-input similarity.

Seed 001 (Peng et al., "How attention sinks emerge…", Figs. 2-4): within two blocks a model recognises position 0
and amplifies it into a fixed high-norm vector; the position-0 sink appears together with the norm jump, and the
position-0 hidden state converges to the same vector whatever the input.

Definitions (p prompt, s site, j position, h_{p,s,j} ∈ R^d the residual stream):
- norm  ‖h_{p,s,j}‖₂; the reference is the median over the other positions, m_{p,s} = median_{j ≥ 1} ‖h_{p,s,j}‖;
  the position-0 ratio r_{p,s} = ‖h_{p,s,0}‖ / m_{p,s}.
- α₀ = the column mass of key 0 (mean attention it receives from the queries that see it, `Trace.key_mass`);
  the sink share of layer l = mean over prompts and heads of 1[α₀ > ε].
- cross-input similarity at (s, j): mean over prompt pairs p < q of cos(h_{p,s,j}, h_{q,s,j}), computed as
  (‖Σ_p u_p‖² − P) / (P(P − 1)) with u_p = h_{p,s,j} / ‖h_{p,s,j}‖ (the capture sums the u_p, `hidden_leading`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.mechanisms.residual import MechTrace, Site


def site_frame(sites: Sequence[Site]) -> pd.DataFrame:
    return pd.DataFrame({"site": range(len(sites)), "layer": [s.layer for s in sites],
                         "sublayer": [s.sublayer for s in sites], "depth": [s.depth for s in sites]})


def median_other(norms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """m_{p,s} = median over positions 1 … n_p − 1 of the norms [P, S, N] → [P, S] (NaN for one-token prompts)."""
    out = torch.full(norms.shape[:2], float("nan"))
    for p, n in enumerate(lengths.tolist()):
        if n > 1:
            out[p] = norms[p, :, 1:n].median(dim=-1).values
    return out


def norm_table(mt: MechTrace, prompt_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per prompt × site × position: prompt_id, layer, sublayer, depth, position, token, norm, ratio
    (the norm over the median norm of positions ≥ 1 at that site); sorted by prompt_id, depth, position. Built
    column by column (no merge, no sort), so the table is written once."""
    norms = mt.norms()  # [P, S, N]
    ids = list(prompt_ids) if prompt_ids is not None else list(range(norms.shape[0]))
    med = median_other(norms, mt.lengths)  # [P, S]
    sites = site_frame(mt.sites)
    order = np.argsort(sites["depth"].to_numpy(), kind="stable")  # sites by depth
    site_cols = {c: sites[c].to_numpy()[order] for c in ("layer", "sublayer", "depth")}
    S = len(order)
    frames = []
    for p in sorted(range(len(ids)), key=lambda q: ids[q]):
        n = int(mt.lengths[p])
        block = norms[p, :, :n].numpy()[order]  # [S, n]
        frames.append(pd.DataFrame({
            "prompt_id": np.full(S * n, ids[p], dtype=np.int64),
            **{c: np.repeat(v, n) for c, v in site_cols.items()},
            "position": np.tile(np.arange(n, dtype=np.int64), S),
            "token": np.tile(np.asarray(mt.trace.tokens[p][:n], dtype=object), S),
            "norm": block.ravel(),
            "ratio": (block / med[p].numpy()[order][:, None]).ravel(),
        }, copy=False))
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def norm_profile(mt: MechTrace) -> pd.DataFrame:
    """Per site (mean over prompts): pos0_norm ‖h₀‖, median_norm m, pos0_ratio r = ‖h₀‖/m, max_other_ratio
    (the largest ratio at any position ≥ 1, to show whether position 0 is unique)."""
    norms = mt.norms()  # [P, S, N]
    med = median_other(norms, mt.lengths)
    valid = mt.valid()[:, None, :].clone()  # [P, 1, N]
    valid[..., 0] = False
    other = torch.where(valid, norms, torch.full_like(norms, float("-inf"))).amax(-1)  # [P, S]
    frame = site_frame(mt.sites).drop(columns="site")
    frame["pos0_norm"] = _nanmean(norms[:, :, 0])
    frame["median_norm"] = _nanmean(med)
    frame["pos0_ratio"] = _nanmean(norms[:, :, 0] / med)
    frame["max_other_ratio"] = _nanmean(torch.where(torch.isfinite(other), other, float("nan")) / med)
    return frame


def _nanmean(x: torch.Tensor) -> np.ndarray:
    """Mean over dim 0 ignoring NaNs: [P, …] → numpy […]."""
    arr = x.double().numpy()
    count = np.sum(~np.isnan(arr), axis=0)
    total = np.nansum(arr, axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def sink_share_table(mt: MechTrace, eps: float = 0.2, position: int = 0) -> pd.DataFrame:
    """Per layer: alpha0 = mean α at `position`, sink_share = mean over prompts and heads of 1[α > ε],
    top_other_alpha = mean over prompts and heads of the largest α at any other position."""
    km = mt.trace.key_mass  # [P, L, H, N]
    valid = mt.valid()[:, None, None, :].clone()
    a0 = km[..., position]  # [P, L, H]
    valid[..., position] = False
    other = torch.where(valid, km, torch.full_like(km, -1.0)).amax(-1).clamp(min=0)
    return pd.DataFrame({
        "layer": np.arange(km.shape[1]),
        "alpha0": a0.mean(dim=(0, 2)).numpy(),
        "sink_share": (a0 > eps).float().mean(dim=(0, 2)).numpy(),
        "top_other_alpha": other.mean(dim=(0, 2)).numpy(),
    })


def first_layer(values: Sequence[float], threshold: float) -> int | None:
    """The first index whose value reaches `threshold` (None if none does)."""
    for i, v in enumerate(values):
        if v is not None and np.isfinite(v) and v >= threshold:
            return i
    return None


def formation(profile: pd.DataFrame, shares: pd.DataFrame, *, min_share: float = 0.5, ratio: float = 4.0,
              model: str = "") -> pd.DataFrame:
    """One row: where the position-0 sink forms.

    sink_layer: the first layer whose sink share (heads with α₀ > ε) reaches `min_share`;
    norm_layer/norm_sublayer/norm_depth: the first site whose position-0 ratio ‖h₀‖/median reaches `ratio`;
    peak_ratio/peak_depth: the largest ratio; norm_first: the norm has departed in the residual stream that the
    sink layer's attention reads (depth ≤ sink_layer; seed 001's order: amplification, then sink); sink_layers: how
    many layers reach `min_share`.
    """
    sink_layer = first_layer(shares["sink_share"].tolist(), min_share)
    k = first_layer(profile["pos0_ratio"].tolist(), ratio)
    peak = int(np.nanargmax(profile["pos0_ratio"].to_numpy())) if profile["pos0_ratio"].notna().any() else None
    norm_row = profile.iloc[k] if k is not None else None
    row = {
        "model": model,
        "sink_layer": sink_layer,
        "sink_share_at": float(shares["sink_share"].iloc[sink_layer]) if sink_layer is not None else None,
        "sink_layers": int((shares["sink_share"] >= min_share).sum()),
        "n_layers": len(shares),
        "norm_layer": int(norm_row["layer"]) if norm_row is not None else None,
        "norm_sublayer": str(norm_row["sublayer"]) if norm_row is not None else None,
        "norm_depth": float(norm_row["depth"]) if norm_row is not None else None,
        "ratio_at": float(norm_row["pos0_ratio"]) if norm_row is not None else None,
        "peak_ratio": float(profile["pos0_ratio"].iloc[peak]) if peak is not None else None,
        "peak_depth": float(profile["depth"].iloc[peak]) if peak is not None else None,
        "norm_first": bool(norm_row is not None and sink_layer is not None
                           and float(norm_row["depth"]) <= sink_layer),
        "min_share": min_share,
        "ratio_threshold": ratio,
    }
    return pd.DataFrame([row]).astype({"sink_layer": "Int64", "norm_layer": "Int64"})


def cosine_from_unit_sum(summed: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean of cos(x_a, x_b) over ordered pairs a ≠ b of c vectors, from u = Σ x/‖x‖ [..., d] and c [...]:
    (‖u‖² − c) / (c(c − 1)); NaN where c < 2."""
    total = (summed.double() ** 2).sum(-1)
    c = count.double()
    return torch.where(c > 1, (total - c) / (c * (c - 1)).clamp(min=1), torch.full_like(c, float("nan")))


def cross_input_similarity(mt: MechTrace, variant: str = "native") -> pd.DataFrame:
    """Per site and position j < the shortest prompt: mean pairwise cosine of h_{·,s,j} across prompts
    (seed 001 Fig. 4), from the sums of unit vectors (`MechTrace.units`). Empty with fewer than two prompts."""
    P = mt.trace.n_prompts
    cols = ["variant", "layer", "sublayer", "depth", "position", "cos_sim", "n_prompts"]
    if P < 2:
        return pd.DataFrame(columns=cols)
    units, count = mt.units()  # [S, n, d], [S, n]
    sim = cosine_from_unit_sum(units, count)  # [S, n]
    n = sim.shape[1]
    sites = site_frame(mt.sites)
    s_idx, j_idx = np.meshgrid(np.arange(len(mt.sites)), np.arange(n), indexing="ij")
    frame = pd.DataFrame({"site": s_idx.ravel(), "position": j_idx.ravel(), "cos_sim": sim.numpy().ravel()})
    frame = frame.merge(sites, on="site").drop(columns="site")
    frame["variant"] = variant
    frame["n_prompts"] = P
    return frame[cols].sort_values(["variant", "depth", "position"], ignore_index=True)


def similarity_summary(sim: pd.DataFrame) -> pd.DataFrame:
    """Per variant and site: cos_sim at position 0 and the mean over positions ≥ 1."""
    if sim.empty:
        return pd.DataFrame(columns=["variant", "layer", "sublayer", "depth", "pos0_cos", "other_cos"])
    pos0 = sim[sim["position"] == 0].set_index(["variant", "layer", "sublayer", "depth"])["cos_sim"]
    other = sim[sim["position"] > 0].groupby(["variant", "layer", "sublayer", "depth"])["cos_sim"].mean()
    out = pd.DataFrame({"pos0_cos": pos0, "other_cos": other}).reset_index()
    order = {v: i for i, v in enumerate(dict.fromkeys(sim["variant"]))}  # keep the variants' order
    out = out.assign(_o=out["variant"].map(order)).sort_values(["_o", "depth"], ignore_index=True)
    return out.drop(columns="_o")
