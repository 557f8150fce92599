"""The shipped `sinkscope-tiny` has a first-token sink (#17 item 5), measured with plain transformers only."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


def tiny_dir() -> Path:
    return Path(str(resources.files("sinkscope").joinpath("assets", "sinkscope-tiny")))


SENTENCES = (
    "The cat sat on the mat and looked out of the window.",
    "She walked to the market in the morning to buy fresh bread.",
    "The river was cold, and the old bridge had fallen into the water.",
)


@pytest.fixture(scope="module")
def eager_alpha0() -> torch.Tensor:
    """α₀[sentence, layer, head]: mean over the queries i ≥ 1 of the eager attention weight A_i0 on BOS (query 0 sees
    only itself and is left out, so uniform causal attention over n tokens gives (H_n − 1)/(n − 1))."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = LlamaForCausalLM.from_pretrained(tiny_dir(), attn_implementation="eager").eval()
        tok = PreTrainedTokenizerFast.from_pretrained(tiny_dir())
        out = []
        for text in SENTENCES:
            ids = tok(text, return_tensors="pt")["input_ids"]  # [1, n], BOS first
            assert ids[0, 0] == tok.bos_token_id
            with torch.no_grad():
                att = model(ids, output_attentions=True).attentions  # L × [1, H, n, n]
            out.append(torch.stack([a[0, :, 1:, 0].mean(-1) for a in att]))  # [L, H]
        return torch.stack(out)  # [S, L, H]
    finally:
        torch.set_num_threads(before)


def test_every_later_layer_has_sink_heads(eager_alpha0):
    """Done criterion of #17 item 5: in every layer after the first, at least half of the heads put ≥ 0.3 mean
    attention on position 0 (averaged over three ordinary sentences)."""
    alpha = eager_alpha0.mean(0)  # [L, H]
    assert alpha.shape[0] >= 2
    share = (alpha[1:] >= 0.3).float().mean(-1)  # [L − 1]
    assert bool((share >= 0.5).all()), f"α₀ per layer and head:\n{alpha}"


def test_first_layer_has_a_sink_head(eager_alpha0):
    """What the shipped model does have: a head of the first layer with ≥ 0.3 mean attention on position 0, more than
    twice what uniform causal attention would put there in these sentences, (H_n − 1)/(n − 1)."""
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_dir())
    uniform = []
    for text in SENTENCES:
        n = len(tok(text)["input_ids"])
        uniform.append(sum(1 / k for k in range(2, n + 1)) / (n - 1))
    first = eager_alpha0.mean(0)[0]  # [H]
    assert float(first.max()) >= 0.3 and float(first.max()) > 2 * max(uniform), (first, uniform)


def test_card_states_the_sentence_table(eager_alpha0):
    """The model card's per-sentence figures are these eager numbers."""
    import json

    card = json.loads((tiny_dir() / "sinks.json").read_text())
    assert tuple(card["sentences"]) == SENTENCES
    torch.testing.assert_close(eager_alpha0.mean(0), torch.tensor(card["sentence_alpha0"]), atol=1e-4, rtol=0)
