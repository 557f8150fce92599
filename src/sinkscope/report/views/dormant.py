"""The report section of a `sinkscope dormant` run: the sink share of every head on every domain as a heat map
(domains × heads), the heads that are dormant in one domain and active in another, and the per-domain counts."""

from __future__ import annotations

from typing import Any

from sinkscope.report.sections import SectionContent, register_section
from sinkscope.report.views import figures_html, floats, grid, help_text, script, tables_of
from sinkscope.store import Run

HEADS = ["domain", "layer", "head", "sink_share", "value_ratio", "out_rel", "state"]


@register_section("dormant", title="Active and dormant heads", order=45)
def dormant_section(run: Run) -> SectionContent | None:
    tables = tables_of(run)
    if not tables.has("head_domains", HEADS) or "domain_switch" not in tables.names():
        return None
    heads = tables.read("head_domains", HEADS).sort_values(["layer", "head"], kind="stable")
    switch = tables.read("domain_switch")
    domains = list(dict.fromkeys(tables.read("head_domains", ["domain"])["domain"]))
    keys = heads[["layer", "head"]].drop_duplicates()
    labels = [f"L{layer}.{head}" for layer, head in zip(keys["layer"], keys["head"], strict=True)]
    wide = heads.pivot_table(index="domain", columns=["layer", "head"], values="sink_share").reindex(domains)
    state = heads.pivot(index="domain", columns=["layer", "head"], values="state").reindex(domains)
    counts = (heads.groupby("domain", sort=False)["state"].value_counts().unstack(fill_value=0)
              .reindex(domains).reset_index())
    params = tables.manifest.get("parameters", {}) or {}
    data: dict[str, Any] = {
        "domains": domains, "heads": labels, "values": floats(wide.to_numpy().reshape(-1)),
        "states": [str(s) for s in state.to_numpy().reshape(-1)],
        "switch": grid(switch), "counts": grid(counts),
    }
    rule = (f"dormant: σ ≥ {params.get('dormant_share', 0.9)} and ‖o‖ / mean ‖v_j‖ ≤ "
            f"{params.get('output_ratio', 0.5)}; active: σ < {params.get('active_share', 0.5)}")
    body = (help_text("Guo et al. (2024): a head whose queries put nearly all their attention on the sink, whose "
                      "value vector is small (a value-state drain), adds almost nothing to the residual stream — it "
                      "is dormant — and the same head can be active on another domain. σ is the mean attention on "
                      f"the sink key (position {params.get('sink', 0)}) over the queries that see it; {rule}. Hover "
                      "a cell for the head's state.")
            + '<div class="ss-chart ss-dorm-map"></div>'
            + f"<h3>{len(switch)} head(s) dormant in one domain and active in another</h3>"
            + '<div class="ss-dorm-switch"></div><h3>Heads per domain</h3><div class="ss-dorm-counts"></div>'
            + figures_html(tables, [("head_domains.png", "sink share and state per head and domain")]))
    return SectionContent(html=body, data=data, script=script("dormant"))
