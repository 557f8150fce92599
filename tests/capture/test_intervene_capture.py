"""Interventions under a capture session: every statistic and the logits equal those of an independent eager forward
pass that changes each layer's whole attention matrix at once (the session applies the hooks a chunk at a time)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from sinkscope.capture import (
    Calibrate,
    CaptureConfig,
    MaskKeyPerRow,
    MaskKeys,
    Reweight,
    ReweightSinks,
    Temperature,
    intervene,
)
from sinkscope.capture.attention import capture_session
from sinkscope.models import tiny_model

PROMPTS = ["The cat sat on the mat, then on the rug.", "Hi!", "Attention sinks draw mass, a lot of it, at BOS."]
TOL = 1e-5
_REF: dict[str, list] = {"hooks": [], "probs": []}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention in float32 over the whole [b, h, q, k] matrix (GQA by repetition, soft-capping, learned sink
    logits as an extra softmax column), changed by the reference hooks at once; records the changed matrix."""
    g = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(g, dim=1)
    v = value.float().repeat_interleave(g, dim=1)
    scores = query.float() @ k.transpose(-1, -2) * scaling
    if kwargs.get("softcap") is not None:
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    mask = attention_mask[..., : k.shape[2]].float()
    scores = scores + mask
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        b, h, nq, _ = scores.shape
        scores = torch.cat([scores, sinks.float().view(1, h, 1, 1).expand(b, h, nq, 1)], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    bias = torch.where(mask > torch.finfo(attention_mask.dtype).min / 2, 0.0, -torch.inf)  # [b, 1, q, k]
    for hook in _REF["hooks"]:
        if hook.applies(module.layer_idx):
            probs = hook(probs, module.layer_idx, bias)
    _REF["probs"].append(probs)
    return (probs @ v).transpose(1, 2).contiguous().to(query.dtype), probs


AttentionInterface.register("reference_hooked", _reference_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("reference_hooked", eager_mask)

HOOKS = {
    "mask_keys": lambda: [MaskKeys(positions=[0, -1])],
    "mask_key_per_row": lambda: [MaskKeyPerRow(keys=[0, 2, 1])],
    "reweight": lambda: [Reweight(weights=[0.2, 3.0, 0.5])],
    "reweight_sinks": lambda: [ReweightSinks(gamma=0.0)],
    "reweight_sinks_scoped": lambda: [ReweightSinks(gamma=0.4, layers=[1], heads=[0, 3])],
    "temperature": lambda: [Temperature(t=0.7)],
    "act": lambda: [Calibrate(beta=0.3, threshold=0.05)],
    "act_heads": lambda: [Calibrate(beta=0.3, threshold=0.05, heads=[1, 3])],
    "act_then_mask": lambda: [Calibrate(beta=0.5, threshold=0.05), MaskKeys(positions=[1])],
    "temperature_then_act": lambda: [Temperature(t=0.7), Calibrate(beta=0.5, threshold=0.05)],
}


def _inputs(lm, padding_side):
    lm.tokenizer.padding_side = padding_side
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    kwargs = {"input_ids": enc["input_ids"], "attention_mask": mask,
              "position_ids": (mask.cumsum(-1) - 1).clamp(min=0), "use_cache": False}
    return kwargs, mask


def _reference(lm, hooks, kwargs):
    model = copy.deepcopy(lm.model)
    model.set_attn_implementation("reference_hooked")
    _REF["hooks"], _REF["probs"] = hooks, []
    try:
        with torch.no_grad():
            logits = model(**kwargs).logits
        return logits, list(_REF["probs"])
    finally:
        _REF["hooks"], _REF["probs"] = [], []


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_oss", "gemma2"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("name", sorted(HOOKS))
def test_capture_under_interventions_equals_the_whole_changed_matrix(family, padding_side, name):
    """Key mass, key counts, entropy, the last rows, the sink share, the kept first-token column and the logits of a
    capture under interventions (chunks of 3 queries, ACT's column means from a pass over the chunks) equal an eager
    pass that changes each layer's whole matrix: padding on both sides, GQA, soft-capping, learned sink logits."""
    lm = tiny_model(family)
    kwargs, mask = _inputs(lm, padding_side)
    ref_logits, ref_probs = _reference(lm, HOOKS[name](), kwargs)
    real = mask.bool()  # [b, n]
    b = real.shape[0]
    offsets = (mask.cumsum(-1) == 0).sum(-1)  # [b] first real position
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # [b] last real position
    config = CaptureConfig(rows="last", entropy=True, columns=[0], chunk_size=3)
    with torch.no_grad(), intervene(lm.model, *HOOKS[name]()), \
            capture_session(lm.model, config, mask, row_positions=last[:, None],
                            column_positions=offsets[:, None]) as session:
        logits = lm.model(**kwargs).logits
    assert len(session.records) == len(ref_probs) == lm.info.n_layers
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-4, rtol=0)
    qv = real[:, None, :].float()  # [b, 1, q]
    for record, probs in zip(session.records, ref_probs, strict=True):  # probs [b, h, q, k]
        assert probs.shape[-1] == probs.shape[-2]
        torch.testing.assert_close(record.key_mass_sum, (probs * qv[..., None]).sum(-2), atol=TOL, rtol=1e-5)
        for p in range(b):
            q = real[p]
            torch.testing.assert_close(record.entropy[p][:, q], -torch.special.xlogy(probs[p], probs[p]).sum(-1)[:, q],
                                       atol=TOL, rtol=0)
            torch.testing.assert_close(record.rows[p, :, 0], probs[p, :, last[p]], atol=TOL, rtol=0)
            torch.testing.assert_close(record.columns[p, :, :, 0], probs[p, :, :, offsets[p]] * qv[p], atol=TOL, rtol=0)
            if family == "gpt_oss":
                torch.testing.assert_close(record.sink_share[p][:, q], 1 - probs[p].sum(-1)[:, q], atol=TOL, rtol=0)
            else:
                assert record.sink_share is None


@pytest.mark.parametrize("name", ["reweight_sinks", "act_then_mask"])
def test_sink_columns_under_interventions_are_the_changed_columns(name):
    """`sink_columns` under interventions (found from the changed key mass, read in a second pass over the changed
    chunks): the keys whose changed column mass exceeds the floor, and their changed columns."""
    lm = tiny_model("llama")
    kwargs, mask = _inputs(lm, "right")
    _, ref_probs = _reference(lm, HOOKS[name](), kwargs)
    floor = 0.1
    with torch.no_grad(), intervene(lm.model, *HOOKS[name]()), \
            capture_session(lm.model, CaptureConfig(rows=None, sink_columns=floor, chunk_size=3), mask) as session:
        lm.model(**kwargs)
    qv = mask.bool()[:, None, :, None].float()  # [b, 1, q, 1]
    n = mask.shape[1]
    seen = (torch.tril(torch.ones(n, n)) * qv[:, 0] * mask[:, None, :]).sum(-2)  # [b, k] real queries seeing k
    for record, probs in zip(session.records, ref_probs, strict=True):
        alpha = (probs * qv).sum(-2) / seen[:, None].clamp(min=1)  # [b, h, k]
        index = record.column_index  # [b, h, K]
        for p in range(mask.shape[0]):
            for head in range(probs.shape[1]):
                expected = {int(k) for k in (alpha[p, head] > floor).nonzero()}
                got = {int(k) for k in index[p, head] if k >= 0}
                assert got == expected
                for j, k in enumerate(index[p, head].tolist()):
                    want = probs[p, head, :, k] * qv[p, 0, :, 0] if k >= 0 else torch.zeros(n)
                    torch.testing.assert_close(record.columns[p, head, :, j], want, atol=TOL, rtol=0)


def test_a_capture_under_interventions_never_holds_the_whole_matrix():
    """Under a capture session the hooks see a chunk of queries at a time (ACT's column pass included), every key of
    each row: no [b, h, q, k] tensor of the prompt."""
    seen = []

    class Record(Temperature):
        def change(self, probs, layer, visible):
            seen.append(tuple(probs.shape[-2:]))
            return super().change(probs, layer, visible)

    lm = tiny_model("llama")
    kwargs, mask = _inputs(lm, "right")
    n = mask.shape[1]
    with torch.no_grad(), intervene(lm.model, Record(t=0.8), Calibrate(beta=0.4)), \
            capture_session(lm.model, CaptureConfig(chunk_size=4), mask):
        lm.model(**kwargs)
    assert n > 8 and max(q for q, _ in seen) == 4 and all(k == n for _, k in seen)
    assert len(seen) == lm.info.n_layers * 2 * -(-n // 4)  # per layer: ACT's column pass, then the reduction
