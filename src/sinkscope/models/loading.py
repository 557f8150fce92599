"""Load HuggingFace models and tokenizers and know their architecture facts.

A model is a Hub id, a local directory, a built-in name, or an already constructed `transformers` model; nothing else
in sinkscope cares which. Weights load from safetensors unless the caller opts in to pickle checkpoints, and code
from a model repository never runs unless `trust_remote_code=True`.
"""

from __future__ import annotations

import difflib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from sinkscope.errors import SinkscopeError

# model_type values of encoder-only families: attention is bidirectional and there is no causal LM head.
ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "albert", "camembert", "mpnet", "deberta",
     "deberta-v2", "modernbert", "ernie", "nomic_bert"}
)
# model_type values of the vision transformers sinkscope captures (bidirectional, images in; see capture.images).
# A CLIP or SigLIP checkpoint (text + vision) loads its vision tower (`VISION_TOWERS`).
VISION_TYPES = frozenset(
    {"vit", "deit", "dinov2", "dinov2_with_registers", "clip_vision_model", "siglip_vision_model"}
)
VISION_TOWERS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}


@dataclass
class ModelInfo:
    """Architecture facts sinkscope needs: sizes, masking and tokenizer behaviour."""

    name: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    is_causal: bool
    adds_bos: bool
    bos_token: str | None
    max_positions: int | None
    revision: str | None = None
    dtype: str = "float32"


@dataclass
class LoadedModel:
    """A model with its tokenizer (None for a vision model, which has an `image_processor` instead) and facts.
    `model` is in eval mode."""

    model: transformers.PreTrainedModel
    tokenizer: Any
    info: ModelInfo
    extra: dict[str, Any] = field(default_factory=dict)
    image_processor: Any = None

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' device (for a model dispatched over several devices, the first)."""
        device_map = getattr(self.model, "hf_device_map", None)
        if device_map:
            first = next(iter(device_map.values()))
            if isinstance(first, int):
                return torch.device("cuda", first)
            return torch.device(first if first not in ("disk", "meta") else "cpu")
        return next(self.model.parameters()).device


