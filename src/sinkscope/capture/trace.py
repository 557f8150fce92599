"""`Trace`: the statistics of one capture run, and `run_capture`, which tokenises prompts and fills it.

Every tensor in a Trace is in prompt coordinates: position 0 is each prompt's first real token (padding removed,
whatever side the tokenizer padded on), and positions at or past `lengths[p]` hold zeros.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sinkscope.capture.attention import CaptureConfig, LayerRecord, capture_session, pad_to
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel


@dataclass
class Trace:
    """Named statistics of one capture run (shapes: P prompts, L layers, H heads, N = longest prompt)."""

    prompts: list[str]
    input_ids: list[list[int]]
    tokens: list[list[str]]
    lengths: torch.Tensor  # [P]
    key_mass: torch.Tensor  # [P, L, H, N]  α_k: mean attention key k receives from the queries that see it
    key_mass_sum: torch.Tensor  # [P, L, H, N]  the same, summed instead of averaged
    key_count: torch.Tensor  # [P, L, N]  number of queries that see key k
    rows: torch.Tensor | None = None  # [P, L, H, S, N]  full rows of the selected queries
    row_positions: torch.Tensor | None = None  # [P, S]
    entropy: torch.Tensor | None = None  # [P, L, H, N]  entropy (nats) of each query's row
    sink_share: torch.Tensor | None = None  # [P, L, H, N]  learned sink logit's share, 1 − row sum
    maps: torch.Tensor | None = None  # [P, L, H, N, N]
    head_outputs: torch.Tensor | None = None  # [P, L, H, N, d_v]
    values: torch.Tensor | None = None  # [P, L, KVH, N, d_v]
    info: dict[str, Any] = field(default_factory=dict)

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


def validate_prompts(loaded: LoadedModel, prompts: Sequence[str]) -> tuple[list[int], list[tuple[int, str]]]:
    """Split prompts into usable indices and (index, reason) for the unusable ones."""
    good: list[int] = []
    bad: list[tuple[int, str]] = []
    limit = loaded.info.max_positions
    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text.strip():
            bad.append((i, "empty prompt"))
            continue
        n = len(loaded.tokenizer(text)["input_ids"])
        if limit is not None and n > limit:
            bad.append((i, f"{n} tokens, more than the model's context of {limit}; shorten it"))
            continue
        good.append(i)
    return good, bad


def run_capture(
    loaded: LoadedModel,
    prompts: Sequence[str],
    config: CaptureConfig | None = None,
    *,
    batch_size: int = 8,
    padding_side: str | None = None,
    progress: bool = False,
) -> Trace:
    """Tokenise `prompts`, run the model in batches under a capture session, and return the Trace.

    Raises SinkscopeError for an empty prompt list, an empty prompt or a prompt longer than the context
    (use `validate_prompts` first to skip bad prompts instead).
    """
    config = config or CaptureConfig()
    prompts = list(prompts)
    if not prompts:
        raise SinkscopeError("no prompts given: pass --prompt TEXT or --prompts FILE with one prompt per line")
    _, bad = validate_prompts(loaded, prompts)
    if bad:
        i, reason = bad[0]
        raise SinkscopeError(f"prompt {i + 1}: {reason}")
    if batch_size < 1:
        raise SinkscopeError("batch size must be at least 1")
    tok = loaded.tokenizer
    if padding_side is not None:
        if padding_side not in ("left", "right"):
            raise SinkscopeError("padding side must be 'left' or 'right'")
        tok.padding_side = padding_side
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    parts: list[dict[str, Any]] = []
    iterator: Any = batches
    if progress and len(batches) > 1:
        from rich.progress import track

        iterator = track(batches, description="capturing", transient=True)
    for batch in iterator:
        parts.append(_capture_batch(loaded, batch, config))
    return _assemble(loaded, prompts, parts, config)


def _capture_batch(loaded: LoadedModel, batch: list[str], config: CaptureConfig) -> dict[str, Any]:
    model, tok = loaded.model, loaded.tokenizer
    enc = tok(batch, return_tensors="pt", padding=True)
    mask = enc["attention_mask"]  # [b, n]
    lengths = mask.sum(-1)
    offsets = (mask.cumsum(-1) == 0).sum(-1)  # left-padding offset of each prompt  [b]
    rows = _row_positions(config.rows, offsets, lengths)
    inputs = {k: v.to(loaded.device) for k, v in enc.items() if k in _forward_args(model)}
    if "position_ids" in _forward_args(model):
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(loaded.device)
    if "use_cache" in _forward_args(model):
        inputs["use_cache"] = False
    with torch.inference_mode(), capture_session(model, config, mask, rows) as session:
        model(**inputs)
    records = session.records
    if len(records) != loaded.info.n_layers:
        raise SinkscopeError(
            f"captured {len(records)} attention calls for a model with {loaded.info.n_layers} layers: "
            f"{type(model).__name__} does not route all its attention through transformers' AttentionInterface"
        )
    return {
        "ids": enc["input_ids"],
        "mask": mask,
        "offsets": offsets,
        "lengths": lengths,
        "rows_at": rows,
        "records": records,
    }


def _forward_args(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


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
    "head_outputs": [3], "values": [3],
}


def _stack(records: list[LayerRecord], name: str) -> torch.Tensor | None:
    values = [getattr(r, name) for r in records]
    if values[0] is None:
        return None
    return torch.stack([v.cpu() for v in values], dim=1)  # layer becomes dim 1


def _assemble(loaded: LoadedModel, prompts: list[str], parts: list[dict[str, Any]], config: CaptureConfig) -> Trace:
    n_max = max(int(p["lengths"].max()) for p in parts)
    fields: dict[str, list[torch.Tensor]] = {}
    ids: list[list[int]] = []
    for part in parts:
        off, lens = part["offsets"], part["lengths"]
        stacked = {name: _stack(part["records"], name) for name in _TOKEN_DIMS}
        aligned: dict[str, torch.Tensor] = {}
        for name, dims in _TOKEN_DIMS.items():
            if stacked.get(name) is not None:
                aligned[name] = pad_to(_left_align(stacked[name], off, lens, dims), n_max, dims)
        if part["rows_at"] is not None:
            aligned["row_positions"] = part["rows_at"] - off[:, None]
        for name, tensor in aligned.items():
            fields.setdefault(name, []).append(tensor)
        for row, o, n in zip(part["ids"].tolist(), off.tolist(), lens.tolist(), strict=True):
            ids.append(row[o : o + n])
    merged = {name: torch.cat(parts_, dim=0) for name, parts_ in fields.items()}
    key_mass = merged["key_mass_sum"] / merged["key_count"][:, :, None].clamp(min=1)
    tokens = [_token_strings(loaded.tokenizer, row) for row in ids]
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
        key_mass_sum=merged["key_mass_sum"],
        key_count=merged["key_count"],
        rows=merged.get("rows"),
        row_positions=merged.get("row_positions"),
        entropy=merged.get("entropy"),
        sink_share=merged.get("sink_share"),
        maps=merged.get("maps"),
        head_outputs=merged.get("head_outputs"),
        values=merged.get("values"),
        info=info,
    )


def _token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Readable per-token strings: each id decoded on its own (byte-level marks like 'Ġ' become spaces)."""
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]
