"""`sweep`: the merged tables equal `profile`'s, under one process or torchrun; kill/resume loses and repeats nothing;
a deleted, truncated or corrupted unit is recomputed (and named); a changed fingerprint, another command's folder, a
missing --out and a bad dataset are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from sinkscope import store
from sinkscope.analyses.profile import layer_summary, profile
from sinkscope.analyses.sweep import (
    KILL_HOOK,
    SHARDS,
    SORT_KEYS,
    Ranks,
    plan_units,
    resolve_device,
    sweep,
    unit_name,
    unit_path,
)
from sinkscope.cli.app import app
from sinkscope.errors import SinkscopeError
from sinkscope.store import UNIT_RECORD, Run, RunFolder, load_run, make_manifest, save_run

runner = CliRunner()
# With unit size 2, unit 2 holds only unusable prompts (empty, longer than tiny:llama's 512 positions).
PROMPTS = ["The cat sat on the mat.", "Sinks, sinks everywhere!", "A third prompt, a little longer than the rest.",
           "", "", "x" * 900, "Question: what is the capital of France? Answer:", "short", "  ",
           "The quick brown fox jumps over the lazy dog near the river bank."]
GOOD = [i for i, p in enumerate(PROMPTS) if p.strip() and len(p) < 500]
MANY = [f"Prompt {i}: the quick brown fox jumps over the lazy dog." + " again" * (i % 5) for i in range(24)]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))  # JSONL keeps empty prompts apart
    return path


def assert_same_tables(got: dict[str, pd.DataFrame], want: dict[str, pd.DataFrame]) -> None:
    assert list(got) == list(want)
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=False, rtol=1e-5, atol=1e-6, obj=name)


def assert_no_gaps(tables: dict[str, pd.DataFrame], good: list[int]) -> None:
    assert tables["prompts"]["prompt_id"].tolist() == good
    keys = tables["keys"]
    assert not keys.duplicated(["prompt_id", "layer", "head", "position"]).any()
    assert sorted(keys["prompt_id"].unique()) == good


def profile_tables(lm, prompts: list[str], folder: Path, method: str = "column_mass") -> dict[str, pd.DataFrame]:
    """`profile`'s tables after the same Parquet round trip as a sweep's."""
    return load_run(save_run(folder, profile(lm, prompts, method).run(lm))).tables


def torchrun(*args: str, nproc: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "sinkscope", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.fixture(scope="module")
def many_reference(tmp_path_factory, tiny_llama) -> dict[str, pd.DataFrame]:
    """An uninterrupted single-process sweep of MANY with unit size 1."""
    out = tmp_path_factory.mktemp("reference") / "sweep"
    sweep(tiny_llama, MANY, out, unit_size=1)
    return load_run(out).tables


@pytest.mark.parametrize("method", ["column_mass", "sink_rate", "zscore"])
def test_single_process_equals_profile(tmp_path, tiny_llama, method):
    result = sweep(tiny_llama, PROMPTS, tmp_path / "sweep", method, unit_size=2, batch_size=3)
    assert result.n_units == 5 and result.done_now == [0, 1, 2, 3, 4] and result.done_before == 0
    got = load_run(tmp_path / "sweep")
    assert got.manifest["command"] == "sweep" and got.manifest["sweep"]["n_units"] == 5
    assert got.manifest["sweep"]["world_size"] == 1 and got.manifest["model"]["name"] == "tiny:llama"
    assert_same_tables(got.tables, profile_tables(tiny_llama, PROMPTS, tmp_path / "profile", method))
    assert got.tables["skipped"]["prompt_id"].tolist() == [3, 4, 5, 8]  # global ids, unit 2 entirely skipped
    assert not list((tmp_path / "sweep" / SHARDS).glob(".tmp-*"))


def test_merge_streams_units_and_equals_their_concatenation(tmp_path, tiny_llama, monkeypatch):
    """The merge appends the units a piece at a time (row groups of 50 rows here); its tables equal the units'
    tables concatenated whole and sorted, with `layers` built from all rows at once (the merge before it streamed)."""
    monkeypatch.setattr(RunFolder, "table_stream", lambda self, row_group_rows=0: store.TableStream(self.path, 50))
    out = tmp_path / "sweep"
    sweep(tiny_llama, PROMPTS, out, "sink_rate", unit_size=2, batch_size=3)
    folder = RunFolder(out, "sweep")
    units = [folder.read_unit(unit_name(u)).tables() for u in range(5)]
    whole = {name: pd.concat([unit[name] for unit in units if name in unit], ignore_index=True)
             .sort_values(SORT_KEYS[name], kind="stable").reset_index(drop=True) for name in SORT_KEYS}
    whole["layers"] = layer_summary(whole["heads"], whole["keys"])
    order = ["keys", "heads", "prompts", "layers", "sink_rate", "skipped"]
    want = load_run(save_run(tmp_path / "whole", Run({n: whole[n] for n in order}, make_manifest("sweep", {}, {}))))
    got = load_run(out)
    assert list(got.tables) == order and got.manifest["tables"] == want.manifest["tables"]
    for name in order:
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=True, obj=name)
    assert pq.ParquetFile(out / "keys.parquet").num_row_groups > 1
    assert not list(out.glob(".tmp-*"))


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    args = ["sweep", "-m", "tiny:llama", "--prompts", str(prompts), "--unit-size", "2", "--batch-size", "2"]
    single = invoke(*args, "--out", tmp_path / "one")
    assert single.exit_code == 0, single.output
    proc = torchrun(*args, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "heads with sink" in proc.stdout and "by 2 process(es)" in proc.stdout
    two = load_run(tmp_path / "two")
    assert two.manifest["sweep"]["world_size"] == 2
    folder = RunFolder(tmp_path / "two", "sweep")
    for u in range(5):  # unit u belongs to rank u % 2
        info = folder.unit_info(f"unit-{u:06d}")
        assert (info["rank"], info["world_size"]) == (u % 2, 2)
    assert_same_tables(two.tables, load_run(tmp_path / "one").tables)
    # every rank refuses a changed fingerprint with the same one-line error (rank 0 checks, then tells the others)
    refused = torchrun(*args[:-2], "--unit-size", "3", "--out", str(tmp_path / "two"))
    assert refused.returncode != 0 and refused.stderr.count("pass a new --out") == 2, refused.stderr
    assert "sinkscope/sweep" not in refused.stderr  # torchrun prints its own traceback, the workers none


def test_sigkill_at_a_random_moment_then_resume(tmp_path, many_reference):
    prompts = write_prompts(tmp_path / "prompts.jsonl", MANY)
    out = tmp_path / "sweep"
    args = ["sweep", "-m", "tiny:llama", "--prompts", str(prompts), "--out", str(out), "--unit-size", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "sinkscope", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while not unit_path(out, 0).is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    done = [u for u in range(len(MANY)) if unit_path(out, u).is_dir()]
    assert 1 <= len(done) < len(MANY) and not (out / "manifest.json").exists()
    resumed = invoke(*args)
    assert resumed.exit_code == 0, resumed.output
    assert f"{len(done)} found done" in resumed.output
    tables = load_run(out).tables
    assert_no_gaps(tables, list(range(len(MANY))))
    assert_same_tables(tables, many_reference)


def test_kill_between_write_and_rename_then_resume(tmp_path, many_reference, caplog):
    prompts = write_prompts(tmp_path / "prompts.jsonl", MANY)
    out = tmp_path / "sweep"
    args = ["sweep", "-m", "tiny:llama", "--prompts", str(prompts), "--out", str(out), "--unit-size", "1"]
    proc = subprocess.run([sys.executable, "-m", "sinkscope", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", KILL_HOOK: "unit-000002"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [u for u in range(len(MANY)) if unit_path(out, u).is_dir()] == [0, 1]
    assert len(list((out / SHARDS).glob(".tmp-unit-000002-*/keys.parquet"))) == 1  # written, never renamed
    resumed = invoke(*args)
    assert resumed.exit_code == 0, resumed.output
    assert "2 found done" in resumed.output
    assert "unit 2: left half-written by an interrupted run — recomputing" in caplog.text  # the sinkscope logger
    assert not list((out / SHARDS).glob(".tmp-*"))
    tables = load_run(out).tables
    assert_no_gaps(tables, list(range(len(MANY))))
    assert_same_tables(tables, many_reference)
    again = invoke(*args)  # a finished folder: merged again, nothing recomputed
    assert again.exit_code == 0 and "already done" in again.output
    assert_same_tables(load_run(out).tables, many_reference)


def test_fingerprint_mismatch_is_refused(tmp_path, tiny_llama):
    out = tmp_path / "sweep"
    sweep(tiny_llama, PROMPTS[:3], out, unit_size=2)
    with pytest.raises(SinkscopeError, match=r"unit_size: 2 → 3.*new --out"):
        sweep(tiny_llama, PROMPTS[:3], out, unit_size=3)
    with pytest.raises(SinkscopeError, match="prompts differ"):
        sweep(tiny_llama, PROMPTS[1:4], out, unit_size=2)
    with pytest.raises(SinkscopeError, match="eps"):
        sweep(tiny_llama, PROMPTS[:3], out, params={"eps": 0.5}, unit_size=2)
    # the default threshold spelled out, another batch size: the same sweep
    again = sweep(tiny_llama, PROMPTS[:3], out, params={"eps": 0.2}, unit_size=2, batch_size=1)
    assert again.done_before == again.n_units == 2 and again.done_now == []
    result = invoke("sweep", "-m", "tiny:gpt2", "--prompt", "a", "--prompt", "b", "--prompt", "c", "--out", out)
    assert result.exit_code == 2 and "new --out" in result.output and "Traceback" not in result.output
    other = tmp_path / "not-a-sweep"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SinkscopeError, match="holds no sinkscope run"):
        sweep(tiny_llama, PROMPTS[:3], other)


def test_another_commands_folder_is_refused_unless_overwrite(tmp_path, tiny_llama):
    out = tmp_path / "run"
    save_run(out, profile(tiny_llama, PROMPTS[:2]).run(tiny_llama))
    with pytest.raises(SinkscopeError, match=r"holds a `profile` run; pass another --out or --overwrite"):
        sweep(tiny_llama, PROMPTS[:3], out, unit_size=2)
    assert load_run(out).manifest["command"] == "profile"  # untouched
    result = sweep(tiny_llama, PROMPTS[:3], out, unit_size=2, overwrite=True)
    assert result.done_now == [0, 1] and load_run(out).manifest["command"] == "sweep"
    with pytest.raises(SinkscopeError, match=r"unit_size: 2 → 1"):
        sweep(tiny_llama, PROMPTS[:3], out, unit_size=1)
    again = sweep(tiny_llama, PROMPTS[:3], out, unit_size=1, overwrite=True)
    assert again.done_before == 0 and again.n_units == 3
    # and the other way round: a non-resuming command refuses the sweep's folder
    with pytest.raises(SinkscopeError, match="holds a `sweep` run"):
        save_run(out, profile(tiny_llama, PROMPTS[:2]).run(tiny_llama))


def _damage(path: Path, how: str) -> None:
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a record cut short
        path.write_text(path.read_text()[:20])


@pytest.mark.parametrize(("how", "file", "reason"), [
    ("delete", "keys.parquet", "keys.parquet missing"),
    ("truncate", "heads.parquet", "heads.parquet has"),
    ("corrupt", UNIT_RECORD, "unit.json is corrupt"),
])
def test_damaged_unit_is_recomputed_and_named(tmp_path, tiny_llama, many_reference, how, file, reason):
    out = tmp_path / "sweep"
    first = sweep(tiny_llama, MANY, out, unit_size=1)
    assert first.done_now == list(range(len(MANY)))
    _damage(unit_path(out, 2) / file, how)
    assert not RunFolder(out, "sweep").unit_done("unit-000002")
    said: list[str] = []
    again = sweep(tiny_llama, MANY, out, unit_size=1, log=said.append)
    assert again.done_now == [2] and again.done_before == len(MANY) - 1
    assert list(again.damaged) == [2] and reason in again.damaged[2]
    assert len(said) == 1 and said[0].startswith(f"unit 2: {reason}") and said[0].endswith("recomputing")
    tables = load_run(out).tables
    assert_no_gaps(tables, list(range(len(MANY))))
    assert_same_tables(tables, many_reference)


def test_damaged_unit_through_the_cli_is_named(tmp_path, caplog):
    prompts = write_prompts(tmp_path / "prompts.jsonl", MANY[:6])
    out = tmp_path / "sweep"
    args = ["sweep", "-m", "tiny:llama", "--prompts", str(prompts), "--out", str(out), "--unit-size", "2"]
    assert invoke(*args).exit_code == 0
    (unit_path(out, 1) / "keys.parquet").unlink()
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "unit 1: keys.parquet missing — recomputing" in caplog.text and "already done" not in again.output
    assert "2 found done" in again.output
    assert_no_gaps(load_run(out).tables, list(range(6)))


def test_damage_found_at_the_merge_is_one_line(tmp_path, tiny_llama, monkeypatch):
    """A unit that verified before the units ran but is damaged by the merge: an error naming it, no traceback."""
    import sinkscope.analyses.sweep as sweep_mod

    out = tmp_path / "sweep"
    sweep(tiny_llama, PROMPTS[:4], out, unit_size=2)
    real = sweep_mod.run_units

    def run_then_damage(*args, **kwargs):
        done = real(*args, **kwargs)
        _damage(unit_path(out, 1) / "keys.parquet", "truncate")
        return done

    monkeypatch.setattr(sweep_mod, "run_units", run_then_damage)
    with pytest.raises(SinkscopeError, match=r"units/unit-000001: keys.parquet has .*rerun the same command"):
        sweep(tiny_llama, PROMPTS[:4], out, unit_size=2)


def test_corrupt_run_record_is_one_line(tmp_path, tiny_llama):
    out = tmp_path / "sweep"
    sweep(tiny_llama, PROMPTS[:3], out, unit_size=2)
    (out / "run.json").write_text('{"command": "sweep", "settings')
    with pytest.raises(SinkscopeError, match=r"run.json is corrupt .*--overwrite") as err:
        sweep(tiny_llama, PROMPTS[:3], out, unit_size=2)
    assert "\n" not in str(err.value)
    assert sweep(tiny_llama, PROMPTS[:3], out, unit_size=2, overwrite=True).done_now == [0, 1]


def test_dataset_prompts(tmp_path):
    rows = [{"id": f"r{i}", "text": f"sentence number {i} is fine", "label": "positive"} for i in range(5)]
    data = tmp_path / "sst2.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sweep"
    result = invoke("sweep", "-m", "tiny:llama", "--dataset", "sst2", "--data", data, "--limit", "3", "--out", out,
                    "--unit-size", "2")
    assert result.exit_code == 0, result.output
    run = load_run(out)
    texts = run.tables["prompts"]["text"].tolist()
    assert len(texts) == 3 and all(t.startswith("Classify the sentiment") and t.endswith("Sentiment:") for t in texts)
    assert run.manifest["sweep"]["source"]["dataset"] == "sst2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "hi"], "needs --out"),
        (["--dataset", "nope", "--out", "{out}"], "unknown dataset"),
        (["--dataset", "sst2", "--prompt", "hi", "--out", "{out}"], "either --dataset"),
        (["--prompt", "hi", "--limit", "3", "--out", "{out}"], "go with --dataset"),
        (["--out", "{out}"], "no prompts"),
        (["--prompt", "hi", "--unit-size", "0", "--out", "{out}"], "unit-size"),
        (["--prompt", "hi", "--method", "nope", "--out", "{out}"], "unknown detector"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["sweep", "-m", "tiny:llama", *[a.format(out=tmp_path / "o") for a in args]])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_units_ranks_and_devices():
    assert plan_units(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert Ranks.from_env({}) == Ranks(0, 1, 0)
    assert Ranks.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    with pytest.raises(SinkscopeError, match="RANK"):
        Ranks.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    assert resolve_device("cuda", Ranks(3, 4, 1)) == "cuda:1"
    assert resolve_device("cpu", Ranks(3, 4, 1)) == "cpu"
    assert resolve_device(None, Ranks()) is None
