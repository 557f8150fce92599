"""`Trace`: the statistics of one capture run, and `run_capture`, which tokenises prompts and fills it.

Every tensor in a Trace is in prompt coordinates: position 0 is each prompt's first real token (padding removed,
whatever side the tokenizer padded on), and positions at or past `lengths[p]` hold zeros.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from sinkscope.capture.attention import CaptureConfig, LayerRecord, capture_session, pad_to
from sinkscope.capture.hidden import HiddenRecorder, Site
from sinkscope.capture.images import VisionLayout, is_vision, pixel_values, vision_layout
from sinkscope.capture.moments import MOMENT_K_DIMS
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel
from sinkscope.progress import Progress


@dataclass
class Trace:
    """Named statistics of one capture run (shapes: P prompts, L layers, H heads, N = longest prompt)."""

    prompts: list[str]
    input_ids: list[list[int]]
    tokens: list[list[str]]
    lengths: torch.Tensor  # [P]
    key_mass: torch.Tensor  # [P, L, H, N]  α_k: mean attention key k receives from the queries that see it
    key_count: torch.Tensor  # [P, L, N]  number of queries that see key k
    rows: torch.Tensor | None = None  # [P, L, H, S, N]  full rows of the selected queries
    row_positions: torch.Tensor | None = None  # [P, S]
    entropy: torch.Tensor | None = None  # [P, L, H, N]  entropy (nats) of each query's row
    sink_share: torch.Tensor | None = None  # [P, L, H, N]  learned sink logit's share, 1 − row sum
    maps: torch.Tensor | None = None  # [P, L, H, N, N]
    head_outputs: torch.Tensor | None = None  # [P, L, H, N, d_v]
    values: torch.Tensor | None = None  # [P, L, KVH, N, d_v]
    column_index: torch.Tensor | None = None  # [P, L, H, K]  key of each kept column, −1 = none
    columns: torch.Tensor | None = None  # [P, L, H, N, K]  A_ik: attention of query i to the kept key k
    column_values: torch.Tensor | None = None  # [P, L, H, K, d_v]  value vector of each kept column's key
    head_output_norms: torch.Tensor | None = None  # [P, L, H, N]  ‖o_i‖
    value_norms: torch.Tensor | None = None  # [P, L, KVH, N]  ‖v_j‖
    tag_moments: dict[str, torch.Tensor] | None = None  # name → [P, L, H, ...] (CaptureConfig.tag_moments)
    hidden: torch.Tensor | None = None  # [P, S, N, d]  residual stream at the sites `sites`
    hidden_norms: torch.Tensor | None = None  # [P, S, N]  ‖h‖ at the sites (CaptureConfig.hidden_norms)
    hidden_summary: dict[str, torch.Tensor] | None = None  # value/position/dim [P,S,k], median [P,S], first [P,S,d]
    hidden_units: torch.Tensor | None = None  # [S, J, d]  Σ over prompts of h_j/‖h_j‖ (CaptureConfig.hidden_leading)
    hidden_unit_count: torch.Tensor | None = None  # [S, J]  the number of non-zero vectors in that sum
    sites: list[Site] | None = None
    logprobs: torch.Tensor | None = None  # [P, V]  log p(next token) at each prompt's last token
    nll_sum: torch.Tensor | None = None  # [P]  Σ next-token cross-entropy (nats) over each prompt's real tokens
    nll_count: torch.Tensor | None = None  # [P]  the number of next tokens in nll_sum (length − 1)
    info: dict[str, Any] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        """A notebook view: model, shape, what was captured, the first prompt's tokens and a layer × head grid of α at
        position 0 (`report.notebook`)."""
        from sinkscope.report.notebook import trace_html

        return trace_html(self)

    @property
    def key_mass_sum(self) -> torch.Tensor:
        """[P, L, H, N] the attention key k receives summed over the queries that see it (α_k × their number;
        computed when read, so a trace holds one [P, L, H, N] tensor per key statistic, not two)."""
        return self.key_mass * self.key_count[:, :, None]

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    @property
    def n_layers(self) -> int:
        return self.key_mass.shape[1]

    @property
    def n_heads(self) -> int:
        return self.key_mass.shape[2]

    def valid_keys(self) -> torch.Tensor:
        """[P, N] bool: True at real token positions."""
        n = self.key_mass.shape[-1]
        return torch.arange(n)[None, :] < self.lengths[:, None]

    def to_frame(self, kind: str = "keys") -> pd.DataFrame:
        """A tidy table keyed by prompt_id, layer, head, position, token (one row per real token of every prompt,
        layer and head).

        kind: "keys" (key_mass α_k, key_mass_sum, key_count: the per-key statistics detectors read), "queries"
        (entropy of each query's row, and sink_share for learned sink logits), or "last_row" (weight: the last
        token's attention to each key; needs rows="last" at capture).
        """
        columns: dict[str, torch.Tensor]  # name → [P, L, H, N]
        if kind == "keys":
            count = self.key_count[:, :, None].expand_as(self.key_mass)
            columns = {"key_mass": self.key_mass, "key_mass_sum": self.key_mass_sum, "key_count": count}
        elif kind == "queries":
            if self.entropy is None:
                raise SinkscopeError("this trace has no entropies; capture with CaptureConfig(entropy=True)")
            columns = {"entropy": self.entropy}
            if self.sink_share is not None:
                columns["sink_share"] = self.sink_share
        elif kind == "last_row":
            columns = {"weight": self.last_rows()}
        else:
            raise SinkscopeError(f"unknown table '{kind}': use keys, queries or last_row")
        _, n_layers, n_heads, _ = self.key_mass.shape
        frames = []
        for p in range(self.n_prompts):
            n = int(self.lengths[p])
            frame = pd.DataFrame({
                "prompt_id": np.full(n_layers * n_heads * n, p, dtype=np.int64),
                "layer": np.repeat(np.arange(n_layers), n_heads * n),
                "head": np.tile(np.repeat(np.arange(n_heads), n), n_layers),
                "position": np.tile(np.arange(n), n_layers * n_heads),
                "token": np.tile(np.asarray(self.tokens[p], dtype=object), n_layers * n_heads),
            })
            for name, values in columns.items():
                frame[name] = values[p, :, :, :n].float().reshape(-1).numpy()
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def last_rows(self) -> torch.Tensor:
        """[P, L, H, N]: the attention row of each prompt's last token (requires rows='last' at capture)."""
        if self.rows is None or self.row_positions is None:
            raise SinkscopeError("this trace has no attention rows; capture with rows='last'")
        last = self.lengths - 1
        hit = self.row_positions == last[:, None]  # [P, S]
        if not bool(hit.any(-1).all()):
            raise SinkscopeError("the captured rows do not include each prompt's last token")
        idx = hit.float().argmax(-1)
        return self.rows[torch.arange(self.n_prompts), :, :, idx]


PromptsLike = str | Sequence[str] | Sequence[Sequence[int]]


@dataclass
class Continuation:
    """A sequence whose keys and values sit in a KV cache, for captures that continue it (decoding, one token at a
    time): `run_capture(loaded, [new_ids], config, continuation=c)` runs only the new tokens, each query attending to
    every cached key and to the new keys up to itself, and appends them to `c`. The first capture fills an empty one.

    cache: a transformers `DynamicCache` that keeps every key (sliding-window layers see them through their mask),
        updated in place by each pass; ids, tokens: the token ids and strings it holds. A continued Trace is in
        sequence coordinates: its key axis is `ids` (every earlier token plus the new ones), and per-query statistics
        (entropy, sink share) sit at the new tokens' positions, zeros before them.
    """

    cache: Any = field(default_factory=DynamicCache)
    ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


_CONTINUED = ("rows", "entropy", "values", "value_norms", "logprobs", "chunk_size", "fused", "max_map_tokens")
"""The CaptureConfig fields a continued capture supports; any other statistic must stay at its default (off)."""


def _is_ids(prompts: Sequence[Any]) -> bool:
    """True when `prompts` holds token-id sequences rather than texts."""
    first = prompts[0]
    if isinstance(first, torch.Tensor):
        return True
    return isinstance(first, Sequence) and not isinstance(first, str) and all(
        isinstance(i, int) for i in list(first)[:8])


def tokenize(loaded: LoadedModel, prompts: Sequence[str]) -> tuple[list[list[int] | None], list[tuple[int, str]]]:
    """Each prompt's token ids (special tokens as the tokenizer adds them), tokenised once; None for an unusable
    prompt, with (index, reason) for it: empty, or longer than the model's context."""
    if loaded.tokenizer is None:
        if is_vision(loaded):
            raise SinkscopeError(f"{loaded.info.name} is a vision model: it reads images, not text; run `sinkscope "
                                 f"vision --model {loaded.info.name} --images DIR`")
        raise SinkscopeError(f"{loaded.info.name} has no tokenizer: save one beside the model, or pass token ids")
    ids: list[list[int] | None] = []
    bad: list[tuple[int, str]] = []
    limit = loaded.info.max_positions
    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text.strip():
            ids.append(None)
            bad.append((i, "empty prompt"))
            continue
        seq = list(loaded.tokenizer(text)["input_ids"])
        if limit is not None and len(seq) > limit:
            ids.append(None)
            bad.append((i, f"{len(seq)} tokens, more than the model's context of {limit}; shorten it"))
            continue
        ids.append(seq)
    return ids, bad


def validate_prompts(loaded: LoadedModel, prompts: Sequence[str]) -> tuple[list[int], list[tuple[int, str]]]:
    """Split prompts into usable indices and (index, reason) for the unusable ones."""
    ids, bad = tokenize(loaded, prompts)
    return [i for i, seq in enumerate(ids) if seq is not None], bad


def run_capture(
    loaded: LoadedModel,
    prompts: PromptsLike,
    config: CaptureConfig | None = None,
    *,
    batch_size: int = 8,
    padding_side: str | None = None,
    progress: Progress | None = None,
    texts: Sequence[str] | None = None,
    embed_delta: tuple[int, torch.Tensor] | None = None,
    continuation: Continuation | None = None,
) -> Trace:
    """Run the model on prompts in batches under a capture session and return the Trace. The one code path that runs
    a model under capture: every analysis calls it (or takes its Trace).

    prompts: one text, a list of texts (tokenised once, special tokens added as the tokenizer does), or a list of
        token-id sequences used as they are (e.g. a prompt with its BOS removed). `texts` names id prompts (default:
        their decoding). Batches are padded on `padding_side` (default: the tokenizer's); positions count real
        tokens only, so the padding side changes nothing but rounding. Token ids need no tokenizer
        (`loaded.tokenizer` None): padding then uses id 0, and tokens and prompt names are the ids as text.
    embed_delta: (position, δ [d]) adds δ to the input embedding of that prompt position (negative counts from the
        end) in every prompt: the model then runs on `inputs_embeds` = embed(ids) + δ at that position, where embed is
        `model.get_input_embeddings()` (models that scale or add to the embeddings afterwards, e.g. Gemma's √d or
        GPT-2's positions, do so to the shifted vector as well). The perturbation of the over-mixing analysis.
    continuation: continue the sequence held in this KV cache (`Continuation`): one prompt of new token ids (or
        text, tokenised with special tokens); the key mass, rows, entropy, values and logprobs only. The cache and the
        continuation's ids grow by the new tokens; the Trace is in sequence coordinates.
    progress: called as progress("capture", done, total) after each batch (done, total: batches).
    Raises SinkscopeError for an empty prompt list, an empty prompt or a prompt longer than the context
    (use `validate_prompts` first to skip bad prompts instead).
    A vision transformer (`capture.images.is_vision`) takes images instead of prompts: PIL images, image files,
    folders of images or pixel values [P, C, H, W]; its Trace's tokens are "[CLS]", "[REG0]", …, "patch(r,c)", its
    input_ids −1 and `info["image"]` the layout (prefix tokens, patch grid, patch and image size).
    """
    config = config or CaptureConfig()
    if is_vision(loaded):
        return _capture_images(loaded, prompts, config, batch_size, progress)
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise SinkscopeError("no prompts given: pass --prompt TEXT or --prompts FILE with one prompt per line")
    if batch_size < 1:
        raise SinkscopeError("batch size must be at least 1")
    tok = loaded.tokenizer
    if _is_ids(prompts):
        seqs = [[int(i) for i in (s.tolist() if isinstance(s, torch.Tensor) else s)] for s in prompts]
        limit = loaded.info.max_positions
        for i, seq in enumerate(seqs):
            if not seq:
                raise SinkscopeError(f"prompt {i + 1}: an empty token sequence")
            if limit is not None and len(seq) > limit:
                raise SinkscopeError(f"prompt {i + 1}: {len(seq)} tokens, more than the model's context of {limit}")
        names = list(texts) if texts is not None else [_decode(tok, s) for s in seqs]
    else:
        if tok is None:
            raise SinkscopeError(f"{loaded.info.name} has no tokenizer: save one beside the model, or pass token ids")
        ids, bad = tokenize(loaded, prompts)
        if bad:
            i, reason = bad[0]
            raise SinkscopeError(f"prompt {i + 1}: {reason}")
        seqs = [s for s in ids if s is not None]
        names = list(prompts)
    if continuation is not None:
        _check_continuation(loaded, continuation, seqs, config, embed_delta)
    side = padding_side or getattr(tok, "padding_side", None) or "right"
    if side not in ("left", "right"):
        raise SinkscopeError("padding side must be 'left' or 'right'")
    batches = [seqs[i : i + batch_size] for i in range(0, len(seqs), batch_size)]
    parts: list[dict[str, Any]] = []
    for batch in batches:
        parts.append(_capture_batch(loaded, batch, config, side, embed_delta, continuation))
        if progress is not None:
            progress("capture", len(parts), len(batches))
    if continuation is not None and texts is None:
        names = [_decode(tok, continuation.ids)]
    trace = _assemble(loaded, names, parts, config)
    if embed_delta is not None:
        trace.info["embed_delta"] = {"position": int(embed_delta[0]),
                                     "norm": float(torch.linalg.vector_norm(embed_delta[1].float()))}
    return trace


def _check_continuation(loaded: LoadedModel, continuation: Continuation, seqs: list[list[int]],
                        config: CaptureConfig, embed_delta: Any) -> None:
    """A continued capture takes one sequence, fits the context, and asks only for statistics it supports."""
    if len(seqs) != 1:
        raise SinkscopeError(f"a capture that continues a KV cache takes one sequence, not {len(seqs)}")
    limit = loaded.info.max_positions
    if limit is not None and len(continuation) + len(seqs[0]) > limit:
        raise SinkscopeError(f"continuing {len(continuation)} cached tokens by {len(seqs[0])} would pass the model's "
                             f"context of {limit} tokens; generate fewer tokens")
    default = CaptureConfig()
    extra = [name for name, value in vars(config).items() if name not in _CONTINUED and value != getattr(default, name)]
    if embed_delta is not None:
        extra.append("embed_delta")
    if extra:
        raise SinkscopeError("a capture that continues a KV cache collects the key mass, rows, entropy, values and "
                             f"logprobs only; turn off {', '.join(extra)}")


def padding_id(tokenizer: Any) -> int:
    """The id that fills padded positions: the tokenizer's pad, else EOS, else UNK, else 0 (never attended to; also
    without a tokenizer)."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad token id lists into a batch. Returns ids [b, n], attention mask [b, n] (1 at real tokens) and offsets [b]
    (where each sequence starts: 0 with right padding, n − len with left padding)."""
    if side not in ("left", "right"):
        raise SinkscopeError("padding side must be 'left' or 'right'")
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    offsets = torch.zeros(len(seqs), dtype=torch.long)
    for i, seq in enumerate(seqs):
        start = 0 if side == "right" else n - len(seq)
        ids[i, start : start + len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, start : start + len(seq)] = 1
        offsets[i] = start
    return ids, mask, offsets


def forward_inputs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, device: torch.device | str,
                   *, past: int = 0, use_cache: bool = False) -> dict[str, Any]:
    """Keyword arguments for a padded forward pass (ids, mask [b, t]): positions count real tokens only (left padding
    shifts nothing). `past`: the number of cached positions the pass continues (all real); the mask then covers them
    and positions start at `past`. The one convention every forward pass in sinkscope uses."""
    args = forward_args(model)
    if past:
        mask = torch.cat([torch.ones(mask.shape[0], past, dtype=mask.dtype), mask.cpu()], dim=-1)
    inputs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if "position_ids" in args:
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:].to(device)
    if "use_cache" in args:
        inputs["use_cache"] = use_cache
    return inputs


