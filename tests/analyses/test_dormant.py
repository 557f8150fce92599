"""Active/dormant heads and value-state drains (issue #18 item 1) against independent computations: value vectors
v = W_v x per head computed by hand from the module weights and an eager forward's hidden states, the sink share and
head outputs o_i = Σ_j A_ij v_j from eager attention weights, and the residual norms from `output_hidden_states`;
the classification and the domain-switch table on hand-made numbers; the shared data sets as domains."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from sinkscope.analyses.dormant import (
    classify,
    domain_names,
    domain_table,
    head_domains,
    load_domains,
    switch_table,
)
from sinkscope.errors import SinkscopeError

TEXTS = ["The cat sat on the mat and looked at the birds.", "Attention sinks draw mass, a lot of it.",
         "Hi there, friend"]
CODE = ["def f(x): return x + 1", "for i in range(10): print(i)"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@torch.no_grad()
def _by_hand(lm, text: str, sink: int, max_tokens: int) -> dict[str, np.ndarray]:
    """Per layer and head from one eager forward (no sinkscope code): σ, ‖v_s‖, mean_{j≠s} ‖v_j‖, mean ‖o_i‖ over
    the sink's queries, and the residual norms ‖h_s‖ per site (embeddings, then each block's output)."""
    model = copy.deepcopy(lm.model)
    model.set_attn_implementation("eager")
    ids = list(lm.tokenizer(text)["input_ids"])
    if len(ids) > max_tokens:
        ids = [*ids[: max_tokens - 1], ids[-1]] if not lm.info.is_causal else ids[:max_tokens]
    n = len(ids)
    s = sink % n
    out = model(input_ids=torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    layers = model.model.layers if lm.info.is_causal else model.encoder.layer
    queries = [i for i in range(n) if (i > s if lm.info.is_causal else i != s)]
    others = [j for j in range(n) if j != s]
    share, sink_v, other_v, out_norm = [], [], [], []
    for layer, (block, att) in enumerate(zip(layers, out.attentions, strict=True)):
        h_in = out.hidden_states[layer][0]  # [n, d]: the block's input
        if lm.info.is_causal:
            v = block.self_attn.v_proj(block.input_layernorm(h_in))  # [n, kvh·dv]
            kvh = model.config.num_key_value_heads
        else:
            v = block.attention.self.value(h_in)
            kvh = model.config.num_attention_heads
        v = v.view(n, kvh, -1).transpose(0, 1).double()  # [kvh, n, dv]
        a = att[0].double()  # [h, n, n]
        g = a.shape[0] // kvh
        v_h = v.repeat_interleave(g, dim=0)  # [h, n, dv]
        o = a @ v_h  # [h, n, dv]
        vn = v_h.norm(dim=-1)  # [h, n]
        share.append(a[:, queries, s].mean(-1).numpy())
        sink_v.append(vn[:, s].numpy())
        other_v.append(vn[:, others].mean(-1).numpy())
        out_norm.append(o[:, queries].norm(dim=-1).mean(-1).numpy())
    return {"sink_share": np.stack(share), "sink_value": np.stack(sink_v), "other_value": np.stack(other_v),
            "out_norm": np.stack(out_norm), "n": n, "s": s,
            "states": [h[0] for h in out.hidden_states]}


@pytest.mark.parametrize(("family", "sink"), [("llama", 0), ("bert", 0), ("bert", -1)])
def test_head_measures_match_eager_values(family: str, sink: int) -> None:
    from sinkscope.models import tiny_model

    lm = tiny_model(family)
    result = head_domains(lm, {"prose": TEXTS, "code": CODE}, sink=sink, max_tokens=20, batch_size=2)
    per_prompt = result.tables["prompt_heads"]
    residual = result.tables["residual"]
    for domain, texts in (("prose", TEXTS), ("code", CODE)):
        for pid, text in enumerate(texts):
            want = _by_hand(lm, text, sink, 20)
            got = per_prompt[(per_prompt["domain"] == domain) & (per_prompt["prompt_id"] == pid)]
            assert (got["position"] == want["s"]).all()
            for name in ("sink_share", "sink_value", "other_value", "out_norm"):
                values = got.pivot(index="layer", columns="head", values=name).sort_index().to_numpy()
                np.testing.assert_allclose(values, want[name], rtol=1e-4, atol=1e-6, err_msg=f"{family} {name}")
            np.testing.assert_allclose(got["value_ratio"], got["sink_value"] / got["other_value"])
            res = residual[(residual["domain"] == domain) & (residual["prompt_id"] == pid)].sort_values("layer")
            norms = [h.norm(dim=-1) for h in want["states"]]  # embeddings, then each block's output
            if family == "llama":  # transformers reports the last block after the final norm: compare the others
                norms, res = norms[:-1], res.iloc[:-1]
            np.testing.assert_allclose(res["sink_norm"], [float(x[want["s"]]) for x in norms], rtol=1e-4)
            median = [float(torch.cat([x[: want["s"]], x[want["s"] + 1:]]).median()) for x in norms]
            np.testing.assert_allclose(res["median_norm"], median, rtol=1e-4)


def test_domain_table_classifies_and_finds_switches() -> None:
    rows = []
    #  head (0, 0): dormant in "a" (σ 0.95, small output), active in "b" (σ 0.2): a switch
    #  head (0, 1): σ 0.95 in both but a large output: never dormant; head (1, 0): mixed in "b"
    for domain, head, layer, share, out in [("a", 0, 0, 0.95, 0.1), ("b", 0, 0, 0.2, 2.0), ("a", 1, 0, 0.95, 1.5),
                                            ("b", 1, 0, 0.95, 1.5), ("a", 0, 1, 0.1, 1.0), ("b", 0, 1, 0.7, 1.0)]:
        for pid in range(2):
            rows.append({"domain": domain, "prompt_id": pid, "layer": layer, "head": head, "position": 0,
                         "token": "<s>", "sink_share": share, "sink_value": 0.1, "other_value": 1.0,
                         "value_ratio": 0.1, "out_norm": out})
    heads = domain_table(pd.DataFrame(rows), dormant_share=0.9, output_ratio=0.5, active_share=0.5)
    state = heads.set_index(["domain", "layer", "head"])["state"]
    assert state["a", 0, 0] == "dormant" and state["b", 0, 0] == "active"
    assert state["a", 0, 1] == "mixed" and state["b", 1, 0] == "mixed" and state["a", 1, 0] == "active"
    assert heads["out_rel"].tolist() == pytest.approx(heads["out_norm"].tolist())  # other_value = 1
    layer0 = heads[(heads["domain"] == "a") & (heads["layer"] == 0)]
    assert layer0["out_rel_layer"].tolist() == pytest.approx([0.1 / 0.8, 1.5 / 0.8])
    switch = switch_table(heads)
    assert switch[["layer", "head", "dormant_in", "active_in"]].values.tolist() == [[0, 0, "a", "b"]]
    assert switch["share_range"].iloc[0] == pytest.approx(0.75)
    assert classify(pd.Series([0.9]), pd.Series([0.5]), 0.9, 0.5, 0.5).tolist() == ["dormant"]


def test_refusals(tiny_llama) -> None:
    with pytest.raises(SinkscopeError, match="no domains"):
        head_domains(tiny_llama, {})
    with pytest.raises(SinkscopeError, match="decoder"):
        head_domains(tiny_llama, {"a": TEXTS}, sink=-1)
    with pytest.raises(SinkscopeError, match="no usable prompt"):
        head_domains(tiny_llama, {"a": ["", "  "]})
    with pytest.raises(SinkscopeError, match="active share"):
        head_domains(tiny_llama, {"a": TEXTS}, dormant_share=0.4, active_share=0.5)
    result = head_domains(tiny_llama, {"a": [*TEXTS, "", "x"]}, max_tokens=8)
    assert result.tables["skipped"]["prompt_id"].tolist() == [3]  # "x" is <s> x: two tokens, enough
    assert result.tables["prompts"]["n_tokens"].max() == 8
    fixed = head_domains(tiny_llama, {"a": TEXTS}, max_tokens=20, min_tokens=20)  # 48, 40 and 17 tokens
    assert set(fixed.tables["prompts"]["n_tokens"]) == {20}
    assert "min-tokens 20" in fixed.tables["skipped"]["reason"].iloc[0]
    with pytest.raises(SinkscopeError, match="unknown dataset"):
        domain_names("sst2,nope")
    with pytest.raises(SinkscopeError, match="twice"):
        domain_names("sst2,SST-2")


def test_shared_data_sets_as_domains(shared) -> None:
    data = shared / "data"
    if not (data / "sst2").is_dir() or not (data / "tiny_shakespeare").is_dir():
        pytest.skip(f"the shared data sets are not at {data}")
    assert domain_names("all")[-1] == "tiny_shakespeare" and len(domain_names("all")) == 10
    domains = load_domains(domain_names("sst2,cb,shakespeare"), data, limit=3, excerpt_chars=200)
    assert list(domains) == ["sst2", "cb", "tiny_shakespeare"]
    assert all(len(texts) == 3 for texts in domains.values())
    assert "\n" in domains["cb"][0]  # premise and hypothesis, no instruction
    assert all(len(t) <= 200 for t in domains["tiny_shakespeare"])
    assert load_domains(["tiny_shakespeare"], data, limit=3, excerpt_chars=200) == {
        "tiny_shakespeare": domains["tiny_shakespeare"]}  # seeded: the same excerpts again
