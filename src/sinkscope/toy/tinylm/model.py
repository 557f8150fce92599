"""The tiny LM itself: its configuration (`TrainConfig`), the transformers Llama it builds, loading a checkpoint
with its attention variant, and the shipped `sinkscope-tiny` model."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel, model_info
from sinkscope.toy.tinylm.data import RECALL_RULES, check_synthetic, corpus_files
from sinkscope.toy.tinylm.variants import apply_variant, check_variant

TINY_DIR_NAME = "sinkscope-tiny"


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in the checkpoint; `resume` reuses the saved one)."""

    data: str | None = None  # text file or folder (see corpus_files)
    synthetic: str | None = None  # a SYNTHETIC task name
    synthetic_frac: float = 0.5  # share of each batch drawn from the synthetic task when data is also given
    synthetic_triggers: int = 3  # trigger tokens of the Bigram-Backcopy task
    synthetic_distances: int = 1  # copy rules: trigger k copies the token 1 + (k mod this) places before it
    synthetic_rules: str = "copy,induction,two_hop"  # trigger_recall: trigger k follows rule k mod len (RECALL_RULES)
    synthetic_rate: float = 0.1  # text_recall: share of text positions where a trigger is inserted
    synthetic_pool: int = 32768  # synthetic sequences drawn up front (batches pick from them)
    out: str = "runs/tinylm"
    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 128  # tokens per sequence, BOS included
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int | None = None  # warmup steps (default: 5% of steps)
    min_lr_frac: float = 0.1  # cosine decay to lr·min_lr_frac
    beta2: float = 0.95
    grad_clip: float = 1.0
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int | None = None  # SwiGLU width (default: 8/3·d_model rounded up to 16)
    vocab_size: int = 2048
    variant: str = "softmax"
    seed: int = 0
    eval_every: int = 100
    eval_batch: int = 16  # held-out sequences of seq_len in the fixed evaluation batch
    save_every: int | None = None  # default: eval_every
    device: str = "auto"  # auto: cuda if available, else cpu
    bf16: bool | None = None  # bf16 autocast (default: on for cuda)

    def validate(self) -> TrainConfig:
        check_variant(self.variant)
        check_synthetic(self.synthetic)
        if self.data is None and self.synthetic is None:
            raise SinkscopeError("nothing to train on: pass --data FILE_OR_DIR and/or --synthetic bigram_backcopy")
        if self.data is not None:
            corpus_files(self.data)
        for name in ("steps", "batch_size", "d_model", "layers", "heads", "eval_every", "eval_batch"):
            if getattr(self, name) < 1:
                raise SinkscopeError(f"--{name.replace('_', '-')} must be at least 1")
        if self.seq_len < 4:
            raise SinkscopeError("--seq-len must be at least 4 (BOS plus three tokens)")
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            raise SinkscopeError(f"--d-model {self.d_model} must split into {self.heads} heads of even size")
        if self.lr <= 0 or self.weight_decay < 0:
            raise SinkscopeError("--lr must be positive and --weight-decay non-negative")
        if self.synthetic_pool < 1:
            raise SinkscopeError("the synthetic pool needs at least one sequence")
        if not 1 <= self.synthetic_triggers <= 32:
            raise SinkscopeError("the synthetic task needs between 1 and 32 trigger tokens")
        if not 1 <= self.synthetic_distances <= min(8, self.synthetic_triggers):
            raise SinkscopeError("the synthetic task's copy distances must be between 1 and 8, and at most its "
                                 "number of trigger tokens")
        rules = self.synthetic_rules.split(",")
        if self.synthetic in ("trigger_recall", "text_recall") and (any(r not in RECALL_RULES for r in rules)
                                                   or len(rules) > self.synthetic_triggers):
            raise SinkscopeError(f"synthetic rules {self.synthetic_rules!r}: a comma-separated list of "
                                 f"{', '.join(RECALL_RULES)}, at most one per trigger token")
        if not 0.0 <= self.synthetic_frac <= 1.0:
            raise SinkscopeError("synthetic fraction must be between 0 and 1")
        need, have = self.memory_estimate(), _physical_memory()
        if have is not None and need > have:
            raise SinkscopeError(f"this run needs at least {need / 2**30:,.1f} GiB (weights and optimizer state, one "
                                 f"batch of activations, the synthetic pool) and this machine has {have / 2**30:,.1f} "
                                 "GiB: use a smaller --d-model, --n-layers, --batch-size, --eval-batch or --seq-len")
        return self

    def memory_estimate(self) -> int:
        """A lower bound on the bytes training takes: fp32 weights, gradients and AdamW's two moments (16 bytes a
        parameter), 8 floats per token, layer and hidden unit of the larger of a batch and the evaluation batch, and
        the synthetic pool (int64 tokens). Checked before anything is built, so that absurd sizes fail at once."""
        d = self.d_model
        params = self.layers * (4 * d * d + 3 * d * self.ffn) + max(self.vocab_size, 0) * d
        tokens = max(self.batch_size, self.eval_batch) * self.seq_len
        pool = self.synthetic_pool * self.seq_len if self.synthetic else 0
        return 16 * params + 4 * 8 * tokens * self.layers * d + 8 * pool

    @property
    def ffn(self) -> int:
        return self.intermediate or 16 * math.ceil(8 * self.d_model / 3 / 16)


