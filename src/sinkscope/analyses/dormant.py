"""Value-state drains and active/dormant heads across input domains (Guo et al. 2024, "Active-dormant attention
heads: mechanistically demystifying extreme-token phenomena in LLMs", arXiv:2410.13835).

Guo et al. describe three extreme-token phenomena of the sink token s: it receives most of the attention (attention
sink), its value vectors are small (value-state drain), and its residual-stream norm is large (residual-state peak).
A head whose queries put nearly all their attention on s adds almost nothing to the residual stream: it is *dormant*;
the same head can be *active* on another domain (their Llama-2 example: a head active on GitHub code, dormant on
Wikipedia). Per head and domain this module measures, from one capture per domain (`run_capture`: the attention
column of s, the value norms, the head-output norms and the residual-stream norms in the same forward pass):

- sink share  σ = mean_{i ∈ Q} A_{i,s}, over the queries Q that see s other than s itself (i > s in a decoder);
- value ratio ρ_v = ‖v_s‖ / mean_{j ≠ s} ‖v_j‖ per KV head (a value-state drain has ρ_v ≪ 1);
- output norm ‖o‖ = mean_{i ∈ Q} ‖Σ_j A_ij v_j‖ (before W_O), against the head's own value scale,
  out_rel = ‖o‖ / mean_{j ≠ s} ‖v_j‖, and against the layer's heads, out_rel_layer = ‖o‖ / mean_heads ‖o‖;
- the residual norm of s, ‖h_s‖, after each block, against the median ‖h_j‖ of the other positions.

A head is *dormant* in a domain when σ ≥ `dormant_share` and out_rel ≤ `output_ratio`, *active* when σ <
`active_share`, and *mixed* otherwise. Guo et al. define dormancy by these two properties (attention on the sink and
a near-zero output) without one published numeric cut-off that sinkscope could find; the defaults 0.9, 0.5 and 0.5
are sinkscope's own choice, and the tables keep σ and out_rel so any other cut can be applied afterwards.
The output is judged against the head's own value scale, not against the other heads of its layer: where most of a
layer's heads are sinks (SmolLM2-135M's layer 18: all nine heads with σ > 0.98 on SST-2), the layer mean is itself
a sink output and out_rel_layer stays near 0.5 for every head, while out_rel is ≈ ρ_v ≈ 0.08.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sinkscope.capture import CaptureConfig, run_capture
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel
from sinkscope.progress import Progress

SHAKESPEARE = "tiny_shakespeare"
STATES = ("dormant", "mixed", "active")


@dataclass
class DormantResult:
    """Tables, a summary and the parameters of one `head_domains` run."""

    tables: dict[str, pd.DataFrame]
    summary: dict[str, Any]
    params: dict[str, Any]
    skipped: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        """A notebook view: the summary or parameters and each table's first rows (`report.notebook`)."""
        from sinkscope.report.notebook import result_html

        return result_html(self)


# ---------------------------------------------------------------------------------------------------- the domains
def domain_names(spec: str) -> list[str]:
    """'sst2,agnews' → the names; 'all' → the nine classification sets of seed 000 and Tiny Shakespeare."""
    from sinkscope.analyses.evaluate.datasets import get_spec, list_datasets

    if spec.strip().lower() == "all":
        return [*list_datasets(), SHAKESPEARE]
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise SinkscopeError(f"--datasets '{spec}' names no data set: pass e.g. sst2,agnews,tiny_shakespeare or all")
    out = []
    for name in names:
        out.append(SHAKESPEARE if _is_shakespeare(name) else get_spec(name).name)
    if len(set(out)) != len(out):
        raise SinkscopeError(f"--datasets '{spec}' names a data set twice")
    return out


def _is_shakespeare(name: str) -> bool:
    return name.strip().lower().replace("-", "_") in (SHAKESPEARE, "shakespeare")


def shakespeare_excerpts(data: str | Path | None = None, excerpt_chars: int = 600) -> list[str]:
    """Tiny Shakespeare as excerpts: the first `excerpt_chars` characters of each of its chunks, cut at the last line
    break before the limit (`<data>/tiny_shakespeare/test.jsonl`, a `text` field per chunk)."""
    from sinkscope.analyses.evaluate.datasets import default_data_dir

    root = Path(data) if data is not None else default_data_dir()
    if root is None:
        raise SinkscopeError("Tiny Shakespeare is read from the shared data folder: pass --data FOLDER or set "
                             "SINKSCOPE_DATA")
    path = root / SHAKESPEARE / "test.jsonl" if root.is_dir() else root
    if not path.is_file():
        raise SinkscopeError(f"no Tiny Shakespeare file at {path}: expected {SHAKESPEARE}/test.jsonl under --data")
    excerpts = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            text = json.loads(line).get("text")
        except (ValueError, AttributeError):
            continue
        if not isinstance(text, str) or not text.strip():
            continue
        cut = text[:excerpt_chars]
        if len(text) > excerpt_chars and "\n" in cut:
            cut = cut[: cut.rindex("\n")]
        excerpts.append(cut.strip())
    if not excerpts:
        raise SinkscopeError(f"{path} holds no JSON lines with a text field")
    return excerpts