def forward_args(model: torch.nn.Module) -> set[str]:
    """The keyword arguments `model.forward` accepts."""
    return set(inspect.signature(model.forward).parameters)


def logits_only_at(model: torch.nn.Module, inputs: dict[str, Any], last: torch.Tensor | None,
                   device: torch.device | str) -> torch.Tensor | None:
    """Ask for logits only at the positions `last` [b] (padded coordinates; None: only the final position, whose
    logits nobody reads) where the model allows it (`logits_to_keep`). Returns each prompt's index into the returned
    logits' position axis: `last` itself when the model computes every position."""
    if "logits_to_keep" not in forward_args(model):
        return last
    if last is None:
        inputs["logits_to_keep"] = 1
        return None
    keep, at = torch.unique(last, return_inverse=True)  # the distinct last positions; each prompt's among them
    inputs["logits_to_keep"] = keep.to(device)
    return at


def _capture_batch(loaded: LoadedModel, batch: list[list[int]], config: CaptureConfig, side: str,
                   embed_delta: tuple[int, torch.Tensor] | None = None,
                   continuation: Continuation | None = None) -> dict[str, Any]:
    model = loaded.model
    ids, mask, offsets = pad_batch(batch, padding_id(loaded.tokenizer), side)  # [b, n], [b, n], [b]
    past = len(continuation) if continuation is not None else 0
    inputs = forward_inputs(model, ids, mask, loaded.device, past=past, use_cache=continuation is not None)
    last = offsets + mask.sum(-1) - 1  # [b] each prompt's last real token, in the pass's padded coordinates
    if continuation is not None:  # the session sees the whole sequence: the cached tokens, then the new ones
        inputs["cache" if "cache" in forward_args(model) else "past_key_values"] = continuation.cache
        mask = torch.cat([torch.ones(1, past, dtype=mask.dtype), mask], dim=-1)  # [1, past + t]
        ids = torch.cat([torch.tensor(continuation.ids, dtype=torch.long).view(1, past), ids], dim=-1)
    lengths = mask.sum(-1)
    rows = _row_positions(config.rows, offsets, lengths)
    columns = _row_positions(list(config.columns), offsets, lengths) if config.columns is not None else None
    if embed_delta is not None:
        inputs["inputs_embeds"] = shifted_embeddings(model, inputs.pop("input_ids"), offsets, lengths, *embed_delta)
    at = last  # the loss needs the LM head at every position; otherwise it runs only where it is read ([b, n, V]
    if not config.loss:  # logits would cost more than the capture)
        at = logits_only_at(model, inputs, last if config.logprobs else None, loaded.device)
    recorder = HiddenRecorder(model, config.hidden, norms=config.hidden_norms, top=config.hidden_top,
                              leading=config.hidden_leading, real=mask) if config.hidden else None
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if recorder is not None:
            stack.enter_context(recorder)
        session = stack.enter_context(capture_session(model, config, mask, rows, columns))
        output = model(**inputs)
    records = session.records
    if len(records) != loaded.info.n_layers:
        raise SinkscopeError(
            f"captured {len(records)} attention calls for a model with {loaded.info.n_layers} layers: "
            f"{type(model).__name__} does not route all its attention through transformers' AttentionInterface"
        )
    part: dict[str, Any] = {"ids": ids, "offsets": offsets, "lengths": lengths, "rows_at": rows, "records": records}
    if continuation is not None:
        _at_sequence_positions(records, past)
        continuation.ids.extend(batch[0])
        continuation.tokens.extend(_token_strings(loaded.tokenizer, list(batch[0])))
        part["tokens"] = [list(continuation.tokens)]
    if recorder is not None:
        part.update(_recorded(recorder, config))
    if config.logprobs or config.loss:
        logits = getattr(output, "logits", None)
        if logits is None:
            raise SinkscopeError(f"{type(model).__name__} has no language-model head: it gives no next-token "
                                 "log-probabilities")
        if config.logprobs:
            part["logprobs"] = torch.log_softmax(logits[torch.arange(len(batch)), at.to(logits.device)].float(),
                                                 -1).cpu()  # [b, V]
        if config.loss:
            part["nll_sum"], part["nll_count"] = next_token_nll(logits, ids, mask)
    return part


