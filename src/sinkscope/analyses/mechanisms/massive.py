"""Massive activations (Sun et al. 2024, "Massive activations in large language models", in seed 002's survey).

A few hidden-state entries, in fixed feature dimensions and at the sink token (the first token, BOS, a delimiter),
are orders of magnitude larger than the rest (Sun et al.: |h| > 100 and ~1000× the median magnitude in LLaMA2-7B);
they act as fixed biases and are what makes the sink's hidden state high-norm and input-independent.

Per prompt p and site s (a hidden state H ∈ R^{n×d}):
- the k largest |H_{j,c}| with their position j and dimension c, and ratio = |H_{j,c}| / median_{j',c'} |H_{j',c'}|;
  an entry is *massive* when ratio ≥ `ratio` and |H_{j,c}| ≥ `min_value` (defaults 1,000 and 100: Sun et al.'s
  rule; ratio 100 with min_value 0 is the looser ratio-only rule, for small models whose activations are smaller
  in absolute terms);
- the dimensions that carry the position-0 spike: energy share e_c = H_{0,c}² / ‖H_0‖² (mean over prompts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.mechanisms.residual import MechTrace


def massive_activations(mt: MechTrace, prompt_ids: Sequence[int] | None = None, *, top_k: int = 5,
                        ratio: float = 1000.0, min_value: float = 100.0) -> pd.DataFrame:
    """The `top_k` largest-magnitude entries of every prompt × site (including the embeddings), from the capture's
    residual summary (`MechTrace.summary`).

    Columns: prompt_id, layer, sublayer, depth, rank, position, token, dim, value, median_abs, ratio, massive.
    """
    summary = mt.summary(top_k)
    ids = list(prompt_ids) if prompt_ids is not None else list(range(mt.trace.n_prompts))
    rows = []
    for p in range(summary["value"].shape[0]):
        for s, site in enumerate(mt.sites):
            med = float(summary["median"][p, s])
            for r in range(top_k):
                pos = int(summary["position"][p, s, r])
                if pos < 0:
                    continue
                value = float(summary["value"][p, s, r])
                rows.append((ids[p], site.layer, site.sublayer, site.depth, r, pos, mt.trace.tokens[p][pos],
                             int(summary["dim"][p, s, r]), value, med, abs(value) / max(med, 1e-30)))
    cols = ["prompt_id", "layer", "sublayer", "depth", "rank", "position", "token", "dim", "value", "median_abs",
            "ratio"]
    frame = pd.DataFrame(rows, columns=cols)
    frame["massive"] = (frame["ratio"] >= ratio) & (frame["value"].abs() >= min_value)
    return frame


def pos0_energy(mt: MechTrace) -> torch.Tensor:
    """e_{s,c} = mean over prompts of H_{p,s,0,c}² / ‖H_{p,s,0}‖²: [S, d] (each row sums to 1)."""
    h0 = mt.summary(1)["first"].double()  # [P, S, d]
    e = h0**2 / (h0**2).sum(-1, keepdim=True).clamp(min=1e-30)
    return e.mean(0).float()


def pos0_dims(mt: MechTrace, top_k: int = 4) -> pd.DataFrame:
    """Per site, the `top_k` dimensions with the largest share of the position-0 squared norm.

    Columns: layer, sublayer, depth, rank, dim, energy_share (e_c), value (mean H_{0,c}), ratio (mean over prompts
    of |H_{0,c}| / median |H| at that site).
    """
    summary = mt.summary(1)
    energy = pos0_energy(mt)  # [S, d]
    h0 = summary["first"]  # [P, S, d]
    med = summary["median"]  # [P, S]
    ratio = (h0.abs() / med[..., None].clamp(min=1e-30)).mean(0)  # [S, d]
    k = min(top_k, energy.shape[-1])
    share, dims = energy.topk(k, dim=-1)
    rows = []
    for s, site in enumerate(mt.sites):
        for r in range(k):
            c = int(dims[s, r])
            rows.append((site.layer, site.sublayer, site.depth, r, c, float(share[s, r]), float(h0[:, s, c].mean()),
                         float(ratio[s, c])))
    return pd.DataFrame(rows, columns=["layer", "sublayer", "depth", "rank", "dim", "energy_share", "value",
                                       "ratio"])


def massive_dims(entries: pd.DataFrame, mt: MechTrace, spike_depths: Sequence[float], *,
                 min_energy: float = 0.1) -> pd.DataFrame:
    """Per dimension that holds a massive entry or ≥ `min_energy` of the position-0 energy at a spike site.

    spike_depths: the sites where position 0's norm is far above the median (seed 001's amplified state).
    Columns: dim, n_massive (massive entries over prompts × sites), pos0_share (the share of them at position 0),
    first_depth (the first site where the dimension is massive), max_ratio, pos0_energy and pos0_energy_max (mean
    and largest e_c over the spike sites), carries_pos0 (pos0_energy_max ≥ `min_energy`: the dimension holds a
    real part of the position-0 spike; none without spike sites).
    """
    energy = pos0_energy(mt).numpy()  # [S, d]
    depths = np.array([s.depth for s in mt.sites])
    spike = np.isin(depths, np.asarray(list(spike_depths), dtype=float))
    spike_mean = energy[spike].mean(0) if spike.any() else np.zeros(energy.shape[1])
    spike_max = energy[spike].max(0) if spike.any() else np.zeros(energy.shape[1])
    flagged = entries[entries["massive"]]
    dims = set(flagged["dim"].tolist()) | set(np.nonzero(spike_max >= min_energy)[0].tolist())
    rows = []
    for c in sorted(dims):
        sub = flagged[flagged["dim"] == c]
        rows.append({
            "dim": int(c),
            "n_massive": len(sub),
            "pos0_share": float((sub["position"] == 0).mean()) if len(sub) else float("nan"),
            "first_depth": float(sub["depth"].min()) if len(sub) else float("nan"),
            "max_ratio": float(sub["ratio"].max()) if len(sub) else float("nan"),
            "pos0_energy": float(spike_mean[c]),
            "pos0_energy_max": float(spike_max[c]),
        })
    cols = ["dim", "n_massive", "pos0_share", "first_depth", "max_ratio", "pos0_energy", "pos0_energy_max"]
    frame = pd.DataFrame(rows, columns=cols)
    frame["carries_pos0"] = frame["pos0_energy_max"] >= min_energy
    return frame.sort_values(["carries_pos0", "pos0_energy", "n_massive"], ascending=False, ignore_index=True)
