"""GGUF files as models: `load_model("path/to/model.gguf")` and `--model FILE.gguf`.

A GGUF file (llama.cpp's format) holds quantised weights, the config and the tokenizer. sinkscope reads it with
transformers' GGUF support, which dequantises every tensor to float32, and caches the result once as a plain
safetensors folder keyed by the file's SHA-256 (`$SINKSCOPE_CACHE/gguf/<hash>`, default `~/.cache/sinkscope`).
Later loads read that folder like any other, so a GGUF model costs its conversion once.

The folder is written by sinkscope (config, tokenizer, `model.safetensors` from the state dict) rather than by
`save_pretrained`, which transformers refuses for GGUF-loaded models of some architectures ("The model is quantized
with gguf and is not serializable") although their weights are already float32. A GGUF file holds no code and no
pickle, so neither safety flag is involved. Which architectures load is transformers' list
(`GGUF_SUPPORTED_ARCHITECTURES`: llama, mistral, qwen2/3, gemma2/3, phi3, gpt2, starcoder2, …).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from sinkscope.errors import SinkscopeError

__all__ = ["cache_dir", "gguf_folder", "is_gguf"]

INSTALL = "pip install gguf accelerate"


def cache_dir() -> Path:
    """Where converted models are kept: $SINKSCOPE_CACHE, default ~/.cache/sinkscope."""
    return Path(os.environ.get("SINKSCOPE_CACHE", Path.home() / ".cache" / "sinkscope"))


def is_gguf(path: Path) -> bool:
    """A file whose first four bytes are the GGUF magic."""
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _supported() -> str:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        return ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    except ImportError:  # pragma: no cover - older transformers
        return "see transformers' GGUF documentation"


def gguf_folder(path: str | os.PathLike) -> Path:
    """Dequantise the GGUF file at `path` to a float32 safetensors folder once (cached by content: one folder per
    file content, whatever its name or place); return it.

    Raises SinkscopeError with one line when the file is not GGUF, the `gguf` package is missing, or transformers
    cannot read the architecture."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SinkscopeError(f"no such GGUF file: {file}")
    if not is_gguf(file):
        raise SinkscopeError(f"{file} is not a GGUF file (it does not start with the GGUF magic bytes); pass a .gguf "
                             "file, a model folder or a Hub id")
    digest = _sha256(file)
    target = cache_dir() / "gguf" / digest[:32]
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise SinkscopeError(f"reading a GGUF file needs the package {module}: {INSTALL}")
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError, NotImplementedError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SinkscopeError(f"transformers cannot read {file.name}: {first} (GGUF architectures it reads: "
                             f"{_supported()})") from err
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: a plain float32 checkpoint
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{digest[:8]}-"))
    try:
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))  # not save_pretrained: see the module docstring
        (staging / "gguf-source.json").write_text(json.dumps({"file": file.name, "sha256": digest}) + "\n")
        if target.exists():  # a damaged earlier conversion
            shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model.safetensors").exists():  # not another process's finished conversion
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
