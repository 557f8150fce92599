"""Label scoring and causal effects against direct forward passes; batched runs equal unbatched ones."""

from __future__ import annotations

import math

import pytest
import torch

from sinkscope.analyses.evaluate.causal import MaskKeyPerRow, causal_effects
from sinkscope.analyses.evaluate.classify import label_token_ids, pad_batch, prompt_pass, score_labels
from sinkscope.analyses.evaluate.datasets import DatasetSpec, Example
from sinkscope.analyses.evaluate.run import EvalConfig, evaluate_examples
from sinkscope.capture import intervene
from sinkscope.errors import SinkscopeError

PROMPTS = ["Rate: fun\nA:", "Rate: a dull, slow film\nA:", "Rate: ok\nA:"]
# a short task so that the byte-level tiny tokenizer keeps prompts (and n causal passes) small
TINY_SPEC = DatasetSpec("tiny", "Tiny", ("no", "yes"), "R", "{text}:", frozenset({"r", "no", "yes"}))


def _direct_logprob(lm, prompt_ids, label):
    """log p(label | prompt) from one plain forward pass over prompt + label[:-1] (no padding, no sinkscope)."""
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([prompt_ids + label[:-1]])).logits[0]
    logprobs = torch.log_softmax(logits.float(), -1)
    n = len(prompt_ids)
    return sum(float(logprobs[n - 1 + t, tok]) for t, tok in enumerate(label))


def test_label_scores_equal_log_softmax_of_a_direct_forward(tiny_llama):
    tok = tiny_llama.tokenizer
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    labels = [[ord("y")], [66, 67], tok(" no", add_special_tokens=False)["input_ids"]]  # 1, 2 and 3 tokens
    assert [len(x) for x in labels] == [1, 2, 3]
    expected = torch.tensor([[_direct_logprob(tiny_llama, ids, label) for label in labels] for ids in prompt_ids])
    for side in ("right", "left"):
        passed = prompt_pass(tiny_llama, prompt_ids, padding_side=side)
        scores = score_labels(tiny_llama, prompt_ids, labels, passed.logprobs, padding_side=side, batch_size=2)
        torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)


