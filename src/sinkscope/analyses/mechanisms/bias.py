"""The implicit attention bias view of a sink (seed 002's survey): the softmax's sum-to-one constraint makes a head
park mass on a sink whose value contribution is (nearly) the same for every query and input — a learned bias.

Per head, with the sink s = position 0, query i > s, attention A_{i,s}, value v_s and head output
o_i = Σ_j A_{i,j} v_j (before the output projection):

- sink contribution  t_i = A_{i,s} v_s;   its share  ‖t_i‖ / ‖o_i‖  (can exceed 1 when the other terms cancel it);
- constancy  = mean over pairs of cos(t_a, t_b) across queries *and inputs*; within one input every t_i is a
  multiple of the same v_s, so this measures how input-independent the sink's value direction is;
- bias_r2 = 1 − Σ‖t − t̄‖² / Σ‖t‖² (t̄ the mean contribution): 1 when t is one constant vector (direction and
  size), the bias reading of a sink;
- magnitude_cv = std / mean of ‖t_i‖;  v_sink_ratio = ‖v_s‖ / median_{j ≠ s} ‖v_j‖ (sinks often carry small values).

Query i = s is left out (A_{s,s} = 1 in a causal model: t_s = o_s trivially).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.mechanisms.norms import cosine_from_unit_sum
from sinkscope.analyses.mechanisms.residual import MechTrace
from sinkscope.errors import SinkscopeError


def sink_inputs(mt: MechTrace, sink: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the decomposition reads: (A_{·,s} [P, L, H, N], ‖o_i‖ [P, L, H, N], ‖v_j‖ [P, L, H, N] and v_s
    [P, L, H, dv], the values expanded from the KV heads). From the capture's reductions (`head_output_norms`,
    `value_norms`, `column_values` with `columns=[s]`) or, when it kept them, from the full head outputs and values.
    t_i = A_{i,s} v_s needs nothing more: within a prompt every t_i is a non-negative multiple of v_s."""
    tr = mt.trace
    if mt.sink_column is not None:
        a = mt.sink_column  # [P, L, H, N]
    elif tr.maps is not None:
        a = tr.maps[..., sink]
    else:
        raise SinkscopeError("the bias decomposition needs the sink's attention column: capture with "
                             "sink_position=0 (or maps=True)")
    heads = a.shape[2]
    if tr.head_output_norms is not None:
        o_norm = tr.head_output_norms
    elif tr.head_outputs is not None:
        o_norm = torch.linalg.vector_norm(tr.head_outputs, dim=-1)
    else:
        raise SinkscopeError("the bias decomposition needs CaptureConfig(head_output_norms=True) (or head_outputs)")
    if tr.value_norms is not None and tr.column_values is not None and tr.column_index is not None:
        slot = int((tr.column_index[0, 0, 0] == sink).nonzero()[0, 0])
        v_norm = tr.value_norms.repeat_interleave(heads // tr.value_norms.shape[2], dim=2)
        v_sink = tr.column_values[..., slot, :]  # [P, L, H, dv]
    elif tr.values is not None:
        v = tr.values.repeat_interleave(heads // tr.values.shape[2], dim=2)  # [P, L, H, N, dv]
        v_norm, v_sink = torch.linalg.vector_norm(v, dim=-1), v[:, :, :, sink]
    else:
        raise SinkscopeError("the bias decomposition needs CaptureConfig(value_norms=True, column_values=True) "
                             "(or values)")
    return a, o_norm, v_norm, v_sink


def implicit_bias(mt: MechTrace, prompt_ids: Sequence[int] | None = None, *, sink: int = 0, eps: float = 0.2
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The decomposition per head and per query: (`bias_heads`, `bias_queries`)."""
    return bias_heads(mt, sink=sink, eps=eps), bias_queries(mt, prompt_ids, sink=sink)


def bias_heads(mt: MechTrace, *, sink: int = 0, eps: float = 0.2) -> pd.DataFrame:
    """The decomposition per head: layer, head, alpha0 (column mass of s), is_sink (alpha0 > ε), attn_to_sink
    (mean A_{i,s}), share_mean, share_median, constancy, bias_r2, magnitude_cv, v_sink_ratio.

    With t_{p,i} = A_{p,i} v_p (v_p = prompt p's v_s, A ≥ 0) the pair and sum statistics over queries reduce to
    per-prompt sums: constancy = (‖Σ_p c_p û_p‖² − c)/(c(c − 1)) with c_p the kept queries with A > 0 and
    û_p = v_p/‖v_p‖; bias_r2 = 1 − Σ‖t − t̄‖²/Σ‖t‖² = K‖t̄‖² / Σ‖t‖² with t̄ = Σ_p (Σ_i A_{p,i}) v_p / K over
    the K kept queries.
    """
    a, o_norm, v_norm, v_sink = sink_inputs(mt, sink)
    L, H = a.shape[1:3]
    keep = mt.valid().clone()  # [P, N]
    keep[:, : sink + 1] = False
    kf = keep[:, None, None, :].float()  # [P, 1, 1, N]: 1 at the kept queries
    vs = v_sink.double()  # [P, L, H, dv]
    vs_norm = torch.linalg.vector_norm(vs, dim=-1)  # [P, L, H]
    t_norm, share = _contributions(a, o_norm, vs_norm)
    count = (keep.sum(dim=0).sum() * torch.ones(L, H)).clamp(min=1)  # [L, H]  kept queries over all prompts

    def masked_sum(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Σ over prompts and kept queries of x [P, L, H, N] → [L, H] (NaN entries skipped)."""
        return torch.nan_to_num(x.to(dtype) * kf, nan=0.0).sum(dim=(0, 3))

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return masked_sum(x) / count

    nonzero = ((a > 0) & keep[:, None, None, :]).sum(-1).double() * (vs_norm > 0)  # [P, L, H]  c_p
    unit = vs / vs_norm[..., None].clamp(min=1e-300)
    summed = (nonzero[..., None] * unit).sum(0)  # [L, H, dv]
    constancy = cosine_from_unit_sum(summed, nonzero.sum(0))  # [L, H]
    s1 = (a * kf).sum(-1, dtype=torch.float64)  # [P, L, H]  Σ_i A
    s2 = (a.square() * kf).sum(-1, dtype=torch.float64)  # [P, L, H]  Σ_i A²
    n_kept = keep.sum().double() * torch.ones(L, H, dtype=torch.float64)  # [L, H]
    mean_t = (s1[..., None] * vs).sum(0) / n_kept.clamp(min=1)[..., None]  # [L, H, dv]
    total = (s2 * vs_norm**2).sum(0)  # [L, H]  Σ‖t‖²
    bias_r2 = torch.where(total > 0, n_kept * (mean_t**2).sum(-1) / total.clamp(min=1e-300),
                          torch.full_like(total, float("nan")))
    mag_mean = masked_mean(t_norm)
    mag_sq = masked_mean(t_norm.square())
    mag_cv = (mag_sq - mag_mean**2).clamp(min=0).sqrt() / mag_mean.clamp(min=1e-30)
    share_median = _share_median(share, keep)  # [L, H]
    v_other = torch.stack([v_norm[p, :, :, [j for j in range(n) if j != sink]].median(-1).values
                           if n > 1 else torch.full((L, H), float("nan")) for p, n in enumerate(mt.lengths.tolist())])
    v_ratio = torch.nanmean(v_norm[..., sink] / v_other, dim=0)
    alpha0 = mt.trace.key_mass[..., sink].mean(0)  # [L, H]
    l_idx, h_idx = np.meshgrid(np.arange(L), np.arange(H), indexing="ij")
    heads = pd.DataFrame({
        "layer": l_idx.ravel(), "head": h_idx.ravel(),
        "alpha0": alpha0.numpy().ravel(),
        "is_sink": (alpha0 > eps).numpy().ravel(),
        "attn_to_sink": masked_mean(a).numpy().ravel(),
        "share_mean": masked_mean(share).numpy().ravel(),
        "share_median": share_median.numpy().ravel(),
        "constancy": constancy.float().numpy().ravel(),
        "bias_r2": bias_r2.float().numpy().ravel(),
        "magnitude_cv": mag_cv.numpy().ravel(),
        "v_sink_ratio": v_ratio.numpy().ravel(),
    })
    return heads


def _contributions(a: torch.Tensor, o_norm: torch.Tensor, vs_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖t_i‖ = A_{i,s}‖v_s‖, share ‖t_i‖/‖o_i‖, NaN where ‖o_i‖ = 0), both [P, L, H, N], from A_{·,s} and ‖o_i‖
    [P, L, H, N] and ‖v_s‖ [P, L, H]."""
    t_norm = a * vs_norm[..., None].float()
    share = t_norm / o_norm.clamp(min=1e-30)
    share[(o_norm <= 0).expand_as(share)] = float("nan")
    return t_norm, share


def bias_queries(mt: MechTrace, prompt_ids: Sequence[int] | None = None, *, sink: int = 0) -> pd.DataFrame:
    """`implicit_bias`'s per-query table: prompt_id, layer, head, position, token, attn_to_sink, sink_norm ‖t_i‖,
    out_norm ‖o_i‖, share, one row per prompt × layer × head × query after the sink (the size of profile's keys
    table: `analyze` builds it when it is read or saved)."""
    ids = list(prompt_ids) if prompt_ids is not None else list(range(mt.trace.n_prompts))
    a, o_norm, _, v_sink = sink_inputs(mt, sink)
    L, H = a.shape[1:3]
    t_norm, share = _contributions(a, o_norm, torch.linalg.vector_norm(v_sink.double(), dim=-1))
    frames = []
    for p, n in enumerate(mt.lengths.tolist()):
        if n <= sink + 1:
            continue
        q = n - sink - 1  # queries after the sink
        # one column per array, no consolidation into blocks (copy=False): the table is its columns, once
        frames.append(pd.DataFrame({
            "prompt_id": np.full(L * H * q, ids[p], dtype=np.int64),
            "layer": np.repeat(np.arange(L, dtype=np.int64), H * q),
            "head": np.tile(np.repeat(np.arange(H, dtype=np.int64), q), L),
            "position": np.tile(np.arange(sink + 1, n, dtype=np.int64), L * H),
            "token": np.tile(np.asarray(mt.trace.tokens[p][sink + 1 : n], dtype=object), L * H),
            "attn_to_sink": a[p, :, :, sink + 1 : n].numpy().ravel(),
            "sink_norm": t_norm[p, :, :, sink + 1 : n].numpy().ravel(),
            "out_norm": o_norm[p, :, :, sink + 1 : n].numpy().ravel(),
            "share": share[p, :, :, sink + 1 : n].numpy().ravel(),
        }, copy=False))
    cols = ["prompt_id", "layer", "head", "position", "token", "attn_to_sink", "sink_norm", "out_norm", "share"]
    if len(frames) == 1:  # one prompt: no concatenated copy
        return frames[0]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def _share_median(share: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per layer and head, the (lower) median share over prompts and kept queries, NaN skipped: share [P, L, H, N],
    keep [P, N] → [L, H]. One head at a time, so the working copy is [P·N], not the whole table."""
    L, H = share.shape[1:3]
    flat = keep.reshape(-1)
    out = torch.empty(L, H)
    for layer in range(L):
        for head in range(H):
            out[layer, head] = torch.nanmedian(share[:, layer, head].reshape(-1)[flat])
    return out

