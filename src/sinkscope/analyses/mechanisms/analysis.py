"""`analyze`: every mechanism measurement on one model and one set of prompts, as tidy tables and a summary.

One call runs (forward passes in brackets): the native encoding with attention capture, the residual sites and the
bias decomposition's head outputs and position-0 column (1), the two other BOS variants (2), and one run per ablated
head and per ablated layer (heads + 1 per layer).
Tables share the key columns prompt_id, layer, sublayer, position, token (where they apply):

- prompts, skipped; norms (prompt × site × position: norm, ratio to the median position); norm_profile (per site:
  pos0_norm, median_norm, pos0_ratio, max_other_ratio); layers (per layer: alpha0, sink_share, top_other_alpha);
  formation (one row: sink_layer, norm_layer/sublayer/depth, peak_ratio, norm_first, …);
- bos_layers (variant × layer), bos_summary (per variant); similarity (variant × site × position: cos_sim) and
  similarity_summary (variant × site: pos0_cos, other_cos);
- ablation_profile (ablation × layer), ablation (one row per ablated head or layer);
- massive (top-k entries per prompt × site), pos0_dims (top dims of ‖h₀‖² per site), massive_dims (per dim);
- bias_heads (layer × head), bias_queries (prompt × layer × head × query).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sinkscope.analyses.mechanisms.ablation import ablation_sweep, ablation_table
from sinkscope.analyses.mechanisms.bias import bias_heads, bias_queries
from sinkscope.analyses.mechanisms.bos import (
    VARIANTS,
    bos_layers,
    bos_summary,
    bos_variants,
    bos_verdict,
    resolve_bos,
)
from sinkscope.analyses.mechanisms.massive import massive_activations, massive_dims, pos0_dims
from sinkscope.analyses.mechanisms.norms import (
    cross_input_similarity,
    formation,
    norm_profile,
    norm_table,
    similarity_summary,
    sink_share_table,
)
from sinkscope.analyses.mechanisms.residual import MechTrace, capture_ids
from sinkscope.capture import CaptureConfig, validate_prompts
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel
from sinkscope.progress import Progress
from sinkscope.store import Run, Tables, make_manifest


@dataclass
class MechanismsResult:
    """Tables, the summary and the parameters of one `analyze` run (`traces` holds the captures per variant: the
    norms of their residual stream and its reductions, never the vectors)."""

    tables: MutableMapping[str, pd.DataFrame]  # `store.Tables`: norms and bias_queries are built when read or saved
    summary: dict[str, Any]
    params: dict[str, Any]
    traces: dict[str, MechTrace] = field(default_factory=dict, repr=False)
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def _repr_html_(self) -> str:
        """A notebook view: the summary or parameters and each table's first rows (`report.notebook`)."""
        from sinkscope.report.notebook import result_html

        return result_html(self)

    def run(self, loaded: LoadedModel, command: str = "mechanisms", figures: Sequence[str] = ()) -> Run:
        info = loaded.info
        model = {"name": info.name, "model_type": info.model_type, "revision": info.revision, "dtype": info.dtype,
                 "n_layers": info.n_layers, "n_heads": info.n_heads, "n_kv_heads": info.n_kv_heads,
                 "adds_bos": info.adds_bos}
        manifest = make_manifest(command, model, {**self.params, "figures": list(figures)})
        manifest["summary"] = self.summary
        return Run(tables=self.tables, manifest=manifest)

    def lines(self) -> list[str]:
        return summary_lines(self.summary)