def load_domains(names: Sequence[str], data: str | Path | None = None, limit: int | None = 16, seed: int = 0,
                 excerpt_chars: int = 600) -> dict[str, list[str]]:
    """name → texts for shared data sets: each classification example's raw text (its template fields joined by
    newlines, no instruction or label, so that the domain is the text itself), `limit` of them drawn as `sinkscope
    eval` draws them (seeded, source order); Tiny Shakespeare as excerpts (`shakespeare_excerpts`), drawn alike."""
    from sinkscope.analyses.evaluate.datasets import Example, get_spec, load_examples, sample

    domains: dict[str, list[str]] = {}
    for name in names:
        if _is_shakespeare(name):
            texts = shakespeare_excerpts(data, excerpt_chars)
            picks = sample([Example(str(i), {}, 0, i) for i in range(len(texts))], limit, seed)
            domains[SHAKESPEARE] = [texts[int(ex.id)] for ex in picks]
            continue
        spec = get_spec(name)
        rows = load_examples(spec, data)
        examples = sample(rows.examples, limit, seed)
        if not examples:
            raise SinkscopeError(f"{spec.name} has no usable rows in {rows.source}")
        domains[spec.name] = ["\n".join(ex.fields[f] for f in spec.fields) for ex in examples]
    return domains


# ---------------------------------------------------------------------------------------------------- the measures
def sink_index(lengths: torch.Tensor, sink: int) -> torch.Tensor:
    """Each prompt's sink position in prompt coordinates: `sink`, or lengths + sink for a negative one. [P] long."""
    return lengths + sink if sink < 0 else torch.full_like(lengths, sink)


