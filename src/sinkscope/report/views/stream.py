"""The report section of a `sinkscope stream` run: per-token loss of the three caches over position, with the
point where the sink + window cache starts evicting marked, and the perplexities."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sinkscope.report.sections import SectionContent, register_section
from sinkscope.report.views import floats, grid, help_text, script, tables_of
from sinkscope.store import Run

MAX_POINTS = 4096  # positions drawn; a longer text is drawn as means over equal bins
LABELS = {"full": "full cache", "sink_window": "sinks + window (StreamingLLM)", "window": "window only"}


def binned(position: np.ndarray, values: pd.DataFrame, max_points: int = MAX_POINTS) -> tuple[np.ndarray,
                                                                                                pd.DataFrame]:
    """Positions and values as at most `max_points` bin means (the first position of each bin stands for it)."""
    n = len(position)
    if n <= max_points:
        return position, values
    bins = np.arange(n) * max_points // n
    return position[np.searchsorted(bins, np.arange(max_points))], values.groupby(bins).mean()


@register_section("stream", title="Streaming caches", order=20)
def stream_section(run: Run) -> SectionContent | None:
    tables = tables_of(run)
    if not tables.has("tokens", ["position"]) or not tables.has("perplexity", ["policy", "ppl"]):
        return None
    columns = [c for c in tables.columns("tokens") if c.startswith("nll_")]
    if not columns:
        return None
    tokens = tables.read("tokens", ["position", *columns])
    ppl = tables.read("perplexity")
    params = tables.manifest.get("parameters", {}) or {}
    sink, window = params.get("sink"), params.get("window")
    if sink is None and "sink" in ppl:
        sink, window = int(ppl["sink"].iloc[0]), int(ppl["window"].iloc[0])
    budget = int(sink) + int(window) if sink is not None and window is not None else None
    position, values = binned(tokens["position"].to_numpy(), tokens[columns])
    policies = [c[4:] for c in columns]
    data: dict[str, Any] = {
        "x": position.tolist(), "binned": len(position) < len(tokens),
        "evict": None if budget is None else budget + 1,
        "series": [{"name": LABELS.get(p, p), "policy": p, "y": floats(values[f"nll_{p}"])} for p in policies],
        "ppl": {"categories": [LABELS.get(p, p) for p in ppl["policy"]],
                "series": [{"name": "perplexity, all tokens", "values": floats(ppl["ppl"])}]
                + ([{"name": "after eviction starts", "values": floats(ppl["ppl_after"])}] if "ppl_after" in ppl
                   else [])},
        "table": grid(ppl),
    }
    where = (f"The dashed line marks position {budget + 1}, the first token predicted from an evicted cache ({sink} "
             f"sink tokens + a window of {window} = {budget} kept); the perplexity after eviction starts there."
             ) if budget is not None else ""
    body = (help_text("Per-token loss (negative log-likelihood of each next token, nats) of the same text under three "
                      f"KV caches: the full cache, StreamingLLM's sink tokens + recent window, and the window alone. "
                      f"{where} Smooth the curves with a running mean to compare them.")
            + '<div class="ss-controls"><label>running mean over <select class="ss-stream-smooth">'
              '<option value="1">1 token</option><option value="8">8 tokens</option>'
              '<option value="32" selected>32 tokens</option><option value="128">128 tokens</option></select></label>'
              '</div><div class="ss-chart ss-stream-loss"></div>'
            + '<div class="ss-view-row"><div class="ss-chart ss-stream-ppl"></div><div class="ss-stream-table"></div>'
              '</div>')
    return SectionContent(html=body, data=data, script=script("stream"))
