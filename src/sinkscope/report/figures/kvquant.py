"""Figure of a `sinkscope kv-quant` run, in the style of `report.palette`.

``kvquant.png``: perplexity against the KV cache's bit width, one curve per keep policy (all tokens quantised, the
detected sinks kept, the first k kept), one panel per cache (full, StreamingLLM's sinks + window); the unquantised
baseline is the leftmost point of every curve and a dotted line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from sinkscope.report.palette import MARKERS, OKABE_ITO, figure_title, styled

KEEP_LABELS = {"none": "all tokens quantised", "sinks": "detected sinks kept", "first": "first k kept"}
CACHE_LABELS = {"full": "full cache", "sink_window": "sinks + window (StreamingLLM)"}
_DASH = {"none": "-", "sinks": "--", "first": ":"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


@styled
def plot_kvquant(table: pd.DataFrame, path: str | Path, model: str = "") -> Path:
    """table: the kvquant table (cache, bits, keep, perplexity). Writes a PNG and returns its path."""
    plt = _pyplot()
    caches = list(dict.fromkeys(table["cache"]))
    widths = sorted(set(table["bits"]), reverse=True)
    x = {b: i for i, b in enumerate(widths)}
    fig, axes = plt.subplots(1, len(caches), figsize=(4.6 * len(caches), 3.8), squeeze=False, sharey=True)
    for ax, cache in zip(axes[0], caches, strict=True):
        part = table[table["cache"] == cache]
        base = part[part["keep"] == "none"].sort_values("bits", ascending=False)
        baseline = float(base["perplexity"].iloc[0]) if len(base) else float("nan")
        ax.axhline(baseline, color="#888888", lw=0.8, ls=":", label="unquantised")
        for i, keep in enumerate(k for k in KEEP_LABELS if k in set(part["keep"])):
            rows = part[(part["keep"] == keep) | (part["bits"] == part["bits"].max())]
            rows = rows.sort_values("bits", ascending=False).drop_duplicates("bits")
            ax.plot([x[b] for b in rows["bits"]], rows["perplexity"], color=OKABE_ITO[i], marker=MARKERS[i],
                    ls=_DASH.get(keep, "-"), label=KEEP_LABELS[keep])
        ax.set_xticks(range(len(widths)), [f"{b}" + (" (none)" if b >= 16 else "") for b in widths])
        ax.set_xlabel("bits per key and value")
        ax.set_title(CACHE_LABELS.get(cache, cache))
        ax.grid(True, color="#e6e6e6", lw=0.6)
    axes[0][0].set_ylabel("perplexity")
    axes[0][-1].legend()
    if model:
        fig.suptitle(figure_title(model, "perplexity with a fake-quantised KV cache"))
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
