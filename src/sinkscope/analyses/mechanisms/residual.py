"""The residual stream at every "half layer" and full block, captured in the same forward pass as attention.

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

Other families (encoders, OPT, …) are refused with a `SinkscopeError`; their half layer is not in a known place.
The block sites are the decoder layers' outputs; the ``embed`` site is block 0's input. They equal
``output_hidden_states`` except for the last block, which transformers reports after the final norm.

`capture_ids` runs token-id sequences (right-padded, so padded and prompt coordinates agree) under a
`sinkscope.capture.attention.capture_session` and these hooks at once, and returns a `MechTrace`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from sinkscope.capture import CaptureConfig, Intervention, Trace, capture_session, intervene, pad_to
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel

# model_type → how to read the residual stream after attention ("norm:<child>" = that child's input; "attn+resid")
_HALF_SITE: dict[str, str] = {
    **{t: "norm:post_attention_layernorm" for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gpt_oss", "granite",
        "smollm3", "olmo", "starcoder2")},
    **{t: "norm:pre_feedforward_layernorm" for t in ("gemma2", "gemma3", "gemma3_text")},
    "gpt2": "norm:ln_2",
    "gpt_neox": "attn+resid:attention",
}
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "layers", "h", "model.decoder.layers",
                "encoder.layer")

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


class HiddenRecorder:
    """Forward hooks that record the residual stream at every `Site`, for every forward pass inside the block.

    `forwards[f]` is a list of 2L + 1 tensors [batch, n, d] (float32, on the CPU) in `sites_for` order.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.layers = decoder_layers(model)
        self.rule = half_site_rule(model)
        self.sites = sites_for(len(self.layers))
        self.forwards: list[list[torch.Tensor | None]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inputs: dict[int, torch.Tensor] = {}

    def _slot(self, index: int, value: torch.Tensor) -> None:
        if index == 0:  # the embedding site opens a new forward pass
            self.forwards.append([None] * len(self.sites))
        self.forwards[-1][index] = value.detach().float().cpu().clone()

    def __enter__(self) -> HiddenRecorder:
        kind, child = self.rule.split(":", 1)
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_input(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._block_output(i)))
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
            self._inputs[i] = x
            if i == 0:
                self._slot(0, x)
        return hook

    def _norm_input(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            self._slot(2 * i + 1, args[0])
        return hook

    def _attn_plus_residual(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._slot(2 * i + 1, self._inputs[i] + _first_tensor(output))
        return hook

    def _block_output(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._slot(2 * i + 2, _first_tensor(output))
        return hook

    def stacked(self, forward: int = -1) -> torch.Tensor:
        """[batch, site, n, d] for one recorded forward pass."""
        slots = self.forwards[forward]
        if any(s is None for s in slots):
            missing = [self.sites[k] for k, s in enumerate(slots) if s is None][:3]
            raise SinkscopeError(f"the residual-stream hooks missed {missing}: the model's blocks did not run as "
                                 "expected")
        return torch.stack(slots, dim=1)  # type: ignore[arg-type]


@dataclass
class SinkColumnProbe(Intervention):
    """A read-only probe on the attention probabilities: records A_{i,s} for key `position` s at every query i.

    It returns the probabilities unchanged (it rides the intervention hook of the sinkscope attention function, so
    the layer's output is computed as A·V in float32 instead of by SDPA: equal to ~1e-6). `columns[layer]` holds
    one [batch, head, query] tensor per forward pass.
    """

    position: int = 0
    columns: dict[int | None, list[torch.Tensor]] = field(default_factory=dict, repr=False)

    def change(self, probs: torch.Tensor, layer: int | None, visible: torch.Tensor) -> torch.Tensor:
        self.columns.setdefault(layer, []).append(probs[..., self.position].detach().float().cpu().clone())
        return probs


@dataclass
class MechTrace:
    """Attention statistics plus the residual stream of one capture (P prompts, S = 2L + 1 sites, N, d)."""

    trace: Trace  # key_mass [P, L, H, N] etc., in prompt coordinates (right padding: position 0 = first token)
    hidden: torch.Tensor  # [P, S, N, d]  residual stream; zeros past each prompt's length
    sites: list[Site]
    sink_column: torch.Tensor | None = None  # [P, L, H, N]  A_{i,s}: attention of query i to the sink key s

    @property
    def lengths(self) -> torch.Tensor:
        return self.trace.lengths

    def valid(self) -> torch.Tensor:
        """[P, N] bool: real token positions."""
        return self.trace.valid_keys()


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each id decoded on its own (byte-level marks become spaces); special tokens kept."""
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def _forward_args(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


@contextmanager
def _maybe_intervene(model: transformers.PreTrainedModel, interventions: Sequence[Intervention]) -> Iterator[None]:
    if interventions:
        with intervene(model, *interventions):
            yield
    else:
        yield


def capture_ids(
    loaded: LoadedModel,
    ids: Sequence[Sequence[int]],
    config: CaptureConfig | None = None,
    *,
    interventions: Sequence[Intervention] = (),
    sink_position: int | None = None,
    hidden: bool = True,
    batch_size: int = 8,
    prompts: Sequence[str] | None = None,
) -> MechTrace:
    """Run token-id sequences through the model under attention capture and the residual-stream hooks at once.

    ids: one list of token ids per prompt (special tokens already in place). Batches are right-padded, so every
        tensor is in prompt coordinates. `interventions` (e.g. `AblateHeads`) apply to every forward pass;
        `sink_position` adds a `SinkColumnProbe` that records A_{i,s} for that key.
    Returns a `MechTrace`; `hidden` is an empty tensor when `hidden=False`.
    """
    config = config or CaptureConfig(rows=None, entropy=False, fused=False)
    seqs = [list(map(int, s)) for s in ids]
    if not seqs or any(len(s) == 0 for s in seqs):
        raise SinkscopeError("capture_ids needs at least one non-empty token sequence")
    if batch_size < 1:
        raise SinkscopeError("batch size must be at least 1")
    model, tok = loaded.model, loaded.tokenizer
    pad_id = getattr(tok, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    args = _forward_args(model)
    n_max = max(len(s) for s in seqs)
    n_layers = loaded.info.n_layers
    stats: dict[str, list[torch.Tensor]] = {}
    hiddens: list[torch.Tensor] = []
    columns: list[torch.Tensor] = []
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start : start + batch_size]
        n = max(len(s) for s in batch)
        input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), n, dtype=torch.long)
        for b, s in enumerate(batch):
            input_ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1
        inputs: dict[str, Any] = {"input_ids": input_ids.to(loaded.device), "attention_mask": mask.to(loaded.device)}
        if "position_ids" in args:
            inputs["position_ids"] = torch.arange(n).expand(len(batch), n).to(loaded.device)
        if "use_cache" in args:
            inputs["use_cache"] = False
        probe = SinkColumnProbe(position=sink_position) if sink_position is not None else None
        active = [*interventions, *([probe] if probe is not None else [])]
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            recorder = stack.enter_context(HiddenRecorder(model)) if hidden else None
            stack.enter_context(_maybe_intervene(model, active))
            session = stack.enter_context(capture_session(model, config, mask))
            model(**inputs)
        records = session.records
        if len(records) != n_layers:
            raise SinkscopeError(f"captured {len(records)} attention calls for a model with {n_layers} layers: "
                                 f"{type(model).__name__} does not route all its attention through the "
                                 "AttentionInterface")
        for name in ("key_mass_sum", "key_count", "maps", "head_outputs", "values"):
            values = [getattr(r, name) for r in records]
            if values[0] is None:
                continue
            stacked = torch.stack([v.float().cpu() for v in values], dim=1)  # layer becomes dim 1
            dims = {"key_mass_sum": [3], "key_count": [2], "maps": [3, 4], "head_outputs": [3], "values": [3]}[name]
            stats.setdefault(name, []).append(pad_to(stacked, n_max, dims))
        if recorder is not None:
            hiddens.append(pad_to(recorder.stacked(), n_max, [2]))  # [b, S, n_max, d]
        if probe is not None:
            per_layer = [probe.columns[layer][0] for layer in range(n_layers)]  # each [b, h, q]
            columns.append(pad_to(torch.stack(per_layer, dim=1), n_max, [3]))  # [b, L, H, n_max]
    merged = {name: torch.cat(parts, dim=0) for name, parts in stats.items()}
    lengths = torch.tensor([len(s) for s in seqs])
    valid = torch.arange(n_max)[None, :] < lengths[:, None]  # [P, N]
    key_mass = merged["key_mass_sum"] / merged["key_count"][:, :, None].clamp(min=1)
    key_mass = key_mass * valid[:, None, None, :]
    trace = Trace(
        prompts=list(prompts) if prompts is not None else [tok.decode(s) for s in seqs],
        input_ids=seqs,
        tokens=[token_strings(tok, s) for s in seqs],
        lengths=lengths,
        key_mass=key_mass,
        key_mass_sum=merged["key_mass_sum"],
        key_count=merged["key_count"],
        maps=merged.get("maps"),
        head_outputs=merged.get("head_outputs"),
        values=merged.get("values"),
        info={"model": loaded.info.name, "model_type": loaded.info.model_type, "padding": "right",
              "capture": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()}},
    )
    hidden_all = torch.cat(hiddens, dim=0) * valid[:, None, :, None] if hiddens else torch.empty(0)
    sites = sites_for(n_layers)
    column = torch.cat(columns, dim=0) * valid[:, None, None, :] if columns else None
    return MechTrace(trace=trace, hidden=hidden_all, sites=sites, sink_column=column)