def _recorded(recorder: HiddenRecorder, config: CaptureConfig) -> dict[str, Any]:
    """A batch's residual-stream fields: hidden [b, S, n, d] or hidden_norms [b, S, n], sites, and the reductions."""
    part: dict[str, Any] = {"hidden_norms" if config.hidden_norms else "hidden": recorder.stacked(),
                            "sites": recorder.sites}
    if config.hidden_top:
        part["hidden_summary"] = recorder.summary()
    if config.hidden_leading:
        part["hidden_units"], part["hidden_unit_count"] = recorder.units, recorder.unit_count
    return part


def _capture_images(loaded: LoadedModel, images: Any, config: CaptureConfig, batch_size: int,
                    progress: Progress | None) -> Trace:
    """`run_capture` for a vision transformer: images (see `capture.images.pixel_values`) in batches; every image is
    one sequence of the layout's tokens, with no padding and no token ids (input_ids −1)."""
    if config.logprobs or config.loss:
        raise SinkscopeError(f"{loaded.info.name} is a vision encoder: it has no next-token head (no logprobs or loss)")
    if batch_size < 1:
        raise SinkscopeError("batch size must be at least 1")
    names, pixels = pixel_values(loaded, images)  # [P, C, H, W]
    layout = vision_layout(loaded, pixels.shape[-2], pixels.shape[-1])
    batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
    parts: list[dict[str, Any]] = []
    for batch in batches:
        parts.append(_capture_pixels(loaded, batch, config, layout))
        if progress is not None:
            progress("capture", len(parts), len(batches))
    trace = _assemble(loaded, names, parts, config)
    trace.info["image"] = {**layout.info(), "size": [int(pixels.shape[-2]), int(pixels.shape[-1])]}
    return trace


