"""Tiny random-config models (one per architecture family) with an offline byte-level tokenizer, for tests."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig

from sinkscope.errors import SinkscopeError
from sinkscope.models.loading import ENCODER_TYPES, LoadedModel, model_info

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
    """A 2-layer random config of `family` (see `TINY_FAMILIES`), small enough for unit tests."""
    if family not in TINY_FAMILIES:
        raise SinkscopeError(f"unknown tiny family '{family}': use one of {', '.join(sorted(TINY_FAMILIES))}")
    params = {**_COMMON, **TINY_FAMILIES[family], **overrides}
    model_type = params.pop("model_type")
    config = AutoConfig.for_model(model_type, **params)
    if family == "bert":
        config.vocab_size = 262
    return config


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> LoadedModel:
    """Build a random-weight tiny model of an architecture family, with an offline byte tokenizer."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    encoder = config.model_type in ENCODER_TYPES
    auto = AutoModel if encoder else AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype)
    _spread_init(model, seed)
    model.eval()
    tokenizer = byte_tokenizer(encoder=encoder)
    name = f"tiny:{family}"
    model.config._name_or_path = name
    return LoadedModel(model=model, tokenizer=tokenizer, info=model_info(model, tokenizer, name))


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
