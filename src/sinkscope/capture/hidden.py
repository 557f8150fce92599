"""Residual-stream sites: the hidden state at every "half layer" and full block, read in the capture pass.

Sites. For a decoder of L blocks the residual stream is read at 2L + 1 sites (seed 001, Figs. 2-3):

- ``embed``  (layer −1, depth 0): the input of block 0 (token + position embeddings, as the first block sees it);
- ``attn``   (layer l, depth l + ½): h + Attn_l(…) — after block l's attention and its residual add, before the MLP;
- ``block``  (layer l, depth l + 1): the output of block l (after the MLP's residual add).

How the ``attn`` site is read, per family (forward hooks on the decoder layer's submodules, nothing is patched):

- Llama-like pre-norm blocks (llama incl. SmolLM2, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe, phi3,
  gpt_oss, granite, smollm3, olmo, starcoder2): the input of ``post_attention_layernorm`` (= residual + attention
  output), via a forward pre-hook;
- Gemma 2/3 (gemma2, gemma3, gemma3_text; sandwich norms): the input of ``pre_feedforward_layernorm`` — their
  ``post_attention_layernorm`` normalises the attention output *before* the residual add;
- GPT-2 (gpt2): the input of ``ln_2``;
- GPT-NeoX (gpt_neox): block input + the output of ``attention`` (with the parallel residual the MLP reads the
  block input, so the half layer is defined as x + Attn(LN(x))).

- vision transformers: the input of ``layernorm_after`` (ViT, DeiT), ``norm2`` (DINOv2, after its layer scale) or
  ``layer_norm2`` (CLIP and SigLIP vision towers).

Other families (text encoders, OPT, …) are refused with a `SinkscopeError`; their half layer is not in a known place.
The block sites are the decoder layers' outputs; the ``embed`` site is block 0's input. They equal
``output_hidden_states`` except for the last block, which transformers reports after the final norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sinkscope.errors import SinkscopeError

# model_type → how to read the residual stream after attention ("norm:<child>" = that child's input; "attn+resid")
_HALF_SITE: dict[str, str] = {
    **{t: "norm:post_attention_layernorm" for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gpt_oss", "granite",
        "smollm3", "olmo", "starcoder2")},
    **{t: "norm:pre_feedforward_layernorm" for t in ("gemma2", "gemma3", "gemma3_text")},
    "gpt2": "norm:ln_2",
    "gpt_neox": "attn+resid:attention",
    **{t: "norm:layernorm_after" for t in ("vit", "deit")},  # vision transformers: pre-norm blocks as well
    **{t: "norm:norm2" for t in ("dinov2", "dinov2_with_registers")},  # (after DINOv2's layer scale)
    **{t: "norm:layer_norm2" for t in ("clip_vision_model", "siglip_vision_model")},
}
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "layers", "h", "model.decoder.layers",
                "encoder.layer", "encoder.layers", "vision_model.encoder.layers")

SUBLAYERS = ("embed", "attn", "block")


@dataclass(frozen=True)
class Site:
    """Where the residual stream is read: layer (−1 for the embeddings), sublayer, depth (0, l + ½, l + 1)."""

    layer: int
    sublayer: str
    depth: float


def sites_for(n_layers: int) -> list[Site]:
    """The 2L + 1 sites in forward order: embed, attn 0, block 0, attn 1, block 1, …"""
    out = [Site(-1, "embed", 0.0)]
    for layer in range(n_layers):
        out += [Site(layer, "attn", layer + 0.5), Site(layer, "block", layer + 1.0)]
    return out


def _model_type(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    config = get() if callable(get) else config
    return str(getattr(config, "model_type", type(model).__name__))


def _get_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of transformer blocks (model.model.layers, transformer.h, gpt_neox.layers, encoder.layer, …)."""
    for root in (model, getattr(model, "base_model", None)):
        if root is None:
            continue
        for path in _LAYER_PATHS:
            found = _get_path(root, path)
            if isinstance(found, torch.nn.ModuleList) and len(found) > 0:
                return found
    raise SinkscopeError(f"cannot find the transformer blocks of {type(model).__name__} "
                         f"(looked for {', '.join(_LAYER_PATHS)})")


