"""The averaging toy of seed 003 §7: generators, model, theorem construction, training, mechanism check, CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sinkscope.cli.toy import app
from sinkscope.toy.averaging import (
    DEFAULT_THEOREM_C,
    NUMBER,
    SEP,
    SEP2,
    AveragingTransformer,
    TaskConfig,
    ToyConfig,
    TrainConfig,
    catch_tag_release_model,
    check_mechanism,
    check_mechanism_sep2,
    make_batch,
    rebuttal_config,
    tag_variance_explained,
    theorem_losses,
    total_variation_from_uniform,
    train,
)
from sinkscope.toy.experiments import check_batch, format_table, save_toy, success_table, trained_files

# A seed and a short schedule that converge on the one-[SEP] task (found by a sweep over seeds 0-59: train loss
# < 1e-3 by epoch 5; held-out R^2 0.992 after 10 epochs, about 2 s on one thread).
CONVERGING = dict(seed=51, epochs=10)


@pytest.fixture
def one_thread():
    """Tiny tensors train fastest on one thread; restore the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def loop_target(values: list[float], kinds: list[int]) -> float:
    """The task's target computed token by token."""
    after, between, seen_sep, seen_sep2 = [], [], False, False
    for value, kind in zip(values, kinds, strict=True):
        if kind == SEP:
            seen_sep = True
        elif kind == SEP2:
            seen_sep2 = True
        elif seen_sep:
            after.append(value)
            if not seen_sep2:
                between.append(value)
    target = sum(after) / len(after)
    if SEP2 in kinds:
        target += sum(between) / len(between)
    return target


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), seq_len=st.integers(4, 24), sep2=st.booleans())
def test_targets_match_a_plain_loop(seed: int, seq_len: int, sep2: bool) -> None:
    batch = make_batch(32, TaskConfig(seq_len=seq_len, sep2=sep2), seed=seed)
    for i in range(len(batch)):
        values, kinds = batch.values[i].tolist(), batch.kinds[i].tolist()
        assert kinds.count(SEP) == 1 and kinds.count(SEP2) == (1 if sep2 else 0)
        assert kinds[-1] == NUMBER  # the read-out token is a number after every special token
        if sep2:
            assert kinds.index(SEP2) > kinds.index(SEP) + 1
        assert batch.target[i].item() == pytest.approx(loop_target(values, kinds), rel=1e-5, abs=1e-6)


def test_generator_is_seeded_and_covers_all_sep_positions() -> None:
    a, b = make_batch(2000, seed=3), make_batch(2000, seed=3)
    assert torch.equal(a.values, b.values) and torch.equal(a.kinds, b.kinds)
    assert not torch.equal(a.values, make_batch(2000, seed=4).values)
    assert set(a.sep_pos.tolist()) == set(range(15))  # seq_len 16: [SEP] anywhere but last
    assert a.values.min() >= 0.0 and a.values.max() <= 1.0


def test_attention_is_causal_and_normalised() -> None:
    torch.manual_seed(0)
    batch = make_batch(8, TaskConfig(sep2=True), seed=1)
    model = AveragingTransformer(rebuttal_config(2))
    pred, attns = model(batch.values, batch.kinds, return_attn=True)
    assert pred.shape == (8,) and len(attns) == 2
    for attn in attns:
        assert attn.shape == (8, 2, 16, 16)
        torch.testing.assert_close(attn.sum(-1), torch.ones(8, 2, 16))
        assert torch.all(attn.triu(diagonal=1) == 0)


def test_helpers_on_hand_worked_examples() -> None:
    mask = torch.tensor([[False, True, True, True, True]])
    assert total_variation_from_uniform(torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2]]), mask).item() == pytest.approx(0)
    assert total_variation_from_uniform(torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]]), mask).item() == pytest.approx(0.75)
    # all attention on the sink (key 0): the output is the tag, VE = 1; no attention on it: VE = 0
    values = torch.randn(1, 1, 3, 2)
    rows = torch.tensor([[False, True, True]])
    on_sink = torch.tensor([[[[1.0, 0, 0], [1, 0, 0], [1, 0, 0]]]])
    off_sink = torch.tensor([[[[1.0, 0, 0], [0, 1, 0], [0, 0.5, 0.5]]]])
    assert tag_variance_explained(on_sink, values, torch.tensor([0]), rows).item() == pytest.approx(1.0)
    assert tag_variance_explained(off_sink, values, torch.tensor([0]), rows).item() == pytest.approx(0.0)