def test_prompt_pass_batched_equals_unbatched(tiny_llama):
    tok = tiny_llama.tokenizer
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    alone = [prompt_pass(tiny_llama, [ids]) for ids in prompt_ids]
    for side in ("right", "left"):
        batch = prompt_pass(tiny_llama, prompt_ids, padding_side=side)
        for i, single in enumerate(alone):
            assert batch.rows[i].shape == (2, 4, len(prompt_ids[i]))  # [layer, head, n]
            torch.testing.assert_close(batch.logprobs[i], single.logprobs[0], atol=1e-4, rtol=0)
            torch.testing.assert_close(batch.rows[i], single.rows[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batch.key_mass[i], single.key_mass[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batch.rows[i].sum(-1), torch.ones(2, 4), atol=1e-5, rtol=0)


def test_pad_batch_sides():
    ids, mask, offsets = pad_batch([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert offsets.tolist() == [0, 2]
    with pytest.raises(SinkscopeError, match="padding side"):
        pad_batch([[1]], 0, side="middle")


def test_label_token_ids_rejects_clashing_labels(tiny_llama):
    with pytest.raises(SinkscopeError, match="same ids"):
        label_token_ids(tiny_llama.tokenizer, ["yes", "yes"])


def _hide_key_mask(n: int, j: int) -> torch.Tensor:
    """Additive [1, 1, n, n] mask: causal, and key j hidden from every query except query 0 when j = 0 (a row
    cannot be empty; the intervention leaves that row as it is)."""
    visible = torch.ones(n, n).tril().bool()
    hide = torch.zeros(n, n, dtype=torch.bool)
    hide[:, j] = True
    hide[j, j] = j != 0
    hide[0, 0] = False
    visible &= ~hide
    return torch.zeros(1, 1, n, n).masked_fill(~visible, -math.inf)


def test_causal_effect_equals_a_manual_masked_forward(tiny_llama):
    """effect_j = log p(y|x) − log p(y | x, key j masked in every layer), with the masked pass computed
    independently: the model's own eager attention with a custom 4-D mask (no sinkscope code involved)."""
    tok = tiny_llama.tokenizer
    prompt = tok("Rate: fun\nA:")["input_ids"]
    target = tok(" yes", add_special_tokens=False)["input_ids"]
    n = len(prompt)
    got = causal_effects(tiny_llama, prompt, target, batch_size=5)  # prefix reuse, several blocks
    plain = causal_effects(tiny_llama, prompt, target, batch_size=n, reuse_prefix=False)
    model = tiny_llama.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # transformers' own attention; a 4-D mask is used as given
    try:
        seq = torch.tensor([prompt + target[:-1]])
        total = seq.shape[1]
        with torch.no_grad():
            base = _direct_logprob(tiny_llama, prompt, target)
            expected = []
            for j in range(n):
                logits = model(input_ids=seq, attention_mask=_hide_key_mask(total, j)).logits[0]
                logprobs = torch.log_softmax(logits.float(), -1)
                masked = sum(float(logprobs[n - 1 + t, y]) for t, y in enumerate(target))
                expected.append(base - masked)
    finally:
        model.set_attn_implementation(previous)
    assert got.base == pytest.approx(base, abs=1e-4)
    torch.testing.assert_close(got.effects, torch.tensor(expected), atol=1e-4, rtol=0)
    torch.testing.assert_close(plain.effects, got.effects, atol=1e-4, rtol=0)
    assert got.effects.abs().max() > 1e-3  # masking changes the prediction


def test_occlusion_effect_equals_a_forward_without_the_token(tiny_llama):
    tok = tiny_llama.tokenizer
    prompt = tok("Rate: ok\nA:")["input_ids"]
    target = tok(" no", add_special_tokens=False)["input_ids"]
    got = causal_effects(tiny_llama, prompt, target, mode="occlude", batch_size=4)
    base = _direct_logprob(tiny_llama, prompt, target)
    expected = [base - _direct_logprob(tiny_llama, prompt[:j] + prompt[j + 1 :], target) for j in range(len(prompt))]
    torch.testing.assert_close(got.effects, torch.tensor(expected), atol=1e-4, rtol=0)
    partial = causal_effects(tiny_llama, prompt, target, mode="occlude", positions=[2, 5])
    assert partial.positions == [2, 5] and torch.isnan(partial.effects).sum() == len(prompt) - 2
    with pytest.raises(SinkscopeError, match="causal mode"):
        causal_effects(tiny_llama, prompt, target, mode="shuffle")


def test_mask_key_per_row_needs_one_key_per_row(tiny_llama):
    with intervene(tiny_llama.model, MaskKeyPerRow(keys=[0, 1])), pytest.raises(SinkscopeError, match="2 keys"):
        tiny_llama.model(input_ids=torch.tensor([[1, 2, 3]]))


def test_evaluate_examples_batched_equals_unbatched(tiny_llama):
    examples = [Example(f"e{i}", {"text": t}, i % 2, i + 1) for i, t in enumerate(["fun", "a dull film", "ok"])]
    config = EvalConfig(methods=("zscore", "entropy_delta"), causal=True, batch_size=3, causal_batch_size=4)
    single_config = EvalConfig(methods=("zscore", "entropy_delta"), causal=True, batch_size=1, causal_batch_size=64)
    singles = [evaluate_examples(tiny_llama, TINY_SPEC, [x], single_config)[0] for x in examples]
    for side in ("left", "right"):
        # causal effects run per example without padding: measured once, with left padding of the label pass
        batch = evaluate_examples(tiny_llama, TINY_SPEC, examples,
                                  EvalConfig(**{**vars(config), "padding_side": side, "causal": side == "left"}))
        for b, s in zip(batch, singles, strict=True):
            assert b["example"]["pred"] == s["example"]["pred"]
            assert [x["logprob"] for x in b["scores"]] == pytest.approx([x["logprob"] for x in s["scores"]], abs=1e-4)
            columns = ["attention_before", "attention_after_zscore", "attention_after_entropy_delta"]
            for col in columns + (["causal_effect"] if side == "left" else []):
                assert b["tokens"][col] == pytest.approx(s["tokens"][col], abs=1e-4), col
            assert b["tokens"]["sink_zscore"] == s["tokens"]["sink_zscore"]
            for x, y in zip(b["alignment"], s["alignment"], strict=True):
                assert x["match"] == pytest.approx(y["match"], nan_ok=True)
                if side == "left":
                    assert x["spearman"] == pytest.approx(y["spearman"], abs=1e-6, nan_ok=True)