def analyze(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    eps: float = 0.2,
    min_share: float = 0.5,
    norm_ratio: float = 4.0,
    ablate_layers: Sequence[int] = (0, 1),
    ablate_heads: Sequence[int] | None = None,
    massive_ratio: float = 1000.0,
    massive_min_value: float = 100.0,
    top_k: int = 5,
    bos: bool = True,
    bos_id: int | None = None,
    replace_with: str = "the",
    bias: bool = True,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> MechanismsResult:
    """Measure where the position-0 sink comes from (seeds 001 and 002) on `prompts`.

    eps: α threshold for a sink head (α₀ > ε); min_share: the share of heads that makes a layer's position 0 a
    sink; norm_ratio: ‖h₀‖ / median ‖h_j‖ that counts as a departed norm; ablate_layers/heads: the heads to zero
    (empty layers: no ablation); massive_ratio/min_value: Sun et al.'s massive-activation rule (|h| ≥ 100 and ≥ 1,000×
    the median |h|; pass massive_min_value=0, massive_ratio=100 for the looser ratio-only rule); bos: run the
    BOS-removal variants (bos_id overrides the tokenizer's BOS, replace_with is the replacement token's text).
    Prompts that are empty, too long, or have fewer than two real tokens are skipped (`result.skipped`).
    progress: called as progress("mechanism passes", done, total) after each forward pass over the prompts.
    """
    if not 0 < min_share <= 1:
        raise SinkscopeError("min_share must be in (0, 1]")
    if norm_ratio <= 1:
        raise SinkscopeError("norm_ratio must be above 1")
    good, bad = validate_prompts(loaded, prompts)
    tok, info = loaded.tokenizer, loaded.info
    native: list[list[int]] = []
    kept: list[int] = []
    for i in good:
        ids = list(tok(prompts[i])["input_ids"])
        if len(ids) - int(info.adds_bos) < 2:
            bad.append((i, "fewer than two real tokens; position 0 needs other positions to compare with"))
            continue
        native.append(ids)
        kept.append(i)
    bad.sort()
    if not kept:
        reasons = "; ".join(f"prompt {i + 1}: {why}" for i, why in bad[:3])
        raise SinkscopeError(f"no usable prompt ({reasons})" if bad else "no prompts given")
    texts = [prompts[i] for i in kept]
    params: dict[str, Any] = {"eps": eps, "min_share": min_share, "norm_ratio": norm_ratio,
                              "ablate_layers": list(ablate_layers), "ablate_heads": ablate_heads,
                              "massive_ratio": massive_ratio, "massive_min_value": massive_min_value, "top_k": top_k,
                              "bos": bos, "replace_with": replace_with, "bias": bias, "n_prompts": len(texts)}
    config = CaptureConfig(rows=None, entropy=False)
    n_ablations = len(ablate_layers) * (len(ablate_heads) if ablate_heads is not None else info.n_heads) \
        + (len(ablate_layers) if ablate_heads is None or len(ablate_heads) > 1 else 0)
    resolved = None
    summary: dict[str, Any] = {}
    if bos:
        try:
            resolved = resolve_bos(tok, info.adds_bos, bos_id, replace_with)
        except SinkscopeError as err:
            summary["bos_skipped"] = str(err)
    bar = _Passes(1 + (2 if resolved is not None else 0) + n_ablations, progress)
    # one pass over the native prompts gives the residual stream reduced as it is read (norms, the top entries and
    # median per site, position 0's vector, the cross-prompt unit sums) and, for the bias decomposition, each head's
    # output norms, the value norms, position 0's value and its attention column: nothing of size n × d is kept
    main_cfg = replace(config, head_output_norms=bias, value_norms=bias, column_values=bias,
                       columns=[0] if bias else None)
    main = capture_ids(loaded, native, main_cfg, sink_position=0 if bias else None, hidden="norms",
                       top=max(1, top_k), leading=_leading(native), batch_size=batch_size, prompts=texts)
    bar.step()
    traces: dict[str, MechTrace] = {"native": main}
    tables = Tables({
        "prompts": pd.DataFrame({"prompt_id": kept, "text": texts, "n_tokens": main.lengths.tolist()}),
        "skipped": pd.DataFrame({"prompt_id": [i for i, _ in bad], "reason": [w for _, w in bad]}
                                ).astype({"prompt_id": "int64", "reason": "object"}),
    })
    # every other forward pass runs next, while only the captures' small reductions are held (the ablations
    # first: they keep a few numbers per layer, the BOS variants their key mass); the tables, which grow with the
    # prompts, are built after the last pass, so a pass's working memory never meets them
    prof = None
    if ablate_layers:  # 5. head ablation: one pass per ablated head (and per layer with all of them)
        prof = ablation_sweep(loaded, native, ablate_layers, ablate_heads, eps=eps, baseline=main,
                              batch_size=batch_size, progress=bar.each_update)
    by_variant: dict[str, MechTrace] = {}
    sims: list[pd.DataFrame] = []
    if resolved is not None:  # 3. BOS removal: the two other encodings
        bos_tok, rep_tok = resolved
        variants = bos_variants(native, info.adds_bos, bos_tok, rep_tok)
        for v in VARIANTS:
            if v == variants.native:
                by_variant[v] = main
                continue
            ids = variants.get(v)
            mt = capture_ids(loaded, ids, config, hidden="norms", leading=_leading(ids), batch_size=batch_size,
                             prompts=texts)
            sims.append(cross_input_similarity(mt, v))
            by_variant[v] = mt
            bar.step()
        traces.update({v: mt for v, mt in by_variant.items() if v != variants.native})
    # 1-2. norms and where the sink forms
    tables["norms"] = partial(norm_table, main, kept)  # one row per prompt × site × position: built when read or saved
    profile = norm_profile(main)
    shares = sink_share_table(main, eps)
    tables["norm_profile"] = profile
    tables["layers"] = shares
    form = formation(profile, shares, min_share=min_share, ratio=norm_ratio, model=info.name)
    tables["formation"] = form
    summary = {"model": info.name, "n_layers": info.n_layers, "n_heads": info.n_heads,
               "n_prompts": len(texts), "adds_bos": info.adds_bos, "eps": eps,
               "min_share": min_share, "norm_ratio": norm_ratio, "massive_ratio": massive_ratio,
               "massive_min_value": massive_min_value,
               "formation": _plain(form.iloc[0].to_dict()), **summary}
    # 3. BOS removal: its tables
    if resolved is not None:
        tables["bos_layers"] = bos_layers(by_variant, eps)
        tables["bos_summary"] = bos_summary(by_variant, tables["bos_layers"], min_share=min_share, ratio=norm_ratio)
        summary["bos"] = {
            "bos_token": tok.convert_ids_to_tokens(bos_tok), "bos_id": bos_tok,
            "replacement": tok.convert_ids_to_tokens(rep_tok), "native": variants.native,
            "verdict": bos_verdict(tables["bos_summary"], tables["bos_layers"], min_share),
            "variants": _plain(tables["bos_summary"].set_index("variant").to_dict(orient="index")),
        }
    # 4. cross-input similarity on every captured encoding (the BOS variants' were taken right after capture)
    main_label = summary["bos"]["native"] if "bos" in summary else "native"
    sims.insert(0, cross_input_similarity(main, main_label))
    tables["similarity"] = pd.concat(sims, ignore_index=True)
    sim_sum = similarity_summary(tables["similarity"])
    tables["similarity_summary"] = sim_sum
    summary["similarity"] = _similarity_digest(sim_sum, form)
    # 5. head ablation: its tables
    if prof is not None:
        target = form["norm_depth"].iloc[0]
        target = 2.0 if pd.isna(target) else float(target)
        tables["ablation_profile"] = prof
        tables["ablation"] = ablation_table(prof, target)
        summary["ablation"] = _ablation_digest(tables["ablation"])
    # 6. massive activations
    entries = massive_activations(main, kept, top_k=top_k, ratio=massive_ratio, min_value=massive_min_value)
    spikes = profile.loc[profile["pos0_ratio"] >= norm_ratio, "depth"].tolist()
    tables["massive"] = entries
    tables["pos0_dims"] = pos0_dims(main)
    tables["massive_dims"] = massive_dims(entries, main, spikes)
    summary["massive"] = _massive_digest(entries, tables["massive_dims"], spikes)
    # 7. implicit attention bias
    if bias:
        heads = bias_heads(main, eps=eps)
        tables["bias_heads"] = heads
        tables["bias_queries"] = partial(bias_queries, main, kept)  # built when read or saved
        summary["bias"] = _bias_digest(heads)
    return MechanismsResult(tables=tables, summary=summary, params=params, traces=traces, skipped=bad)


class _Passes:
    """Counts the forward passes, reporting each to `progress` ("mechanism passes", done, total)."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self._progress = total, 0, progress

    def step(self) -> None:
        self.done += 1
        if self._progress is not None:
            self._progress("mechanism passes", self.done, self.total)

    def each_update(self, task: str, done: int, total: int | None, *, status: str | None = None) -> None:
        """A `Progress` for a part that reports one update per forward pass (`ablation_sweep`): each is one step."""
        self.step()


def _leading(ids: Sequence[Sequence[int]]) -> int:
    """The positions the cross-input similarity compares (those every prompt has); 0 (none) for one prompt."""
    return min(len(x) for x in ids) if len(ids) > 1 else 0


def _plain(value: Any) -> Any:
    """JSON-friendly copy: numpy scalars → Python, NaN/NA → None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _similarity_digest(sim: pd.DataFrame, form: pd.DataFrame) -> dict[str, Any]:
    """Per variant: the cross-input cosine at position 0 and at the other positions, averaged over the sites from
    the norm departure on (depth ≥ 1 when the norm never departs), and at the last site."""
    out: dict[str, Any] = {}
    depth = form["norm_depth"].iloc[0]
    start = 1.0 if pd.isna(depth) else float(depth)
    for variant, group in sim.groupby("variant", sort=False):
        group = group.sort_values("depth")
        after = group[group["depth"] >= start]
        last = group.iloc[-1]
        out[str(variant)] = _plain({
            "from_depth": start,
            "pos0": float(after["pos0_cos"].mean()), "other": float(after["other_cos"].mean()),
            "final_pos0": float(last["pos0_cos"]), "final_other": float(last["other_cos"]),
        })
    return out


def _ablation_digest(table: pd.DataFrame, top: int = 3) -> dict[str, Any]:
    if table.empty:
        return {}
    single = table[table["head"] >= 0]
    by_share = single.sort_values("d_later_share").head(top)
    by_norm = single.sort_values("pos0_norm_change").head(top)
    whole = table[table["head"] < 0]
    return _plain({
        "target_depths": sorted(set(table["target_depth"].tolist())),
        "largest_share_drop": [(r.ablation, r.d_later_share) for r in by_share.itertuples()],
        "largest_norm_drop": [(r.ablation, r.pos0_norm_change) for r in by_norm.itertuples()],
        "whole_layer": [(r.ablation, r.pos0_norm_change, r.d_later_share) for r in whole.itertuples()],
        "single_heads_weaken_norm": int((single["pos0_norm_change"] < -0.1).sum()),
        "single_heads_strengthen_norm": int((single["pos0_norm_change"] > 0.1).sum()),
        "n_single": len(single),
    })


def _massive_digest(entries: pd.DataFrame, dims: pd.DataFrame, spikes: Sequence[float]) -> dict[str, Any]:
    top = entries.sort_values("ratio", ascending=False).iloc[0]
    carriers = dims[dims["carries_pos0"]]
    others = dims[~dims["carries_pos0"] & (dims["n_massive"] > 0)].sort_values("n_massive", ascending=False)
    return _plain({
        "n_massive": int(entries["massive"].sum()),
        "n_entries": len(entries),
        "top": {"layer": int(top["layer"]), "sublayer": top["sublayer"], "position": int(top["position"]),
                "token": top["token"], "dim": int(top["dim"]), "value": float(top["value"]),
                "ratio": float(top["ratio"])},
        "pos0_dims": [(int(r.dim), float(r.pos0_energy), float(r.pos0_energy_max)) for r in carriers.itertuples()],
        "other_massive_dims": [int(d) for d in others["dim"]][:8],
        "spike_sites": len(spikes),
    })


def _bias_digest(heads: pd.DataFrame) -> dict[str, Any]:
    sink, other = heads[heads["is_sink"]], heads[~heads["is_sink"]]

    def stats(frame: pd.DataFrame) -> dict[str, Any]:
        if frame.empty:
            return {"n": 0}
        return {"n": len(frame), "share": float(frame["share_mean"].mean()),
                "constancy": float(frame["constancy"].mean()), "bias_r2": float(frame["bias_r2"].mean()),
                "v_sink_ratio": float(frame["v_sink_ratio"].mean())}

    return _plain({"sink_heads": stats(sink), "other_heads": stats(other)})


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The printed summary: where the sink forms, the massive dimensions, the BOS verdict, similarity, ablation,
    bias."""
    f = s["formation"]
    lines = [f"{s['model']}: {s['n_layers']} layers × {s['n_heads']} heads, {s['n_prompts']} prompt(s), "
             f"tokenizer adds BOS: {s['adds_bos']}"]
    if f["sink_layer"] is not None:
        sink = (f"position-0 sink forms at layer {f['sink_layer']} ({_fmt(f['sink_share_at'], '.0%')} of heads with "
                f"α₀ > {s['eps']}; ≥ {s['min_share']:.0%} of heads in {f['sink_layers']}/{f['n_layers']} layers)")
    else:
        sink = f"no layer has ≥ {s['min_share']:.0%} of heads with α₀ > {s['eps']} at position 0"
    lines.append(sink)
    if f["norm_depth"] is not None:
        lines.append(f"position-0 norm departs at depth {f['norm_depth']:g} (layer {f['norm_layer']} "
                     f"{f['norm_sublayer']}, ‖h₀‖/median = {_fmt(f['ratio_at'], '.1f')} ≥ {s['norm_ratio']}); peak "
                     f"{_fmt(f['peak_ratio'], '.1f')}× at depth {_fmt(f['peak_depth'], 'g')}; "
                     + ("the norm departs before the sink forms" if f["norm_first"] else
                        "the sink forms before the norm reaches the threshold"))
    else:
        lines.append(f"position-0 norm never reaches {s['norm_ratio']}× the median (peak "
                     f"{_fmt(f['peak_ratio'], '.1f')}× at depth {_fmt(f['peak_depth'], 'g')})")
    m = s.get("massive")
    if m:
        top = m["top"]
        dims = ", ".join(f"{d} (mean {e:.0%}, max {x:.0%} of ‖h₀‖²)" for d, e, x in m["pos0_dims"]) or "none"
        spike = (f"dims carrying the position-0 spike over its {m['spike_sites']} sites: {dims}" if m["spike_sites"]
                 else f"no site has a position-0 spike (‖h₀‖/median ≥ {s['norm_ratio']})")
        others = ", ".join(map(str, m["other_massive_dims"])) or "none"
        lines.append(f"massive activations: {m['n_massive']} of {m['n_entries']} top entries (per prompt × site) are ≥ "
                     f"{s['massive_ratio']:g}× the median |h|"
                     + (f" and |h| ≥ {s['massive_min_value']:g}" if s.get("massive_min_value") else "")
                     + f"; the largest, |h| = {abs(top['value']):.1f} "
                     f"({top['ratio']:.0f}× median), is at layer {top['layer']} {top['sublayer']}, position "
                     f"{top['position']} {top['token']!r}, dim {top['dim']}; {spike}; other massive dims: {others}")
    b = s.get("bos")
    if b:
        lines.append(f"BOS removal (BOS {b['bos_token']!r}, replacement {b['replacement']!r}): {b['verdict']}")
    elif s.get("bos_skipped"):
        lines.append(f"BOS removal skipped: {s['bos_skipped']}")
    for variant, sim in s.get("similarity", {}).items():
        lines.append(f"cross-input cosine ({variant}): position 0 {_fmt(sim['pos0'])} vs other positions "
                     f"{_fmt(sim['other'])} (mean over depths ≥ {sim['from_depth']:g}); last layer "
                     f"{_fmt(sim['final_pos0'])} vs {_fmt(sim['final_other'])}")
    a = s.get("ablation")
    if a:
        drops = ", ".join(f"{n} {_fmt(d, '+.2f')}" for n, d in a["largest_share_drop"])
        norms = ", ".join(f"{n} {_fmt(d, '+.0%')}" for n, d in a["largest_norm_drop"])
        whole = ", ".join(f"{n}: norm {_fmt(c, '+.0%')}, share {_fmt(d, '+.2f')}" for n, c, d in a["whole_layer"])
        lines.append(f"head ablation (position-0 norm read at depth {a['target_depths']}): largest drop in later sink "
                     f"share {drops}; in the position-0 norm {norms}; {a['single_heads_weaken_norm']}/{a['n_single']}"
                     f" single heads weaken it by >10%, {a['single_heads_strengthen_norm']} raise it by >10%"
                     + (f"; whole layers — {whole}" if whole else ""))
    bi = s.get("bias")
    if bi:
        sk, ot = bi["sink_heads"], bi["other_heads"]
        if sk["n"]:
            lines.append(f"implicit bias: {sk['n']}/{s['n_layers'] * s['n_heads']} heads are position-0 sinks "
                         f"(α₀ > {s['eps']}) — the sink's value is {_fmt(sk['share'], '.0%')} of "
                         f"the head output on average, constancy {_fmt(sk['constancy'])}, bias R² "
                         f"{_fmt(sk['bias_r2'])}, ‖v₀‖/median {_fmt(sk['v_sink_ratio'])}"
                         + (f" (other heads: share {_fmt(ot['share'], '.0%')}, constancy {_fmt(ot['constancy'])})"
                            if ot["n"] else ""))
        else:
            lines.append("implicit bias: no head has α₀ > ε")
    return lines


def write(result: MechanismsResult, loaded: LoadedModel, out: str | Path, figures: bool = True,
          overwrite: bool = False) -> Path:
    """Write the tables, figures and manifest (with the summary) to a run folder. The figures are drawn in a scratch
    folder and moved in with the tables, so a refused folder (another command's run) is left untouched."""
    import tempfile

    from sinkscope.store import save_run

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise SinkscopeError(f"--out {out} is a file; pass a folder")
    if not figures:
        return save_run(folder, result.run(loaded), overwrite=overwrite)
    import importlib.util

    from sinkscope.report.figures.mechanisms import write_figures

    if importlib.util.find_spec("matplotlib") is None:
        raise SinkscopeError("figures need matplotlib: pip install matplotlib, or pass --no-figures")
    with tempfile.TemporaryDirectory(prefix="sinkscope-figures-") as scratch:
        names = write_figures(result, Path(scratch))
        files = {name: Path(scratch) / name for name in names}
        return save_run(folder, result.run(loaded, figures=names), overwrite=overwrite, files=files)
