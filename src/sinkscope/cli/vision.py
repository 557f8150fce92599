"""`sinkscope vision`: sink patches, [CLS] and register mass, and high-norm patches of a vision transformer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sinkscope.cli.options import (
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    LimitOpt,
    MethodOpt,
    ModelOpt,
    NoFiguresOpt,
    OutOpt,
    OverwriteOpt,
    PickleOpt,
    ThresholdOpt,
    TrustOpt,
    console,
    described,
    load,
    method_params,
    progress_bars,
    user_errors,
)
from sinkscope.errors import SinkscopeError


@user_errors
def vision_command(
    model: ModelOpt,
    images: Annotated[list[Path], typer.Option(
        "--images", help="Image files or folders of images (PNG, JPEG, …; repeat for several)")],
    out: described(OutOpt, ", with a patch figure per image") = None,
    layer: Annotated[int, typer.Option(help="Layer the patch figures show (-1: the last)")] = -1,
    method: described(MethodOpt, "; it reads each head's key mass over the image's tokens") = "mean_multiple",
    threshold: ThresholdOpt = None,
    norm_ratio: Annotated[float, typer.Option(
        help="‖h‖ / median patch ‖h‖ above which a patch is a high-norm outlier (Darcet et al.)")] = 3.0,
    limit: described(LimitOpt, " images (the first, by name within a folder)") = None,
    no_figures: NoFiguresOpt = False,
    overwrite: OverwriteOpt = False,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Attention sinks of a vision transformer (ViT, DeiT, DINOv2 with or without registers, CLIP or SigLIP vision
    tower): key mass per patch, [CLS] and register token, sink patches, and high-norm patches."""
    from sinkscope.analyses.vision import analyze_images, write
    from sinkscope.capture.images import image_files
    from sinkscope.store import MANIFEST, read_json

    params = method_params(method, threshold)
    if not norm_ratio > 1:
        raise SinkscopeError(f"--norm-ratio {norm_ratio}: a high-norm patch is a multiple of the median, so pass a "
                             "ratio above 1")
    files = image_files(images)[:limit]
    loaded = load(model, device, dtype, trust_remote_code, allow_pickle, images=True)
    if not -loaded.info.n_layers <= layer < loaded.info.n_layers:
        raise SinkscopeError(f"--layer {layer}: the model has {loaded.info.n_layers} layers (0 to "
                             f"{loaded.info.n_layers - 1}, or -1 for the last)")
    with progress_bars() as update:
        result = analyze_images(loaded, files, method=method, params=params, norm_ratio=norm_ratio,
                                batch_size=batch_size, progress=update)
    for line in result.lines():
        console.print(line, highlight=False, soft_wrap=True)
    if out is not None:
        folder = write(result, loaded, out, layer=layer, figures=not no_figures, overwrite=overwrite)
        figures = read_json(folder / MANIFEST)["parameters"]["figures"]
        console.print(f"wrote {folder}/ ({', '.join(result.tables)} + manifest.json"
                      + (f"; figures {', '.join(figures)}" if figures else "") + ")")
