"""Sinks during generation: the attention row of every generated token, reduced as it is produced to a few numbers per
layer and head, and the keys that later tokens keep attending to (secondary sinks, e.g. in reasoning traces).

The prompt is prefilled once into a KV cache; each generated token is then one decode step of length 1 through
`run_capture` (`Continuation`): its query row A_t· over every earlier key is captured, with its entropy, in the
capture's attention function. Per step and per (layer, head) only the first token's share A_t0, the entropy
H_t = −Σ_j A_tj log A_tj, the top keys and how many keys exceed the row sink threshold ε are kept (`steps`, streamed
to the run folder); memory grows only with the KV cache and one running sum per (layer, head, key).

Secondary sinks (beyond position 0): for layer l and key j ≥ 1, the attention j receives from the later generated
tokens, averaged over them and over the heads,

    m_lj = (1 / (H · |T_j|)) Σ_h Σ_{t ∈ T_j} A^{l,h}_tj,    T_j = the generated tokens at positions after j,

and j is a secondary sink of layer l when m_lj ≥ `secondary_threshold` and |T_j| ≥ `min_later` (a key a handful of
tokens old is attended to as recent context, not as a sink). Per-row sinks follow Gu et al. 2025 (seed 002's sink
rate): key j is a sink of a head's row when A_tj > ε = 0.3.

The text is the model's own: the attention output of every decode step comes from the model's native kernel (the
capture's `fused=False`), so greedy decoding gives `model.generate(do_sample=False)`'s tokens.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.profile import model_manifest
from sinkscope.capture import CaptureConfig, run_capture, use_sinkscope_attention
from sinkscope.capture.trace import Continuation
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel
from sinkscope.progress import Progress
from sinkscope.store import Run, make_manifest, open_run

SINK_EPS = 0.3
"""The row sink threshold ε: Gu et al. 2025's sink-rate threshold (a head's row puts more than ε on the key)."""
SECONDARY_THRESHOLD = 0.05
"""m_lj ≥ 0.05: a key draws 5% of a whole layer's attention from the later tokens (sinkscope's choice; on SmolLM2 a
key that is not a sink draws well under 1% once a few dozen tokens follow it)."""
MIN_LATER = 16
"""A secondary sink is read from at least this many later generated tokens (sinkscope's choice)."""
TABLES = ("generation", "tokens", "steps", "layers", "key_mass", "secondary_sinks", "sink_curves")


@dataclass
class GenerateSettings:
    """What to generate and what counts as a sink.

    max_new_tokens: at most this many generated tokens (fewer when an end-of-sequence token comes first).
    temperature: 0 decodes greedily; > 0 samples from softmax(logits / temperature), seeded by `seed`.
    top_k: with sampling, draw only among the k most likely tokens (None: all).
    sink_threshold: ε, the row sink threshold (`SINK_EPS`); it must be ≥ 0.1, so that at most ⌈1/ε⌉ − 1 ≤ 9 keys
        can exceed it and the `steps` table's top keys name every one of them.
    top_keys: how many of a row's largest keys `steps` names (raised to ⌈1/ε⌉ − 1 when smaller).
    secondary_threshold, min_later: the secondary-sink rule (module docstring).
    curves: the `sink_curves` table follows position 0 and this many of the strongest secondary sinks.
    stop_at_eos: stop after the model's end-of-sequence token (it is generated and recorded).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    sink_threshold: float = SINK_EPS
    top_keys: int = 3
    secondary_threshold: float = SECONDARY_THRESHOLD
    min_later: int = MIN_LATER
    curves: int = 4
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SinkscopeError("generate at least one token: --max-new-tokens must be ≥ 1")
        if not self.temperature >= 0:
            raise SinkscopeError(f"the temperature must be ≥ 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SinkscopeError("--top-k must be ≥ 1")
        if not 0.1 <= self.sink_threshold < 1:
            raise SinkscopeError(f"the row sink threshold must be in [0.1, 1), got {self.sink_threshold}")
        if not 0 < self.secondary_threshold < 1:
            raise SinkscopeError(f"the secondary-sink threshold must be in (0, 1), got {self.secondary_threshold}")
        if self.top_keys < 1 or self.min_later < 1 or self.curves < 0:
            raise SinkscopeError("top_keys and min_later must be ≥ 1, curves ≥ 0")

    @property
    def n_top(self) -> int:
        """Keys named per row: enough for every key above ε (at most ⌈1/ε⌉ − 1 of them)."""
        return max(self.top_keys, math.ceil(1 / self.sink_threshold) - 1)


@dataclass
class GenerateResult:
    """Generations (one per prompt) with their sink tables. `tables["steps"]` is absent when the steps were streamed
    to `folder`."""

    prompt_ids: list[list[int]]
    generated_ids: list[list[int]]
    texts: list[str]
    stopped: list[str]  # per prompt: "eos" or "max_new_tokens"
    tables: dict[str, pd.DataFrame]
    settings: GenerateSettings
    folder: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ per-step statistics
STEP_CAPTURE = CaptureConfig(rows=None, entropy=True, logprobs=True, fused=False)
"""A decode step: the key mass (for one query, its row), its entropy and the next-token log-probabilities; the layer
output from the model's own kernel, so the generated text is the model's."""
PREFILL_CAPTURE = CaptureConfig(rows=None, entropy=False, logprobs=True, fused=False)


def step_table(row: torch.Tensor, entropy: torch.Tensor, tokens: Sequence[str], step: int, n_top: int,
               eps: float, prompt_id: int = 0) -> pd.DataFrame:
    """One decode step's rows of the `steps` table: one per (layer, head).

    row: [layer, head, n] the new token's attention over every key (it sits at position n − 1);
    entropy: [layer, head] its entropy in nats. Columns: prompt_id, step, position, token (the new token), layer,
    head, first_mass = A_t0, entropy, n_over = #{j: A_tj > ε}, over_mass = Σ of those, and for i = 1..n_top the i-th
    largest key: top{i}_position, top{i}_token, top{i}_attention (position −1 and token "" when the row has fewer keys).
    """
    n_layers, n_heads, n = row.shape
    k = min(n_top, n)
    values, index = row.topk(k, dim=-1)  # [L, H, k]
    over = row > eps
    frame = pd.DataFrame({
        "prompt_id": np.full(n_layers * n_heads, prompt_id, dtype=np.int64),
        "step": np.full(n_layers * n_heads, step, dtype=np.int64),
        "position": np.full(n_layers * n_heads, n - 1, dtype=np.int64),
        "token": np.full(n_layers * n_heads, tokens[n - 1], dtype=object),
        "layer": np.repeat(np.arange(n_layers, dtype=np.int64), n_heads),
        "head": np.tile(np.arange(n_heads, dtype=np.int64), n_layers),
        "first_mass": row[..., 0].reshape(-1).numpy().astype(np.float32),
        "entropy": entropy.reshape(-1).numpy().astype(np.float32),
        "n_over": over.sum(-1).reshape(-1).numpy().astype(np.int64),
        "over_mass": (row * over).sum(-1).reshape(-1).numpy().astype(np.float32),
    })
    flat_index = index.reshape(-1, k).numpy()
    flat_values = values.reshape(-1, k).numpy()
    token_array = np.asarray(tokens, dtype=object)
    for i in range(n_top):
        if i < k:
            frame[f"top{i + 1}_position"] = flat_index[:, i].astype(np.int64)
            frame[f"top{i + 1}_token"] = token_array[flat_index[:, i]]
            frame[f"top{i + 1}_attention"] = flat_values[:, i].astype(np.float32)
        else:
            frame[f"top{i + 1}_position"] = np.full(len(frame), -1, dtype=np.int64)
            frame[f"top{i + 1}_token"] = np.full(len(frame), "", dtype=object)
            frame[f"top{i + 1}_attention"] = np.zeros(len(frame), dtype=np.float32)
    return frame


class KeyAttention:
    """Running Σ_t A^{l,h}_tj over the generated tokens t after each key j (not t's own key): the secondary-sink sums.
    [layer, head, key] float64, grown (doubling) as keys are added."""

    def __init__(self, n_layers: int, n_heads: int) -> None:
        self.sums = torch.zeros(n_layers, n_heads, 64, dtype=torch.float64)
        self.n_keys = 0

    def add(self, row: torch.Tensor) -> None:
        """row: [layer, head, n], the row of the token at position n − 1; adds A_tj for the earlier keys j < n − 1."""
        n = row.shape[-1]
        if n > self.sums.shape[-1]:
            grown = torch.zeros(*self.sums.shape[:2], max(n, 2 * self.sums.shape[-1]), dtype=torch.float64)
            grown[..., : self.n_keys] = self.sums[..., : self.n_keys]
            self.sums = grown
        self.sums[..., : n - 1] += row[..., : n - 1].double()
        self.n_keys = max(self.n_keys, n)


def later_counts(n_keys: int, n_prompt: int, n_steps: int) -> np.ndarray:
    """|T_j| for each key j < n_keys: the generated tokens after j. Generated token s sits at position n_prompt + s, so
    a prompt key is followed by every one of the n_steps, and generated key n_prompt + s by n_steps − s − 1."""
    j = np.arange(n_keys)
    return n_steps - np.clip(j - n_prompt + 1, 0, None)


def key_mass_table(sums: torch.Tensor, tokens: Sequence[str], n_prompt: int, n_steps: int, prompt_id: int = 0
                   ) -> pd.DataFrame:
    """m_lj for every layer and key (module docstring): prompt_id, layer, position, token, generated, mass, n_later
    (|T_j|; keys no generated token follows have none and mass 0). sums: [layer, head, key]."""
    n_layers, _, n_keys = sums.shape
    count = later_counts(n_keys, n_prompt, n_steps)  # [key]
    mass = (sums.mean(1) / torch.as_tensor(count, dtype=torch.float64).clamp(min=1)).numpy()  # [L, key]
    return pd.DataFrame({
        "prompt_id": np.full(n_layers * n_keys, prompt_id, dtype=np.int64),
        "layer": np.repeat(np.arange(n_layers, dtype=np.int64), n_keys),
        "position": np.tile(np.arange(n_keys, dtype=np.int64), n_layers),
        "token": np.tile(np.asarray(tokens[:n_keys], dtype=object), n_layers),
        "generated": np.tile(np.arange(n_keys) >= n_prompt, n_layers),
        "mass": mass.reshape(-1),
        "n_later": np.tile(count.astype(np.int64), n_layers),
    })


def secondary_sinks(sums: torch.Tensor, tokens: Sequence[str], n_prompt: int, n_steps: int, threshold: float,
                    min_later: int, prompt_id: int = 0) -> pd.DataFrame:
    """The secondary sinks (module docstring) from the running sums [layer, head, key]: one row per (layer, key j ≥ 1)
    with m_lj ≥ threshold and |T_j| ≥ min_later — prompt_id, layer, position, token, generated (j ≥ n_prompt),
    mass = m_lj, n_later = |T_j|, peak_head and peak_mass (the head whose mean over T_j is largest) — strongest
    first."""
    n_keys = sums.shape[-1]
    count = torch.as_tensor(later_counts(n_keys, n_prompt, n_steps), dtype=torch.float64)  # [key]
    per_head = sums / count.clamp(min=1)  # [L, H, key]
    mass = per_head.mean(1)  # [L, key]
    keep = (mass >= threshold) & (count >= min_later)[None, :]
    keep[:, 0] = False
    layer, key = keep.nonzero(as_tuple=True)
    peak_mass, peak_head = per_head[layer, :, key].max(-1)
    frame = pd.DataFrame({
        "prompt_id": np.full(len(key), prompt_id, dtype=np.int64),
        "layer": layer.numpy().astype(np.int64),
        "position": key.numpy().astype(np.int64),
        "token": np.asarray(tokens, dtype=object)[key.numpy()] if len(key) else np.array([], dtype=object),
        "generated": (key >= n_prompt).numpy(),
        "mass": mass[layer, key].numpy(),
        "n_later": count[key].numpy().astype(np.int64),
        "peak_head": peak_head.numpy().astype(np.int64),
        "peak_mass": peak_mass.numpy(),
    })
    return frame.sort_values(["mass", "layer"], ascending=[False, True], ignore_index=True)


def layer_table(sums: torch.Tensor, first: torch.Tensor, entropy: torch.Tensor, n_steps: int,
                sinks: pd.DataFrame) -> pd.DataFrame:
    """Per layer, over the generated tokens and heads: first_mass (mean A_t0), entropy (mean H_t), n_secondary (the
    layer's secondary sinks) and its strongest one's position and mass (−1 and 0 without one).
    first, entropy: [layer, head] sums over the steps."""
    n_layers = sums.shape[0]
    top = sinks.sort_values("mass", ascending=False).drop_duplicates("layer").set_index("layer")
    return pd.DataFrame({
        "layer": np.arange(n_layers, dtype=np.int64),
        "first_mass": (first.mean(1) / n_steps).numpy(),
        "entropy": (entropy.mean(1) / n_steps).numpy(),
        "n_secondary": sinks.groupby("layer").size().reindex(range(n_layers), fill_value=0).to_numpy(np.int64),
        "top_secondary_position": top["position"].reindex(range(n_layers), fill_value=-1).to_numpy(np.int64),
        "top_secondary_mass": top["mass"].reindex(range(n_layers), fill_value=0.0).to_numpy(np.float64),
    })


def curve_keys(sinks: pd.DataFrame, n: int) -> list[int]:
    """Position 0 and the n strongest distinct secondary-sink positions (by their largest m_lj over layers)."""
    strongest = sinks.groupby("position")["mass"].max().sort_values(ascending=False)
    return [0, *strongest.index[:n].astype(int).tolist()]


def sink_curves(loaded: LoadedModel, ids: Sequence[int], tokens: Sequence[str], n_prompt: int, keys: Sequence[int],
                prompt_id: int = 0) -> pd.DataFrame:
    """The attention each generated token pays to the keys `keys`, per layer, mean over heads: one row per (step,
    layer, key) with the key before the token — prompt_id, step, position, token, layer, key_position, key_token,
    attention. Read as attention columns A_·k of one capture of the whole sequence (`CaptureConfig.columns`): the
    secondary sinks are known only at the end, and a column per key costs O(n) instead of keeping every row."""
    trace = run_capture(loaded, [list(ids)], CaptureConfig(rows=None, entropy=False, columns=list(keys)),
                        batch_size=1, texts=["sequence"])
    assert trace.columns is not None
    cols = trace.columns[0, :, :, n_prompt:, : len(keys)].mean(1)  # [L, steps, K]
    n_layers, n_steps, _ = cols.shape
    layer, step, k = np.meshgrid(np.arange(n_layers), np.arange(n_steps), np.arange(len(keys)), indexing="ij")
    key_at = np.asarray(keys, dtype=np.int64)[k.reshape(-1)]
    position = n_prompt + step.reshape(-1)
    frame = pd.DataFrame({
        "prompt_id": np.full(layer.size, prompt_id, dtype=np.int64),
        "step": step.reshape(-1).astype(np.int64),
        "position": position.astype(np.int64),
        "token": np.asarray(tokens, dtype=object)[position],
        "layer": layer.reshape(-1).astype(np.int64),
        "key_position": key_at,
        "key_token": np.asarray(tokens, dtype=object)[key_at],
        "attention": cols.reshape(-1).numpy(),
    })
    return frame[frame["key_position"] < frame["position"]].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ decoding
def eos_ids(loaded: LoadedModel) -> set[int]:
    """The model's end-of-sequence ids: its generation config's (an id or a list) and its tokenizer's."""
    found: set[int] = set()
    config = getattr(loaded.model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(loaded.tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list | tuple):
            found.update(int(v) for v in value)
    return found


def next_token(logprobs: torch.Tensor, settings: GenerateSettings, generator: torch.Generator) -> int:
    """Greedy: argmax of log p. Sampling: a draw from softmax(log p / T) over the top_k most likely tokens (log p and
    the logits differ by a constant, so this is softmax(logits / T))."""
    if settings.temperature == 0:
        return int(logprobs.argmax())
    scores = logprobs.float() / settings.temperature  # [V]
    if settings.top_k is not None and settings.top_k < scores.numel():
        kth = scores.topk(settings.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))


def prompt_token_ids(loaded: LoadedModel, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
    """The prompt's ids: a text tokenised with the tokenizer's special tokens, or (chat) wrapped in the tokenizer's
    chat template as one user turn with the assistant's turn opened; ids are used as given."""
    if not isinstance(prompt, str):
        ids = [int(i) for i in prompt]
    else:
        if not prompt.strip():
            raise SinkscopeError("the prompt is empty: pass --prompt TEXT")
        tok = loaded.tokenizer
        if tok is None:
            raise SinkscopeError(f"{loaded.info.name} has no tokenizer: pass token ids")
        if chat:
            if not getattr(tok, "chat_template", None):
                raise SinkscopeError(f"{loaded.info.name}'s tokenizer has no chat template; drop --chat")
            ids = list(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"])
        else:
            ids = list(tok(prompt)["input_ids"])
    if not ids:
        raise SinkscopeError("the prompt has no tokens")
    return ids


def generate(
    loaded: LoadedModel,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    settings: GenerateSettings | None = None,
    *,
    chat: bool = False,
    out: str | Path | None = None,
    overwrite: bool = False,
    figures: Mapping[str, Callable[[dict[str, pd.DataFrame], Path], Any]] | None = None,
    progress: Progress | None = None,
) -> GenerateResult:
    """Generate from each prompt (prompt_id: its index) and record the sinks of every generated token's attention
    (module docstring).

    prompts: a text, texts (tokenised with special tokens; `chat` wraps each in the chat template) or token-id lists.
    out: a run folder: `steps` is streamed into it a step at a time (memory stays flat) and saved with the other
        tables and the manifest at the end; without it `steps` is kept in `result.tables`.
    figures: {file name: draw(tables, path)}, drawn from the finished tables and saved in `out` with them (listed in
        the manifest, so the report embeds them); analyses never plot, the caller passes the drawing.
    progress: called as progress("generating", done, total) after each generated token (total: max_new_tokens per
        prompt; a prompt that stops at EOS leaves its remaining tokens uncounted).
    Tables: generation (per prompt: prompt, text, counts, why it stopped), tokens (every position of every sequence),
    steps (per generated token × layer × head), layers, secondary_sinks, sink_curves.
    """
    settings = settings or GenerateSettings()
    if not loaded.info.is_causal:
        raise SinkscopeError(f"{loaded.info.name} is an encoder: generation needs a causal language model")
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
        prompts = [prompts]  # type: ignore[list-item]
    if not len(prompts):
        raise SinkscopeError("no prompts given: pass --prompt TEXT or --prompts FILE")
    all_ids = [prompt_token_ids(loaded, p, chat) for p in prompts]
    limit = loaded.info.max_positions
    for i, ids in enumerate(all_ids):
        if limit is not None and len(ids) + settings.max_new_tokens > limit:
            raise SinkscopeError(f"prompt {i + 1}: {len(ids)} tokens + {settings.max_new_tokens} new ones pass the "
                                 f"model's context of {limit}; pass a smaller --max-new-tokens")
    total = settings.max_new_tokens * len(all_ids)
    parts: dict[str, list[pd.DataFrame]] = {}
    results: list[_Generated] = []
    with ExitStack() as stack:
        folder = stack.enter_context(open_run(out, "generate", overwrite=overwrite, restart=False)) \
            if out is not None else None
        stream = stack.enter_context(folder.table_stream()) if folder is not None else None

        def emit(table: pd.DataFrame) -> None:
            if stream is not None:
                stream.append("steps", table)
            else:
                parts.setdefault("steps", []).append(table)

        for pid, (prompt, ids) in enumerate(zip(prompts, all_ids, strict=True)):
            done = pid * settings.max_new_tokens
            tick = None if progress is None else (lambda step, done=done: progress("generating", done + step, total))
            one = _generate_one(loaded, ids, settings, pid, emit, tick)
            one.tables["generation"].insert(1, "prompt", prompt if isinstance(prompt, str)
                                            else "".join(one.tokens[: len(ids)]))
            results.append(one)
            for name, table in one.tables.items():
                parts.setdefault(name, []).append(table)
        tables = {name: pd.concat(parts[name], ignore_index=True) for name in TABLES if name in parts}
        parameters = {**asdict(settings), "chat": chat, "n_prompts": len(all_ids),
                      "n_generated": [len(r.generated) for r in results], "stopped": [r.stopped for r in results]}
        if folder is not None:
            run = Run(tables, make_manifest("generate", model_manifest(loaded), parameters, settings.seed))
            with tempfile.TemporaryDirectory(prefix=".tmp-figures-", dir=folder.path) as scratch:
                files: dict[str, Any] = {}
                for name, draw in (figures or {}).items():
                    draw(tables, Path(scratch) / name)
                    files[name] = Path(scratch) / name
                folder.save(run, files, streams=stream, order=TABLES)
    return GenerateResult(prompt_ids=[r.prompt_ids for r in results], generated_ids=[r.generated for r in results],
                          texts=[r.text for r in results], stopped=[r.stopped for r in results], tables=tables,
                          settings=settings, folder=None if out is None else Path(out),
                          info={"parameters": parameters})


@dataclass
class _Generated:
    prompt_ids: list[int]
    generated: list[int]
    tokens: list[str]
    text: str
    stopped: str
    tables: dict[str, pd.DataFrame]


def _generate_one(loaded: LoadedModel, ids: list[int], settings: GenerateSettings, prompt_id: int,
                  emit: Callable[[pd.DataFrame], None], progress: Callable[[int], None] | None) -> _Generated:
    """Prefill `ids`, then decode one token per step through `run_capture`, handing each step's rows to `emit`."""
    model, info = loaded.model, loaded.info
    n_prompt = len(ids)
    eos = eos_ids(loaded) if settings.stop_at_eos else set()
    generator = torch.Generator().manual_seed(settings.seed)
    keys = KeyAttention(info.n_layers, info.n_heads)
    first_sum = torch.zeros(info.n_layers, info.n_heads, dtype=torch.float64)  # Σ_t A_t0
    entropy_sum = torch.zeros(info.n_layers, info.n_heads, dtype=torch.float64)  # Σ_t H_t
    generated: list[int] = []
    stopped = "max_new_tokens"
    cont = Continuation()
    with torch.inference_mode(), use_sinkscope_attention(model):  # one switch of the attention for every step
        trace = run_capture(loaded, [ids], PREFILL_CAPTURE, continuation=cont, texts=["prompt"])
        for step in range(settings.max_new_tokens):
            assert trace.logprobs is not None
            token = next_token(trace.logprobs[0], settings, generator)
            generated.append(token)
            trace = run_capture(loaded, [[token]], STEP_CAPTURE, continuation=cont, texts=["step"])
            assert trace.entropy is not None
            row = trace.key_mass[0]  # [L, H, n]: one query's key mass is its row
            entropy = trace.entropy[0, :, :, -1]  # [L, H]
            emit(step_table(row, entropy, cont.tokens, step, settings.n_top, settings.sink_threshold, prompt_id))
            keys.add(row)
            first_sum += row[..., 0].double()
            entropy_sum += entropy.double()
            if progress is not None:
                progress(step + 1)
            if token in eos:
                stopped = "eos"
                break
    n_steps = len(generated)
    tokens = list(cont.tokens)
    sums = keys.sums[..., : keys.n_keys]  # [L, H, n]
    sinks = secondary_sinks(sums, tokens, n_prompt, n_steps, settings.secondary_threshold, settings.min_later,
                            prompt_id)
    curves = sink_curves(loaded, cont.ids, tokens, n_prompt, curve_keys(sinks, settings.curves), prompt_id)
    tok = loaded.tokenizer
    text = tok.decode(generated, skip_special_tokens=False) if tok is not None else " ".join(map(str, generated))
    layers = layer_table(sums, first_sum, entropy_sum, n_steps, sinks)
    layers.insert(0, "prompt_id", np.int64(prompt_id))
    tables = {
        "generation": pd.DataFrame({"prompt_id": [prompt_id], "text": [text], "n_prompt_tokens": [n_prompt],
                                    "n_generated": [n_steps], "stopped": [stopped]}),
        "tokens": pd.DataFrame({"prompt_id": np.full(len(tokens), prompt_id, dtype=np.int64),
                                "position": np.arange(len(tokens), dtype=np.int64), "token": tokens,
                                "token_id": np.asarray(cont.ids, dtype=np.int64),
                                "generated": np.arange(len(tokens)) >= n_prompt}),
        "layers": layers,
        "key_mass": key_mass_table(sums, tokens, n_prompt, n_steps, prompt_id),
        "secondary_sinks": sinks,
        "sink_curves": curves,
    }
    return _Generated(prompt_ids=list(ids), generated=generated, tokens=tokens, text=text, stopped=stopped,
                      tables=tables)