def _capture_pixels(loaded: LoadedModel, pixels: torch.Tensor, config: CaptureConfig, layout: VisionLayout
                    ) -> dict[str, Any]:
    """One batch of images, pixels [b, C, H, W], under a capture session: the records of every layer in a part as
    `_capture_batch` makes it (every image is `layout.n_tokens` real tokens)."""
    model = loaded.model
    b, n = pixels.shape[0], layout.n_tokens
    mask = torch.ones(b, n, dtype=torch.long)  # [b, n]
    offsets, lengths = torch.zeros(b, dtype=torch.long), torch.full((b,), n)
    rows = _row_positions(config.rows, offsets, lengths)
    columns = _row_positions(list(config.columns), offsets, lengths) if config.columns is not None else None
    recorder = HiddenRecorder(model, config.hidden, norms=config.hidden_norms, top=config.hidden_top,
                              leading=config.hidden_leading, real=mask) if config.hidden else None
    dtype = next(model.parameters()).dtype
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if recorder is not None:
            stack.enter_context(recorder)
        session = stack.enter_context(capture_session(model, config, mask, rows, columns))
        model(pixel_values=pixels.to(loaded.device, dtype))
    records = session.records
    if len(records) != loaded.info.n_layers:
        raise SinkscopeError(
            f"captured {len(records)} attention calls for a model with {loaded.info.n_layers} layers: "
            f"{type(model).__name__} does not route all its attention through transformers' AttentionInterface"
        )
    if records[0].key_mass_sum.shape[-1] != n:
        raise SinkscopeError(f"{type(model).__name__} ran {records[0].key_mass_sum.shape[-1]} tokens per image, not "
                             f"the {n} of its layout ({len(layout.prefix)} + {layout.rows}×{layout.cols} patches); "
                             "this model version is unsupported")
    part: dict[str, Any] = {"ids": torch.full((b, n), -1), "offsets": offsets, "lengths": lengths, "rows_at": rows,
                            "records": records, "tokens": [layout.tokens() for _ in range(b)]}
    if recorder is not None:
        part.update(_recorded(recorder, config))
    return part