def test_hand_built_solution_loss_decreases_to_zero_with_c() -> None:
    losses = [loss for _, loss in theorem_losses(DEFAULT_THEOREM_C[:7], n=1024)]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert theorem_losses([30.0], n=1024)[0][1] < 1e-12


def test_hand_built_solution_is_catch_tag_release() -> None:
    batch = make_batch(256, seed=11)
    batch.values = batch.values.double()
    report = check_mechanism(catch_tag_release_model(15.0), batch)
    assert report.passed
    assert report.catch > 0.99 and report.tag_ve > 0.99 and report.release_tv < 0.05


def test_masking_the_sink_breaks_the_hand_built_solution() -> None:
    batch = make_batch(512, seed=2)
    values, target = batch.values.double(), batch.target.double()
    model = catch_tag_release_model(15.0)
    sep_col = torch.nn.functional.one_hot(batch.sep_pos, 16).bool()[:, None, None, :]  # [batch, 1, 1, key]

    def mask_sink(layer: int, attn: torch.Tensor) -> torch.Tensor:
        if layer != 0:
            return attn
        kept = attn.masked_fill(sep_col, 0.0)
        return kept / kept.sum(-1, keepdim=True).clamp(min=1e-30)

    with torch.no_grad():
        clean = torch.mean((model(values, batch.kinds) - target) ** 2).item()
        same = torch.mean((model(values, batch.kinds, attn_hook=lambda i, a: a) - target) ** 2).item()
        masked = torch.mean((model(values, batch.kinds, attn_hook=mask_sink) - target) ** 2).item()
    assert same == clean < 1e-6
    assert masked > 1e-2


def test_short_training_converges_with_the_mechanism(one_thread) -> None:
    res = train(ToyConfig(c_init=10.0), TrainConfig(**CONVERGING))
    assert res.r2 >= 0.9, res.history
    assert len(res.history) == CONVERGING["epochs"] and math.isfinite(res.c)
    report = check_mechanism(res.model, check_batch(TaskConfig()))
    assert report.passed, report


def test_sep2_check_needs_two_heads() -> None:
    torch.manual_seed(0)
    report = check_mechanism_sep2(AveragingTransformer(rebuttal_config(1)), make_batch(64, TaskConfig(sep2=True)))
    assert not report.passed and report.sep2_head is None and report.between_head is None
    assert len(report.sep_tail) == 1


def test_success_table_counts_runs() -> None:
    import pandas as pd

    runs = pd.DataFrame({"c_init": [10.0, 10.0, 1.0], "converged": [True, False, False],
                         "mechanism": [True, True, False], "success": [True, False, False], "r2": [1.0, 0.5, 0.4]})
    table = success_table(runs)
    assert table["paper"].tolist() == ["4/10", "0/10"]
    assert table["success"].tolist() == ["1/2", "0/1"]
    assert "4/10" in format_table(table)


