"""The report section of a `sinkscope mechanisms` run: the hidden-state norm heat map (click a site × position for
that token's norm over depth and the token view at that site), the position-0 curve, BOS removal, head ablation,
massive activations, and the figures the command drew."""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd

from sinkscope.report.sections import SectionContent, register_section
from sinkscope.report.source import RunTables
from sinkscope.report.views import figures_html, floats, grid, help_text, script, tables_of
from sinkscope.store import Run

MAX_PROMPTS = 8  # prompts with a norm heat map
MAX_POSITIONS = 1024  # positions per heat map (the first ones)
MAX_MASSIVE = 20  # bars of the largest activations
FIGURES = [("norm_heatmap.png", "log₁₀ ‖h‖ per site × position, first prompt"),
           ("pos0_norm.png", "‖h₀‖ against the median ‖h_j‖ per depth"),
           ("bos_removal.png", "sink share and position-0 norm ratio with BOS, without, and replaced"),
           ("similarity.png", "cross-input cosine per depth × position"),
           ("ablation.png", "head ablation: change in α₀ and in the position-0 norm ratio")]


def site_label(layer: int, sublayer: str) -> str:
    return "embed" if int(layer) < 0 else f"L{int(layer)} {sublayer}"


def norm_maps(tables: RunTables) -> dict[str, Any] | None:
    """Per prompt (the first MAX_PROMPTS), log₁₀ ‖h‖ as a [site × position] matrix, its sites and tokens."""
    if not tables.has("norms", ["prompt_id", "depth", "position", "norm"]):
        return None
    if tables.has("prompts", ["prompt_id"]):
        ids = [int(p) for p in tables.read("prompts", ["prompt_id"])["prompt_id"].head(MAX_PROMPTS)]
    else:
        ids = sorted({int(p) for b in tables.batches("norms", ["prompt_id"]) for p in b["prompt_id"].unique()})
        ids = ids[:MAX_PROMPTS]
    columns = [c for c in ("prompt_id", "layer", "sublayer", "depth", "position", "token", "norm")
               if c in tables.columns("norms")]
    norms = tables.read("norms", columns, prompt_ids=ids)
    norms = norms[norms["position"] < MAX_POSITIONS]
    prompts = []
    for pid, group in norms.groupby("prompt_id", sort=True):
        sites = group.drop_duplicates("depth").sort_values("depth")
        depth_index = {d: i for i, d in enumerate(sites["depth"])}
        n = int(group["position"].max()) + 1
        matrix = np.full((len(sites), n), np.nan)
        matrix[group["depth"].map(depth_index).to_numpy(), group["position"].to_numpy()] = np.log10(
            np.maximum(group["norm"].to_numpy(dtype=np.float64), 1e-12))
        first = group[group["depth"] == sites["depth"].iloc[0]].sort_values("position")
        labels = [site_label(r.layer, r.sublayer) if "sublayer" in sites else f"{r.depth:g}"
                  for r in sites.itertuples()]
        prompts.append({"prompt_id": int(pid), "sites": labels, "depth": floats(sites["depth"]), "n": n,
                        "tokens": [str(t) for t in first["token"]] if "token" in first else [str(i) for i in range(n)],
                        "values": floats(matrix.ravel(), 4)})
    return {"prompts": prompts} if prompts else None