def shifted_embeddings(model: torch.nn.Module, ids: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor,
                       position: int, delta: torch.Tensor) -> torch.Tensor:
    """embed(ids) with δ added at one prompt position of every row: ids [b, n] (padded), offsets and lengths [b],
    position in prompt coordinates (negative counts from the end), δ [d] → inputs_embeds [b, n, d]."""
    embed = model.get_input_embeddings()
    if embed is None:
        raise SinkscopeError(f"{type(model).__name__} has no input embeddings to perturb")
    at = lengths + position if position < 0 else torch.full_like(lengths, position)  # [b]
    if bool((at < 0).any() | (at >= lengths).any()):
        raise SinkscopeError(f"cannot perturb position {position}: a prompt has only {int(lengths.min())} tokens")
    with torch.inference_mode():
        x = embed(ids).clone()  # [b, n, d]
        if delta.shape != (x.shape[-1],):
            raise SinkscopeError(f"the embedding perturbation has shape {tuple(delta.shape)}; the model's "
                                 f"embeddings have {x.shape[-1]} dimensions")
        rows = torch.arange(ids.shape[0], device=x.device)
        x[rows, (offsets + at).to(x.device)] += delta.to(device=x.device, dtype=x.dtype)
    return x


def _at_sequence_positions(records: list[LayerRecord], past: int) -> None:
    """Move the per-query statistics of a continued pass ([b, h, t]: the new tokens) to their sequence positions
    ([b, h, past + t], zeros at the cached tokens), where the key axis already is."""
    for record in records:
        for name in ("entropy", "sink_share"):
            value = getattr(record, name)
            if value is not None:
                setattr(record, name, F.pad(value, (past, 0)))


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence, Σ_t −log p(x_{t+1} | x_≤t) over the positions t where x_t and x_{t+1} are both real tokens, in
    float32, and the number of those positions. logits [b, n, V], ids and mask [b, n] → ([b] float32, [b] long)."""
    b, n, vocab = logits.shape
    labels = ids[:, 1:].to(logits.device)
    real = (mask[:, 1:].bool() & mask[:, :-1].bool()).to(logits.device)  # [b, n − 1]
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), labels.reshape(-1), reduction="none")
    nll = torch.where(real, nll.view(b, n - 1), 0.0)
    return nll.sum(-1).cpu(), real.sum(-1).cpu()


def _row_positions(
    rows: str | Sequence[int] | None, offsets: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor | None:
    """Selected query positions in padded coordinates. Returns [b, s] or None."""
    if rows is None:
        return None
    if rows == "last":
        return (offsets + lengths - 1)[:, None]
    picks = torch.tensor(list(rows), dtype=torch.long)
    if picks.numel() == 0:
        return None
    resolved = torch.where(picks[None, :] < 0, lengths[:, None] + picks[None, :], picks[None, :])
    if bool((resolved < 0).any() | (resolved >= lengths[:, None]).any()):
        raise SinkscopeError(f"row positions {list(rows)} fall outside a prompt of {int(lengths.min())} tokens")
    return offsets[:, None] + resolved


def _left_align(x: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Shift each prompt's real tokens to position 0 along `dims` (x's dim 0 is the prompt) and zero the rest."""
    n = x.shape[dims[0]]
    if not bool(offsets.any()) and bool((lengths == n).all()):  # no padding: nothing to move (and no copy)
        return x
    idx = torch.arange(n)[None, :] + offsets[:, None]  # [b, n]
    keep = torch.arange(n)[None, :] < lengths[:, None]
    idx = idx.clamp(max=n - 1)
    for dim in dims:
        shape = [x.shape[0]] + [1] * (x.dim() - 1)
        shape[dim] = n
        gather_idx = idx.view(shape).expand(*[x.shape[i] if i != dim else n for i in range(x.dim())])
        x = torch.gather(x, dim, gather_idx) * keep.view(shape).to(x.dtype)
    return x


