"""Sinks during generation (`sinkscope.analyses.generate`): every decode step's statistics equal those of the eager
attention of a full forward of the same prefix (its last row); greedy tokens equal `model.generate`'s; the per-key
shares, secondary sinks, per-layer means and sink curves equal a direct computation from the eager maps; the CLI
writes the tables, the figure and a report section."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from sinkscope.analyses.generate import (
    GenerateSettings,
    generate,
    later_counts,
    next_token,
    step_table,
)
from sinkscope.cli.app import app
from sinkscope.errors import SinkscopeError
from sinkscope.models import tiny_model

PROMPT = "The cat sat on the mat."
N_NEW = 12
SETTINGS = GenerateSettings(max_new_tokens=N_NEW, secondary_threshold=0.02, min_later=2, stop_at_eos=False)
TOL = 1e-5


def eager_maps(lm, ids: list[int]) -> torch.Tensor:
    """[layer, head, n, n] float32 attention of an eager copy of the model on `ids` (output_attentions)."""
    model = copy.deepcopy(lm.model)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    return torch.stack([a[0].float() for a in out.attentions])


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def generated(request):
    lm = tiny_model(request.param)
    result = generate(lm, PROMPT, SETTINGS)
    ids = result.prompt_ids[0] + result.generated_ids[0]
    return lm, result, ids, eager_maps(lm, ids)


def test_each_decode_step_equals_eager_attention_of_its_prefix(generated):
    """Step s's row (the token at position n_prompt + s over every earlier key) is the last row of an eager forward of
    the prefix up to that token: first-token share, entropy, the top keys and the keys above ε."""
    lm, result, ids, _ = generated
    steps = result.tables["steps"]
    n_prompt = len(result.prompt_ids[0])
    eps = SETTINGS.sink_threshold
    assert len(steps) == N_NEW * lm.info.n_layers * lm.info.n_heads
    for s in range(N_NEW):
        prefix = ids[: n_prompt + s + 1]
        ref = eager_maps(lm, prefix)[:, :, -1]  # [L, H, n]
        got = steps[steps["step"] == s].sort_values(["layer", "head"])
        assert (got["position"] == len(prefix) - 1).all()
        np.testing.assert_allclose(got["first_mass"], ref[..., 0].reshape(-1), atol=TOL)
        entropy = -torch.special.xlogy(ref, ref).sum(-1)
        np.testing.assert_allclose(got["entropy"], entropy.reshape(-1), atol=1e-4)
        top = ref.sort(-1, descending=True).values.reshape(-1, ref.shape[-1])
        flat = ref.reshape(-1, ref.shape[-1])
        for i in range(SETTINGS.n_top):
            pos = torch.as_tensor(got[f"top{i + 1}_position"].to_numpy().copy())
            att = got[f"top{i + 1}_attention"].to_numpy()
            np.testing.assert_allclose(att, top[:, i], atol=TOL)  # the i-th largest share…
            np.testing.assert_allclose(flat[torch.arange(len(pos)), pos], att, atol=TOL)  # …sits at that key
        over = ref > eps
        np.testing.assert_array_equal(got["n_over"], over.sum(-1).reshape(-1))
        np.testing.assert_allclose(got["over_mass"], (ref * over).sum(-1).reshape(-1), atol=TOL)


def test_greedy_tokens_equal_model_generate(generated):
    lm, result, _, _ = generated
    prompt = torch.tensor([result.prompt_ids[0]])
    out = lm.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=N_NEW,
                            min_new_tokens=N_NEW, pad_token_id=0)
    assert out[0, prompt.shape[1]:].tolist() == result.generated_ids[0]


def test_key_mass_secondary_sinks_and_layers_equal_the_eager_maps(generated):
    """m_lj = mean over heads and the generated tokens after j of A_tj, from the eager maps of the whole sequence."""
    _, result, ids, maps = generated
    n_prompt, n = len(result.prompt_ids[0]), len(ids)
    gen = maps[:, :, n_prompt:]  # [L, H, steps, n]: the generated tokens' rows
    later = torch.arange(n_prompt, n)[:, None] > torch.arange(n)[None, :]  # [steps, n]: t after j
    mass = (gen * later).sum(2).mean(1) / later.sum(0).clamp(min=1)  # [L, n]
    keys = result.tables["key_mass"].sort_values(["layer", "position"])
    np.testing.assert_allclose(keys["mass"], mass.reshape(-1), atol=TOL)
    np.testing.assert_array_equal(keys["n_later"].to_numpy()[:n], later.sum(0).numpy())
    np.testing.assert_array_equal(later_counts(n, n_prompt, N_NEW), later.sum(0).numpy())

    sinks = result.tables["secondary_sinks"]
    want = (mass >= SETTINGS.secondary_threshold) & (later.sum(0) >= SETTINGS.min_later)[None]
    want[:, 0] = False
    assert set(zip(sinks["layer"], sinks["position"], strict=True)) == {tuple(x) for x in want.nonzero().tolist()}
    assert len(sinks) > 0
    per_head = (gen * later).sum(2) / later.sum(0).clamp(min=1)  # [L, H, n]
    for row in sinks.itertuples():
        assert row.peak_head == int(per_head[row.layer, :, row.position].argmax())
        assert row.peak_mass == pytest.approx(float(per_head[row.layer, :, row.position].max()), abs=TOL)
        assert row.generated == (row.position >= n_prompt)
        assert row.token == result.tables["tokens"]["token"][row.position]

    layers = result.tables["layers"].sort_values("layer")
    np.testing.assert_allclose(layers["first_mass"], gen[..., 0].mean((1, 2)), atol=TOL)
    entropy = -torch.special.xlogy(gen, gen).sum(-1)  # [L, H, steps]
    np.testing.assert_allclose(layers["entropy"], entropy.mean((1, 2)), atol=1e-4)


def test_sink_curves_equal_the_eager_columns(generated):
    _, result, _, maps = generated
    curves = result.tables["sink_curves"]
    assert set(curves["key_position"]) >= {0}
    assert (curves["key_position"] < curves["position"]).all()
    at = [torch.as_tensor(curves[c].to_numpy().copy()) for c in ("layer", "position", "key_position")]
    ref = maps[at[0], :, at[1], at[2]]  # [rows, H]
    np.testing.assert_allclose(curves["attention"], ref.mean(-1), atol=TOL)
    strongest = result.tables["secondary_sinks"].groupby("position")["mass"].max().nlargest(SETTINGS.curves)
    assert set(curves["key_position"]) == {0, *strongest.index}


def test_step_table_by_hand():
    """A hand-made row: two layers, one head, four keys."""
    row = torch.tensor([[[0.5, 0.1, 0.35, 0.05]], [[0.25, 0.25, 0.25, 0.25]]])  # [L=2, H=1, n=4]
    entropy = -torch.special.xlogy(row, row).sum(-1)
    table = step_table(row, entropy, ["<s>", "a", "b", "c"], step=3, n_top=3, eps=0.3, prompt_id=2)
    first = table.iloc[0]
    assert (first["prompt_id"], first["step"], first["position"], first["token"]) == (2, 3, 3, "c")
    assert first["first_mass"] == pytest.approx(0.5)
    assert (first["top1_position"], first["top2_position"], first["top3_position"]) == (0, 2, 1)
    assert first["top2_token"] == "b" and first["top2_attention"] == pytest.approx(0.35)
    assert first["n_over"] == 2 and first["over_mass"] == pytest.approx(0.85)
    assert table.iloc[1]["n_over"] == 0 and table.iloc[1]["entropy"] == pytest.approx(np.log(4), rel=1e-6)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    logprobs = torch.log_softmax(torch.randn(50, generator=torch.Generator().manual_seed(1)), -1)
    greedy = int(logprobs.argmax())
    one = GenerateSettings(temperature=1.5, top_k=1)
    assert next_token(logprobs, one, torch.Generator().manual_seed(0)) == greedy
    hot = GenerateSettings(temperature=2.0)
    draws = [next_token(logprobs, hot, torch.Generator().manual_seed(s)) for s in range(20)]
    again = [next_token(logprobs, hot, torch.Generator().manual_seed(s)) for s in range(20)]
    assert draws == again and len(set(draws)) > 3


def test_sampled_generation_is_reproducible(tiny_llama):
    settings = GenerateSettings(max_new_tokens=6, temperature=1.0, top_k=20, seed=7, stop_at_eos=False)
    a, b = generate(tiny_llama, PROMPT, settings), generate(tiny_llama, PROMPT, settings)
    assert a.generated_ids == b.generated_ids


def test_bad_input_is_one_clear_error(tiny_llama, tiny_bert):
    with pytest.raises(SinkscopeError, match="encoder"):
        generate(tiny_bert, PROMPT, SETTINGS)
    with pytest.raises(SinkscopeError, match="empty"):
        generate(tiny_llama, "  ", SETTINGS)
    with pytest.raises(SinkscopeError, match="context"):
        generate(tiny_llama, PROMPT, GenerateSettings(max_new_tokens=10**6))
    with pytest.raises(SinkscopeError, match="chat template"):
        generate(tiny_llama, PROMPT, SETTINGS, chat=True)
    for bad in ({"sink_threshold": 0.05}, {"temperature": -1.0}, {"max_new_tokens": 0}, {"top_k": 0}):
        with pytest.raises(SinkscopeError):
            GenerateSettings(**bad)


def test_several_prompts_and_streamed_steps(tiny_llama, tmp_path):
    """With a run folder the steps go to disk a step at a time (not kept); prompts are numbered in every table."""
    settings = GenerateSettings(max_new_tokens=4, min_later=1, stop_at_eos=False)
    result = generate(tiny_llama, [PROMPT, "Hello there"], settings, out=tmp_path / "run")
    assert "steps" not in result.tables
    steps = pd.read_parquet(tmp_path / "run" / "steps.parquet")
    assert sorted(steps["prompt_id"].unique()) == [0, 1]
    assert len(steps) == 2 * 4 * tiny_llama.info.n_layers * tiny_llama.info.n_heads
    for name in ("generation", "tokens", "layers", "key_mass", "sink_curves"):
        assert sorted(result.tables[name]["prompt_id"].unique()) == [0, 1], name
    alone = generate(tiny_llama, "Hello there", settings)
    assert alone.generated_ids[0] == result.generated_ids[1]


def test_cli_writes_the_tables_figure_and_report(tmp_path):
    from sinkscope.report import write_report

    out = tmp_path / "gen"
    res = CliRunner().invoke(app, ["generate", "--model", "tiny:llama", "--prompt", PROMPT, "--max-new-tokens", "5",
                                   "--min-later", "1", "--ignore-eos", "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "generate"
    assert set(manifest["tables"]) == {"generation", "tokens", "steps", "layers", "key_mass", "secondary_sinks",
                                       "sink_curves"}
    assert manifest["tables"]["steps"] == 5 * 2 * 4  # steps × layers × heads of tiny:llama
    assert "sink_mass.png" in manifest["files"] and (out / "sink_mass.png").stat().st_size > 0
    page = write_report(out).read_text()
    assert 'id="sec-generate"' in page and "data:image/png;base64," in page

    res = CliRunner().invoke(app, ["generate", "--model", "tiny:llama", "--prompt", PROMPT, "--max-new-tokens", "3"])
    assert res.exit_code == 0 and "3 generated" in res.output
    res = CliRunner().invoke(app, ["generate", "--model", "tiny:llama", "--prompt", PROMPT, "--sink-threshold",
                                   "0.01"])
    assert res.exit_code == 2
