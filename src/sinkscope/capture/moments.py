"""The tag / non-tag split of head outputs (seed 003) reduced to a few small moments per head, inside the capture.

For a head with outputs o_i [d_v] over the n real queries i, attention A_ik to K candidate sinks k and their values
v_k, the split o_i = Σ_{k∈S} A_ik v_k + rest, and every variance statistic of `sinkscope.analyses.tags` for any
subset S of the candidates (any threshold above the capture's floor), follow from

    count n,  mean ō = Σ_i o_i / n,  C = Σ_i õ_i õ_iᵀ [d_v, d_v],  moment = Σ_i ã_i õ_iᵀ [K, d_v],
    gram = Σ_i ã_i ã_iᵀ [K, K],  values v_k [K, d_v],  and at the last real query A_last [K] and o_last [d_v]

(õ = o − ō, ã = a − ā: centred over the real queries). These are O(d_v² + K·d_v) per head instead of the
O(n·d_v) head outputs and the [n, K] columns, so the split costs no memory that grows with the prompt.
"""

from __future__ import annotations

import torch

__all__ = ["MOMENT_K_DIMS", "candidate_values", "tag_moments"]

MOMENT_K_DIMS: dict[str, tuple[int, ...]] = {
    "count": (), "mean": (), "cov": (), "moment": (-2,), "gram": (-2, -1), "values": (-2,),
    "last_columns": (-1,), "last_output": (),
}
"""Each moment → its dims that index the K candidates (zero-padded by `run_capture` when layers or batches keep
more candidates)."""


def candidate_values(
    value: torch.Tensor,  # [b, kvh, k, d_v]
    index: torch.Tensor,  # [b, h, K] key positions, −1 = none
) -> torch.Tensor:
    """v of each head's candidate keys: [b, h, K, d_v] float32, zero where the index is −1."""
    b, h, k_cols = index.shape
    kvh = value.shape[1]
    kv_of_head = torch.arange(h, device=value.device) // (h // kvh)  # [h]
    per_head = value.float()[:, kv_of_head]  # [b, h, k, d_v]
    picked = per_head.gather(2, index.clamp(min=0)[..., None].expand(b, h, k_cols, value.shape[-1]))
    return picked * (index >= 0)[..., None]


def tag_moments(
    outputs: torch.Tensor,  # [..., n, d_v]  o_i (any values at invalid queries)
    columns: torch.Tensor,  # [..., n, K]  A_ik
    values: torch.Tensor,  # [..., K, d_v]  v_k (zero rows for missing candidates)
    valid: torch.Tensor | None = None,  # [..., n] bool: the real queries (None: all)
) -> dict[str, torch.Tensor]:
    """The moments of the module docstring, computed in float64: count [...], mean [..., d_v], cov [..., d_v, d_v],
    moment [..., K, d_v], gram [..., K, K], values [..., K, d_v], last_columns [..., K], last_output [..., d_v].
    cov, the one that grows as d_v², is stored at the outputs' precision (float32 in a capture: its rounding, 6e-8
    relative, is below the float32 outputs' own)."""
    o = outputs.double()
    a = columns.double()
    n = o.shape[-2]
    if valid is None:
        valid = torch.ones(o.shape[:-1], dtype=torch.bool, device=o.device)
    w = valid.to(o.dtype)[..., None]  # [..., n, 1]
    count = w.sum(-2)  # [..., 1]
    safe = count.clamp(min=1)
    mean = (o * w).sum(-2) / safe  # [..., d_v]
    oc = (o - mean[..., None, :]) * w  # [..., n, d_v]
    ac = (a - ((a * w).sum(-2) / safe)[..., None, :]) * w  # [..., n, K]
    last = (valid.long() * torch.arange(1, n + 1, device=o.device)).argmax(-1, keepdim=True)  # [..., 1]
    return {
        "count": count[..., 0],
        "mean": mean,
        "cov": (oc.transpose(-1, -2) @ oc).to(torch.promote_types(outputs.dtype, torch.float32)),
        "moment": ac.transpose(-1, -2) @ oc,
        "gram": ac.transpose(-1, -2) @ ac,
        "values": values.double(),
        "last_columns": a.gather(-2, last[..., None].expand(*a.shape[:-2], 1, a.shape[-1]))[..., 0, :],
        "last_output": o.gather(-2, last[..., None].expand(*o.shape[:-2], 1, o.shape[-1]))[..., 0, :],
    }