# Trace field → the dims (after stacking layers as dim 1) that index token positions.
_TOKEN_DIMS: dict[str, list[int]] = {
    "key_mass_sum": [3], "key_count": [2], "rows": [4], "entropy": [3], "sink_share": [3], "maps": [3, 4],
    "head_outputs": [3], "values": [3], "columns": [3], "head_output_norms": [3], "value_norms": [3],
}


# Trace field → its dim (from the end) that indexes the kept columns, which differ in number between layers/batches.
_K_DIM: dict[str, int] = {"columns": -1, "column_index": -1, "column_values": -2}


def _stack(records: list[LayerRecord], name: str) -> torch.Tensor | None:
    values = [getattr(r, name) for r in records]
    if values[0] is None:
        return None
    if name in _K_DIM:  # the number of kept columns differs between layers
        k = max(v.shape[_K_DIM[name]] for v in values)
        fill = -1 if name == "column_index" else 0.0
        values = [pad_to(v, k, [v.dim() + _K_DIM[name]], value=fill) for v in values]
    return torch.stack([v.cpu() for v in values], dim=1)  # layer becomes dim 1


def _pad_moments(moments: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Zero-pad every candidate dim of the tag moments (`MOMENT_K_DIMS`) to k candidates."""
    return {name: pad_to(x, k, [d % x.dim() for d in MOMENT_K_DIMS[name]]) for name, x in moments.items()}


def _stack_moments(records: list[LayerRecord]) -> dict[str, torch.Tensor] | None:
    """Per-layer tag moments [b, H, ...] → [b, L, H, ...], candidates padded to the layers' largest K."""
    if records[0].tag_moments is None:
        return None
    k = max(r.tag_moments["values"].shape[-2] for r in records)  # type: ignore[index]
    layers = [_pad_moments(r.tag_moments, k) for r in records]  # type: ignore[arg-type]
    return {name: torch.stack([m[name].cpu() for m in layers], dim=1) for name in layers[0]}


def _assemble(loaded: LoadedModel, prompts: list[str], parts: list[dict[str, Any]], config: CaptureConfig) -> Trace:
    n_max = max(int(p["lengths"].max()) for p in parts)
    fields: dict[str, list[torch.Tensor]] = {}
    moment_parts: list[dict[str, torch.Tensor]] = []
    ids: list[list[int]] = []
    for part in parts:
        off, lens = part["offsets"], part["lengths"]
        stacked = {name: _stack(part["records"], name) for name in _TOKEN_DIMS}
        index = _stack(part["records"], "column_index")  # [b, L, H, K] padded coordinates
        column_values = _stack(part["records"], "column_values")  # [b, L, H, K, d_v]
        moments = _stack_moments(part["records"])
        part["records"] = None  # the per-layer tensors are stacked: free them before aligning
        aligned: dict[str, torch.Tensor] = {}
        for name, dims in _TOKEN_DIMS.items():
            if stacked.get(name) is not None:
                aligned[name] = pad_to(_left_align(stacked[name], off, lens, dims), n_max, dims)
        if part["rows_at"] is not None:
            aligned["row_positions"] = part["rows_at"] - off[:, None]
        if index is not None:
            shift = off.view(-1, 1, 1, 1)
            aligned["column_index"] = torch.where(index >= 0, index - shift, -1)
        if column_values is not None:
            aligned["column_values"] = column_values
        for name in ("hidden", "hidden_norms"):
            if name in part:
                aligned[name] = pad_to(_left_align(part[name], off, lens, [2]), n_max, [2])
        for name in ("logprobs", "nll_sum", "nll_count"):
            if name in part:
                aligned[name] = part[name]
        for name, tensor in aligned.items():
            fields.setdefault(name, []).append(tensor)
        if moments is not None:
            moment_parts.append(moments)
        for row, o, n in zip(part["ids"].tolist(), off.tolist(), lens.tolist(), strict=True):
            ids.append(row[o : o + n])
    for name, dim in _K_DIM.items():  # batches may keep different numbers of columns
        if name in fields:
            k = max(x.shape[dim] for x in fields[name])
            fields[name] = [pad_to(x, k, [x.dim() + dim], value=-1 if name == "column_index" else 0.0)
                            for x in fields[name]]
    merged = {name: parts_[0] if len(parts_) == 1 else torch.cat(parts_, dim=0) for name, parts_ in fields.items()}
    summaries = [p["hidden_summary"] for p in parts if "hidden_summary" in p]
    hidden_summary = {k: torch.cat([s[k] for s in summaries]) for k in summaries[0]} if summaries else None
    leading = [p for p in parts if "hidden_units" in p]
    tag_moments = None
    if moment_parts:
        k = max(m["values"].shape[-2] for m in moment_parts)
        padded = [_pad_moments(m, k) for m in moment_parts]
        tag_moments = {name: torch.cat([m[name] for m in padded]) for name in padded[0]}
    # α = the sums over the queries' count, divided in place: the trace keeps α and the counts, not the sums
    key_mass = merged.pop("key_mass_sum").div_(merged["key_count"][:, :, None].clamp(min=1))
    given = [t for p in parts for t in p.get("tokens", [None] * len(p["lengths"]))]
    tokens = [t if t is not None else _token_strings(loaded.tokenizer, row) for t, row in zip(given, ids, strict=True)]
    info = {
        "model": loaded.info.name,
        "model_type": loaded.info.model_type,
        "dtype": loaded.info.dtype,
        "revision": loaded.info.revision,
        "adds_bos": loaded.info.adds_bos,
        "attention": "sinkscope (statistics recomputed in float32 query chunks)",
        "capture": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
    }
    return Trace(
        prompts=prompts,
        input_ids=ids,
        tokens=tokens,
        lengths=torch.tensor([len(r) for r in ids]),
        key_mass=key_mass,
        key_count=merged["key_count"],
        rows=merged.get("rows"),
        row_positions=merged.get("row_positions"),
        entropy=merged.get("entropy"),
        sink_share=merged.get("sink_share"),
        maps=merged.get("maps"),
        head_outputs=merged.get("head_outputs"),
        values=merged.get("values"),
        column_index=merged.get("column_index"),
        columns=merged.get("columns"),
        column_values=merged.get("column_values"),
        head_output_norms=merged.get("head_output_norms"),
        value_norms=merged.get("value_norms"),
        tag_moments=tag_moments,
        hidden_summary=hidden_summary,
        hidden_units=sum(p["hidden_units"] for p in leading) if leading else None,
        hidden_unit_count=sum(p["hidden_unit_count"] for p in leading) if leading else None,
        hidden=merged.get("hidden"),
        hidden_norms=merged.get("hidden_norms"),
        sites=parts[0].get("sites"),
        logprobs=merged.get("logprobs"),
        nll_sum=merged.get("nll_sum"),
        nll_count=merged.get("nll_count"),
        info=info,
    )


def _token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Readable per-token strings: each id decoded on its own (byte-level marks like 'Ġ' become spaces); the ids
    as text without a tokenizer."""
    if tokenizer is None:
        return [str(i) for i in ids]
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    """A prompt's text: its decoding, or its ids separated by spaces without a tokenizer."""
    return " ".join(map(str, ids)) if tokenizer is None else tokenizer.decode(ids)