def _config_int(config: PretrainedConfig, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def model_info(model: transformers.PreTrainedModel, tokenizer: Any, name: str) -> ModelInfo:
    """Read layers, heads, KV heads, head size, causality, BOS behaviour and context length off a model."""
    config = _text_config(model.config)
    n_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
    n_heads = _config_int(config, "num_attention_heads", "n_head", "num_heads")
    if n_layers is None or n_heads is None:
        raise SinkscopeError(
            f"cannot read the number of layers/heads of '{name}' ({type(config).__name__}); "
            "sinkscope supports transformer models whose config names them the usual way"
        )
    n_kv = _config_int(config, "num_key_value_heads", "num_kv_heads") or n_heads
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model") or 0
    head_dim = _config_int(config, "head_dim") or (hidden // n_heads if hidden else 0)
    is_causal = config.model_type not in ENCODER_TYPES | VISION_TYPES or bool(getattr(config, "is_decoder", False))
    adds_bos, bos = _tokenizer_bos(tokenizer)
    max_pos = _config_int(config, "max_position_embeddings", "n_positions", "n_ctx", "seq_length")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return ModelInfo(
        name=name,
        model_type=config.model_type,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        is_causal=is_causal,
        adds_bos=adds_bos,
        bos_token=bos,
        max_positions=max_pos,
        revision=getattr(model.config, "_commit_hash", None),
        dtype=dtype,
    )


def _tokenizer_bos(tokenizer: Any) -> tuple[bool, str | None]:
    """Whether encoding a plain string puts a special token first (BOS or [CLS]) and which one."""
    if tokenizer is None:
        return False, None
    ids = tokenizer("a")["input_ids"]
    if not ids:
        return False, None
    first = ids[0]
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    if first in specials:
        return True, tokenizer.convert_ids_to_tokens(first)
    return False, getattr(tokenizer, "bos_token", None)


# ---------------------------------------------------------------------------------------------------------------
# Built-in names: a registry other modules (real offline models, the shipped tiny model) add to.
# ---------------------------------------------------------------------------------------------------------------

BUILTINS: dict[str, Callable[..., LoadedModel]] = {}


def register_builtin(name: str) -> Callable[[Callable[..., LoadedModel]], Callable[..., LoadedModel]]:
    """Register a function `(**load_kwargs) -> LoadedModel` under a built-in model name."""

    def deco(fn: Callable[..., LoadedModel]) -> Callable[..., LoadedModel]:
        BUILTINS[name] = fn
        return fn

    return deco


def _load_zoo() -> None:
    import sinkscope.models.builtins  # noqa: F401  (registers the real offline models)


def list_builtins() -> list[str]:
    _load_zoo()
    from sinkscope.models.tiny import TINY_FAMILIES, TINY_VISION_FAMILIES

    return sorted(BUILTINS) + [f"tiny:{family}" for family in sorted({**TINY_FAMILIES, **TINY_VISION_FAMILIES})]


def load_model(
    name_or_model: str | os.PathLike | transformers.PreTrainedModel,
    *,
    tokenizer: Any = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a model + tokenizer from a Hub id, a local directory, a GGUF file, a built-in name or a constructed model.

    - A `.gguf` file is dequantised to float32 once and cached as safetensors (`sinkscope.models.gguf`).
    - Built-in names: `tiny:<family>` (random-config test models, see `TINY_FAMILIES` and `TINY_VISION_FAMILIES`)
      and names registered with `register_builtin`.
    - A vision transformer (`VISION_TYPES`; a CLIP or SigLIP checkpoint loads its vision tower) comes with its image
      processor (`LoadedModel.image_processor`) and no tokenizer.
    - Weights load from safetensors only, unless `allow_pickle=True` (pickle checkpoints can run arbitrary code).
    - Code shipped in a model repository runs only with `trust_remote_code=True`.
    - Model parallel: `device="auto"` (or `device_map="auto"` / an explicit accelerate device map, with optional
      `max_memory` and `offload_folder`) spreads the layers over every GPU, then CPU, then disk, through accelerate.
      Capture works across devices: each layer's statistics are computed where that layer runs.
    """
    torch_dtype = parse_dtype(dtype)
    if device is not None and str(device) == "auto":
        device, device_map = None, device_map or "auto"
    check_device(device)  # before anything is loaded
    if device_map is not None:
        if device is not None:
            raise SinkscopeError("pass either a device or a device map (--device auto), not both")
        loaded = load_model(name_or_model, tokenizer=tokenizer, dtype=torch_dtype, revision=revision,
                            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        return dispatch(loaded, device_map, max_memory=max_memory, offload_folder=offload_folder)
    if isinstance(name_or_model, transformers.PreTrainedModel):
        model = name_or_model
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        loaded = LoadedModel(model=model.eval(), tokenizer=tokenizer, info=model_info(model, tokenizer, name))
        return _place(loaded, device)
    name = str(name_or_model)
    if not name.strip():
        raise SinkscopeError("no model given: pass --model with a Hub id, a local folder or a built-in name")
    if name.startswith("tiny:"):
        from sinkscope.models.tiny import tiny_model

        return _place(tiny_model(name.removeprefix("tiny:"), dtype=torch_dtype), device)
    _load_zoo()
    if name in BUILTINS:
        return _place(BUILTINS[name](dtype=torch_dtype), device)
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        from sinkscope.models.gguf import gguf_folder, is_gguf

        if not (is_gguf(path) or path.suffix.lower() == ".gguf"):
            raise SinkscopeError(f"'{name}' is a file but not a GGUF file; pass a .gguf file, or the folder that holds "
                                 "config.json and the weights")
        loaded = load_model(gguf_folder(path), tokenizer=tokenizer, dtype=torch_dtype, device=device)
        loaded.info.name = name
        return loaded
    local = path.is_dir()
    if local and not (path / "config.json").exists():
        raise SinkscopeError(f"'{name}' has no config.json: pass a folder saved with save_pretrained()")
    try:
        loaded = _from_pretrained(name, torch_dtype, revision, trust_remote_code, allow_pickle, local)
    except SinkscopeError:
        raise
    except (OSError, ValueError) as err:
        raise _load_error(name, local, err) from err
    return _place(loaded, device)


def dispatch(
    loaded: LoadedModel,
    device_map: str | dict[str, Any] = "auto",
    *,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> LoadedModel:
    """Spread a loaded model's layers over devices with accelerate (model parallel). `device_map` is "auto",
    "balanced", "sequential" or an explicit {module name: device} map; a layer mapped to "disk" needs
    `offload_folder`. The model is first loaded on CPU: for checkpoints larger than CPU memory, load them with
    transformers' `from_pretrained(..., device_map="auto")` and pass the model to `load_model`."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError as err:
        raise SinkscopeError("model parallel loading needs accelerate: pip install accelerate") from err
    model = loaded.model
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise SinkscopeError(f"unknown device map '{device_map}': use auto, balanced, sequential or a dict")
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if "disk" in device_map.values() and offload_folder is None:
        raise SinkscopeError("the device map offloads layers to disk: pass an offload folder")
    dispatch_model(model, device_map=device_map, offload_dir=None if offload_folder is None else str(offload_folder))
    model.hf_device_map = dict(device_map)
    return loaded


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise SinkscopeError(f"unknown dtype '{dtype}': use one of {', '.join(sorted(table))}")
    return table[dtype]


def check_device(device: str | torch.device | None) -> torch.device | None:
    """The device, or a one-line SinkscopeError naming the fix: an unknown name (`gpu`), or CUDA/MPS that this
    machine does not have."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SinkscopeError(f"unknown device '{device}': use cpu, cuda, cuda:1, mps or auto (model parallel)"
                             ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SinkscopeError(f"--device {device}: this machine has no CUDA GPU visible to torch "
                                 f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SinkscopeError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                 f"numbered from 0")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise SinkscopeError(f"--device {device}: the CPU is one device; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SinkscopeError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return dev


def _place(loaded: LoadedModel, device: str | torch.device | None) -> LoadedModel:
    if device is not None:
        loaded.model.to(check_device(device))
    return loaded


def _load_error(name: str, local: bool, err: Exception) -> SinkscopeError:
    text = str(err)
    if "trust_remote_code" in text:
        return SinkscopeError(
            f"'{name}' needs code from its repository; rerun with --trust-remote-code if you trust it"
        )
    if "safetensors" in text.lower() or "pytorch_model.bin" in text or "use_safetensors" in text:
        return SinkscopeError(
            f"'{name}' has no safetensors weights; pickle checkpoints can run code when loaded, "
            "pass --allow-pickle to load them anyway"
        )
    if local:
        return SinkscopeError(f"could not load the model in '{name}': {text.splitlines()[0] if text else err!r}")
    names = list_builtins()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.8)
    if close:
        return SinkscopeError(f"could not load '{name}': no such local folder or built-in name; did you mean "
                              f"'{close[0]}'? (`sinkscope models` lists them)")
    if name.startswith((".", "/", "~")) or name.endswith("/"):
        return SinkscopeError(f"no such folder: '{name}' (a local model is a folder saved with save_pretrained)")
    if "/" not in name:
        where = "a Hub id looks like owner/name"
    else:
        where = "the HuggingFace Hub is unreachable or has no such model"
    return SinkscopeError(
        f"could not load '{name}': it is not a local folder or built-in name, and {where}. Check the id, "
        f"download it with `hf download {name} --local-dir DIR` and pass DIR, or use a built-in name "
        f"({', '.join(names)})"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the Hub, so an offline machine fails at once instead of after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _refuse_pickle_shards(name: str, revision: str | None, local: bool) -> None:
    """Every weight file the loader will read must be safetensors: a `model.safetensors.index.json` may map weights
    to pickle shards, which transformers would then unpickle. Raises SinkscopeError naming the first such file."""
    index: Path | None = None
    if local:
        candidate = Path(name) / "model.safetensors.index.json"
        index = candidate if candidate.exists() else None
    else:
        from transformers.utils import cached_file

        try:
            found = cached_file(name, "model.safetensors.index.json", revision=revision,
                                _raise_exceptions_for_missing_entries=False)
        except OSError:
            found = None
        index = Path(found) if found else None
    if index is None:
        return
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        raise SinkscopeError(f"{index} is not a readable safetensors index; fix or remove it") from None
    unsafe = sorted({str(f) for f in weight_map.values() if not str(f).endswith(".safetensors")})
    if unsafe:
        raise SinkscopeError(f"'{name}' maps weights to {unsafe[0]}, which is not a safetensors file; pickle files "
                             "can run code when loaded: pass --allow-pickle to load them anyway")


def _from_pretrained(
    name: str, dtype: torch.dtype, revision: str | None, trust_remote_code: bool, allow_pickle: bool, local: bool
) -> LoadedModel:
    try:  # a local folder, or a Hub id already in the local cache
        AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError):
        if local or not _hub_reachable():
            raise
    config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    if not allow_pickle:
        _refuse_pickle_shards(name, revision, local)
    if config.model_type in VISION_TYPES or config.model_type in VISION_TOWERS:
        return _vision_from_pretrained(name, config.model_type, dtype, revision, trust_remote_code, allow_pickle)
    text_config = _text_config(config)
    auto = AutoModel if text_config.model_type in ENCODER_TYPES else AutoModelForCausalLM
    try:  # before the weights: a folder without a tokenizer fails at once
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except ImportError as err:
        raise SinkscopeError(f"the tokenizer of '{name}' needs a package that is not installed: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}") from None
    except (OSError, ValueError, TypeError) as err:
        if "trust_remote_code" in str(err):
            raise
        raise SinkscopeError(f"'{name}' has no tokenizer that transformers can load (tokenizer.json, or "
                             "tokenizer_config.json with its vocabulary files): save the tokenizer into it with "
                             "tokenizer.save_pretrained, or pass one to load_model(tokenizer=...)") from None
    try:
        model = auto.from_pretrained(
            name,
            revision=revision,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
        )
    except Exception as err:  # a damaged weights file or weights that do not fit config.json: one line
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if type(err).__name__ == "SafetensorError" or "deserializ" in text.lower():
            raise SinkscopeError(f"the weights of '{name}' are damaged or not safetensors ({text[:160]}); "
                                 "download or save them again") from None
        if "size mismatch" in str(err) or "ignore_mismatched_sizes" in text or "shape" in text.lower():
            raise SinkscopeError(f"the weights of '{name}' do not fit its config.json ({text[:160]}); the folder "
                                 "mixes files of two models: save it again") from None
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, info=model_info(model, tokenizer, name))


def _vision_from_pretrained(name: str, model_type: str, dtype: torch.dtype, revision: str | None,
                            trust_remote_code: bool, allow_pickle: bool) -> LoadedModel:
    """A vision transformer with its image processor (transformers picks the PIL backend when torchvision is absent);
    a CLIP or SigLIP checkpoint loads as its vision tower."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SinkscopeError(f"'{name}' has no image processor that transformers can load ({first[:160]}): save one "
                             "beside the model with image_processor.save_pretrained") from None
    auto = getattr(transformers, VISION_TOWERS[model_type]) if model_type in VISION_TOWERS else AutoModel
    model = auto.from_pretrained(name, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code,
                                 use_safetensors=None if allow_pickle else True)
    model.eval()
    return LoadedModel(model=model, tokenizer=None, info=model_info(model, None, name), image_processor=processor)
