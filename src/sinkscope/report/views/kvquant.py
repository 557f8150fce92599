"""The report section of a `sinkscope kv-quant` run: perplexity against the KV cache's bit width per keep policy (all
tokens quantised, the detected sinks kept, the first k kept), one chart per cache, the kept positions and the table."""

from __future__ import annotations

from typing import Any

import pandas as pd

from sinkscope.report.sections import SectionContent, register_section
from sinkscope.report.views import figures_html, floats, grid, help_text, script, tables_of
from sinkscope.store import Run

COLUMNS = ["cache", "bits", "keep", "perplexity"]
KEEP_LABELS = {"none": "all tokens quantised", "sinks": "detected sinks kept", "first": "first k kept"}
CACHE_LABELS = {"full": "full cache", "sink_window": "sinks + window (StreamingLLM)"}


@register_section("kvquant", title="KV-cache quantisation", order=25)
def kvquant_section(run: Run) -> SectionContent | None:
    tables = tables_of(run)
    if not tables.has("kvquant", COLUMNS):
        return None
    frame = tables.read("kvquant")
    charts = []
    for cache in dict.fromkeys(frame["cache"]):
        part = frame[frame["cache"] == cache]
        base = part[part["bits"] == part["bits"].max()]
        series = []
        for keep, label in KEEP_LABELS.items():
            rows = part[part["keep"] == keep]
            if keep != "none" and rows.empty:
                continue
            rows = (rows if keep == "none" else pd.concat([rows, base])).sort_values("bits").drop_duplicates("bits")
            series.append({"name": label, "x": [int(b) for b in rows["bits"]], "y": floats(rows["perplexity"])})
        charts.append({"title": CACHE_LABELS.get(cache, cache), "series": series})
    kept = tables.read("kept") if tables.has("kept", ["keep", "position"]) else None
    params = tables.manifest.get("parameters", {}) or {}
    data: dict[str, Any] = {"charts": charts, "table": grid(frame),
                            "kept": None if kept is None else grid(kept)}
    body = (help_text("Perplexity of the same text with the KV cache fake-quantised as KIVI does (keys per channel "
                      f"over groups of {params.get('group', 32)} tokens, values per token, asymmetric min-max), "
                      "keeping in full precision no token, the sink tokens the default detector finds on the text's "
                      "prefix (KVSink, PrefixQuant), or the first k tokens. The rightmost point (16 bits) is the "
                      "unquantised cache. A token's quantised key and value are read only by later tokens, as in a "
                      f"real quantised cache (fed {params.get('chunk', 32)} tokens at a time).")
            + '<div class="ss-view-row ss-kvq-charts"></div><h3>Perplexity per condition</h3>'
              '<div class="ss-kvq-table"></div>'
            + ('<h3>Positions kept in full precision</h3><div class="ss-kvq-kept"></div>' if kept is not None else "")
            + figures_html(tables, [("kvquant.png", "perplexity against bits per keep policy and cache")]))
    return SectionContent(html=body, data=data, script=script("kvquant"))
