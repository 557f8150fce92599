"""Does attention point at the right tokens? Keyword match (seed 000 §2.1, Table 2) and causal alignment.

Keyword match, the paper's way: take the top-K tokens of an attention vector (K = 10; after detect-mask-
renormalise the removed sinks have weight 0 and are not ranked) and count the prompt's task keywords found there.

    match     = |{w ∈ W_x : some top-K token belongs to w}| / |W_x|     W_x = task keywords that occur in prompt x
    precision = |{t ∈ top-K : t belongs to a keyword}| / |top-K|        (precision@K)

Token ↔ word rule (case-insensitive, token-boundary aware): the per-token strings are concatenated back into the
prompt text; a word is a maximal run of letters and digits; a token belongs to every word its characters overlap.
So 'Class' and 'ify' both belong to "classify", ' positive' and 'Ġpositive' (byte-level BPE marks decoded to a
space) belong to "positive", while ' positively' belongs to "positively", not "positive", and punctuation or
whitespace tokens belong to no word.

Causal alignment (beyond the paper): with effect_j the drop in the predicted label's log-probability when token j
is removed (`causal.py`), per example

    ρ       = Spearman correlation of (a_j) and (effect_j) over the prompt tokens (average ranks for ties)
    overlap = |top-K(a) ∩ top-K(effect)| / min(K, n)
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

__all__ = ["KeywordScore", "keyword_score", "spearman", "token_words", "top_k", "topk_overlap"]

_WORD = re.compile(r"[^\W_]+")


def token_words(tokens: Sequence[str], special: Sequence[bool] | None = None) -> list[tuple[str, ...]]:
    """The case-folded words each token belongs to (see the module docstring).

    tokens: the decoded token strings; special: True for special tokens (BOS, <|im_start|>, …), which belong to no
    word and do not join their neighbours.
    """
    special = special if special is not None else [False] * len(tokens)
    pieces = ["" if s else t for t, s in zip(tokens, special, strict=True)]
    text = "".join(pieces)
    spans = [(m.start(), m.end(), m.group(0).casefold()) for m in _WORD.finditer(text)]
    out: list[tuple[str, ...]] = []
    pos = 0
    for piece in pieces:
        lo, hi = pos, pos + len(piece)
        out.append(tuple(w for a, b, w in spans if a < hi and lo < b))
        pos = hi
    return out


def top_k(weights: torch.Tensor, k: int) -> list[int]:
    """Positions of the k largest weights, largest first (ties: lower position first); zero weights are never ranked.

    weights: [n] → at most k positions.
    """
    w = weights.detach().float().cpu()
    order = torch.argsort(-w, stable=True)
    return [int(i) for i in order[:k] if float(w[int(i)]) > 0]


@dataclass(frozen=True)
class KeywordScore:
    """Keyword match of one attention vector: match and precision@K (NaN when undefined), and the words."""

    match: float
    precision: float
    found: tuple[str, ...]
    present: tuple[str, ...]


def keyword_score(weights: torch.Tensor, words: Sequence[Collection[str]], keywords: Collection[str], k: int = 10
                  ) -> KeywordScore:
    """Share of the prompt's keywords among the top-k tokens, and precision@k.

    weights: [n] attention over the prompt's tokens; words: per token, the words it belongs to (`token_words`);
    keywords: case-folded task keywords. match is NaN when the prompt holds no keyword, precision when nothing is
    ranked.
    """
    kw = {w.casefold() for w in keywords}
    present = sorted({w for ws in words for w in ws} & kw)
    ranked = top_k(weights, k)
    hits = [set(words[i]) & kw for i in ranked]
    found = sorted(set().union(*hits)) if hits else []
    match = len(found) / len(present) if present else math.nan
    precision = sum(1 for h in hits if h) / len(ranked) if ranked else math.nan
    return KeywordScore(match, precision, tuple(found), tuple(present))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1 … n with ties given their mean rank. x: [n] → [n] float64."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    i, n = 0, len(x)
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's ρ: the Pearson correlation of the average ranks. x, y: [n]; NaN entries are dropped pairwise.

    NaN when fewer than 2 pairs remain or either side is constant.
    """
    keep = ~(torch.isnan(x.double()) | torch.isnan(y.double()))
    if int(keep.sum()) < 2:
        return math.nan
    rx, ry = _average_ranks(x[keep]), _average_ranks(y[keep])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum()) / denom if denom > 0 else math.nan


def topk_overlap(weights: torch.Tensor, effects: torch.Tensor, k: int = 10) -> float:
    """|top-k(weights) ∩ top-k(effects)| / min(k, n): do the most attended tokens matter most causally?

    weights, effects: [n]; effects ranks every position (largest drop first, NaN never). NaN when effects is all NaN.
    """
    e = effects.double()
    valid = ~torch.isnan(e)
    if not bool(valid.any()):
        return math.nan
    order = torch.argsort(-torch.where(valid, e, -math.inf), stable=True)  # NaN ranks last
    causal_top = {int(i) for i in order[: min(k, int(valid.sum()))]}
    attended = set(top_k(weights, k))
    return len(attended & causal_top) / min(k, len(weights))
