"""Zero-shot classification by verbaliser log-probability, with the last prompt token's attention captured in the
same batched forward pass.

    score(x, y) = Σ_t log p(y_t | x, y_<t)        y = answer_prefix + label, tokenised without special tokens
    prediction  = argmax_y score(x, y)

A single-token label is read off the prompt's next-token distribution; a multi-token label is scored by one more
forward pass over prompt + label[:-1] (summed log-probabilities, as in ACT's and lm-eval's multiple-choice
scoring). Prompts are padded to a batch on either side; the logits and attention rows are read at each prompt's
last real token, so a batched run gives the unbatched numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sinkscope.capture import CaptureConfig, run_capture
from sinkscope.capture.trace import forward_inputs, logits_only_at, pad_batch, padding_id
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel

__all__ = ["PromptPass", "label_token_ids", "next_token_logprobs", "pad_batch", "prompt_pass", "score_labels"]


def label_token_ids(tokenizer: Any, labels: Sequence[str], prefix: str = " ") -> list[list[int]]:
    """The token ids of prefix + label for each label (no special tokens). Raises if a label is empty or two labels
    tokenise alike."""
    ids = [list(tokenizer(prefix + label, add_special_tokens=False)["input_ids"]) for label in labels]
    for label, toks in zip(labels, ids, strict=True):
        if not toks:
            raise SinkscopeError(f"label {label!r} tokenises to nothing; use a non-empty verbaliser")
    if len({tuple(t) for t in ids}) != len(ids):
        raise SinkscopeError(f"two of the labels {list(labels)} tokenise to the same ids; use distinct verbalisers")
    return ids


@dataclass
class PromptPass:
    """What one forward pass over the prompts gives (P prompts, V vocabulary, L layers, H heads, n_p tokens).

    logprobs: [P, V] log p(next token | prompt) at each prompt's last token
    rows: P × [L, H, n_p] the last prompt token's attention over the prompt, per layer and head
    key_mass: P × [L, H, n_p] column mass α_k (mean attention key k receives from the queries that see it)
    """

    logprobs: torch.Tensor
    rows: list[torch.Tensor]
    key_mass: list[torch.Tensor]


def prompt_pass(loaded: LoadedModel, prompt_ids: Sequence[Sequence[int]], padding_side: str = "right") -> PromptPass:
    """One padded capture pass over the prompts (seed 000 §4.1: the last token's row), with the model's own logits
    bit for bit (`fused=False`)."""
    config = CaptureConfig(rows="last", entropy=False, fused=False, logprobs=True)
    trace = run_capture(loaded, [list(p) for p in prompt_ids], config, batch_size=max(1, len(prompt_ids)),
                        padding_side=padding_side, texts=[""] * len(prompt_ids))
    assert trace.logprobs is not None
    rows = trace.last_rows()  # [P, L, H, N]
    lengths = trace.lengths.tolist()
    return PromptPass(
        logprobs=trace.logprobs,
        rows=[rows[i, :, :, :n].clone() for i, n in enumerate(lengths)],
        key_mass=[trace.key_mass[i, :, :, :n].clone() for i, n in enumerate(lengths)],
    )


def next_token_logprobs(loaded: LoadedModel, prompt_ids: Sequence[Sequence[int]], padding_side: str = "right"
                        ) -> torch.Tensor:
    """log p(next token | prompt) at each prompt's last token, from one padded forward pass without capture (the
    model's own attention, or the active interventions'); logits only at the last tokens where the model allows.

    Returns [P, V], equal to `prompt_pass(...).logprobs`.
    """
    model = loaded.model
    ids, mask, offsets = pad_batch(prompt_ids, padding_id(loaded.tokenizer), padding_side)
    last = offsets + mask.sum(-1) - 1  # [P] in padded coordinates
    inputs = forward_inputs(model, ids, mask, loaded.device)
    at = logits_only_at(model, inputs, last, loaded.device)
    assert at is not None
    with torch.inference_mode():
        logits = model(**inputs).logits  # [P, len(keep) or n, V]
    return torch.log_softmax(logits[torch.arange(len(prompt_ids)), at.to(logits.device)].float(), -1).cpu()


def continuation_logprobs(
    loaded: LoadedModel,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    padding_side: str = "right",
    batch_size: int = 8,
) -> torch.Tensor:
    """Σ_t log p(y_t | x, y_<t) for each (x, y) pair, from forward passes over x + y[:-1]. Returns [len(pairs)]."""
    model = loaded.model
    out = torch.zeros(len(pairs))
    for b0 in range(0, len(pairs), batch_size):
        chunk = pairs[b0 : b0 + batch_size]
        seqs = [list(x) + list(y[:-1]) for x, y in chunk]
        ids, mask, offsets = pad_batch(seqs, padding_id(loaded.tokenizer), padding_side)
        with torch.inference_mode():
            logits = model(**forward_inputs(model, ids, mask, loaded.device)).logits.float().cpu()  # [b, n, V]
        for i, (x, y) in enumerate(chunk):
            at = int(offsets[i]) + len(x) - 1 + torch.arange(len(y))  # positions predicting y_0 … y_{m-1}
            logprobs = torch.log_softmax(logits[i, at], -1)  # [m, V]
            out[b0 + i] = logprobs[torch.arange(len(y)), torch.tensor(list(y))].sum()
    return out


def score_labels(
    loaded: LoadedModel,
    prompt_ids: Sequence[Sequence[int]],
    label_ids: Sequence[Sequence[int]],
    first: torch.Tensor,
    padding_side: str = "right",
    batch_size: int = 8,
) -> torch.Tensor:
    """score[p, c] = Σ_t log p(label_c[t] | prompt_p, label_c[:t]).

    first: [P, V] next-token log-probabilities after each prompt (`PromptPass.logprobs`), used for single-token
    labels; multi-token labels get their own forward passes. Returns [P, C].
    """
    scores = torch.zeros(len(prompt_ids), len(label_ids))
    pairs: list[tuple[Sequence[int], Sequence[int]]] = []
    where: list[tuple[int, int]] = []
    for c, label in enumerate(label_ids):
        if len(label) == 1:
            scores[:, c] = first[:, label[0]]
            continue
        for p, prompt in enumerate(prompt_ids):
            pairs.append((prompt, label))
            where.append((p, c))
    if pairs:
        values = continuation_logprobs(loaded, pairs, padding_side, batch_size)
        for (p, c), value in zip(where, values.tolist(), strict=True):
            scores[p, c] = value
    return scores
