"""sinkscope.toy.tinylm: tokenizer, attention variants, training runs, the emergence trace and the shipped model."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from sinkscope.errors import SinkscopeError
from sinkscope.store import load_run
from sinkscope.toy import tinylm
from sinkscope.toy.tinylm import (
    TRACE_COLUMNS,
    VARIANTS,
    BigramBackcopy,
    TrainConfig,
    attention_stats,
    load_checkpoint,
    softmax_off_by_one,
    softmax_with_sink,
    train,
    train_tokenizer,
)

WORDS = [
    "the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "to", "see", "big", "red", "small", "house", "tree",
    "river", "king", "queen", "said", "why", "how", "when", "what", "is", "was", "will", "be", "not", "very", "good",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small jsonl corpus of random sentences (40 documents)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    lines = []
    for i in range(40):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
                     for _ in range(8)]
        lines.append(json.dumps({"id": i, "text": " ".join(sentences)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def small_config(corpus: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(corpus), out=str(out), steps=4, batch_size=4, seq_len=24, d_model=32, layers=2, heads=4,
                vocab_size=300, eval_every=2, eval_batch=4, lr=1e-2, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_tokenizer_adds_bos(corpus):
    docs = tinylm.read_documents(corpus)
    tok = train_tokenizer(docs, 300)
    ids = tok("The cat sat.")["input_ids"]
    assert ids[0] == tok.bos_token_id == tok.convert_tokens_to_ids("<s>")
    assert tok.convert_ids_to_tokens(ids[1]) != "<s>"
    assert tok.decode(ids[1:]) == "The cat sat."
    words = tinylm.word_tokenizer(8)
    assert words("t1 t2")["input_ids"] == [words.bos_token_id, 5, 6]


def test_off_by_one_matches_hand_computation():
    x = torch.tensor([[1.0, 2.0, -math.inf], [0.5, -1.0, 3.0]])
    got = softmax_off_by_one(x)
    e = x.exp()
    want = e / (1 + e.sum(-1, keepdim=True))
    torch.testing.assert_close(got, want)
    assert bool((got.sum(-1) < 1).all())
    assert float(got[0, 2]) == 0.0


def test_sink_logit_matches_hand_computation():
    scores = torch.tensor([[[[1.0, 0.0], [2.0, -1.0]], [[0.0, 0.0], [1.0, 1.0]]]])  # [1, 2 heads, 2, 2]
    sink = torch.tensor([0.5, -2.0])
    got = softmax_with_sink(scores, sink)
    e = scores.exp()
    want = e / (sink.exp().view(1, 2, 1, 1) + e.sum(-1, keepdim=True))
    torch.testing.assert_close(got, want)
    assert bool((got.sum(-1) < 1).all())


def test_bigram_backcopy_copies_after_triggers():
    task = BigramBackcopy.make(list(range(10, 30)), n_triggers=3, seed=1)
    x = task.sample(16, 40, torch.Generator().manual_seed(0))
    assert x.shape == (16, 40) and int(x.min()) >= 10 and int(x.max()) < 30
    trig_ids = set(task.ids[task.trigger].tolist())
    hits = 0
    for row in x.tolist():
        for t in range(2, 40):
            if row[t - 1] in trig_ids:
                assert row[t] == row[t - 2]
                hits += 1
    assert hits > 0


def test_bigram_backcopy_copy_distances():
    """With D copy distances, trigger k copies the token 1 + (k mod D) places before it; D = 1 is the paper's task
    and draws the same sequences as before distances existed."""
    task = BigramBackcopy.make(list(range(10, 30)), seed=1, trigger_ids=[40, 41, 42, 43, 44], distances=3)
    assert task.distance[task.trigger].tolist() == [1, 2, 3, 1, 2] and int(task.distance[~task.trigger].max()) == 0
    x = task.sample(32, 50, torch.Generator().manual_seed(0))
    dist = dict(zip(task.ids.tolist(), task.distance.tolist(), strict=True))
    seen = set()
    for row in x.tolist():
        for t in range(2, 50):
            d = dist[row[t - 1]]
            if d and t - 1 - d >= 0:
                assert row[t] == row[t - 1 - d]
                seen.add(d)
    assert seen == {1, 2, 3}
    one = BigramBackcopy.make(list(range(10, 30)), n_triggers=3, seed=1)
    assert torch.equal(one.sample(4, 20, torch.Generator().manual_seed(0)),
                       BigramBackcopy.make(list(range(10, 30)), n_triggers=3, seed=1, distances=1)
                       .sample(4, 20, torch.Generator().manual_seed(0)))
    with pytest.raises(SinkscopeError, match="copy distances"):
        TrainConfig(synthetic="bigram_backcopy", synthetic_triggers=2, synthetic_distances=3).validate()


def _recall_reference(row: list[int], t: int, rule: str) -> int | None:
    """The TriggerRecall answer after the trigger at t − 1, by plain search (None: the chain's successor instead)."""
    if rule == "bind_hop":
        v = _recall_reference(row, t, "bind")
        if v is None:
            return None
        s1 = [s for s in range(t - 1) if row[s] == row[t - 1]][-1]
        found = [s for s in range(t - 2) if row[s] == v and s != s1 + 1]
        return row[found[-1] + 1] if found else None
    if rule in ("bind", "bind2"):
        d = 1 if rule == "bind" else 2
        found = [s for s in range(t - d) if row[s] == row[t - 1]]
        return row[found[-1] + d] if found else None
    if t < 2:
        return None
    a, before = row[t - 2], row[: t - 2]
    if rule == "copy":
        return a
    found = [s for s, tok in enumerate(before) if tok == a]
    if not found:
        return None
    s1 = found[-1]
    if rule == "induction":
        return row[s1 + 1]
    b = row[s1 + 1]
    found = [s for s, tok in enumerate(before) if tok == b and s != s1 + 1]
    return row[found[-1] + 1] if found else None


def test_trigger_recall_follows_its_rules():
    """Trigger k follows rule k mod 6 (copy, induction, two-hop, bind, bind2, bind-hop) — checked against a plain
    search over each sequence; every rule fires with its answer found, two-hop answers are not the one-hop ones, and
    the chain is followed elsewhere."""
    triggers = list(range(40, 52))
    rules = ("copy", "induction", "two_hop", "bind", "bind2", "bind_hop")
    task = tinylm.TriggerRecall.make_recall(list(range(10, 26)), triggers, rules=rules, seed=1)
    assert task.rule[task.trigger].tolist() == [0, 1, 2, 3, 4, 5] * 2 and int(task.rule[~task.trigger].max()) == -1
    x = task.sample(64, 48, torch.Generator().manual_seed(0))
    assert x.shape == (64, 48)
    rule = {tok: rules[k % 6] for k, tok in enumerate(triggers)}
    local = {int(v): i for i, v in enumerate(task.ids)}
    checked = dict.fromkeys(rules, 0)
    differs = 0  # two-hop answers that are not the one-hop answer (the rule is not induction in disguise)
    for row in x.tolist():
        for t in range(1, 48):
            if row[t - 1] in rule:
                want = _recall_reference(row, t, rule[row[t - 1]])
                if want is not None:
                    assert row[t] == want, (row, t)
                    checked[rule[row[t - 1]]] += 1
                    differs += rule[row[t - 1]] == "two_hop" and want != _recall_reference(row, t, "induction")
                    continue
            assert row[t] in task.ids[task.succ[local[row[t - 1]]]].tolist()
    assert min(checked.values()) > 20 and differs > 20, (checked, differs)
    with pytest.raises(SinkscopeError, match="unknown trigger rules"):
        tinylm.TriggerRecall.make_recall(list(range(10, 26)), triggers, rules=("copy", "teleport"))
    with pytest.raises(SinkscopeError, match="synthetic rules"):
        TrainConfig(synthetic="trigger_recall", synthetic_triggers=2, synthetic_rules="copy,bind,induction").validate()


def test_trigger_recall_inserted_into_text():
    """text_recall: triggers inserted into text windows; each inserted trigger is followed by its rule's answer (the
    plain search above) or, where there is none, by the text; dropping the triggers and answers gives the text back."""
    triggers = list(range(400, 412))
    rules = ("copy", "induction", "two_hop", "bind")
    task = tinylm.TriggerRecall.make_recall(list(range(10, 26)), triggers, rules=rules, seed=1)
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(10, 30, (32, 40), generator=gen)  # [n, length], a small vocabulary: many repeats
    x = task.insert(text, 0.2, gen)
    assert x.shape == text.shape
    rule = {tok: rules[k % 4] for k, tok in enumerate(triggers)}
    answered = dict.fromkeys(rules, 0)
    for row, src in zip(x.tolist(), text.tolist(), strict=True):
        kept = []
        for t, tok in enumerate(row):
            if t >= 1 and row[t - 1] in rule:  # after a trigger: its answer (which may itself be a trigger token)
                want = _recall_reference(row, t, rule[row[t - 1]])
                if want is not None:
                    assert tok == want
                    answered[rule[row[t - 1]]] += 1
                    continue
            if tok in rule:  # an inserted trigger
                assert 2 <= t <= len(row) - 2 and row[t - 1] not in rule
                continue
            kept.append(tok)
        assert kept == src[: len(kept)]
    assert min(answered.values()) > 5, answered


@pytest.fixture(scope="module")
def variant_runs(corpus, tmp_path_factory) -> dict[str, tinylm.TrainResult]:
    root = tmp_path_factory.mktemp("runs")
    return {v: train(small_config(corpus, root / v, variant=v)) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_trace_is_well_formed(variant_runs, variant):
    result = variant_runs[variant]
    assert result.completed and result.steps_done == 4
    trace = tinylm.read_trace(result.out)
    assert tuple(trace.columns) == TRACE_COLUMNS
    assert sorted(trace["step"].unique()) == [0, 2, 4]
    assert len(trace) == 3 * 2 * 4  # evaluations × layers × heads
    numeric = trace.select_dtypes("number")
    assert not numeric.isna().any().any()
    assert bool(torch.isfinite(torch.tensor(numeric.to_numpy(dtype="float64"))).all())
    assert trace["alpha0"].between(0, 1).all() and trace["share_03"].between(0, 1).all()
    null = trace["null_mass"]
    if variant in ("off_by_one", "sink_logit"):
        assert (null > 0).all()  # rows sum to < 1
    else:
        assert null.abs().max() < 1e-5
    run = load_run(result.out)
    assert run.manifest["command"] == "train-lm" and run.manifest["seed"] == 0
    model, _ = load_checkpoint(result.out / "model")
    assert tinylm.variant_of(model) == variant
    if variant == "sink_logit":
        assert all(hasattr(layer.self_attn, "sinks") for layer in model.model.layers)
        assert any(float(layer.self_attn.sinks.detach().abs().sum()) > 0 for layer in model.model.layers)  # trained


def test_reloaded_variant_gives_the_same_statistics(variant_runs):
    result = variant_runs["sink_logit"]
    model, tok = load_checkpoint(result.out / "model")
    ids = tok(["the cat sat on a mat", "a dog ran"], padding=True, return_tensors="pt")
    a = attention_stats(model, ids["input_ids"], ids["attention_mask"])
    b = attention_stats(model, ids["input_ids"], ids["attention_mask"], batch_size=1)
    torch.testing.assert_close(a.key_mass, b.key_mass, atol=1e-5, rtol=0)
    rows = a.key_mass  # α of the last query of a row is one value; check α sums via null mass
    assert bool((a.null_mass > 0).all()) and rows.shape[:3] == (2, 2, 4)


def _reference_stats(model, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """The statistics as attention_stats computed them before it became a run_capture call, kept here only as the
    independent reference: the probabilities of the variant's own `variant_probs`, recorded by a test attention
    function that then runs the variant's function, ‖h‖ of each decoder layer's output read by forward hooks, and the
    model's own loss. ids, mask [B, N] (right padding)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from sinkscope.capture import attention_implementation

    variant = tinylm.variant_of(model)
    inner = ALL_ATTENTION_FUNCTIONS[tinylm.ATTN_NAMES[variant]]
    probs: list[torch.Tensor] = []

    def recording(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        nq, nk = query.shape[2], key.shape[2]
        visible = torch.ones(nq, nk, dtype=torch.bool).tril()[None, None] if attention_mask is None \
            else attention_mask
        assert visible.dtype == torch.bool
        bias = torch.zeros(visible.shape).masked_fill(~visible, -math.inf)
        keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        probs.append(tinylm.variant_probs(variant, module, query, keys, bias, scaling))
        return inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    name = f"tinylm_test_reference_{variant}"
    AttentionInterface.register(name, recording)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    norms: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _a, out: norms.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.model.layers]
    try:
        with torch.no_grad(), attention_implementation(model, name):
            out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    n = ids.shape[1]
    qv = mask.bool()  # [B, N]
    seen = (qv[:, :, None] & qv[:, None, :] & torch.ones(n, n, dtype=torch.bool).tril()).sum(1)  # [B, key]
    p = torch.stack(probs, dim=1)  # [B, L, H, q, k]
    qf = qv[:, None, None, :].float()
    return {
        "key_mass": (p * qf[..., None]).sum(-2) / seen[:, None, None, :].clamp(min=1),
        "null_mass": ((1 - p.sum(-1)) * qf).sum(-1) / qv.sum(-1)[:, None, None],
        "norms": torch.stack([h.float().norm(dim=-1) for h in norms], dim=1) * qv[:, None, :],
        "loss": float(out.loss),
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_stats_equal_the_variants_own_probabilities(variant_runs, variant):
    """attention_stats (one run_capture pass) equals the statistics of the variant's own probabilities, with
    padding, batching and a trailing all-padding column; training mode is restored afterwards."""
    model, tok = load_checkpoint(variant_runs[variant].out / "model")
    with torch.no_grad():  # sharpen attention so the comparison is not between near-uniform maps
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    enc = tok(["The king said why the river ran.", "A small dog.", "How old is the red house by the tree?"],
              padding=True, return_tensors="pt")
    ids = torch.cat([enc["input_ids"], torch.full((3, 1), tok.pad_token_id)], dim=1)
    mask = torch.cat([enc["attention_mask"], torch.zeros(3, 1, dtype=torch.long)], dim=1)
    ref = _reference_stats(model, ids, mask)
    model.train()
    stats = attention_stats(model, ids, mask, batch_size=2)
    assert model.training
    for name in ("key_mass", "null_mass", "norms"):
        assert getattr(stats, name).shape == ref[name].shape, name
        torch.testing.assert_close(getattr(stats, name), ref[name], atol=1e-5, rtol=0, msg=name)
    assert abs(stats.loss - ref["loss"]) < 1e-5
    assert stats.lengths.tolist() == mask.sum(-1).tolist()
    assert float(stats.key_mass[:, :, :, 0].std()) > 0.01
    if variant in ("off_by_one", "sink_logit"):
        assert float(stats.null_mass.min()) > 0.01
    else:
        assert float(stats.null_mass.abs().max()) == 0.0
    with pytest.raises(SinkscopeError, match="right padding"):
        attention_stats(model, ids, mask.flip(-1))


def test_gate_stays_on_under_sinkscope_capture(variant_runs):
    from sinkscope.capture import CaptureConfig, run_capture
    from sinkscope.models import load_model

    model, tok = load_checkpoint(variant_runs["gated"].out / "model")
    ids = tok("the king said why", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    lm = load_model(model, tokenizer=tok)
    trace = run_capture(lm, ["the king said why"], CaptureConfig(rows=None, entropy=False))
    ours = attention_stats(model, ids)
    torch.testing.assert_close(trace.key_mass, ours.key_mass, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain)


def test_resume_after_interruption_is_deterministic(corpus, tmp_path):
    cfg = small_config(corpus, tmp_path / "full", steps=6, eval_every=2)
    full = train(cfg)
    part_cfg = replace(cfg, out=str(tmp_path / "part"))
    first = train(part_cfg, stop_after=3)  # "killed" after the step-4 checkpoint
    assert not first.completed and first.steps_done == 4
    with pytest.raises(SinkscopeError, match="--resume"):
        train(part_cfg)
    second = train(part_cfg, resume=True)
    assert second.completed
    a, _ = load_checkpoint(full.out / "model")
    b, _ = load_checkpoint(second.out / "model")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    ta = tinylm.read_trace(full.out).drop(columns="time_s")
    tb = tinylm.read_trace(second.out).drop(columns="time_s")
    pd.testing.assert_frame_equal(ta, tb, atol=1e-6, rtol=0)


def test_resume_skips_a_damaged_checkpoint(corpus, tmp_path):
    """The checkpoint is a store unit: a damaged one is reported and not resumed from (here the only one: the run
    starts over), and the result equals an uninterrupted run."""
    cfg = small_config(corpus, tmp_path / "full", steps=4, eval_every=2)
    full = train(cfg)
    part_cfg = replace(cfg, out=str(tmp_path / "part"))
    train(part_cfg, stop_after=2)
    units = sorted((tmp_path / "part" / "units").iterdir())
    assert [u.name for u in units] == ["checkpoint-00000002"]
    (units[0] / "model.safetensors").write_bytes(b"cut short")
    said: list[str] = []
    second = train(part_cfg, resume=True, log=said.append)
    assert second.completed and "checkpoint-00000002: model.safetensors has 9 bytes" in said[0]
    assert not any(m.startswith("resuming") for m in said)
    a, _ = load_checkpoint(full.out / "model")
    b, _ = load_checkpoint(second.out / "model")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_run_folder_guards(corpus, tmp_path):
    from sinkscope.analyses.profile import profile
    from sinkscope.models import tiny_model
    from sinkscope.store import save_run

    lm = tiny_model("llama")
    taken = save_run(tmp_path / "profile", profile(lm, ["a prompt"]).run(lm))
    cfg = small_config(corpus, taken, steps=2)
    with pytest.raises(SinkscopeError, match=r"holds a `profile` run; pass another --out or --overwrite"):
        train(cfg)
    assert train(cfg, overwrite=True).completed
    assert load_run(taken).manifest["command"] == "train-lm"
    with pytest.raises(SinkscopeError, match="--resume"):
        train(cfg)
    assert train(cfg, overwrite=True).completed  # starts over
    assert train(replace(cfg, lr=2e-2), resume=True).completed  # a resume keeps the stored settings …
    assert tinylm.saved_config(taken).lr == 1e-2
    (taken / "units" / "checkpoint-00000002" / "unit.json").write_text("{")
    with pytest.raises(SinkscopeError, match=r"other settings \(lr: 0.01 → 0.02\)"):
        train(replace(cfg, lr=2e-2))  # … and without a usable checkpoint, other settings are refused
    (taken / "train_config.json").write_text('{"lr": ')
    with pytest.raises(SinkscopeError, match=r"train_config.json is corrupt"):
        tinylm.saved_config(taken)


def test_alpha0_equals_sinkscope_capture(variant_runs):
    from sinkscope.capture import CaptureConfig, run_capture
    from sinkscope.models import load_model

    lm = load_model(str(variant_runs["softmax"].out / "model"))
    with torch.no_grad():  # sharpen attention so the comparison is not between near-uniform maps
        for layer in lm.model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    prompts = ["The king said why the river ran.", "A small dog.", "How old is the red house by the tree?"]
    trace = run_capture(lm, prompts, CaptureConfig(rows=None, entropy=False), batch_size=2)
    enc = lm.tokenizer(prompts, padding=True, return_tensors="pt")
    ours = attention_stats(lm.model, enc["input_ids"], enc["attention_mask"])
    assert trace.key_mass.shape == ours.key_mass.shape
    torch.testing.assert_close(ours.key_mass, trace.key_mass, atol=1e-5, rtol=0)
    assert float(trace.key_mass[..., 0].std()) > 0.01


def test_bad_input_is_a_one_line_error(tmp_path, corpus):
    from sinkscope.cli.train import plot_trace, train_lm

    with pytest.raises(SinkscopeError, match="does not exist"):
        train_lm(data=tmp_path / "missing.txt", out=tmp_path / "r")
    with pytest.raises(SinkscopeError, match="unknown attention variant 'sofmax'"):
        train_lm(data=corpus, variant="sofmax", out=tmp_path / "r")
    with pytest.raises(SinkscopeError, match="unknown synthetic task"):
        train_lm(synthetic="nope", out=tmp_path / "r")
    with pytest.raises(SinkscopeError, match="nothing to train on"):
        train_lm(out=tmp_path / "r")
    with pytest.raises(SinkscopeError, match="train-lm"):
        plot_trace(run=tmp_path)
    (tmp_path / "empty.jsonl").write_text('{"label": 1}\n')
    with pytest.raises(SinkscopeError, match="no usable text"):
        train(TrainConfig(data=str(tmp_path / "empty.jsonl"), out=str(tmp_path / "r2"), steps=1))


def test_text_recall_batches_hold_text_and_triggers(corpus, tmp_path):
    """text_recall mixes text windows with triggers inserted into text: the synthetic rows of a batch hold trigger
    tokens, the text rows none, and the task needs --data."""
    cfg = TrainConfig(data=str(corpus), synthetic="text_recall", synthetic_triggers=8, synthetic_rate=0.2,
                      out=str(tmp_path / "tr"), seq_len=32, batch_size=8, vocab_size=300).validate()
    data = tinylm.prepare_data(cfg, tmp_path / "tok")
    assert data.pool is None
    batch = tinylm.make_batch(cfg, data, 0)  # [8, 32]: 4 text rows, then 4 with triggers
    triggers = torch.tensor(data.tokenizer.convert_tokens_to_ids([f"<bb{i}>" for i in range(8)]))
    has = torch.isin(batch, triggers).any(-1)
    assert not bool(has[:4].any()) and bool(has[4:].all())
    assert bool((batch[:, 0] == data.tokenizer.bos_token_id).all())
    with pytest.raises(SinkscopeError, match="give --data"):
        tinylm.prepare_data(replace(cfg, data=None), tmp_path / "tok2")


def test_synthetic_only_run_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from sinkscope.cli.train import plot_trace

    result = train(TrainConfig(synthetic="bigram_backcopy", out=str(tmp_path / "bb"), steps=2, batch_size=4,
                               seq_len=16, d_model=32, layers=2, heads=2, eval_every=1, eval_batch=2, device="cpu"))
    assert result.completed
    plot_trace(run=result.out)
    png = result.out / "trace.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_shipped_tiny_model_matches_its_card():
    folder = tinylm.tiny_dir()
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    assert size <= 15 * 2**20
    lm = tinylm.load_tiny()
    assert lm.info.adds_bos and lm.info.bos_token == "<s>" and lm.info.model_type == "llama"
    card = tinylm.tiny_sinks()
    ids = torch.tensor(card["eval_input_ids"])
    assert bool((ids[:, 0] == lm.tokenizer.bos_token_id).all())
    stats = attention_stats(lm.model, ids)
    torch.testing.assert_close(stats.alpha0(), torch.tensor(card["alpha0"]), atol=2e-3, rtol=0)
    assert abs(stats.loss - card["eval_loss"]) < 2e-3
    for row, share in zip(card["layers"], stats.sink_share(0.3).tolist(), strict=True):
        assert abs(row["share_03"] - share) < 1e-6 or _near_threshold(stats, row["layer"])
    readme = (folder / "README.md").read_text()
    assert f"{card['eval_loss']:.3f}" in readme


def _near_threshold(stats, layer: int) -> bool:
    return bool(((stats.alpha0()[layer] - 0.3).abs() < 2e-3).any())
