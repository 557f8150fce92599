"""Tiny random-config models (one per architecture family) with an offline byte-level tokenizer, for tests; the vision
families get an offline image processor instead (built from a config dict, no download)."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig

from sinkscope.errors import SinkscopeError
from sinkscope.models.loading import ENCODER_TYPES, VISION_TYPES, LoadedModel, model_info

_COMMON = {"vocab_size": 262, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
_LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 512}

TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 512},
    "llama": {"model_type": "llama", **_LLAMA_LIKE},
    "mistral": {"model_type": "mistral", **_LLAMA_LIKE, "sliding_window": 5},
    "qwen2": {"model_type": "qwen2", **_LLAMA_LIKE},
    "qwen3": {"model_type": "qwen3", **_LLAMA_LIKE, "head_dim": 8},
    "gemma2": {"model_type": "gemma2", **_LLAMA_LIKE, "head_dim": 8, "sliding_window": 4,
               "attn_logit_softcapping": 2.0, "query_pre_attn_scalar": 8},
    "phi3": {"model_type": "phi3", **_LLAMA_LIKE},
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "max_position_embeddings": 512},
    "opt": {"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 512, "word_embed_proj_dim": 32},
    "mixtral": {"model_type": "mixtral", **_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"model_type": "gpt_oss", **_LLAMA_LIKE, "head_dim": 8, "num_local_experts": 4,
                "num_experts_per_tok": 2, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "bert": {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 512},
}
# Vision transformers: 64×64 images in 8×8 patches (an 8×8 grid of 64 patches after the [CLS], distillation or
# register tokens).
_VIT_LIKE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 64, "patch_size": 8}
TINY_VISION_FAMILIES: dict[str, dict[str, Any]] = {
    "vit": {"model_type": "vit", **_VIT_LIKE, "intermediate_size": 64},
    "deit": {"model_type": "deit", **_VIT_LIKE, "intermediate_size": 64},
    "dinov2": {"model_type": "dinov2", **_VIT_LIKE, "mlp_ratio": 2},
    "dinov2_registers": {"model_type": "dinov2_with_registers", **_VIT_LIKE, "mlp_ratio": 2, "num_register_tokens": 4},
    "clip_vision": {"model_type": "clip_vision_model", **_VIT_LIKE, "intermediate_size": 64},
    "siglip_vision": {"model_type": "siglip_vision_model", **_VIT_LIKE, "intermediate_size": 64},
}
_CLIP_NORM = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
_SQUARE = {"height": 64, "width": 64}
# model_type → (transformers' PIL-backend image processor, its settings), as the released checkpoints configure them
# at 64 pixels (ViT and SigLIP resize; DeiT, DINOv2 and CLIP resize the short side, then crop the centre).
TINY_IMAGE_PROCESSORS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("ViTImageProcessorPil", {"size": _SQUARE}),
    "deit": ("DeiTImageProcessorPil", {"size": {"height": 73, "width": 73}, "crop_size": _SQUARE}),
    "dinov2": ("BitImageProcessorPil", {"size": {"shortest_edge": 73}, "crop_size": _SQUARE, **_CLIP_NORM}),
    "dinov2_with_registers": ("BitImageProcessorPil", {"size": {"shortest_edge": 73}, "crop_size": _SQUARE,
                                                       **_CLIP_NORM}),
    "clip_vision_model": ("CLIPImageProcessorPil", {"size": {"shortest_edge": 64}, "crop_size": _SQUARE}),
    "siglip_vision_model": ("SiglipImageProcessorPil", {"size": _SQUARE}),
}


def byte_tokenizer(encoder: bool = False) -> transformers.PreTrainedTokenizerFast:
    """An offline byte-level tokenizer: 256 byte tokens plus <s>, </s>, <pad>, <unk> (ids 256-259) and, for
    encoders, [CLS] [SEP] (ids 259-260 reuse the tail of the vocabulary). Decoders get `<s>` prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_bytes_to_unicode().__getitem__)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    specials = ["<s>", "</s>", "<pad>", "<unk>", "[CLS]", "[SEP]"]
    for offset, tok in enumerate(specials):
        vocab[tok] = 256 + offset
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    if encoder:
        core.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        kwargs = {"cls_token": "[CLS]", "sep_token": "[SEP]"}
    else:
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
        kwargs = {"bos_token": "<s>"}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **kwargs
    )


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's reversible byte ↔ printable-character table, inverted (char → byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """A 2-layer random config of `family` (see `TINY_FAMILIES` and `TINY_VISION_FAMILIES`), small enough for unit
    tests."""
    families = {**TINY_FAMILIES, **TINY_VISION_FAMILIES}
    if family not in families:
        raise SinkscopeError(f"unknown tiny family '{family}': use one of {', '.join(sorted(families))}")
    tokens = {} if family in TINY_VISION_FAMILIES else _COMMON  # a vision model has no token ids
    params = {**tokens, **families[family], **overrides}
    model_type = params.pop("model_type")
    config = AutoConfig.for_model(model_type, **params)
    if family == "bert":
        config.vocab_size = 262
    return config


def tiny_image_processor(model_type: str) -> Any:
    """The offline image processor of a tiny vision family (see `TINY_IMAGE_PROCESSORS`)."""
    cls, settings = TINY_IMAGE_PROCESSORS[model_type]
    return getattr(transformers, cls).from_dict(settings)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> LoadedModel:
    """Build a random-weight tiny model of an architecture family, with an offline byte tokenizer."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    vision = config.model_type in VISION_TYPES
    encoder = config.model_type in ENCODER_TYPES
    auto = AutoModel if encoder or vision else AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype)
    _spread_init(model, seed)
    model.eval()
    tokenizer = None if vision else byte_tokenizer(encoder=encoder)
    name = f"tiny:{family}"
    model.config._name_or_path = name
    processor = tiny_image_processor(config.model_type) if vision else None
    return LoadedModel(model=model, tokenizer=tokenizer, info=model_info(model, tokenizer, name),
                       image_processor=processor)


def _spread_init(model: torch.nn.Module, seed: int) -> None:
    """Re-draw weights with a larger scale so tiny random models have peaked, non-uniform attention
    (default 0.02-std initialisation gives nearly uniform maps, which test little)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * 0.3)
            elif name.endswith("sinks"):
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype))