def half_site_rule(model: torch.nn.Module) -> str:
    """How this model's residual stream after attention is read; SinkscopeError for unsupported families."""
    model_type = _model_type(model)
    rule = _HALF_SITE.get(model_type)
    if rule is None:
        supported = ", ".join(sorted(_HALF_SITE))
        raise SinkscopeError(
            f"sinkscope mechanisms does not know where the residual stream after attention is in '{model_type}' "
            f"models; supported model types: {supported}"
        )
    layer = decoder_layers(model)[0]
    child = rule.split(":", 1)[1]
    if not isinstance(getattr(layer, child, None), torch.nn.Module):
        raise SinkscopeError(f"{type(layer).__name__} has no submodule '{child}' where sinkscope expects the "
                             f"residual stream after attention ({model_type}); this model version is unsupported")
    return rule


def _first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple | list) else value


def hidden_summary(h: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """What the massive-activation analyses read from one prompt's hidden state at one site, h [n, d] (real tokens):
    the `top_k` largest |h_jc| as signed `value` [k], `position` [k] and `dim` [k] (largest first), the `median`
    |h| over all n·d entries (torch's lower median), and `first`, the first token's vector [d]. k = min(top_k, n·d);
    the rest of [top_k] is NaN / −1."""
    a = h.abs().flatten()
    k = min(top_k, a.numel())
    _, idx = a.topk(k)
    value = torch.full((top_k,), float("nan"))
    position = torch.full((top_k,), -1, dtype=torch.long)
    dim = torch.full((top_k,), -1, dtype=torch.long)
    value[:k] = h.flatten()[idx].cpu()
    position[:k] = (idx // h.shape[-1]).cpu()
    dim[:k] = (idx % h.shape[-1]).cpu()
    return {"value": value, "position": position, "dim": dim, "median": a.median().cpu(), "first": h[0].cpu()}


def unit_sum(h: torch.Tensor, leading: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ of h_j / ‖h_j‖ over j < leading for one prompt, h [n, d] (real tokens): (units [leading, d], count
    [leading] — 1 where a non-zero vector was added). Summed over prompts, they give the mean pairwise cosine
    across prompts at each position ((‖Σu‖² − c) / (c(c − 1)))."""
    j = min(leading, h.shape[0])
    x = h[:j].double()
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    ok = norm > 0
    units = torch.zeros(leading, h.shape[-1], dtype=torch.float64)
    count = torch.zeros(leading, dtype=torch.float64)
    units[:j] = torch.where(ok, x / norm.clamp(min=1e-30), 0.0).cpu()
    count[:j] = ok[:, 0].double().cpu()
    return units, count


class HiddenRecorder:
    """Forward hooks that record the residual stream at the requested `Site`s, for every forward pass inside the
    block. Used by `run_capture` (CaptureConfig.hidden); nothing else installs hooks on a model.

    sublayers: which of "embed", "attn", "block" to read ("attn" needs a family whose half-layer site is known).
    `forwards[f]` is a list of tensors [batch, n, d] (float32, on the CPU) in `sites` order ([batch, n] norms with
    `norms=True`). With `real` ([batch, n] bool, the real tokens of the batch), each site is also reduced as it is
    read: `top` > 0 keeps `hidden_summary` per prompt (`summary()`), `leading` > 0 adds `unit_sum` over the
    prompts (`units`, `unit_count`: [S, leading, d], [S, leading]).
    """

    def __init__(self, model: torch.nn.Module, sublayers: Sequence[str] = SUBLAYERS, norms: bool = False, *,
                 top: int = 0, leading: int = 0, real: torch.Tensor | None = None) -> None:
        if (top or leading) and real is None:
            raise SinkscopeError("reducing the residual stream needs the batch's real-token mask")
        self.model = model
        self.layers = decoder_layers(model)
        self.rule = half_site_rule(model) if "attn" in sublayers else None
        self.sites = [s for s in sites_for(len(self.layers)) if s.sublayer in sublayers]
        self._slot_of = {(s.layer, s.sublayer): k for k, s in enumerate(self.sites)}
        self.norms = norms  # keep ‖h‖ per position [batch, n] instead of the vectors [batch, n, d]
        self.forwards: list[list[torch.Tensor | None]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inputs: dict[int, torch.Tensor] = {}
        self.top, self.leading = top, leading
        self._keeps_input = self.rule is not None and self.rule.startswith("attn+resid")
        self.real = real.bool().cpu() if real is not None else None
        self._summaries: list[dict[str, torch.Tensor] | None] = [None] * len(self.sites)
        self.units = torch.zeros(len(self.sites), leading, 0, dtype=torch.float64)
        self.unit_count = torch.zeros(len(self.sites), leading, dtype=torch.float64)

    def _slot(self, layer: int, sublayer: str, value: torch.Tensor) -> None:
        index = self._slot_of.get((layer, sublayer))
        if index is None:
            return
        value = value.detach().float()  # [b, n, d]
        if self.top or self.leading:
            self._reduce(index, value)
        self.forwards[-1][index] = value.norm(dim=-1).cpu() if self.norms else value.cpu().clone()

    def _reduce(self, index: int, value: torch.Tensor) -> None:
        """The per-prompt summaries and the cross-prompt unit sums of one site (value [b, n, d])."""
        assert self.real is not None
        per_prompt = []
        for p in range(value.shape[0]):
            h = value[p, self.real[p].to(value.device)]  # [n_p, d] the prompt's real tokens
            if self.top:
                per_prompt.append(hidden_summary(h, self.top))
            if self.leading:
                units, count = unit_sum(h, self.leading)
                if self.units.shape[-1] == 0:
                    self.units = torch.zeros(len(self.sites), self.leading, units.shape[-1], dtype=torch.float64)
                self.units[index] += units
                self.unit_count[index] += count
        if self.top:
            self._summaries[index] = {k: torch.stack([s[k] for s in per_prompt]) for k in per_prompt[0]}

    def summary(self) -> dict[str, torch.Tensor]:
        """The last forward pass's `hidden_summary` per prompt and site: value, position, dim [b, S, k], median
        [b, S], first [b, S, d]."""
        if any(s is None for s in self._summaries):
            raise SinkscopeError("the residual-stream hooks missed a site: the model's blocks did not run as expected")
        return {k: torch.stack([s[k] for s in self._summaries], dim=1)  # type: ignore[index]
                for k in self._summaries[0]}  # type: ignore[union-attr]

    def __enter__(self) -> HiddenRecorder:
        kind, child = self.rule.split(":", 1) if self.rule is not None else ("", "")
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_input(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._block_output(i)))
            if not child:
                continue
            sub = getattr(layer, child)
            if kind == "norm":
                self._handles.append(sub.register_forward_pre_hook(self._norm_input(i)))
            else:
                self._handles.append(sub.register_forward_hook(self._attn_plus_residual(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()

    def _layer_input(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["hidden_states"]  # [b, n, d]
            if self._keeps_input:  # only the attn + residual rule reads it (and frees it when it has)
                self._inputs[i] = x
            if i == 0:  # the first block's input opens a new forward pass
                self.forwards.append([None] * len(self.sites))
                self._slot(-1, "embed", x)
        return hook

    def _norm_input(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            self._slot(i, "attn", args[0])
        return hook

    def _attn_plus_residual(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._slot(i, "attn", self._inputs.pop(i) + _first_tensor(output))
        return hook

    def _block_output(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._slot(i, "block", _first_tensor(output))
        return hook

    def stacked(self, forward: int = -1) -> torch.Tensor:
        """[batch, site, n, d] for one recorded forward pass."""
        slots = self.forwards[forward]
        if any(s is None for s in slots):
            missing = [self.sites[k] for k, s in enumerate(slots) if s is None][:3]
            raise SinkscopeError(f"the residual-stream hooks missed {missing}: the model's blocks did not run as "
                                 "expected")
        return torch.stack(slots, dim=1)  # type: ignore[arg-type]
