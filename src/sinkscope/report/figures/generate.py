"""The figure of a generate run (`sinkscope.analyses.generate`): sink mass over the generated positions, per layer.

One panel per layer (0-based), x = the generated token's position, y = its attention to a key, mean over heads; one
line for position 0 and one per secondary sink of the `sink_curves` table (the strongest ones), drawn only after the
key exists. Okabe-Ito colours with distinct dash patterns, so the lines stay apart in greyscale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sinkscope.errors import SinkscopeError
from sinkscope.report.figures.profile import _plt, figure_style, line_style

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def key_label(position: int, token: str) -> str:
    """A key as the legend names it: its token (quoted, whitespace shown) and position."""
    return f"{token!r}@{position}"


def sink_mass_figure(curves: pd.DataFrame, prompt_id: int = 0, layers: Sequence[int] | None = None,
                     columns: int = 6, title: str | None = None) -> Figure:
    """Small multiples of the attention the generated tokens pay to position 0 and the secondary sinks.

    curves: a `sink_curves` table (prompt_id, position, layer, key_position, key_token, attention); layers: the
    panels (default every layer); columns: panels per row.
    """
    one = curves[curves["prompt_id"] == prompt_id]
    if one.empty:
        raise SinkscopeError(f"the sink_curves table has no rows for prompt {prompt_id}")
    shown = sorted(one["layer"].unique()) if layers is None else list(layers)
    keys = one.drop_duplicates("key_position").sort_values("key_position")
    keys = keys.set_index("key_position")["key_token"]
    order = [0, *[k for k in keys.index if k != 0]] if 0 in keys.index else list(keys.index)
    columns = max(1, min(columns, len(shown)))
    rows = int(np.ceil(len(shown) / columns))
    plt = _plt()
    with figure_style():
        fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns + 0.6, 1.7 * rows + 1.0), sharex=True,
                                 sharey=True, squeeze=False, layout="constrained")
        grouped = dict(tuple(one.groupby(["layer", "key_position"])))
        for i, layer in enumerate(shown):
            ax = axes[i // columns][i % columns]
            for j, key in enumerate(order):
                part = grouped.get((layer, key))
                if part is None or part.empty:
                    continue
                style = line_style(j) | {"marker": None}
                ax.plot(part["position"], part["attention"], lw=1.0, label=key_label(key, keys[key]), **style)
            ax.set_title(f"layer {layer}", pad=2)
            ax.set_ylim(0, 1)
            ax.grid(True, axis="y")
        for i in range(len(shown), rows * columns):
            axes[i // columns][i % columns].set_visible(False)
        for ax in axes[-1]:
            ax.set_xlabel("generated position")
        for row in axes:
            row[0].set_ylabel("attention")
        seen: dict[str, object] = {}  # label → handle, over every panel (a key may have no line in the first)
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                seen.setdefault(label, handle)
        fig.legend(list(seen.values()), list(seen.keys()), loc="outside upper center",
                   ncols=min(5, len(seen)), title="key (mean over heads)")
        if title:
            fig.suptitle(title)
    return fig
