"""Catch, tag, release (seed 003): split each head's output into the part that comes from its sinks (the *tag*) and
the rest, and measure how much of the head's output variance the tags explain.

For a head with attention A [n, n] and values v_j [d_v], the output at token i is o_i = Σ_j A_ij v_j. With the sinks
S of that head (keys whose column mass α_k = mean_{i ≥ k, i sees k} A_ik exceeds ε, the `column_mass` detector,
ε = 0.2 as in seed 003 §3.1), it splits exactly into

    o_i = t_i + r_i,   t_i = Σ_{s∈S} A_is v_s   (the tag),   r_i = Σ_{j∉S} A_ij v_j   (the rest).

Optionally both parts are mapped into the residual stream by the head's slice of the output projection,
W_O^h ∈ R^{d_model × d_v} (t_i ↦ W_O^h t_i; the projection's bias is not per head and is left out).

Variance explained by tags (per prompt, layer and head; tokens i = 0..n−1 of the prompt; õ = o − mean_i o):

    VE = Σ_i ⟨õ_i, t̃_i⟩ / Σ_i ‖õ_i‖²

the covariance share of the tag in the additive split of the head output's total variance across tokens:
Var(o) = Cov(o, t) + Cov(o, r), so VE(tag) + VE(rest) = 1 exactly, and VE = Σ_s VE_s splits further into one share
per sink, VE_s = Σ_i ⟨õ_i, (A_is − mean_i A_is) v_s⟩ / Σ_i ‖õ_i‖². When the rest is uncorrelated with the tag,
VE = Var(t)/Var(o) = R² of the tag as a predictor of o. Two related quantities are reported beside it: `var_ratio`
= Σ‖t̃_i‖² / Σ‖õ_i‖² and `var_projected` = Σ‖P_S õ_i‖² / Σ‖õ_i‖², with P_S the orthogonal projection onto
span{v_s : s ∈ S} (the "tag subspace" of the head). All three coincide when r̃ ⟂ span{v_s}; seed 003 reports ≈0.25–
0.35 for 7–14B models (rebuttal tables on QK-norm models and threshold sensitivity; the paper's exact formula is not
in the seed). A head without sinks has VE = 0.

Computation: inside the capture pass, a read-only intervention (`SinkColumns`) records the attention columns A[:, S]
of the candidate sink keys (α_k above the smallest threshold asked for) of every layer; the capture itself records
the head outputs o and values v, so t, r and the statistics need no stored n × n maps. Prompts are processed in
batches and only the per-head statistics are kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from sinkscope.capture import CaptureConfig, Trace, model_for, run_capture
from sinkscope.capture.moments import tag_moments
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel
from sinkscope.progress import Progress, tracked

__all__ = [
    "COSINE_BINS",
    "DEFAULT_EPS_GRID",
    "Decomposition",
    "PromptLayer",
    "TagResult",
    "capture_tags",
    "cosine_histogram",
    "decompose",
    "final_token_parts",
    "head_statistics",
    "head_summary",
    "output_projections",
    "pca_view",
    "sensitivity_table",
    "tag_part",
    "tag_statistics",
    "taxonomy",
    "variance_explained",
]

DEFAULT_EPS_GRID: tuple[float, ...] = (0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.15, 0.2, 0.3, 0.4)
"""The twelve thresholds of seed 003's sensitivity rebuttal (0.03 … 0.4)."""

COSINE_BINS: tuple[float, ...] = (-1.0, -0.6, -0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.6, 1.0)
"""The histogram bins of seed 003's tag-orthogonality rebuttal table."""


# ---------------------------------------------------------------------------------------------------------------
# Pure functions: the decomposition and variance explained for one head
# ---------------------------------------------------------------------------------------------------------------


def tag_part(columns: torch.Tensor, sink_values: torch.Tensor) -> torch.Tensor:
    """t_i = Σ_s A_is v_s.  columns [..., n, K] (A[:, S]), sink_values [..., K, d] → tags [..., n, d]."""
    return columns @ sink_values


