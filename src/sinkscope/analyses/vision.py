"""Attention sinks in vision transformers: per image, layer and head, the key mass of every patch, [CLS], distillation
and register token, the sink patches a detector finds in it, and hidden-state norms per patch with the high-norm
outliers of Darcet et al.

In a bidirectional encoder every query sees every key, so the key mass α_k = (1/n) Σ_i A_ik is a distribution over
the n tokens (Σ_k α_k = 1), and both row and column detectors of `sinkscope.detect` read it: a sink patch is a patch
the detector flags in α (survey seed 002 §ViT: without causal masking, sinks sit on background, low-semantic patches
and on [CLS]). Darcet et al. 2024 ("Vision Transformers Need Registers", Fig. 3) find the same artefacts as patches
whose output norm stands far above the rest; register tokens give the model somewhere else to put them. A patch is a
high-norm outlier when ‖h_j‖ / median_patches ‖h‖ > `norm_ratio` at that layer (default 3, sinkscope's choice: the
bimodal norms of their Fig. 3 split at about three times the bulk).

Tables (key columns prompt_id, layer, head, position, token; `kind` is cls, distillation, register or patch; `row`,
`col` the patch's grid cell, −1 for the others):

- images: prompt_id, image, rows, cols, n_prefix, height, width;
- patches: one row per image × layer × head × token: key_mass α_k, sink (the detector on that head's α);
- mean_patches: per image × layer × token, α averaged over the heads and the detector's sinks in that mean;
- kinds: per image × layer × kind: mass Σ α over the tokens of that kind (mean over heads), tokens;
- norms: per image × layer (−1 = the embeddings, l = after block l) × token: norm, ratio to the median patch norm,
  outlier;
- layers: per image × layer: cls_mass, register_mass, patch_mass, sink_patches, sink_patch_mass, top_patch,
  top_patch_mass, outlier_patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sinkscope.capture import CaptureConfig, run_capture
from sinkscope.capture.images import display_pixels, is_vision, pixel_values, vision_layout
from sinkscope.detect import detect, get_detector
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel
from sinkscope.progress import Progress
from sinkscope.store import Run, make_manifest

NORM_RATIO = 3.0


@dataclass
class VisionResult:
    """Tables, summary and parameters of one `analyze_images` run; `pixels` holds the images as the model sees
    them ([P, H, W, 3] uint8, the processor's normalisation undone), for figures."""

    tables: dict[str, pd.DataFrame]
    summary: dict[str, Any]
    params: dict[str, Any]
    pixels: torch.Tensor | None = field(default=None, repr=False)

    def run(self, loaded: LoadedModel, command: str = "vision", figures: Sequence[str] = ()) -> Run:
        info = loaded.info
        model = {"name": info.name, "model_type": info.model_type, "revision": info.revision, "dtype": info.dtype,
                 "n_layers": info.n_layers, "n_heads": info.n_heads}
        manifest = make_manifest(command, model, {**self.params, "figures": list(figures)})
        manifest["summary"] = self.summary
        return Run(tables=self.tables, manifest=manifest)

    def lines(self) -> list[str]:
        return summary_lines(self.summary)


def analyze_images(
    loaded: LoadedModel,
    images: Any,
    *,
    method: str = "mean_multiple",
    params: dict[str, Any] | None = None,
    norm_ratio: float = NORM_RATIO,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> VisionResult:
    """Capture a vision transformer on images (PIL images, files, folders, or pixel values [P, C, H, W]) once and
    reduce it to the tables of this module. `method` and `params`: the sink detector run on α per head and on the
    head mean (any detector of `sinkscope.detect` that returns a mask). progress: called as
    progress("capture", done, total) after each batch (`run_capture`)."""
    if not is_vision(loaded):
        raise SinkscopeError(f"{loaded.info.name} is a text model; sinkscope vision needs a vision transformer (ViT, "
                             "DeiT, DINOv2, CLIP or SigLIP vision tower, or a tiny:vit-like built-in)")
    detector = get_detector(method)
    if detector.returns != "mask":
        raise SinkscopeError(f"{method} returns a rate, not a mask of sink keys; pick a detector that flags keys "
                             "(mean_multiple, zscore, column_mass, …)")
    if not norm_ratio > 1:
        raise SinkscopeError(f"the norm ratio {norm_ratio} must be above 1: an outlier is a multiple of the median")
    params = dict(params or {})
    names, pixels = pixel_values(loaded, images)  # [P, C, H, W]
    layout = vision_layout(loaded, pixels.shape[-2], pixels.shape[-1])
    config = CaptureConfig(rows=None, entropy=False, hidden=["embed", "block"], hidden_norms=True)
    trace = run_capture(loaded, pixels, config, batch_size=batch_size, progress=progress)
    alpha = trace.key_mass  # [P, L, H, n]
    sink = detect(method, alpha, **params)  # [P, L, H, n]
    mean_alpha = alpha.mean(2)  # [P, L, n]
    mean_sink = detect(method, mean_alpha, **params)  # [P, L, n]
    meta = layout.frame()  # position, token, kind, row, col
    n_images, n_heads = alpha.shape[0], alpha.shape[2]  # alpha [P, L, H, n]
    h, w = int(pixels.shape[-2]), int(pixels.shape[-1])
    tables: dict[str, pd.DataFrame] = {
        "images": pd.DataFrame({"prompt_id": range(n_images), "image": names, "rows": layout.rows,
                                "cols": layout.cols, "n_prefix": len(layout.prefix), "height": h, "width": w}),
        "patches": _long(meta, {"key_mass": alpha, "sink": sink}, heads=n_heads),
        "mean_patches": _long(meta, {"key_mass": mean_alpha, "sink": mean_sink}),
    }
    tables["kinds"] = _kinds(tables["mean_patches"])
    assert trace.hidden_norms is not None and trace.sites is not None
    tables["norms"] = _norms(meta, trace.hidden_norms, [s.layer for s in trace.sites], norm_ratio)
    tables["layers"] = _layers(tables["mean_patches"], tables["norms"])
    used = {**dict(detector.params), **params}
    used.pop("dims", None)
    summary = {
        "model": loaded.info.name, "images": n_images, "grid": [layout.rows, layout.cols],
        "prefix": list(layout.prefix), "method": method, "detector_params": used, "norm_ratio": norm_ratio,
        "per_layer": _per_layer(tables["layers"]),
    }
    run_params = {"method": method, "params": used, "norm_ratio": norm_ratio, "batch_size": batch_size,
                  "images": names}
    return VisionResult(tables=tables, summary=summary, params=run_params, pixels=display_pixels(loaded, pixels))


def _long(meta: pd.DataFrame, columns: dict[str, torch.Tensor], heads: int | None = None) -> pd.DataFrame:
    """A tidy table of per-token tensors [P, L, (H,) n]: one row per image × layer × (head ×) token."""
    first = next(iter(columns.values()))
    n_images, n_layers, n = first.shape[0], first.shape[1], first.shape[-1]
    inner = n_layers * (heads or 1) * n
    frame = pd.DataFrame({
        "prompt_id": np.repeat(np.arange(n_images), inner),
        "layer": np.tile(np.repeat(np.arange(n_layers), (heads or 1) * n), n_images),
    })
    if heads is not None:
        frame["head"] = np.tile(np.repeat(np.arange(heads), n), n_images * n_layers)
    reps = n_images * n_layers * (heads or 1)
    for name in ("position", "token", "kind", "row", "col"):
        frame[name] = np.tile(meta[name].to_numpy(), reps)
    for name, values in columns.items():
        array = values.reshape(-1).numpy()
        frame[name] = array.astype(bool) if values.dtype == torch.bool else array.astype(np.float64)
    return frame


def _kinds(mean: pd.DataFrame) -> pd.DataFrame:
    """Σ α over the tokens of each kind, per image and layer (α: the head mean)."""
    grouped = mean.groupby(["prompt_id", "layer", "kind"], sort=True)
    return grouped.agg(mass=("key_mass", "sum"), tokens=("position", "size")).reset_index()


def _norms(meta: pd.DataFrame, norms: torch.Tensor, layers: list[int], ratio: float) -> pd.DataFrame:
    """norms [P, S, n] at the sites (embeddings, then each block) → per token: norm, its ratio to the median patch
    norm of that image and site (the lower median, as torch takes it), and whether it is a high-norm outlier
    (ratio > `ratio`)."""
    patch = torch.tensor((meta["kind"] == "patch").to_numpy())  # [n]
    median = norms[..., patch].median(-1, keepdim=True).values.clamp(min=1e-12)  # [P, S, 1]
    frame = _long(meta, {"norm": norms, "ratio": norms / median})
    frame["layer"] = np.asarray(layers)[frame["layer"].to_numpy()]
    frame["outlier"] = frame["ratio"] > ratio
    return frame


def _layers(mean: pd.DataFrame, norms: pd.DataFrame) -> pd.DataFrame:
    """Per image × layer: the mass on [CLS], the registers (and DeiT's distillation token), the patches and the sink
    patches (α: the head mean), the number of sink patches, the patch with the most mass, and the number of
    high-norm outlier patches after that layer's block."""
    rows = []
    for (pid, layer), group in mean.groupby(["prompt_id", "layer"], sort=True):
        patches = group[group["kind"] == "patch"]
        sinks = patches[patches["sink"]]
        top = patches.loc[patches["key_mass"].idxmax()]
        out = norms[(norms["prompt_id"] == pid) & (norms["layer"] == layer) & (norms["kind"] == "patch")]
        rows.append({
            "prompt_id": int(pid), "layer": int(layer),
            "cls_mass": float(group.loc[group["kind"] == "cls", "key_mass"].sum()),
            "register_mass": float(group.loc[group["kind"].isin(["register", "distillation"]), "key_mass"].sum()),
            "patch_mass": float(patches["key_mass"].sum()),
            "sink_patches": len(sinks), "sink_patch_mass": float(sinks["key_mass"].sum()),
            "top_patch": str(top["token"]), "top_patch_mass": float(top["key_mass"]),
            "outlier_patches": int(out["outlier"].sum()),
        })
    return pd.DataFrame(rows)


def _per_layer(layers: pd.DataFrame) -> list[dict[str, Any]]:
    """The layers table averaged over images."""
    columns = ["cls_mass", "register_mass", "sink_patch_mass", "sink_patches", "outlier_patches"]
    mean = layers.groupby("layer", sort=True)[columns].mean().reset_index()
    return [{k: (int(v) if k == "layer" else round(float(v), 4)) for k, v in row.items()}
            for row in mean.to_dict("records")]


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The terminal summary: the model, the layout, and per layer the mass on [CLS], registers and sink patches and
    the number of sink and high-norm patches (means over the images)."""
    prefix = summary["prefix"]
    registers = sum(t.startswith("[REG") for t in prefix)
    extra = ", ".join(p for p in (
        "[CLS]" if "[CLS]" in prefix else "", "[DIST]" if "[DIST]" in prefix else "",
        f"{registers} registers" if registers else "") if p)
    rows, cols = summary["grid"]
    params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in
                       summary["detector_params"].items())
    lines = [f"{summary['model']}: {summary['images']} image(s), {rows}×{cols} patches"
             + (f" + {extra}" if extra else " (no [CLS])")
             + f"; sink patches by {summary['method']} ({params}) on the key mass; high-norm patches: ‖h‖ > "
             f"{summary['norm_ratio']:g}× the median patch",
             "layer  [CLS] mass  register mass  sink-patch mass  sink patches  high-norm patches"]
    for row in summary["per_layer"]:
        lines.append(f"{row['layer']:>5}  {row['cls_mass']:>10.3f}  {row['register_mass']:>13.3f}  "
                     f"{row['sink_patch_mass']:>15.3f}  {row['sink_patches']:>12.1f}  {row['outlier_patches']:>17.1f}")
    return lines


def write(result: VisionResult, loaded: LoadedModel, out: str | Path, *, layer: int = -1, figures: bool = True,
          overwrite: bool = False) -> Path:
    """Write the tables, the figures (`report.figures.vision`, at `layer`) and the manifest (with the summary) to a
    run folder. Figures are drawn in a scratch folder and moved in with the tables, so a refused folder is left
    untouched."""
    import tempfile

    from sinkscope.store import save_run

    if not figures:
        return save_run(out, result.run(loaded), overwrite=overwrite)
    from sinkscope.report.figures.vision import write_figures

    with tempfile.TemporaryDirectory(prefix="sinkscope-figures-") as scratch:
        names = write_figures(result.tables, Path(scratch), result.pixels, layer=layer, model=loaded.info.name)
        files = {name: Path(scratch) / name for name in names}
        return save_run(out, result.run(loaded, figures=names), overwrite=overwrite, files=files)
