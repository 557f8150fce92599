"""Attention patterns of a trained averaging model, after seed 003 Fig. 7 (PNG via matplotlib, Agg, in
`report.palette`'s style)."""

from __future__ import annotations

from pathlib import Path

import torch

from sinkscope.report.palette import HEATMAP_CMAP, OKABE_ITO, styled
from sinkscope.toy.averaging import NUMBER, SEP, AveragingBatch, AveragingTransformer


def token_labels(batch: AveragingBatch, index: int) -> list[str]:
    """'0.42' for a number, '[SEP]' / '[SEP2]' for the special tokens of sequence `index`."""
    out = []
    for value, kind in zip(batch.values[index].tolist(), batch.kinds[index].tolist(), strict=True):
        out.append(f"{value:.2f}" if kind == NUMBER else ("[SEP]" if kind == SEP else "[SEP2]"))
    return out


@torch.no_grad()
@styled
def plot_attention(model: AveragingTransformer, batch: AveragingBatch, index: int, path: str | Path) -> Path:
    """One heatmap per (layer, head) of sequence `index`, plus the last token's layer-2 attention per head
    against the uniform average over the target span. Writes a PNG and returns its path."""
    import matplotlib.pyplot as plt

    values, kinds = batch.values[index : index + 1], batch.kinds[index : index + 1]
    _, attns = model(values, kinds, return_attn=True)  # per layer [1, head, seq, seq]
    labels = token_labels(batch, index)
    after, between = batch.spans()
    n_layers, n_heads = len(attns), attns[0].shape[1]
    # one row per head: the layers' attention maps, then the last token's final-layer attention
    fig, axes = plt.subplots(n_heads, n_layers + 1, figsize=(4.2 * (n_layers + 1), 4.0 * n_heads), squeeze=False)
    ticks = range(len(labels))
    for layer, attn in enumerate(attns):
        for head in range(n_heads):
            ax = axes[head, layer]
            ax.imshow(attn[0, head].numpy(), cmap=HEATMAP_CMAP, vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer}, head {head}")  # numbered from 0, as everywhere in sinkscope
            ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
            ax.set_yticks(ticks, labels, fontsize=7)
            ax.set_xlabel("key")
            ax.set_ylabel("query")
    spans = [("after [SEP]", after[index])]
    if model.config.sep2:
        spans.append(("between", between[index]))
    for head in range(n_heads):
        ax = axes[head, n_layers]
        ax.bar(ticks, attns[-1][0, head, -1].numpy(), color=OKABE_ITO[0])
        for (name, span), style in zip(spans, ("--", ":"), strict=False):
            m = int(span.sum())
            xs = [i for i in ticks if span[i]]
            ax.plot(xs, [1.0 / m] * len(xs), style, color=OKABE_ITO[1], label=f"uniform over {name}")
        ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(f"last token, layer {n_layers - 1}, head {head}")
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
