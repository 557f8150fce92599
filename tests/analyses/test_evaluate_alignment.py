"""Keyword match, top-K, Spearman and causal overlap against hand computations and an independent ranking."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sinkscope.analyses.evaluate.alignment import keyword_score, spearman, token_words, top_k, topk_overlap

# "Classify the sentiment as 'positive' or 'negative'. Sentence: positively fine. Sentiment:" in byte-level BPE
# pieces ('Ġ' already decoded to a space, as tokenizer.decode does), with a BOS special token in front.
TOKENS = ["<s>", "Class", "ify", " the", " sentiment", " as", " '", "positive", "'", " or", " '", "negative", "'.",
          " Sentence", ":", " positively", " fine", ".", " Sent", "iment", ":"]
SPECIAL = [True] + [False] * (len(TOKENS) - 1)
KEYWORDS = {"classify", "sentiment", "positive", "negative"}


def test_token_words_rule():
    words = token_words(TOKENS, SPECIAL)
    assert words[0] == ()  # BOS belongs to no word
    assert words[1] == words[2] == ("classify",)  # sub-word pieces share their word
    assert words[4] == ("sentiment",) and words[7] == ("positive",)
    assert words[15] == ("positively",)  # not "positive": matching is on whole words
    assert words[18] == words[19] == ("sentiment",)  # " Sent" + "iment", case-folded
    assert words[6] == words[14] == words[17] == ()  # punctuation and spaces
    assert token_words(["<s>", "a"]) == [("s",), ("a",)]  # without the special flag "<s>" reads as the word "s"


def test_keyword_score_by_hand():
    words = token_words(TOKENS, SPECIAL)
    w = torch.zeros(len(TOKENS))
    # top-4: BOS (a sink), ' positively', 'Class', ':' — found: classify only; 'positively' is not 'positive'
    w[0], w[15], w[1], w[20] = 0.5, 0.2, 0.1, 0.05
    w[11] = 0.01  # 'negative' is ranked 5th: outside the top-4
    score = keyword_score(w, words, KEYWORDS, k=4)
    assert score.present == ("classify", "negative", "positive", "sentiment")
    assert score.found == ("classify",)
    assert score.match == pytest.approx(1 / 4)
    assert score.precision == pytest.approx(1 / 4)  # only 'Class' of the 4 ranked tokens is a keyword token
    # the sink removed (weight 0, not ranked) and " Sent" + "iment" ranked: both pieces count once for the word
    w[0], w[18], w[19] = 0.0, 0.04, 0.03
    assert top_k(w, 5) == [15, 1, 20, 18, 19]
    score = keyword_score(w, words, KEYWORDS, k=5)
    assert score.found == ("classify", "sentiment")
    assert score.match == pytest.approx(2 / 4) and score.precision == pytest.approx(3 / 5)
    nothing = keyword_score(torch.zeros(len(TOKENS)), words, KEYWORDS, k=4)
    assert nothing.match == 0 and math.isnan(nothing.precision)
    assert math.isnan(keyword_score(w, words, {"topic"}, k=4).match)  # no keyword in the prompt


def test_top_k_ties_and_zeros():
    w = torch.tensor([0.2, 0.0, 0.3, 0.2, 0.3])
    assert top_k(w, 3) == [2, 4, 0]
    assert top_k(w, 10) == [2, 4, 0, 3]  # the zero weight is never ranked


def test_spearman_by_hand():
    # ρ = 1 − 6 Σd² / (n(n² − 1)) = 1 − 6·2 / 60 = 0.8
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 30, 20, 40])) == pytest.approx(0.8)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)
    assert math.isnan(spearman(torch.ones(4), torch.arange(4.0)))
    assert spearman(torch.tensor([1.0, float("nan"), 2, 3]), torch.tensor([1.0, 5, 2, 3])) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.floats(-3, 3, allow_nan=False)), min_size=3, max_size=30))
def test_spearman_equals_pearson_of_pandas_average_ranks(pairs):
    x = torch.tensor([float(a) for a, _ in pairs])
    y = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    rx = pd.Series(x.numpy()).rank(method="average").to_numpy()
    ry = pd.Series(y.numpy()).rank(method="average").to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        assert math.isnan(spearman(x, y))
    else:
        assert spearman(x, y) == pytest.approx(float(np.corrcoef(rx, ry)[0, 1]), abs=1e-9)


def test_topk_overlap_by_hand():
    attention = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1, 0.0])
    effects = torch.tensor([0.0, 2.0, -1.0, 1.5, 0.1, 3.0])
    # top-2 attention {0, 1}; top-2 causal {5, 1} → 1 shared of 2
    assert topk_overlap(attention, effects, k=2) == pytest.approx(0.5)
    assert topk_overlap(attention, effects, k=10) == pytest.approx(5 / 6)  # attention ranks 5 non-zero of 6
    assert math.isnan(topk_overlap(attention, torch.full((6,), float("nan")), k=2))
