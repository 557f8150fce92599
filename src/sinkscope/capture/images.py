"""Images in for vision transformers: reading image files and folders, turning them into the model's pixel values with
its image processor, and the token layout of each family ([CLS], distillation and register tokens, then the patches
row by row). `run_capture` uses these when the model is a vision transformer (`is_vision`).

Token names, in sequence order: "[CLS]" (ViT, DeiT, DINOv2, CLIP), "[DIST]" (DeiT's distillation token), "[REG0]" …
"[REG{R−1}]" (DINOv2 with registers, Darcet et al. 2024), then "patch(r,c)" for the patch in grid row r, column c
(0-based, row-major, as the patch embedding's convolution lays them out). SigLIP's tower has patches only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sinkscope.errors import SinkscopeError
from sinkscope.models import VISION_TYPES, LoadedModel

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Families whose position embeddings are interpolated to any image size (the others take config.image_size only).
_ANY_SIZE = frozenset({"dinov2", "dinov2_with_registers"})
KINDS = ("cls", "distillation", "register", "patch")


@dataclass(frozen=True)
class VisionLayout:
    """The token sequence of one image: `prefix` tokens ([CLS], [DIST], registers), then a rows × cols patch grid."""

    prefix: tuple[str, ...]
    rows: int
    cols: int
    patch_size: tuple[int, int]  # (height, width) in pixels

    @property
    def n_tokens(self) -> int:
        return len(self.prefix) + self.rows * self.cols

    def tokens(self) -> list[str]:
        return list(self.prefix) + [f"patch({r},{c})" for r in range(self.rows) for c in range(self.cols)]

    def frame(self) -> pd.DataFrame:
        """One row per position: position, token, kind (cls, distillation, register, patch), row and col (−1 for
        the prefix tokens)."""
        kinds = [{"[CLS]": "cls", "[DIST]": "distillation"}.get(t, "register") for t in self.prefix]
        n = len(self.prefix)
        grid = range(self.rows * self.cols)
        return pd.DataFrame({
            "position": range(self.n_tokens),
            "token": self.tokens(),
            "kind": kinds + ["patch"] * (self.rows * self.cols),
            "row": [-1] * n + [i // self.cols for i in grid],
            "col": [-1] * n + [i % self.cols for i in grid],
        })

    def info(self) -> dict[str, Any]:
        return {"prefix": list(self.prefix), "grid": [self.rows, self.cols], "patch_size": list(self.patch_size)}


def is_vision(loaded: LoadedModel) -> bool:
    """Whether the model takes images (pixel values) rather than token ids."""
    return loaded.image_processor is not None or getattr(loaded.model, "main_input_name", "") == "pixel_values"


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, Sequence) else (int(value), int(value))


def vision_layout(loaded: LoadedModel, height: int, width: int) -> VisionLayout:
    """The token layout of a height × width image (pixels, after the image processor) for this model; SinkscopeError
    for a vision family sinkscope does not know, or an image the model cannot take."""
    config = loaded.model.config
    model_type = config.model_type
    if model_type not in VISION_TYPES:
        raise SinkscopeError(f"{loaded.info.name} is a '{model_type}' model; sinkscope reads images with the vision "
                             f"transformers {', '.join(sorted(VISION_TYPES))}")
    ph, pw = _pair(config.patch_size)
    if model_type not in _ANY_SIZE:
        size = _pair(config.image_size)
        if (height, width) != size:
            raise SinkscopeError(f"the pixel values are {height}×{width}; {loaded.info.name} takes {size[0]}×{size[1]} "
                                 "images: pass image files (its image processor resizes them) or resize them")
    if height < ph or width < pw:
        raise SinkscopeError(f"the pixel values are {height}×{width}, smaller than one {ph}×{pw} patch")
    prefix: tuple[str, ...] = ()
    if model_type != "siglip_vision_model":
        prefix = ("[CLS]",)
    if model_type == "deit":
        prefix += ("[DIST]",)
    if model_type == "dinov2_with_registers":
        prefix += tuple(f"[REG{i}]" for i in range(int(config.num_register_tokens)))
    return VisionLayout(prefix=prefix, rows=height // ph, cols=width // pw, patch_size=(ph, pw))


def image_files(sources: Sequence[str | Path]) -> list[Path]:
    """The image files named by `sources`: files as given, folders expanded to their image files (by suffix, sorted
    by name, not recursive). SinkscopeError for a missing path or a folder without images."""
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if not str(source).strip() or not path.exists():
            raise SinkscopeError(f"no such image file or folder: '{source}'")
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise SinkscopeError(f"the folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        else:
            files.append(path)
    if not files:
        raise SinkscopeError("no images given: pass image files or a folder of images")
    return files


def open_image(path: Path) -> Any:
    """An image file as an RGB PIL image; SinkscopeError when PIL cannot read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        if isinstance(err, OSError) and not isinstance(err, UnidentifiedImageError) and err.filename is not None:
            raise
        raise SinkscopeError(f"{path} is not an image that Pillow can read; pass PNG, JPEG or another image "
                             "format") from None


def pixel_values(loaded: LoadedModel, images: Any) -> tuple[list[str], torch.Tensor]:
    """Image names and pixel values [P, C, H, W] (float32) from images: a tensor [P, C, H, W] or [C, H, W] of pixel
    values (used as they are), or a sequence of PIL images, image files and folders of images (run through the
    model's image processor)."""
    if isinstance(images, torch.Tensor):
        pixels = images[None] if images.dim() == 3 else images
        if pixels.dim() != 4 or pixels.shape[0] == 0:
            raise SinkscopeError(f"pixel values must be [images, channels, height, width], got "
                                 f"{tuple(images.shape)}")
        return [f"image {i}" for i in range(pixels.shape[0])], pixels.float()
    if isinstance(images, str | Path) or not isinstance(images, Sequence):
        images = [images]
    if not images:
        raise SinkscopeError("no images given: pass image files, a folder of images or PIL images")
    if loaded.image_processor is None:
        raise SinkscopeError(f"{loaded.info.name} has no image processor: save one beside the model "
                             "(image_processor.save_pretrained), or pass pixel values")
    names: list[str] = []
    opened: list[Any] = []
    for i, item in enumerate(images):
        if isinstance(item, str | Path):
            if not Path(item).expanduser().exists():
                raise SinkscopeError(f"no such image file or folder: '{item}' ({loaded.info.name} is a vision model: "
                                     "it reads images, not text)")
            for path in image_files([item]):
                names.append(path.name)
                opened.append(open_image(path))
        elif hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
            names.append(Path(getattr(item, "filename", "") or f"image {i}").name)
            opened.append(item.convert("RGB"))
        else:
            raise SinkscopeError(f"image {i + 1} is a {type(item).__name__}; pass PIL images, image files or folders")
    batch = loaded.image_processor(images=opened, return_tensors="pt")
    return names, batch["pixel_values"].float()  # [P, C, H, W]


def display_pixels(loaded: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
    """The image the model sees, for figures: pixel values [P, C, H, W] with the processor's normalisation undone,
    as uint8 [P, H, W, 3] (without a processor or its statistics, min-max scaled per image)."""
    x = pixels.float()
    proc = loaded.image_processor
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    if mean is not None and std is not None and getattr(proc, "do_normalize", True):
        x = x * torch.tensor(std, dtype=x.dtype)[:, None, None] + torch.tensor(mean, dtype=x.dtype)[:, None, None]
    else:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp(min=1e-12)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x[:, :3].clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
