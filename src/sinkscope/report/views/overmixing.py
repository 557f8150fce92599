"""The report section of a `sinkscope overmixing` run: per layer the perturbation's spread, the representation
entropy, the BOS sink rate and ‖h₀‖ / median, the sink intact and masked side by side."""

from __future__ import annotations

from typing import Any

from sinkscope.report.sections import SectionContent, register_section
from sinkscope.report.views import figures_html, floats, grid, help_text, script, tables_of
from sinkscope.store import Run

CURVES = {"spread_mean": "spread ‖Δh_j‖ / ‖h_j‖", "entropy": "representation entropy (nats)",
          "sink_rate": "BOS sink rate", "bos_ratio": "‖h₀‖ / median ‖h_j‖"}


@register_section("overmixing", title="Over-mixing and representation entropy", order=46)
def overmixing_section(run: Run) -> SectionContent | None:
    tables = tables_of(run)
    if not tables.has("layers", ["condition", "layer", *CURVES]):
        return None
    layers = tables.read("layers").sort_values(["condition", "layer"])
    params = tables.manifest.get("parameters", {}) or {}
    charts = []
    for column, title in CURVES.items():
        series = []
        for condition, group in layers.groupby("condition", sort=False):
            part = group.dropna(subset=[column])
            series.append({"name": f"sink {condition}", "x": part["layer"].tolist(), "y": floats(part[column])})
        charts.append({"title": title, "series": series})
    data: dict[str, Any] = {"charts": charts, "table": grid(layers)}
    body = (help_text(f"Barbero et al. (2025): the input embedding of token {params.get('position', 1)} is moved by "
                      f"ε = {params.get('eps', '?')} times the RMS token-embedding norm along a seeded random "
                      "direction; the spread is the mean relative change ‖Δh_j‖/‖h_j‖ of the later tokens after "
                      "each block (layer −1: the embeddings), with the sink intact and with its key masked in every "
                      "head (MaskKeys). Beside it (Queipo-de-Llano et al. 2025): the entropy of each layer's "
                      "singular-value spectrum p_k = σ_k²/Σσ², the share of heads with α₀ > "
                      f"{params.get('sink_threshold', 0.3)}, and the first token's norm over the median.")
            + '<div class="ss-charts ss-om-charts"></div><div class="ss-om-table"></div>'
            + figures_html(tables, [("overmixing.png", "the four curves, the sink intact and masked")]))
    return SectionContent(html=body, data=data, script=script("overmixing"))
