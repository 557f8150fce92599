"""The report section of a `sinkscope generate` run: the generated text shaded by the attention later tokens give each
key (secondary sinks marked), the sink mass of position 0 and the secondary sinks over the generated positions per
layer, the per-layer summary, the secondary-sink table and the run's figure."""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd

from sinkscope.report.sections import SectionContent, register_section
from sinkscope.report.source import RunTables
from sinkscope.report.views import figures_html, floats, grid, help_text, script, tables_of
from sinkscope.store import Run

MAX_PROMPTS = 8  # prompts with a token view and curves
MAX_POINTS = 1024  # generated positions per curve; longer generations are drawn as bin means
FIGURES = [("sink_mass.png", "attention to position 0 and the secondary sinks over the generated positions, per "
                             "layer (mean over heads), first prompt")]


def binned_curve(position: np.ndarray, values: np.ndarray, max_points: int = MAX_POINTS
                 ) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` (position, mean value) pairs: equal bins of consecutive points (positions sorted)."""
    n = len(position)
    if n <= max_points:
        return position, values
    bins = np.arange(n) * max_points // n
    starts = np.searchsorted(bins, np.arange(max_points))
    return position[starts], pd.Series(values).groupby(bins).mean().to_numpy()


def prompt_view(tables: RunTables, pid: int) -> dict[str, Any]:
    """One prompt's token strip (m_lj per layer and key), its secondary sinks per layer, and its sink curves."""
    tokens = tables.read("tokens", ["prompt_id", "position", "token", "generated"], prompt_ids=[pid])
    mass = tables.read("key_mass", ["prompt_id", "layer", "position", "mass"], prompt_ids=[pid])
    grid_ = mass.pivot(index="layer", columns="position", values="mass").sort_index()
    sinks = tables.read("secondary_sinks", ["prompt_id", "layer", "position"], prompt_ids=[pid])
    curves = tables.read("sink_curves", ["prompt_id", "layer", "position", "key_position", "key_token",
                                         "attention"], prompt_ids=[pid])
    series: dict[str, list[dict[str, Any]]] = {}
    for (layer, key), part in curves.groupby(["layer", "key_position"], sort=True):
        part = part.sort_values("position")
        x, y = binned_curve(part["position"].to_numpy(), part["attention"].to_numpy(dtype=float))
        series.setdefault(str(layer), []).append({"name": f"{part['key_token'].iloc[0]!r}@{key}", "x": x.tolist(),
                                                  "y": floats(y)})
    return {
        "prompt_id": pid,
        "tokens": tokens["token"].tolist(),
        "first_generated": int(np.argmax(tokens["generated"].to_numpy())) if tokens["generated"].any() else None,
        "mass": [floats(grid_.loc[layer].to_numpy()) for layer in grid_.index],
        "sinks": {str(layer): sorted(part["position"].astype(int).tolist()) for layer, part in sinks.groupby("layer")},
        "curves": series,
        "binned": bool(len(curves) and curves.groupby(["layer", "key_position"]).size().max() > MAX_POINTS),
    }


@register_section("generate", title="Sinks during generation", order=25)
def generate_section(run: Run) -> SectionContent | None:
    tables = tables_of(run)
    if not tables.has("generation", ["prompt_id", "text"]) or not tables.has("key_mass", ["layer", "mass"]):
        return None
    generation = tables.read("generation")
    pids = [int(p) for p in generation["prompt_id"].head(MAX_PROMPTS)]
    params = tables.manifest.get("parameters", {}) or {}
    layers = tables.read("layers") if tables.has("layers", ["layer", "first_mass"]) else None
    data: dict[str, Any] = {
        "prompts": [prompt_view(tables, pid) for pid in pids],
        "layers": None if layers is None else {
            "x": sorted(layers["layer"].unique().tolist()),
            "series": [{"name": label, "y": floats(layers.groupby("layer")[col].mean().sort_index())}
                       for col, label in (("first_mass", "attention to position 0"),
                                          ("top_secondary_mass", "strongest secondary sink"))]},
        "table": grid(tables.read("secondary_sinks"), sort_by="mass") if tables.has("secondary_sinks") else None,
    }
    texts = "".join(f"<p><b>prompt {int(r.prompt_id)}</b> ({int(r.n_prompt_tokens)} prompt tokens, "
                    f"{int(r.n_generated)} generated, stopped: {html.escape(str(r.stopped))}): "
                    f"<span class=\"ss-gen-text\">{html.escape(str(r.text))}</span></p>"
                    for r in generation.head(MAX_PROMPTS).itertuples())
    rule = (f"m ≥ {params.get('secondary_threshold', 0.05):g} from at least {params.get('min_later', 16)} later "
            "generated tokens")
    body = (help_text("Each generated token's attention row was captured during decoding (KV cache, one token at a "
                      "time). A key's share m is the attention the later generated tokens give it, mean over them and "
                      f"over heads; a key after position 0 is a secondary sink of a layer when {rule}. The token view "
                      "shades every position by m in the chosen layer (by default the one with the strongest "
                      "secondary sink) and marks that layer's secondary sinks; the curves follow the attention each "
                      "generated token pays to position 0 and to the strongest secondary sinks.")
            + texts
            + '<div class="ss-controls"><label>prompt <select class="ss-gen-prompt"></select></label> '
              '<label>layer <select class="ss-gen-layer"></select></label></div>'
            + '<div class="ss-strip-label ss-gen-label"></div><div class="ss-gen-tokens"></div>'
            + '<div class="ss-chart ss-gen-curves"></div>'
            + '<div class="ss-view-row"><div class="ss-chart ss-gen-layers"></div><div class="ss-gen-table"></div>'
              '</div>'
            + figures_html(tables, FIGURES))
    return SectionContent(html=body, data=data, script=script("generate"))