def _physical_memory() -> int | None:
    """This machine's RAM in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def llama_config(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The transformers config of a run: Llama (RoPE θ = 10⁴, RMSNorm, SwiGLU), tied embeddings, no biases."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.d_model, intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=max(cfg.seq_len, 256), tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02, sinkscope_variant=cfg.variant, use_cache=False,
    )


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised model of the run (deterministic in cfg.seed), with its attention variant."""
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(llama_config(cfg, tokenizer))
    return apply_variant(model, cfg.variant, cfg.seed)


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                    ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load a folder written by `train` (model/ or checkpoint/): the model with its variant, and the tokenizer."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").exists():
        raise SinkscopeError(f"{path} has no config.json: pass a run's model/ or checkpoint/ folder")
    config = LlamaConfig.from_pretrained(path)
    variant = check_variant(getattr(config, "sinkscope_variant", None) or "softmax")
    with quiet():
        if variant == "softmax":
            model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
        else:
            model = apply_variant(LlamaForCausalLM(config), variant)
            missing, unexpected = model.load_state_dict(load_file(path / "model.safetensors"), strict=False)
            if unexpected or set(missing) - {"lm_head.weight"}:
                raise SinkscopeError(f"{path} does not match a {variant} model (missing {missing}, extra {unexpected})")
            model.tie_weights()
            model.to(dtype)
    apply_variant(model, variant)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return model.to(device).eval(), tokenizer


@contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' progress bars and load reports for the duration of the block."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()



def tiny_dir() -> Path:
    """The folder of the shipped `sinkscope-tiny` model inside the installed package."""
    from importlib.resources import files

    return Path(str(files("sinkscope") / "assets" / TINY_DIR_NAME))


def load_tiny(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load the shipped `sinkscope-tiny` decoder (offline, plain transformers Llama + its tokenizer, which adds BOS).

    Its measured sink figures are in `sinks.json` next to it, its recipe in the model card (README.md there).
    """
    path = tiny_dir()
    if not (path / "model.safetensors").exists():
        raise SinkscopeError(f"the shipped model is missing from {path}; reinstall sinkscope")
    with quiet():
        model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model.config._name_or_path = TINY_DIR_NAME
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, info=model_info(model, tokenizer, TINY_DIR_NAME))


def tiny_sinks() -> dict[str, Any]:
    """The shipped model's sink figures as written by scripts/train_tiny.py (sinks.json)."""
    return json.loads((tiny_dir() / "sinks.json").read_text())
