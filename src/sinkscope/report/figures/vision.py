"""Figures of a vision run (matplotlib, Agg backend), written as PNG files into the run folder.

- ``patches_<image>.png`` (0-based image index): the image as the model sees it under a patch-grid overlay of the key
  mass α at one layer (mean over heads), sink patches outlined, high-norm patches (Darcet et al.) crossed, and beside
  the grid the mass on [CLS], the distillation token and the registers against the mean and largest patch;
- ``vision_layers.png``: per layer, the mass on [CLS], on the registers and on the sink patches (means over images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sinkscope.report.palette import HEATMAP_CMAP, MARKERS, OKABE_ITO, figure_title, styled

MAX_FIGURES = 16  # images drawn per run (the first ones)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


@styled
def patch_figure(mean_patches: pd.DataFrame, norms: pd.DataFrame | None, image: np.ndarray | None, prompt_id: int,
                 layer: int, path: Path, name: str = "") -> None:
    """One image at one layer: mean_patches rows (prompt_id, layer, token, kind, row, col, key_mass, sink), norms
    rows (prompt_id, layer, kind, row, col, outlier) or None, image [H, W, 3] uint8 or None (the grid alone)."""
    plt = _plt()
    from matplotlib.patches import Rectangle

    one = mean_patches[(mean_patches["prompt_id"] == prompt_id) & (mean_patches["layer"] == layer)]
    patches = one[one["kind"] == "patch"]
    rows, cols = int(patches["row"].max()) + 1, int(patches["col"].max()) + 1
    grid = np.zeros((rows, cols))
    grid[patches["row"].to_numpy(), patches["col"].to_numpy()] = patches["key_mass"].to_numpy()
    height, width = (image.shape[0], image.shape[1]) if image is not None else (rows, cols)
    ch, cw = height / rows, width / cols
    prefix = one[one["kind"] != "patch"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.5, 4.6), gridspec_kw={"width_ratios": [1.25, 1]})
    if image is not None:
        ax.imshow(image, extent=(0, width, height, 0))
    im = ax.imshow(grid, extent=(0, width, height, 0), cmap=HEATMAP_CMAP, alpha=0.6 if image is not None else 1.0,
                   interpolation="nearest", vmin=0)
    for r in patches[patches["sink"]].itertuples():
        ax.add_patch(Rectangle((r.col * cw, r.row * ch), cw, ch, fill=False, edgecolor=OKABE_ITO[1], linewidth=2))
    if norms is not None:
        high = norms[(norms["prompt_id"] == prompt_id) & (norms["layer"] == layer) & (norms["kind"] == "patch")
                     & norms["outlier"]]
        ax.scatter((high["col"] + 0.5) * cw, (high["row"] + 0.5) * ch, marker="x", color="white", s=40,
                   linewidths=2, label="high-norm patch")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([(c + 0.5) * cw for c in range(cols)], [str(c) if cols <= 16 or c % 4 == 0 else ""
                                                          for c in range(cols)])
    ax.set_yticks([(r + 0.5) * ch for r in range(rows)], [str(r) if rows <= 16 or r % 4 == 0 else ""
                                                          for r in range(rows)])
    ax.set_xlabel("patch column")
    ax.set_ylabel("patch row")
    ax.set_title(f"patch key mass α, layer {layer} (mean over heads)\noutlined: sink patches; ×: high-norm patches")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="α")
    labels = [str(t) for t in prefix["token"]] + ["mean patch", "largest patch"]
    values = [*prefix["key_mass"], float(patches["key_mass"].mean()), float(patches["key_mass"].max())]
    colours = [OKABE_ITO[0] if k == "cls" else OKABE_ITO[2] if k == "register" else OKABE_ITO[3]
               for k in prefix["kind"]] + [OKABE_ITO[5], OKABE_ITO[1]]
    y = np.arange(len(labels))
    bx.barh(y, values, color=colours)
    bx.set_yticks(y, labels, fontsize=8)
    bx.invert_yaxis()
    bx.set_xlabel("key mass α (mean over heads)")
    bx.set_title("[CLS], distillation and register tokens")
    fig.suptitle(figure_title(name or f"image {prompt_id}", f"layer {layer}"))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@styled
def layers_figure(layers: pd.DataFrame, path: Path, model: str = "") -> None:
    """Per layer, the mass on [CLS], on the registers and distillation token, and on the sink patches (mean over
    images, head-mean α)."""
    plt = _plt()
    mean = layers.groupby("layer", sort=True)[["cls_mass", "register_mass", "sink_patch_mass"]].mean()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    labels = {"cls_mass": "[CLS]", "register_mass": "registers / [DIST]", "sink_patch_mass": "sink patches"}
    for i, (column, label) in enumerate(labels.items()):
        ax.plot(mean.index, mean[column], marker=MARKERS[i], color=OKABE_ITO[i], label=label,
                linestyle=["-", "--", ":"][i])
    ax.set_xlabel("layer")
    ax.set_ylabel("key mass α (mean over heads and images)")
    ax.set_xticks(mean.index)
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(figure_title(model, "where attention goes, per layer"))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_figures(tables: dict[str, pd.DataFrame], folder: Path, pixels: Any = None, layer: int = -1,
                  model: str = "", limit: int = MAX_FIGURES) -> list[str]:
    """Write `vision_layers.png` and one `patches_<i>.png` per image (the first `limit`) at `layer` (negative counts
    from the end); pixels [P, H, W, 3] uint8 or None. Returns the file names written."""
    mean = tables["mean_patches"]
    n_layers = int(mean["layer"].max()) + 1
    layer = layer % n_layers
    layers_figure(tables["layers"], folder / "vision_layers.png", model)
    written = ["vision_layers.png"]
    names = dict(zip(tables["images"]["prompt_id"], tables["images"]["image"], strict=True))
    for pid in sorted(names)[:limit]:
        image = None if pixels is None else np.asarray(pixels[pid])
        name = f"patches_{pid}.png"
        patch_figure(mean, tables.get("norms"), image, int(pid), layer, folder / name, str(names[pid]))
        written.append(name)
    return written