def sink_queries(lengths: torch.Tensor, at: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
    """[P, N] bool: the queries that see the sink other than the sink itself — i > s in a decoder, i ≠ s otherwise
    (real tokens only)."""
    pos = torch.arange(n)[None, :]
    real = pos < lengths[:, None]
    return real & (pos > at[:, None] if causal else pos != at[:, None])


def head_measures(trace: Any, sink: int, causal: bool) -> dict[str, torch.Tensor]:
    """Per prompt, layer and head, from a trace captured with `columns=[sink]`, `value_norms` and
    `head_output_norms`: sink_share [P, L, H] (σ), value_ratio [P, L, H] (ρ_v of the head's KV head), sink_value and
    other_value [P, L, H] (‖v_s‖ and mean_{j≠s} ‖v_j‖), out_norm [P, L, H] (mean ‖o_i‖ over the sink's queries)."""
    if trace.columns is None or trace.value_norms is None or trace.head_output_norms is None:
        raise SinkscopeError("head_measures needs a capture with columns=[sink], value_norms and head_output_norms")
    p_count, _, n_heads, n = trace.key_mass.shape
    at = sink_index(trace.lengths, sink)  # [P]
    queries = sink_queries(trace.lengths, at, n, causal).float()  # [P, N]
    n_q = queries.sum(-1).clamp(min=1)[:, None, None]  # [P, 1, 1]
    column = trace.columns[..., 0].float()  # [P, L, H, N]  A_{i,s}
    share = (column * queries[:, None, None, :]).sum(-1) / n_q
    out = (trace.head_output_norms.float() * queries[:, None, None, :]).sum(-1) / n_q
    vn = trace.value_norms.float()  # [P, L, KVH, N]
    rows = torch.arange(p_count)
    sink_v = vn[rows, :, :, at]  # [P, L, KVH]
    others = (torch.arange(n)[None, :] < trace.lengths[:, None]) & (torch.arange(n)[None, :] != at[:, None])
    other_v = (vn * others[:, None, None, :]).sum(-1) / others.sum(-1).clamp(min=1)[:, None, None]
    kv_of_head = torch.arange(n_heads) // (n_heads // vn.shape[2])  # [H]
    sink_v, other_v = sink_v[:, :, kv_of_head], other_v[:, :, kv_of_head]  # [P, L, H]
    return {"sink_share": share, "out_norm": out, "sink_value": sink_v, "other_value": other_v,
            "value_ratio": sink_v / other_v.clamp(min=1e-30)}


def residual_peaks(trace: Any, sink: int) -> dict[str, torch.Tensor]:
    """The residual-state peak per prompt and site, from a trace with `hidden_norms`: sink_norm [P, S] (‖h_s‖) and
    median_norm [P, S] (median ‖h_j‖ over the other real positions; NaN for a one-token prompt)."""
    if trace.hidden_norms is None:
        raise SinkscopeError("residual_peaks needs a capture with hidden sites and hidden_norms=True")
    norms = trace.hidden_norms.float()  # [P, S, N]
    at = sink_index(trace.lengths, sink)
    p_count, n = norms.shape[0], norms.shape[-1]
    sink_norm = norms[torch.arange(p_count), :, at]  # [P, S]
    others = (torch.arange(n)[None, :] < trace.lengths[:, None]) & (torch.arange(n)[None, :] != at[:, None])
    masked = torch.where(others[:, None, :], norms, torch.nan)
    return {"sink_norm": sink_norm, "median_norm": masked.nanmedian(-1).values}


# ---------------------------------------------------------------------------------------------------- the analysis
def truncate(tokenizer: Any, text: str, max_tokens: int | None) -> list[int]:
    """The text's token ids (special tokens as the tokenizer adds them), cut to `max_tokens`; a closing special token
    (an encoder's [SEP]) stays last."""
    seq = list(tokenizer(text)["input_ids"])
    if max_tokens is None or len(seq) <= max_tokens:
        return seq
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [*seq[: max_tokens - 1], seq[-1]] if seq[-1] in special and max_tokens > 1 else seq[:max_tokens]


def _prepare(loaded: LoadedModel, texts: Sequence[str], max_tokens: int | None, sink: int, min_tokens: int = 0
             ) -> tuple[list[list[int]], list[int], list[tuple[int, str]]]:
    """Token ids (cut to `max_tokens`), the indices kept and (index, reason) for the prompts left out: unusable,
    shorter than `min_tokens`, or too short to have the sink and at least one other query."""
    kept_ids, kept, bad = [], [], []
    need = max(2, min_tokens, sink + 2 if sink >= 0 else -sink + 1)
    for i, text in enumerate(texts):
        seq = truncate(loaded.tokenizer, text, max_tokens) if isinstance(text, str) and text.strip() else None
        if seq is None:
            bad.append((i, "empty prompt"))
            continue
        limit = loaded.info.max_positions
        if limit is not None and len(seq) > limit:
            bad.append((i, f"{len(seq)} tokens, more than the model's context of {limit}; lower the token limit"))
            continue
        if len(seq) < need:
            bad.append((i, f"{len(seq)} token(s), fewer than the {need} needed" + (
                f" (--min-tokens {min_tokens})" if need == min_tokens else
                f": the sink at position {sink} needs another query to attend to it")))
            continue
        kept_ids.append(seq)
        kept.append(i)
    return kept_ids, kept, sorted(bad)


def classify(share: pd.Series, out_rel: pd.Series, dormant_share: float, output_ratio: float,
             active_share: float) -> pd.Series:
    """'dormant' (σ ≥ dormant_share and out_rel ≤ output_ratio), 'active' (σ < active_share) or 'mixed'."""
    state = np.where((share >= dormant_share) & (out_rel <= output_ratio), "dormant",
                     np.where(share < active_share, "active", "mixed"))
    return pd.Series(state, index=share.index, dtype=object)


def head_domains(
    loaded: LoadedModel,
    domains: Mapping[str, Sequence[str]],
    *,
    sink: int = 0,
    dormant_share: float = 0.9,
    output_ratio: float = 0.5,
    active_share: float = 0.5,
    max_tokens: int | None = 128,
    min_tokens: int = 0,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> DormantResult:
    """Active and dormant heads per domain (Guo et al. 2024): one capture per domain, then the tables

    - prompts (domain, prompt_id, text, n_tokens), skipped (domain, prompt_id, reason);
    - prompt_heads (domain, prompt_id, layer, head, position = the sink, token: σ, ‖v_s‖, mean ‖v_j‖, ρ_v, ‖o‖);
    - head_domains (domain, layer, head: means over the domain's prompts, out_rel, state);
    - domain_switch (layer, head: heads dormant in one domain and active in another, with the domains and the range
      of σ and out_rel across domains);
    - residual (domain, prompt_id, layer, position, token: ‖h_s‖ after each block, layer −1 the embeddings, the
      median ‖h_j‖ of the other positions and their ratio).

    domains: name → texts (at least one domain); sink: the sink key (0, or negative from the end, e.g. −1 for an
    encoder's [SEP]); max_tokens: prompts are cut to this many tokens; min_tokens: shorter prompts are left out —
    σ falls with the prompt's length (more keys share the mass), so domains of different lengths compare fairly only
    at one length (min_tokens = max_tokens); progress: `update(task, done, total)`.
    """
    if not domains:
        raise SinkscopeError("no domains: pass --datasets NAMES or --domain NAME=FILE")
    if not 0 < dormant_share <= 1 or not 0 < active_share <= dormant_share:
        raise SinkscopeError("the shares must satisfy 0 < active share ≤ dormant share ≤ 1")
    if output_ratio <= 0:
        raise SinkscopeError("the output ratio must be positive")
    if loaded.info.is_causal and sink < 0:
        raise SinkscopeError(f"sink position {sink}: in a decoder the sink must be a position ≥ 0 that later "
                             "queries see")
    info = loaded.info
    config = CaptureConfig(rows=None, entropy=False, columns=[sink], value_norms=True, head_output_norms=True,
                           hidden=["embed", "block"], hidden_norms=True)
    prompt_rows, prompt_frames, residual_frames, skipped_rows = [], [], [], []
    skipped: dict[str, list[tuple[int, str]]] = {}
    for done, (name, texts) in enumerate(domains.items()):
        if progress is not None:
            progress("domains", done, len(domains))
        ids, kept, bad = _prepare(loaded, list(texts), max_tokens, sink, min_tokens)
        skipped[name] = bad
        skipped_rows += [{"domain": name, "prompt_id": i, "reason": why} for i, why in bad]
        if not ids:
            raise SinkscopeError(f"domain {name} has no usable prompt ({bad[0][1] if bad else 'none given'})")
        trace = run_capture(loaded, ids, config, batch_size=batch_size, padding_side="right",
                            texts=[texts[i] for i in kept])
        measures = head_measures(trace, sink, info.is_causal)
        at = sink_index(trace.lengths, sink)
        tokens = [trace.tokens[p][int(at[p])] for p in range(len(kept))]
        prompt_rows.append(pd.DataFrame({"domain": name, "prompt_id": kept, "text": [texts[i] for i in kept],
                                         "n_tokens": trace.lengths.tolist()}))
        prompt_frames.append(_per_head_frame(name, kept, at, tokens, measures))
        peaks = residual_peaks(trace, sink)
        residual_frames.append(_residual_frame(name, kept, at, tokens, peaks, trace.sites))
    if progress is not None:
        progress("domains", len(domains), len(domains))
    per_prompt = pd.concat(prompt_frames, ignore_index=True)
    heads = domain_table(per_prompt, dormant_share, output_ratio, active_share)
    switch = switch_table(heads)
    residual = pd.concat(residual_frames, ignore_index=True)
    tables = {
        "prompts": pd.concat(prompt_rows, ignore_index=True),
        "skipped": pd.DataFrame(skipped_rows, columns=["domain", "prompt_id", "reason"]).astype(
            {"domain": object, "prompt_id": "int64", "reason": object}),
        "prompt_heads": per_prompt,
        "head_domains": heads,
        "domain_switch": switch,
        "residual": residual,
    }
    params = {"domains": list(domains), "sink": sink, "dormant_share": dormant_share, "output_ratio": output_ratio,
              "active_share": active_share, "max_tokens": max_tokens, "min_tokens": min_tokens,
              "n_prompts": {name: int((tables["prompts"]["domain"] == name).sum()) for name in domains}}
    return DormantResult(tables=tables, summary=summarise(heads, switch, residual, info.name), params=params,
                         skipped=skipped)


def _per_head_frame(domain: str, kept: list[int], at: torch.Tensor, tokens: list[str],
                    measures: dict[str, torch.Tensor]) -> pd.DataFrame:
    p_count, n_layers, n_heads = measures["sink_share"].shape
    size = n_layers * n_heads
    frame = pd.DataFrame({
        "domain": domain,
        "prompt_id": np.repeat(np.asarray(kept, dtype=np.int64), size),
        "layer": np.tile(np.repeat(np.arange(n_layers), n_heads), p_count),
        "head": np.tile(np.arange(n_heads), p_count * n_layers),
        "position": np.repeat(at.numpy().astype(np.int64), size),
        "token": np.repeat(np.asarray(tokens, dtype=object), size),
    })
    for name in ("sink_share", "sink_value", "other_value", "value_ratio", "out_norm"):
        frame[name] = measures[name].reshape(-1).double().numpy()
    return frame


def _residual_frame(domain: str, kept: list[int], at: torch.Tensor, tokens: list[str],
                    peaks: dict[str, torch.Tensor], sites: Any) -> pd.DataFrame:
    p_count, n_sites = peaks["sink_norm"].shape
    layers = [s.layer for s in sites]
    frame = pd.DataFrame({
        "domain": domain,
        "prompt_id": np.repeat(np.asarray(kept, dtype=np.int64), n_sites),
        "layer": np.tile(np.asarray(layers, dtype=np.int64), p_count),
        "position": np.repeat(at.numpy().astype(np.int64), n_sites),
        "token": np.repeat(np.asarray(tokens, dtype=object), n_sites),
        "sink_norm": peaks["sink_norm"].reshape(-1).double().numpy(),
        "median_norm": peaks["median_norm"].reshape(-1).double().numpy(),
    })
    frame["ratio"] = frame["sink_norm"] / frame["median_norm"]
    return frame


def domain_table(per_prompt: pd.DataFrame, dormant_share: float, output_ratio: float,
                 active_share: float) -> pd.DataFrame:
    """head_domains: per domain, layer and head the means over prompts of σ, ‖v_s‖, mean ‖v_j‖ and ‖o‖; ρ_v and
    out_rel = ‖o‖ / mean ‖v_j‖ as ratios of the means; out_rel_layer = ‖o‖ / the mean ‖o‖ of the layer's heads in
    that domain; the state."""
    heads = (per_prompt.groupby(["domain", "layer", "head"], sort=False, as_index=False)
             .agg(n_prompts=("prompt_id", "size"), sink_share=("sink_share", "mean"),
                  sink_value=("sink_value", "mean"), other_value=("other_value", "mean"),
                  out_norm=("out_norm", "mean")))
    heads["value_ratio"] = heads["sink_value"] / heads["other_value"]
    heads["out_rel"] = heads["out_norm"] / heads["other_value"]
    heads["out_rel_layer"] = heads["out_norm"] / heads.groupby(["domain", "layer"], sort=False)["out_norm"].transform(
        "mean")
    heads["state"] = classify(heads["sink_share"], heads["out_rel"], dormant_share, output_ratio, active_share)
    return heads


def switch_table(heads: pd.DataFrame) -> pd.DataFrame:
    """domain_switch: the heads dormant in at least one domain and active in at least one other, with the domains of
    each state, and σ and out_rel at their lowest and highest across domains; largest σ range first."""
    rows = []
    for (layer, head), group in heads.groupby(["layer", "head"], sort=True):
        dormant = group.loc[group["state"] == "dormant", "domain"].tolist()
        active = group.loc[group["state"] == "active", "domain"].tolist()
        if not dormant or not active:
            continue
        rows.append({"layer": int(layer), "head": int(head), "dormant_in": ",".join(dormant),
                     "active_in": ",".join(active), "n_dormant": len(dormant), "n_active": len(active),
                     "share_min": group["sink_share"].min(), "share_max": group["sink_share"].max(),
                     "out_rel_min": group["out_rel"].min(), "out_rel_max": group["out_rel"].max()})
    columns = ["layer", "head", "dormant_in", "active_in", "n_dormant", "n_active", "share_min", "share_max",
               "out_rel_min", "out_rel_max"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["share_range"] = frame["share_max"] - frame["share_min"]
    return frame.sort_values(["share_range", "layer", "head"], ascending=[False, True, True], ignore_index=True)


def summarise(heads: pd.DataFrame, switch: pd.DataFrame, residual: pd.DataFrame, model: str) -> dict[str, Any]:
    """Per domain: the number of dormant/active/mixed heads, the mean ρ_v of dormant and of active heads, and the
    peak ‖h_s‖ / median ratio; the number of switching heads."""
    per_domain = {}
    for name, group in heads.groupby("domain", sort=False):
        counts = group["state"].value_counts()
        res = residual[residual["domain"] == name].groupby("layer")["ratio"].mean()
        per_domain[str(name)] = {
            **{state: int(counts.get(state, 0)) for state in STATES},
            "value_ratio_dormant": _mean(group.loc[group["state"] == "dormant", "value_ratio"]),
            "value_ratio_active": _mean(group.loc[group["state"] == "active", "value_ratio"]),
            "peak_ratio": _mean(res.max() if len(res) else float("nan")),
            "peak_layer": int(res.idxmax()) if len(res) and res.notna().any() else None,
        }
    return {"model": model, "n_heads": int(heads[["layer", "head"]].drop_duplicates().shape[0]),
            "domains": per_domain, "n_switch": len(switch)}


def _mean(x: Any) -> float | None:
    value = float(x.mean()) if isinstance(x, pd.Series) else float(x)
    return value if np.isfinite(value) else None
