"""`explain`: one prompt's last-token attention before and after detect-mask-renormalise (seed 000 Figs. 1-2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from sinkscope.analyses.mitigate import aggregate_rows, detect_mask_renormalise
from sinkscope.capture import CaptureConfig, Trace, run_capture
from sinkscope.detect import get_detector
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel


@dataclass
class Explanation:
    """Raw attention a, sink-free attention b and the sink set for one prompt's tokens."""

    tokens: list[str]
    before: torch.Tensor  # [N]
    after: torch.Tensor  # [N]
    sinks: torch.Tensor  # [N] bool
    method: str
    params: dict[str, Any]
    layers: list[int]
    heads: list[int]
    trace: Trace

    def table(self) -> pd.DataFrame:
        """One row per token: position, token, attention before and after, sink flag, rank before and after."""
        frame = pd.DataFrame({
            "prompt_id": 0,
            "position": range(len(self.tokens)),
            "token": self.tokens,
            "before": self.before.numpy(),
            "after": self.after.numpy(),
            "sink": self.sinks.numpy(),
        })
        frame["rank_before"] = frame["before"].rank(ascending=False, method="first").astype("int64")
        frame["rank_after"] = frame["after"].rank(ascending=False, method="first").astype("int64")
        return frame

    def top_k(self, k: int = 10, after: bool = False) -> list[tuple[int, str, float]]:
        """The k most attended tokens as (position, token, weight), before or after removing sinks."""
        weights = self.after if after else self.before
        order = torch.argsort(weights, descending=True, stable=True)[:k]
        return [(int(i), self.tokens[int(i)], float(weights[int(i)])) for i in order]


def explain(
    loaded: LoadedModel,
    text: str,
    method: str = "zscore",
    params: Mapping[str, Any] | None = None,
    *,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
) -> Explanation:
    """Last-token attention aggregated over `layers` × `heads` (default: last layer, mean over heads, as in seed 000
    §4.1), then Algorithm 1 with detector `method`. Column detectors read the same aggregation of the column mass."""
    if not isinstance(text, str) or not text.strip():
        raise SinkscopeError("the text is empty: pass --text with the prompt to explain")
    params = dict(params or {})
    detector = get_detector(method)
    trace = run_capture(loaded, [text], CaptureConfig(rows="last", entropy=False))
    n = int(trace.lengths[0])
    rows = trace.last_rows()[0, :, :, :n]  # [L, H, n]
    a = aggregate_rows(rows, layers, heads)  # [n]
    detect_on = aggregate_rows(trace.key_mass[0, :, :, :n], layers, heads) if detector.statistic == "column" else None
    result = detect_mask_renormalise(a, method, detect_on=detect_on, **params)
    L, H = rows.shape[0], rows.shape[1]
    layer_idx = _resolve(layers, L, [L - 1])
    head_idx = _resolve(heads, H, list(range(H)))
    return Explanation(
        tokens=trace.tokens[0], before=a, after=result.b, sinks=result.sinks, method=method,
        params=dict(result.params), layers=layer_idx, heads=head_idx, trace=trace,
    )


def _resolve(selection: int | Sequence[int] | None, size: int, default: list[int]) -> list[int]:
    if selection is None:
        return default
    chosen = [selection] if isinstance(selection, int) else list(selection)
    return [i % size for i in chosen]