def _lines(frame: pd.DataFrame, x: str, columns: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": label, "x": floats(frame[x]), "y": floats(frame[c])} for c, label in columns.items() if c in frame]


@register_section("mechanisms", title="Mechanisms", order=40)
def mechanisms_section(run: Run) -> SectionContent | None:
    tables = tables_of(run)
    if not tables.has("norm_profile", ["depth"]) and not tables.has("norms", ["depth"]):
        return None
    data: dict[str, Any] = {"norms": norm_maps(tables)}
    body = ""
    summary = tables.manifest.get("summary") or {}
    if data["norms"] is not None:
        body += ("<h3>Hidden-state norms</h3>"
                 + help_text("log₁₀ ‖h‖ of every token (columns) at every site (rows: the embeddings, then after each "
                             "layer's attention and each block; seed 001 Figs. 2-3). A position-0 sink shows as one "
                             "bright column. Click a cell for that token's norm over depth and the token view at that "
                             "site.")
                 + '<div class="ss-controls"><label>prompt <select class="ss-mech-prompt"></select></label></div>'
                 + '<div class="ss-mech-map"></div><div class="ss-panel ss-mech-cell" hidden></div>')
    if tables.has("norm_profile", ["depth", "pos0_norm"]):
        profile = tables.read("norm_profile").sort_values("depth")
        data["profile"] = {
            "norm": _lines(profile, "depth", {"pos0_norm": "‖h₀‖ (position 0)", "median_norm": "median ‖h_j‖, j ≥ 1"}),
            "ratio": _lines(profile, "depth", {"pos0_ratio": "‖h₀‖ / median",
                                               "max_other_ratio": "largest other ratio"}),
        }
        formation = summary.get("formation") or {}
        said = ""
        if formation:
            layer = formation.get("sink_layer")
            said = (f" The position-0 sink forms at layer {layer}" if layer is not None else
                    " No layer has a position-0 sink in most heads")
            said += (f"; the norm departs at depth {formation['norm_depth']:g}." if formation.get("norm_depth")
                     is not None else f"; no site reaches ‖h₀‖ / median ≥ {formation.get('ratio_threshold', 4):g}.")
        body += ("<h3>Position 0 over depth</h3>" + help_text(
            "The first token's hidden-state norm against the median of the others at every site, and their ratio."
            + html.escape(said)) + '<div class="ss-view-row"><div class="ss-chart ss-mech-p0"></div>'
            '<div class="ss-chart ss-mech-ratio"></div></div>')
    if tables.has("bos_layers", ["variant", "layer"]):
        bos = tables.read("bos_layers")
        variants = [(str(v), g.sort_values("layer")) for v, g in bos.groupby("variant", sort=False)]
        data["bos"] = {key: [{"name": v, "x": floats(g["layer"]), "y": floats(g[key])} for v, g in variants]
                       for key in ("alpha0", "sink_share") if key in bos}
        verdict = ((summary.get("bos") or {}).get("verdict")) or ""
        body += ("<h3>BOS removal</h3>" + help_text(
            "The same prompts with BOS, without it, and with BOS replaced by an ordinary token: attention to position "
            "0 and the share of sink heads per layer." + (" Verdict: " + html.escape(verdict) if verdict else ""))
            + '<div class="ss-view-row"><div class="ss-chart ss-mech-bos-a"></div>'
              '<div class="ss-chart ss-mech-bos-s"></div></div>')
        if tables.has("bos_summary"):
            data["bos_summary"] = grid(tables.read("bos_summary"))
            body += '<div class="ss-mech-bos-table"></div>'
    if tables.has("ablation", ["ablation"]):
        ablation = tables.read("ablation")
        bars = {c: label for c, label in (("d_later_alpha0", "Δ α₀ in later layers"),
                                           ("d_later_share", "Δ sink share in later layers"),
                                           ("pos0_norm_change", "relative change of ‖h₀‖")) if c in ablation}
        data["ablation"] = {"categories": [str(a) for a in ablation["ablation"]],
                            "series": [{"name": label, "values": floats(ablation[c])} for c, label in bars.items()],
                            "table": grid(ablation)}
        body += ("<h3>Head ablation</h3>" + help_text(
            "Each ablated head (its output zeroed) against the baseline: how much the position-0 sink of later layers "
            "and the position-0 norm change. Click a column header to sort.")
            + '<div class="ss-chart ss-mech-abl"></div><div class="ss-mech-abl-table"></div>')
    if tables.has("massive", ["ratio"]):
        massive = tables.read("massive").sort_values("ratio", ascending=False, kind="stable")
        top = massive.head(MAX_MASSIVE)
        labels = [f"{site_label(r.layer, r.sublayer)} {r.token!r}@{r.position} d{r.dim}" for r in top.itertuples()]
        n_massive = int(massive["massive"].sum()) if "massive" in massive else 0
        data["massive"] = {"categories": labels, "ratio": floats(top["ratio"]),
                           "dims": grid(tables.read("massive_dims")) if tables.has("massive_dims") else None}
        params = tables.manifest.get("parameters", {}) or {}
        body += ("<h3>Massive activations</h3>" + help_text(
            f"The largest activations |h| / median |h| (Sun et al. 2024); {n_massive} pass the rule "
            f"(ratio ≥ {params.get('massive_ratio', 1000):g} and |h| ≥ {params.get('massive_min_value', 100):g}).")
            + '<div class="ss-chart ss-mech-massive"></div><div class="ss-mech-dims"></div>')
    body += figures_html(tables, FIGURES)
    return SectionContent(html=body, data=data, script=script("mechanisms"))