def variance_explained(
    outputs: torch.Tensor,  # [..., n, d]  o_i
    columns: torch.Tensor,  # [..., n, K]  A_is for the K candidate sinks
    sink_values: torch.Tensor,  # [..., K, d]  v_s
    selected: torch.Tensor | None = None,  # [..., K] bool: which candidates are sinks (None: all)
) -> dict[str, torch.Tensor]:
    """Variance of the head outputs across tokens explained by the tag part (formulas in the module docstring), from
    the per-token tensors: their moments (`capture.moments.tag_moments`, what the capture reduces them to) and
    `moment_statistics`.

    Returns `var_explained` [...] (Σ_i⟨õ_i, t̃_i⟩ / Σ_i‖õ_i‖²), `share` [..., K] (that sum split per sink; 0 for
    unselected candidates), `var_ratio` [...] (Σ‖t̃‖²/Σ‖õ‖²), `var_projected` [...] (Σ‖P_S õ‖²/Σ‖õ‖²) and
    `total` [...] (Σ‖õ‖²). NaN where the outputs do not vary (one token).
    """
    return moment_statistics(tag_moments(outputs, columns, sink_values), selected)


@dataclass
class PromptLayer:
    """Everything needed to decompose one prompt's heads at one layer (prompt coordinates, n real tokens)."""

    outputs: torch.Tensor  # [H, n, d_v]  o_i per head
    values: torch.Tensor  # [H, n, d_v]  v_j of each head's KV head
    alpha: torch.Tensor  # [H, n]  column mass (trace.key_mass)
    index: torch.Tensor  # [H, K]  candidate sink positions, −1 = none
    columns: torch.Tensor  # [H, n, K]  A_is for the candidates

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(valid [H, K] bool, α of each candidate [H, K], v of each candidate [H, K, d_v])."""
        valid = self.index >= 0
        idx = self.index.clamp(min=0)
        alpha = self.alpha.gather(-1, idx) * valid
        vals = self.values.gather(1, idx[:, :, None].expand(-1, -1, self.values.shape[-1]))
        return valid, alpha, vals

    def moments(self) -> LayerMoments:
        """The tag moments of every head (the same reduction the capture does with `tag_moments`)."""
        valid, alpha, vals = self.candidates()
        return LayerMoments(tag_moments(self.outputs, self.columns, vals * valid[..., None]), self.index, alpha,
                            self.outputs.shape[1])


def capture_tags(
    loaded: LoadedModel,
    prompts: Sequence[str],
    floor: float = 0.03,
    *,
    batch_size: int = 8,
    hidden_states: bool = False,
    progress: Progress | None = None,
) -> list[tuple[Trace, list[list[PromptLayer]], list[torch.Tensor] | None]]:
    """Capture in batches, in one pass per batch: head outputs, values, and per head the attention columns of the
    candidate sinks (α_k > floor, `CaptureConfig.sink_columns` — computed in the chunked statistics, never as a
    [query, key] matrix). Returns per batch: the trace, per prompt × layer a `PromptLayer`, and (with
    `hidden_states`) per prompt the residual stream [L + 1, n, d_model] (entry l is the input of layer l, entry L the
    last block's output). progress: called as progress("tags", done, total) after each batch."""
    if not 0 < floor < 1:
        raise SinkscopeError(f"the sink threshold must be in (0, 1), got {floor}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    out = []
    config = CaptureConfig(rows=None, entropy=False, head_outputs=True, values=True, sink_columns=floor,
                           hidden=("embed", "block") if hidden_states else None)
    for batch in _batches(prompts, batch_size, progress):
        trace = run_capture(loaded, batch, config, batch_size=len(batch))
        hidden = None
        if hidden_states:
            assert trace.hidden is not None
            hidden = [trace.hidden[p, :, : int(trace.lengths[p])] for p in range(trace.n_prompts)]
        out.append((trace, _prompt_layers(trace), hidden))
    return out


def _batches(prompts: Sequence[str], batch_size: int, progress: Progress | None) -> Iterator[Sequence[str]]:
    """The prompts in batches (one string is one prompt); progress("tags", done, total) after each batch is done."""
    if not prompts:
        raise SinkscopeError("no prompts given: pass --prompt TEXT or --prompts FILE with one prompt per line")
    return tracked([prompts[i: i + batch_size] for i in range(0, len(prompts), max(1, batch_size))], "tags",
                   progress)


def _prompt_layers(trace: Trace) -> list[list[PromptLayer]]:
    """The trace (prompt coordinates) → per prompt, per layer a PromptLayer."""
    assert trace.head_outputs is not None and trace.values is not None
    assert trace.columns is not None and trace.column_index is not None
    h, kvh = trace.n_heads, trace.values.shape[2]
    group = h // kvh
    result: list[list[PromptLayer]] = []
    for p in range(trace.n_prompts):
        n = int(trace.lengths[p])
        layers = []
        for layer in range(trace.n_layers):
            values = trace.values[p, layer, :, :n].repeat_interleave(group, dim=0)  # [H, n, d_v]
            layers.append(PromptLayer(outputs=trace.head_outputs[p, layer, :, :n], values=values,
                                      alpha=trace.key_mass[p, layer, :, :n], index=trace.column_index[p, layer],
                                      columns=trace.columns[p, layer, :, :n]))
        result.append(layers)
    return result


def output_projections(loaded: LoadedModel | torch.nn.Module) -> list[torch.Tensor]:
    """The output projection of every attention layer as W_O [d_model, H·d_v] (head h: columns h·d_v … (h+1)·d_v).

    Found as the child `o_proj`, `out_proj`, `c_proj` (GPT-2 Conv1D, transposed) or `dense` of each module that has
    a `layer_idx`; raises SinkscopeError when a layer has none.
    """
    model = model_for(loaded) if isinstance(loaded, LoadedModel) else loaded
    found: dict[int, torch.Tensor] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int) or idx in found:
            continue
        for name in ("o_proj", "out_proj", "c_proj", "dense"):
            proj = getattr(module, name, None)
            weight = getattr(proj, "weight", None)
            if isinstance(weight, torch.Tensor):
                w = weight.detach().float().cpu()
                found[idx] = w.T.contiguous() if type(proj).__name__ == "Conv1D" else w
                break
    n_layers = getattr(model.config, "num_hidden_layers", len(found))
    if len(found) != n_layers:
        raise SinkscopeError(
            f"found the output projection of {len(found)} of {n_layers} layers in {type(model).__name__}; "
            "run without --project (head space)"
        )
    return [found[i] for i in range(n_layers)]


def _head_slices(w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """W_O [d_model, H·d_v] → per head [H, d_model, d_v]."""
    d_model, width = w_o.shape
    return w_o.view(d_model, n_heads, width // n_heads).permute(1, 0, 2)


# ---------------------------------------------------------------------------------------------------------------
# Decomposition of short prompt sets (tensors), and streamed statistics (tables)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Decomposition:
    """Per-token split o = tag + rest for every prompt, layer and head (prompt coordinates, zero past the end)."""

    trace: Trace
    sinks: torch.Tensor  # [P, L, H, N] bool
    tag: torch.Tensor  # [P, L, H, N, d]  d = d_v, or d_model with project=True
    rest: torch.Tensor  # [P, L, H, N, d]
    output: torch.Tensor  # [P, L, H, N, d]  o (mapped with project=True)


def decompose(
    loaded: LoadedModel,
    prompts: Sequence[str],
    eps: float = 0.2,
    *,
    project: bool = False,
    batch_size: int = 8,
) -> Decomposition:
    """Split every head output into tag t_i = Σ_{s∈S} A_is v_s and rest o_i − t_i (module docstring), S = the
    keys with column mass α_k > eps. With `project`, all three are mapped by the head's slice of W_O.
    Keeps O(P·L·H·N·d) memory: for large corpora use `tag_statistics`."""
    parts = capture_tags(loaded, prompts, floor=eps, batch_size=batch_size)
    w = output_projections(loaded) if project else None
    p_total = sum(t.n_prompts for t, _, _ in parts)
    n_max = max(int(t.lengths.max()) for t, _, _ in parts)
    first = parts[0][0]
    n_layers, n_heads = first.n_layers, first.n_heads
    d = w[0].shape[0] if w is not None else first.head_outputs.shape[-1]  # type: ignore[union-attr]
    tag = torch.zeros(p_total, n_layers, n_heads, n_max, d)
    output = torch.zeros_like(tag)
    sinks = torch.zeros(p_total, n_layers, n_heads, n_max, dtype=torch.bool)
    traces = []
    p0 = 0
    for trace, layers_of, _ in parts:
        traces.append(trace)
        for p, layers in enumerate(layers_of):
            for layer, pl in enumerate(layers):
                valid, alpha, vals = pl.candidates()
                sel = valid & (alpha > eps)  # [H, K]
                t = tag_part(pl.columns * sel[:, None, :], vals)  # [H, n, d_v]
                o = pl.outputs
                if w is not None:
                    wh = _head_slices(w[layer], n_heads)  # [H, d_model, d_v]
                    t, o = t @ wh.transpose(1, 2), o @ wh.transpose(1, 2)
                n = o.shape[1]
                tag[p0 + p, layer, :, :n] = t
                output[p0 + p, layer, :, :n] = o
                for h in range(n_heads):
                    sinks[p0 + p, layer, h, pl.index[h][sel[h]]] = True
        p0 += trace.n_prompts
    return Decomposition(trace=traces[0] if len(traces) == 1 else _merge(traces), sinks=sinks, tag=tag,
                         rest=output - tag, output=output)


def _merge(traces: list[Trace]) -> Trace:
    """Prompts and tokens of several batch traces in one Trace (key mass padded; no head outputs or values)."""
    n_max = max(int(t.lengths.max()) for t in traces)

    def cat(name: str) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(getattr(t, name), (0, n_max - getattr(t, name).shape[-1]))
                          for t in traces])

    return Trace(prompts=[p for t in traces for p in t.prompts], input_ids=[i for t in traces for i in t.input_ids],
                 tokens=[x for t in traces for x in t.tokens], lengths=torch.cat([t.lengths for t in traces]),
                 key_mass=cat("key_mass"), key_count=cat("key_count"),
                 info=traces[0].info)


@dataclass
class LayerMoments:
    """One prompt × layer reduced to the tag moments of every head (`sinkscope.capture.moments`)."""

    moments: dict[str, torch.Tensor]  # name → [H, ...]
    index: torch.Tensor  # [H, K]  candidate sink positions, −1 = none
    alpha: torch.Tensor  # [H, K]  α of each candidate (0 where none)
    n_tokens: int


def moment_statistics(
    moments: dict[str, torch.Tensor],  # name → [..., ...] (capture.moments.tag_moments)
    selected: torch.Tensor | None = None,  # [..., K] bool: which candidates are sinks (None: all)
    r: torch.Tensor | None = None,  # [..., d_v, d_v]: map head space isometrically to W_O^h's image (W = U·r)
) -> dict[str, torch.Tensor]:
    """`variance_explained` computed from the moments instead of the per-token outputs and columns: the same
    quantities (`var_explained`, `share`, `var_ratio`, `var_projected`, `total`) for any selection of the
    candidates. With `r` (the R of W_O^h = U R, U orthonormal) they are those of the projected outputs W_O^h o."""
    cov, moment, vals, mean = moments["cov"].double(), moments["moment"], moments["values"], moments["mean"]
    if r is not None:
        r = r.double()
        rt = r.transpose(-1, -2)
        cov, moment, vals, mean = r @ cov @ rt, moment @ rt, vals @ rt, (r @ mean[..., None])[..., 0]
    if selected is not None:
        vals = vals * selected.to(vals.dtype)[..., None]
    total = cov.diagonal(dim1=-2, dim2=-1).sum(-1)  # Σ‖õ‖²
    safe = total.clamp(min=1e-300)
    share = (moment * vals).sum(-1) / safe[..., None]  # [..., K]
    ratio = (moments["gram"] * (vals @ vals.transpose(-1, -2))).sum((-2, -1)) / safe  # Σ‖t̃‖² / Σ‖õ‖²
    proj = torch.linalg.pinv(vals) @ vals  # [..., d_v, d_v] projection onto span{v_s}
    projected = (proj.transpose(-1, -2) @ cov @ proj).diagonal(dim1=-2, dim2=-1).sum(-1) / safe
    squares = total + moments["count"] * (mean * mean).sum(-1)  # Σ‖o‖²
    flat = total <= 1e-24 * squares.clamp(min=1e-300)
    nan = torch.tensor(float("nan"), dtype=total.dtype)
    return {
        "var_explained": torch.where(flat, nan, share.sum(-1)),
        "share": torch.where(flat[..., None], nan, share),
        "var_ratio": torch.where(flat, nan, ratio),
        "var_projected": torch.where(flat, nan, projected),
        "total": total,
    }


def head_statistics(
    unit: LayerMoments,
    eps: float,
    r: torch.Tensor | None = None,  # [H, d_v, d_v]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Variance explained for every head of one prompt × layer at threshold eps.
    Returns (moment_statistics' dict with [H] / [H, K] entries, selected [H, K])."""
    sel = (unit.index >= 0) & (unit.alpha > eps)
    return moment_statistics(unit.moments, sel, r), sel


def projection_factors(w_o: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per head the R of the thin QR W_O^h = U R: [H, d_v, d_v]. ‖W_O^h x‖ = ‖R x‖ for every x, so statistics of the
    projected outputs are those of R·o, computed in d_v dimensions."""
    return torch.linalg.qr(_head_slices(w_o, n_heads).double(), mode="reduced").R


def _moment_batches(
    loaded: LoadedModel, prompts: Sequence[str], floor: float, batch_size: int, progress: Progress | None
) -> list[tuple[Trace, list[list[LayerMoments]]]]:
    """One capture per batch with the tag moments reduced inside it (`CaptureConfig.tag_moments`): per prompt and
    layer a LayerMoments; no head outputs, values or columns are kept."""
    config = CaptureConfig(rows=None, entropy=False, sink_columns=floor, tag_moments=True)
    out = []
    for batch in _batches(prompts, batch_size, progress):
        trace = run_capture(loaded, batch, config, batch_size=len(batch))
        assert trace.tag_moments is not None and trace.column_index is not None
        units = []
        for p in range(trace.n_prompts):
            n = int(trace.lengths[p])
            layers = []
            for layer in range(trace.n_layers):
                index = trace.column_index[p, layer]
                alpha = trace.key_mass[p, layer, :, :n].gather(-1, index.clamp(min=0)) * (index >= 0)
                layers.append(LayerMoments({k: v[p, layer] for k, v in trace.tag_moments.items()}, index, alpha, n))
            units.append(layers)
        out.append((trace, units))
    return out


@dataclass
class TagResult:
    """Tables of a tags run (tidy; key columns prompt_id, layer, head, position, token where they apply)."""

    tables: dict[str, pd.DataFrame]
    params: dict[str, Any]

    def _repr_html_(self) -> str:
        """A notebook view: the summary or parameters and each table's first rows (`report.notebook`)."""
        from sinkscope.report.notebook import result_html

        return result_html(self)


def tag_statistics(
    loaded: LoadedModel,
    prompts: Sequence[str],
    eps: float = 0.2,
    *,
    eps_grid: Sequence[float] | None = None,
    project: bool = False,
    geometry: bool = False,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> TagResult:
    """Stream the corpus in batches and build the tables:

    heads (prompt_id, layer, head, n_sinks, var_explained, var_ratio, var_projected), sinks (prompt_id, layer, head,
    position, token, alpha, share, var_explained), head_summary (layer × head means over prompts), taxonomy (one
    row per sink token string), sensitivity (with eps_grid: eps, mean_sinks, mean_var_explained, …) and, with
    `geometry` (needs the output projections), tag_cosines (pairs of distinct tag directions W_O^h v_s in one
    layer of one prompt), cosine_histogram and tag_alignment (mean cosine between a sink's tag direction and the
    layer-input residual h_i of the non-sink tokens i that attend to that sink most among the head's sinks).
    progress: called as progress("tags", done, total) after each batch.
    """
    if not 0 < eps < 1:
        raise SinkscopeError(f"the sink threshold must be in (0, 1), got {eps}")
    grid = sorted({float(e) for e in (eps_grid or ())})
    if any(not 0 < e < 1 for e in grid):
        raise SinkscopeError("every threshold of the sensitivity grid must be in (0, 1)")
    floor = min([eps, *grid])
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    w = output_projections(loaded) if (project or geometry) else None
    heads_rows: list[dict[str, Any]] = []
    sink_rows: list[dict[str, Any]] = []
    sens_rows: list[dict[str, Any]] = []
    cos_rows: list[dict[str, Any]] = []
    align_rows: list[dict[str, Any]] = []
    if geometry:  # the alignment needs each token's columns and residual: keep them, reduce in Python
        batches: Any = ((trace, [[pl.moments() for pl in layers] for layers in layers_of], layers_of, hidden)
                        for trace, layers_of, hidden in capture_tags(loaded, prompts, floor, batch_size=batch_size,
                                                                     hidden_states=True, progress=progress))
    else:  # reduced inside the capture: memory does not grow with the prompt's length
        batches = ((trace, units, None, None)
                   for trace, units in _moment_batches(loaded, prompts, floor, batch_size, progress))
    p0 = 0
    for trace, units, layers_of, hidden in batches:
        n_heads = trace.n_heads
        for p, layers in enumerate(units):
            pid, tokens = p0 + p, trace.tokens[p]
            for layer, unit in enumerate(layers):
                r = projection_factors(w[layer], n_heads) if (w is not None and project) else None
                stats, sel = head_statistics(unit, eps, r)
                for h in range(n_heads):
                    heads_rows.append({"prompt_id": pid, "layer": layer, "head": h, "n_sinks": int(sel[h].sum()),
                                       "n_tokens": unit.n_tokens,
                                       "var_explained": float(stats["var_explained"][h]),
                                       "var_ratio": float(stats["var_ratio"][h]),
                                       "var_projected": float(stats["var_projected"][h])})
                    for k in sel[h].nonzero().flatten().tolist():
                        pos = int(unit.index[h, k])
                        sink_rows.append({"prompt_id": pid, "layer": layer, "head": h, "position": pos,
                                          "token": tokens[pos], "alpha": float(unit.alpha[h, k]),
                                          "share": float(stats["share"][h, k]),
                                          "var_explained": float(stats["var_explained"][h])})
                for e in grid:
                    s_e, sel_e = head_statistics(unit, e, r)
                    for h in range(n_heads):
                        sens_rows.append({"eps": e, "prompt_id": pid, "layer": layer, "head": h,
                                          "n_sinks": int(sel_e[h].sum()),
                                          "var_explained": float(s_e["var_explained"][h])})
                if layers_of is not None and w is not None and hidden is not None:
                    wh = _head_slices(w[layer], n_heads)
                    c, a = _geometry(layers_of[p][layer], sel, wh, hidden[p][layer], tokens, pid, layer)
                    cos_rows.extend(c)
                    align_rows.extend(a)
        p0 += trace.n_prompts
    heads = pd.DataFrame(heads_rows)
    sinks = pd.DataFrame(sink_rows, columns=["prompt_id", "layer", "head", "position", "token", "alpha", "share",
                                             "var_explained"])
    tables = {"heads": heads, "sinks": sinks, "head_summary": head_summary(heads), "taxonomy": taxonomy(sinks)}
    if grid:
        tables["sensitivity_heads"] = pd.DataFrame(sens_rows)
        tables["sensitivity"] = sensitivity_table(tables["sensitivity_heads"])
    if geometry:
        cos = pd.DataFrame(cos_rows, columns=["prompt_id", "layer", "head", "position", "token", "head_b",
                                              "position_b", "token_b", "kind", "cosine"])
        tables["tag_cosines"] = cos
        tables["cosine_histogram"] = cosine_histogram(cos)
        tables["tag_alignment"] = pd.DataFrame(align_rows, columns=["prompt_id", "layer", "head", "position",
                                                                    "token", "n_tagged", "cosine"])
    params = {"eps": eps, "eps_grid": grid, "project": project, "geometry": geometry, "batch_size": batch_size,
              "n_prompts": p0, "variance_explained": "sum_i <o~_i, t~_i> / sum_i |o~_i|^2 (covariance share)"}
    return TagResult(tables=tables, params=params)


def _geometry(pl: PromptLayer, sel: torch.Tensor, wh: torch.Tensor, resid: torch.Tensor, tokens: list[str],
              pid: int, layer: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Tag directions u = W_O^h v_s of the sinks of one prompt × layer: pairwise cosines, and the mean cosine of
    each with the layer-input residual of the tokens it tags. resid [n, d_model]."""
    _, _, vals = pl.candidates()
    dirs, who = [], []
    for h in range(sel.shape[0]):
        for k in sel[h].nonzero().flatten().tolist():
            dirs.append(wh[h] @ vals[h, k])  # [d_model]
            who.append((h, k, int(pl.index[h, k])))
    cos_rows: list[dict[str, Any]] = []
    align_rows: list[dict[str, Any]] = []
    if not dirs:
        return cos_rows, align_rows
    u = torch.nn.functional.normalize(torch.stack(dirs), dim=-1)  # [m, d_model]
    sim = u @ u.T
    for a in range(len(who)):
        for b in range(a + 1, len(who)):
            (ha, _, pa), (hb, _, pb) = who[a], who[b]
            cos_rows.append({"prompt_id": pid, "layer": layer, "head": ha, "position": pa, "token": tokens[pa],
                             "head_b": hb, "position_b": pb, "token_b": tokens[pb],
                             "kind": "same_head" if ha == hb else "cross_head", "cosine": float(sim[a, b])})
    r = torch.nn.functional.normalize(resid.float(), dim=-1)  # [n, d_model]
    n = r.shape[0]
    for a, (h, k, pos) in enumerate(who):
        cols = pl.columns[h] * sel[h]  # [n, K]
        mine = cols.argmax(-1) == k  # tokens whose strongest sink is this one
        sink_pos = pl.index[h][sel[h]]
        nonsink = torch.ones(n, dtype=torch.bool)
        nonsink[sink_pos] = False
        tagged = mine & nonsink & (cols[:, k] > 0)
        if bool(tagged.any()):
            align_rows.append({"prompt_id": pid, "layer": layer, "head": h, "position": pos, "token": tokens[pos],
                               "n_tagged": int(tagged.sum()), "cosine": float((r[tagged] @ u[a]).mean())})
    return cos_rows, align_rows


# ---------------------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------------------


def head_summary(heads: pd.DataFrame) -> pd.DataFrame:
    """Layer × head: mean number of sinks and mean variance explained over prompts (heads table → summary)."""
    if heads.empty:
        return pd.DataFrame(columns=["layer", "head", "n_sinks", "var_explained", "var_ratio", "var_projected",
                                     "n_prompts"])
    return (heads.groupby(["layer", "head"], as_index=False)
            .agg(n_sinks=("n_sinks", "mean"), var_explained=("var_explained", "mean"),
                 var_ratio=("var_ratio", "mean"), var_projected=("var_projected", "mean"),
                 n_prompts=("prompt_id", "nunique")))


def sensitivity_table(per_head: pd.DataFrame) -> pd.DataFrame:
    """ε → mean number of sinks per head, mean variance explained over all heads and over heads with a sink."""
    rows = []
    for eps, part in per_head.groupby("eps"):
        with_sink = part[part["n_sinks"] > 0]
        rows.append({"eps": float(eps), "mean_sinks": float(part["n_sinks"].mean()),
                     "mean_var_explained": float(part["var_explained"].mean()),
                     "mean_var_explained_sink_heads": float(with_sink["var_explained"].mean())
                     if len(with_sink) else float("nan"),
                     "share_heads_with_sink": float((part["n_sinks"] > 0).mean())})
    return pd.DataFrame(rows)


def taxonomy(sinks: pd.DataFrame, top: int | None = None) -> pd.DataFrame:
    """Per sink token string: frequency (number of (prompt, layer, head) where it is a sink), the mean variance
    explained of those heads, its own mean share, and its mean α; most frequent first."""
    if sinks.empty:
        return pd.DataFrame(columns=["token", "frequency", "mean_var_explained", "mean_share", "mean_alpha"])
    table = (sinks.groupby("token", as_index=False)
             .agg(frequency=("alpha", "size"), mean_var_explained=("var_explained", "mean"),
                  mean_share=("share", "mean"), mean_alpha=("alpha", "mean"))
             .sort_values(["frequency", "mean_var_explained"], ascending=[False, False], ignore_index=True))
    return table.head(top) if top else table


def cosine_histogram(cosines: pd.DataFrame, bins: Sequence[float] = COSINE_BINS) -> pd.DataFrame:
    """Counts of pairwise tag cosines per bin [lo, hi) (last bin closed), per kind and for all pairs."""
    edges = np.asarray(bins, dtype=float)
    rows = []
    for kind in ("all", "same_head", "cross_head"):
        values = cosines["cosine"].to_numpy() if kind == "all" else \
            cosines.loc[cosines["kind"] == kind, "cosine"].to_numpy()
        counts, _ = np.histogram(np.clip(values, -1, 1), bins=edges)
        for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True):
            rows.append({"kind": kind, "lo": float(lo), "hi": float(hi), "count": int(c)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# Final-token parts (for probes) and the PCA view
# ---------------------------------------------------------------------------------------------------------------


def final_token_parts(
    loaded: LoadedModel,
    texts: Sequence[str],
    eps: float = 0.2,
    *,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """Tag, non-tag and full head output at each text's last token: arrays [S, L, H, d_v] (float32) under the keys
    "tag", "nontag", "full"; sinks per prompt and head from its column mass (α > eps). progress: called as
    progress("tags", done, total) after each batch."""
    tags, fulls = [], []
    for _, units in _moment_batches(loaded, list(texts), eps, batch_size, progress):
        for layers in units:
            t_rows, o_rows = [], []
            for unit in layers:
                sel = ((unit.index >= 0) & (unit.alpha > eps)).double()  # [H, K]
                m = unit.moments
                t_rows.append(((m["last_columns"] * sel)[:, None, :] @ m["values"])[:, 0])  # [H, d_v]
                o_rows.append(m["last_output"])  # [H, d_v]
            tags.append(torch.stack(t_rows))
            fulls.append(torch.stack(o_rows))
    tag = torch.stack(tags).numpy().astype(np.float32)
    full = torch.stack(fulls).numpy().astype(np.float32)
    return {"tag": tag, "nontag": full - tag, "full": full}


def _pca(x: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k principal components of rows of x [n, d]: (scores [n, k], explained variance ratio [k])."""
    xc = x.double() - x.double().mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    k = min(k, vh.shape[0])
    total = (s**2).sum().clamp(min=1e-300)
    return (xc @ vh[:k].T).float(), (s[:k] ** 2 / total).float()


def pca_view(
    loaded: LoadedModel,
    prompt: str,
    layer: int,
    head: int,
    residual_layer: int | None = None,
    eps: float = 0.2,
) -> pd.DataFrame:
    """Seed 003 Fig. 2: one prompt's head outputs (layer, head) on their top 3 principal components and the
    residual stream entering `residual_layer` (default: the last layer) on its top 3, each token labelled by the
    sink it attends to most (`sink_position`, −1 when the head has no sink). Columns: prompt_id, layer, head,
    position, token, sink_position, sink_token, attention_to_sink, pc1..pc3, res_pc1..res_pc3, residual_layer."""
    (trace, layers_of, hidden), = capture_tags(loaded, [prompt], eps, batch_size=1, hidden_states=True)
    n_layers = trace.n_layers
    if not -n_layers <= layer < n_layers or not 0 <= head < trace.n_heads:
        raise SinkscopeError(f"layer {layer} / head {head} out of range: the model has {n_layers} layers × "
                             f"{trace.n_heads} heads")
    layer %= n_layers
    if residual_layer is not None and not -(n_layers + 1) <= residual_layer <= n_layers:
        raise SinkscopeError(f"residual layer {residual_layer} out of range: the residual stream has {n_layers + 1} "
                             f"sites, 0 (embeddings) … {n_layers} (last block's output)")
    res_layer = n_layers if residual_layer is None else residual_layer % (n_layers + 1)
    pl = layers_of[0][layer]
    valid, alpha, _ = pl.candidates()
    sel = valid[head] & (alpha[head] > eps)  # [K]
    cols = pl.columns[head] * sel  # [n, K]
    tokens = trace.tokens[0]
    n = len(tokens)
    if bool(sel.any()):
        best = cols.argmax(-1)
        sink_pos = pl.index[head][best].tolist()
        weight = cols.gather(-1, best[:, None])[:, 0].tolist()
    else:
        sink_pos, weight = [-1] * n, [0.0] * n
    scores, _ = _pca(pl.outputs[head])
    assert hidden is not None
    res_scores, _ = _pca(hidden[0][res_layer])
    table = pd.DataFrame({"prompt_id": 0, "layer": layer, "head": head, "position": range(n), "token": tokens,
                          "sink_position": sink_pos,
                          "sink_token": [tokens[s] if s >= 0 else "" for s in sink_pos],
                          "attention_to_sink": weight, "residual_layer": res_layer})
    for i in range(3):
        table[f"pc{i + 1}"] = scores[:, i].tolist() if i < scores.shape[1] else 0.0
        table[f"res_pc{i + 1}"] = res_scores[:, i].tolist() if i < res_scores.shape[1] else 0.0
    return table
