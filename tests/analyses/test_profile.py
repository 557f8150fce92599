"""profile/explain tables against independent computations from eager output_attentions; run folders; the batched
profile (what the CLI runs) writes exactly the tables `profile` holds in memory."""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch

from sinkscope.analyses.explain import explain
from sinkscope.analyses.mitigate import detect_mask_renormalise
from sinkscope.analyses.profile import ExactSums, LayerSummary, profile, profile_in_batches
from sinkscope.errors import SinkscopeError
from sinkscope.store import load_run, save_run

PROMPTS = ["The cat sat on the mat.", "Sinks, sinks everywhere!"]
# Eleven usable prompts of different lengths (four batches of three) and two unusable ones.
MANY = [f"Prompt {i}: the quick brown fox jumps over the lazy dog." + " again" * (i % 7) for i in range(11)] + \
    ["", "x" * 900]


def _eager_attentions(lm, text):
    model = copy.deepcopy(lm.model)
    model.set_attn_implementation("eager")
    enc = lm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return [a[0].float() for a in model(**enc, output_attentions=True).attentions]  # each [H, n, n]


def test_key_table_matches_eager(tiny_llama):
    result = profile(tiny_llama, PROMPTS, "column_mass", {"eps": 0.2})
    keys = result.tables["keys"]
    lengths = [len(tiny_llama.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert len(keys) == sum(n * 2 * 4 for n in lengths)  # prompt × layer × head × key
    for pid, text in enumerate(PROMPTS):
        for layer, att in enumerate(_eager_attentions(tiny_llama, text)):
            n = att.shape[-1]
            alpha = att.sum(-2) / torch.arange(n, 0, -1)  # causal: key k is seen by n − k queries
            got = keys[(keys.prompt_id == pid) & (keys.layer == layer)].sort_values(["head", "position"])
            torch.testing.assert_close(torch.tensor(got["alpha"].to_numpy()).view(4, n), alpha, atol=1e-5, rtol=0)
            assert (got["sink"].to_numpy() == (alpha > 0.2).flatten().numpy()).all()
            torch.testing.assert_close(torch.tensor(got["last_row"].to_numpy()).view(4, n), att[:, -1], atol=1e-5,
                                       rtol=0)
    assert list(keys.columns[:5]) == ["prompt_id", "layer", "head", "position", "token"]


def test_keys_table_is_built_when_first_read(tiny_llama):
    """`profile` leaves its largest table, `keys`, to be built when read (a 32,768-token prompt gives 4.7 M rows);
    the per-layer summary needs only some of its rows, and reading `keys` gives the same table as building it."""
    from sinkscope.analyses.profile import key_table, layer_summary

    result = profile(tiny_llama, PROMPTS, "column_mass")
    assert list(result.tables) == ["keys", "heads", "prompts", "layers", "skipped"]
    assert not result.tables.built("keys") and result.tables.built("layers")
    keys = result.tables["keys"]
    assert result.tables.built("keys") and result.tables["keys"] is keys
    pd.testing.assert_frame_equal(keys, key_table(result.trace, result.sinks, [0, 1]))
    pd.testing.assert_frame_equal(result.tables["layers"], layer_summary(result.tables["heads"], keys))


def test_layer_summary_by_hand(tiny_llama):
    result = profile(tiny_llama, PROMPTS, "column_mass")
    heads, layers = result.tables["heads"], result.tables["layers"]
    for layer in range(2):
        per = heads[heads.layer == layer]
        assert layers.loc[layers.layer == layer, "head_share"].item() == pytest.approx((per.n_sinks > 0).mean())
    keys = result.tables["keys"]
    pos0 = keys[(keys.position == 0) & (keys.layer == 1)]["alpha"].mean()
    assert layers.loc[layers.layer == 1, "pos0_alpha"].item() == pytest.approx(pos0)


@pytest.mark.parametrize("method", ["mean_multiple", "zscore", "entropy_delta", "act", "sink_rate"])
def test_every_method_runs(tiny_llama, method):
    result = profile(tiny_llama, PROMPTS, method)
    assert result.sinks.dtype == torch.bool
    assert int(result.tables["heads"]["n_sinks"].sum()) == int(result.sinks.sum())
    if method == "sink_rate":
        rate = result.tables["sink_rate"]
        assert rate["sink_rate"].between(0, 1).all()
        assert len(rate) == result.tables["prompts"]["n_tokens"].sum()


def test_bad_prompts_are_skipped_and_reported(tiny_llama):
    result = profile(tiny_llama, ["fine", "", "x" * 900, "also fine"])
    assert result.tables["prompts"]["prompt_id"].tolist() == [0, 3]
    assert result.tables["skipped"]["prompt_id"].tolist() == [1, 2]
    assert "context" in result.tables["skipped"]["reason"][1]
    with pytest.raises(SinkscopeError, match="no usable prompt"):
        profile(tiny_llama, ["", "   "])


def test_run_folder_roundtrip(tmp_path, tiny_llama):
    result = profile(tiny_llama, PROMPTS)
    folder = save_run(tmp_path / "run", result.run(tiny_llama))
    run = load_run(folder)
    assert set(run.tables) == set(result.tables)
    for name, table in result.tables.items():
        pd.testing.assert_frame_equal(run[name], table.reset_index(drop=True), check_dtype=False)
    manifest = run.manifest
    assert manifest["model"]["name"] == "tiny:llama" and manifest["parameters"]["method"] == "column_mass"
    assert {"torch", "transformers", "python", "sinkscope"} <= set(manifest["versions"])
    assert manifest["tables"]["keys"] == len(result.tables["keys"])
    with pytest.raises(SinkscopeError, match="not a sinkscope run"):
        load_run(tmp_path)


def test_explain_matches_eager(tiny_llama):
    text = "The movie was great."
    ex = explain(tiny_llama, text, "zscore", {"alpha": 1.5})
    att = _eager_attentions(tiny_llama, text)
    a = att[-1][:, -1].mean(0)  # last layer, last token, mean over heads (seed 000 §4.1)
    torch.testing.assert_close(ex.before, a, atol=1e-5, rtol=0)
    expected = detect_mask_renormalise(a, "zscore", alpha=1.5)
    torch.testing.assert_close(ex.after, expected.b, atol=1e-5, rtol=0)
    assert torch.equal(ex.sinks, expected.sinks)
    assert float(ex.after.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(ex.after[ex.sinks].sum()) == 0.0
    table = ex.table()
    assert len(table) == len(ex.tokens) and table["rank_before"].min() == 1
    # layer range and head subset
    ex2 = explain(tiny_llama, text, "entropy_delta", layers=[0, 1], heads=[1, 3])
    a2 = torch.stack([att[layer][[1, 3], -1] for layer in (0, 1)]).mean((0, 1))
    torch.testing.assert_close(ex2.before, a2, atol=1e-5, rtol=0)
    with pytest.raises(SinkscopeError, match="empty"):
        explain(tiny_llama, "  ")


@pytest.mark.parametrize("method", ["column_mass", "sink_rate", "zscore", "entropy_delta"])
def test_batched_run_folder_equals_in_memory(tmp_path, tiny_llama, method):
    """profile_in_batches appends each batch's tables to the run folder; they equal profile's, bit for bit."""
    result = profile(tiny_llama, MANY, method, batch_size=3)
    want = load_run(save_run(tmp_path / "memory", result.run(tiny_llama)))
    summary = profile_in_batches(tiny_llama, MANY, method, batch_size=3, out=tmp_path / "batched")
    got = load_run(tmp_path / "batched")
    assert list(got.tables) == list(want.tables) and got.manifest["tables"] == want.manifest["tables"]
    for name, table in want.tables.items():
        pd.testing.assert_frame_equal(got[name], table, check_exact=True, obj=name)
    for key in ("command", "model", "parameters", "settings_sha256"):
        assert got.manifest[key] == want.manifest[key]
    pd.testing.assert_frame_equal(summary.layers, result.tables["layers"], check_exact=True)
    assert summary.skipped == result.skipped and summary.rows == got.manifest["tables"]
    assert summary.n_prompts == 11 and not list((tmp_path / "batched").glob(".tmp-*"))
    alone = profile_in_batches(tiny_llama, MANY, method, batch_size=3)  # no folder: the summary only
    assert alone.folder is None and alone.rows == summary.rows
    pd.testing.assert_frame_equal(alone.layers, summary.layers, check_exact=True)


def _pandas_layer_summary(heads: pd.DataFrame, keys: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """The pandas formula LayerSummary replaced (it needs every prompt's tables at once)."""
    by_layer = heads.groupby("layer")
    frame = pd.DataFrame({
        "head_share": by_layer["n_sinks"].apply(lambda s: float((s > 0).mean())),
        "mean_sinks": by_layer["n_sinks"].mean(),
        "pos0_alpha": keys[keys["position"] == 0].groupby("layer")["alpha"].mean(),
    })
    described = {}
    for layer, group in keys[keys["sink"]].groupby("layer"):
        stats = group.groupby(["position", "token"])["alpha"].agg(["size", "mean"]).sort_values("size", ascending=False)
        described[layer] = ", ".join(f"{tok!r}@{pos} ({mean:.2f})"
                                     for (pos, tok), (_, mean) in stats.head(top).iterrows())
    frame["sink_tokens"] = pd.Series(described, dtype="object")
    frame["sink_tokens"] = frame["sink_tokens"].fillna("")
    return frame.reset_index()


def test_layer_summary_matches_pandas_for_any_batching(tiny_llama):
    tables = profile(tiny_llama, MANY, "zscore").tables
    heads, keys, layers = tables["heads"], tables["keys"], tables["layers"]
    want = _pandas_layer_summary(heads, keys)
    assert (layers["sink_tokens"] != "").all()
    pd.testing.assert_frame_equal(layers.drop(columns="pos0_alpha"), want.drop(columns="pos0_alpha"), check_exact=True)
    # pandas 3 averages float32 α with a compensated float32 sum; LayerSummary's mean is exact, in float64
    np.testing.assert_allclose(layers["pos0_alpha"], want["pos0_alpha"].astype("float64"), rtol=2e-7, atol=0)
    summary = LayerSummary()
    for pid in heads["prompt_id"].unique()[::-1]:  # a prompt at a time, last first: the same bits
        summary.add(heads[heads["prompt_id"] == pid], keys[keys["prompt_id"] == pid])
    pd.testing.assert_frame_equal(summary.table(), layers, check_exact=True)


def test_exact_sums_do_not_round():
    sums = ExactSums(["g"])
    values = [1e16, 1.0, -1e16, 3.0, 2.0**-60]  # a float64 running sum loses the 1.0 and the 2^-60
    for v in values:
        sums.add(pd.DataFrame({"g": [7], "x": [v]}), "x")
    assert sums.means() == {7: (5, float((Fraction(4) + Fraction(2) ** -60) / 5))}
    whole = ExactSums(["g"])
    whole.add(pd.DataFrame({"g": [7] * 5, "x": values}), "x")
    assert whole.means() == sums.means()