def test_cli_theorem_prints_c_loss_pairs(tmp_path) -> None:
    result = CliRunner().invoke(app, ["theorem", "--c-values", "4,10,20", "--n", "256", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "c loss"
    pairs = [tuple(map(float, line.split())) for line in lines[1:]]
    assert [c for c, _ in pairs] == [4.0, 10.0, 20.0]
    assert pairs[0][1] > pairs[1][1] > pairs[2][1]
    assert (tmp_path / "theorem.txt").read_text().splitlines() == lines


def test_plot_writes_a_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from sinkscope.report.figures.toy import plot_attention

    batch = make_batch(2, seed=2)
    batch.values = batch.values.double()
    path = plot_attention(catch_tag_release_model(10.0), batch, 0, tmp_path / "attn.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_train_and_plot_write_their_files(tmp_path, one_thread) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--epochs", "1", "--seed", "0", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("r2 ") and "release_tv" in result.output
    summary = json.loads((tmp_path / "result.json").read_text())
    assert len(summary["history"]) == 1 and "passed" in summary["mechanism"]
    assert (tmp_path / "model.pt").exists()
    pytest.importorskip("matplotlib")
    result = runner.invoke(app, ["plot", "--epochs", "1", "--seed", "0", "--out", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "plots").glob("attention_sep_*.png"))


# each toy command that writes --out, with arguments that finish in a second or two, and a file it writes
TOY_RUNS = {
    "theorem": (["--c-values", "4,10", "--n-sequences", "64"], "theorem.txt"),
    "train": (["--epochs", "1", "--seed", "0"], "model.pt"),
    "success-rate": (["--c-values", "10", "--seeds", "1", "--epochs", "1"], "success_rate_runs.parquet"),
    "sep2": (["--n-heads", "1", "--seeds", "1", "--epochs", "1"], "sep2_runs.parquet"),
    "plot": (["--epochs", "1", "--seed", "0"], "attention_sep_c10_seed0.png"),
}


@pytest.mark.parametrize("command", list(TOY_RUNS))
def test_cli_toy_out_is_a_run_folder(tmp_path, one_thread, command: str) -> None:
    from sinkscope.store import file_record, load_run

    if command == "plot":
        pytest.importorskip("matplotlib")
    args, written = TOY_RUNS[command]
    out = tmp_path / command
    runner = CliRunner()
    result = runner.invoke(app, [command, *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = load_run(out)
    assert run.manifest["command"] == f"toy {command}"
    assert run.tables and all(len(table) for table in run.tables.values())
    assert file_record(out / written).items() <= run.manifest["files"][written].items()
    # the same command again replaces its run; another command's run folder is refused without --overwrite
    assert runner.invoke(app, [command, *args, "--out", str(out)]).exit_code == 0
    other = "theorem" if command != "theorem" else "train"
    before = (out / "manifest.json").read_bytes()
    refused = runner.invoke(app, [other, *TOY_RUNS[other][0], "--out", str(out)])
    assert refused.exit_code == 2, refused.output
    assert f"holds a `toy {command}` run" in refused.output and "--overwrite" in refused.output
    assert (out / "manifest.json").read_bytes() == before
    result = runner.invoke(app, [other, *TOY_RUNS[other][0], "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert load_run(out).manifest["command"] == f"toy {other}"
    assert not (out / written).exists()


def test_cli_toy_refuses_another_commands_run_folder(tmp_path) -> None:
    import pandas as pd

    from sinkscope.store import Run, load_run, save_run

    save_run(tmp_path, Run({"x": pd.DataFrame({"a": [1]})}, {"command": "profile"}))
    result = CliRunner().invoke(app, ["theorem", "--c-values", "4", "--n-sequences", "64", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "holds a `profile` run" in result.output
    assert load_run(tmp_path).manifest["command"] == "profile"


@pytest.mark.parametrize("command", ["theorem", "train", "success-rate", "sep2", "plot"])
def test_cli_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "--seed" in result.output


def test_save_toy_writes_a_run_folder(tmp_path, one_thread) -> None:
    import pandas as pd

    from sinkscope.errors import SinkscopeError
    from sinkscope.store import Run, file_record, load_run, save_run

    cfg, tc = ToyConfig(), TrainConfig(seed=0, epochs=1)
    res = train(cfg, tc)
    report = check_mechanism(res.model, check_batch(TaskConfig(), tc.data_seed))
    history = pd.DataFrame({"epoch": range(1, len(res.history) + 1), "loss": res.history})
    out = save_toy(tmp_path / "train", "train", {"history": history}, {"model": "sep", "epochs": 1},
                   trained_files(res, cfg, tc, report), seed=tc.seed)
    run = load_run(out)
    assert run.manifest["command"] == "toy train" and run.manifest["seed"] == 0
    assert run.manifest["files"]["model.pt"] == file_record(out / "model.pt")
    assert json.loads((out / "result.json").read_text())["history"] == res.history
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["config"]["c_init"] == cfg.c_init and set(state["state_dict"]) == set(res.model.state_dict())
    with pytest.raises(SinkscopeError, match="holds a `toy train` run"):
        save_run(out, Run({"x": history}, {"command": "profile"}))
    rows = pd.DataFrame({"c": [4.0], "loss": [1e-3]})
    assert load_run(save_toy(out, "theorem", {"theorem": rows}, {"n": 256}, overwrite=True))["theorem"].equals(rows)
