"""sinkscope.store: atomic writes keep the old file on failure; the manifest records files with checksums; units
verify (a deleted, truncated or corrupted file makes a unit not done); a folder of another command or other settings
is refused unless overwrite; corrupt JSON and a second process are one-line errors; streamed tables are written a row
group at a time and saved like the others."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from sinkscope import store
from sinkscope.errors import SinkscopeError
from sinkscope.store import (
    MANIFEST,
    RUN_RECORD,
    UNIT_RECORD,
    Run,
    RunFolder,
    atomic_dir,
    check_run,
    file_record,
    fingerprint,
    load_run,
    make_manifest,
    open_run,
    read_table,
    save_run,
    table_batches,
    write_file,
    write_json,
)

TABLE = pd.DataFrame({"prompt_id": [0, 0, 1], "position": [0, 1, 0], "alpha": [0.5, 0.25, 1.0]})


def a_run(command: str = "profile", rows: int = 3, **parameters) -> Run:
    return Run({"keys": TABLE.head(rows), "layers": TABLE.tail(1)}, make_manifest(command, {"name": "m"}, parameters))


def temporaries(folder: Path) -> list[Path]:
    return list(folder.rglob(".tmp-*"))


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "keys.parquet"
    write_file(path, TABLE)
    before = path.read_bytes()

    def half_then_fail(self, target, **kwargs):
        Path(target).write_bytes(b"PAR1 half a table")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_file(path, TABLE.head(1))
    assert path.read_bytes() == before and temporaries(tmp_path) == []


def test_failed_rename_keeps_the_old_manifest(tmp_path, monkeypatch):
    out = save_run(tmp_path / "run", a_run(eps=0.2))
    manifest = (out / MANIFEST).read_text()

    def no_rename(src, dst):
        raise OSError("interrupted")

    monkeypatch.setattr(store.os, "replace", no_rename)
    with pytest.raises(OSError, match="interrupted"):
        save_run(out, a_run(rows=1, eps=0.3))
    assert (out / MANIFEST).read_text() == manifest and temporaries(out) == []
    monkeypatch.undo()
    assert len(load_run(out)["keys"]) == 3


def test_failed_folder_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text('{"half": ')
        raise RuntimeError("killed")
    assert (target / "config.json").read_text() == "{}" and temporaries(tmp_path) == []


def test_manifest_records_command_settings_versions_and_files(tmp_path):
    out = save_run(tmp_path / "run", a_run(eps=0.2))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["command"] == "profile" and manifest["created"] and manifest["versions"]["pandas"]
    assert manifest["settings_sha256"] == fingerprint({"model": {"name": "m"}, "parameters": {"eps": 0.2}, "seed": 0})
    assert manifest["tables"] == {"keys": 3, "layers": 1}
    assert manifest["files"]["keys.parquet"] == {"rows": 3, **file_record(out / "keys.parquet")}
    # a run of the same command replaces it; a table it lacks goes
    save_run(out, Run({"keys": TABLE}, make_manifest("profile", None, {})))
    assert not (out / "layers.parquet").exists() and list(load_run(out).tables) == ["keys"]


def test_fingerprint_is_stable():
    assert fingerprint({"a": (1, 2), "b": {"y": 1, "x": None}}) == fingerprint({"b": {"x": None, "y": 1}, "a": [1, 2]})
    assert fingerprint({"a": 1}) != fingerprint({"a": 1.5})


def test_damaged_table_is_a_one_line_error(tmp_path):
    out = save_run(tmp_path / "run", a_run())
    data = (out / "keys.parquet").read_bytes()
    (out / "keys.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(SinkscopeError, match=r"keys.parquet has \d+ bytes, \d+ were written; rerun") as err:
        load_run(out)
    assert "\n" not in str(err.value)
    (out / MANIFEST).write_text('{"command": "prof')
    with pytest.raises(SinkscopeError, match=r"manifest.json is corrupt .*; rerun the command"):
        load_run(out)


def test_check_run_verifies_without_loading(tmp_path):
    out = save_run(tmp_path / "run", a_run())
    assert check_run(out)["tables"] == {"keys": 3, "layers": 1}
    data = (out / "keys.parquet").read_bytes()
    (out / "keys.parquet").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other bytes
    with pytest.raises(SinkscopeError, match=r"keys.parquet does not match its checksum; rerun") as err:
        check_run(out)
    assert "\n" not in str(err.value)
    (out / "keys.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(SinkscopeError, match=r"keys.parquet has \d+ bytes, \d+ were written; rerun"):
        check_run(out)
    (out / "keys.parquet").unlink()
    with pytest.raises(SinkscopeError, match=r"keys.parquet missing; rerun"):
        check_run(out)
    (out / MANIFEST).write_text('{"command": "prof')
    with pytest.raises(SinkscopeError, match=r"manifest.json is corrupt .*; rerun the command"):
        check_run(out)
    with pytest.raises(SinkscopeError, match="not a sinkscope run folder"):
        check_run(tmp_path)


def test_tables_read_in_pieces(tmp_path):
    """Chosen columns, batches of rows and chosen prompts' rows, equal to the table read whole."""
    keys = pd.DataFrame({"prompt_id": np.repeat(np.arange(6), 5), "position": np.tile(np.arange(5), 6),
                         "token": [f"t{i}" for i in range(30)], "alpha": np.linspace(0, 1, 30)})
    manifest = make_manifest("profile", {"name": "m"}, {})
    with open_run(tmp_path / "run", "profile") as folder, folder.table_stream(row_group_rows=10) as stream:
        for pid in range(6):  # row groups of 10 rows: prompts 0-1, 2-3, 4-5
            stream.append("keys", keys[keys["prompt_id"] == pid])
        folder.save(Run({"empty": keys.head(0), "plain": pd.DataFrame({"x": [1]})}, manifest), streams=stream)
    out = tmp_path / "run"
    assert pq.ParquetFile(out / "keys.parquet").num_row_groups == 3
    whole = load_run(out)["keys"]
    batches = list(table_batches(out, "keys", ["prompt_id", "alpha"], batch_rows=7))
    assert [len(b) for b in batches] == [7, 7, 7, 7, 2]
    pd.testing.assert_frame_equal(pd.concat(batches, ignore_index=True), whole[["prompt_id", "alpha"]])
    picked = read_table(out, "keys", ["token", "alpha"], prompt_ids=[4, 1])
    expect = whole.loc[whole["prompt_id"].isin([1, 4]), ["token", "alpha"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(picked, expect)
    pd.testing.assert_frame_equal(read_table(out, "keys", prompt_ids=[99]), whole.head(0))
    empty = list(table_batches(out, "empty"))
    assert len(empty) == 1 and empty[0].empty and list(empty[0].columns) == list(keys.columns)
    with pytest.raises(ValueError, match="no prompt_id"):
        read_table(out, "plain", prompt_ids=[1])


@pytest.fixture
def folder(tmp_path):
    with open_run(tmp_path / "run", "sweep", {"unit_size": 2}) as opened:
        opened.write_unit("unit-000000", {"keys": TABLE, "notes.txt": "hello"}, {"rank": 0})
        opened.write_unit("unit-000001", {"keys": TABLE.head(1)}, {"rank": 1})
        yield opened


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda p: (p / "keys.parquet").unlink(), "keys.parquet missing"),
    (lambda p: (p / "keys.parquet").write_bytes((p / "keys.parquet").read_bytes()[:40]), "keys.parquet has 40 bytes"),
    (lambda p: (p / "notes.txt").write_text("hellO"), "notes.txt does not match its checksum"),
    (lambda p: (p / UNIT_RECORD).write_text('{"files": {"keys.par'), "unit.json is corrupt"),
    (lambda p: (p / UNIT_RECORD).unlink(), "unit.json missing"),
])
def test_units_verify(folder, damage, reason):
    assert folder.unit_done("unit-000000") and folder.unit_done("unit-000001")
    assert not folder.unit_done("unit-000002") and folder.check_unit("unit-000002") == "missing"
    unit = folder.read_unit("unit-000000")
    assert unit.info == {"rank": 0} and unit.files["notes.txt"] == b"hello"
    pd.testing.assert_frame_equal(unit.tables()["keys"], TABLE)
    damage(folder.unit_path("unit-000000"))
    assert not folder.unit_done("unit-000000") and folder.unit_done("unit-000001")
    assert folder.check_unit("unit-000000").startswith(reason)
    assert list(folder.damaged_units()) == ["unit-000000"]
    with pytest.raises(SinkscopeError, match=rf"units/unit-000000: {reason}.*rerun the same command"):
        folder.read_unit("unit-000000")
    folder.write_unit("unit-000000", {"keys": TABLE, "notes.txt": "hello"}, {"rank": 0})  # recomputed
    assert folder.damaged_units() == {} and folder.unit_done("unit-000000")


def test_a_finished_unit_is_kept_when_written_again(folder):
    record = (folder.unit_path("unit-000001") / UNIT_RECORD).read_text()
    folder.write_unit("unit-000001", {"keys": TABLE}, {"rank": 9})  # another process got there first
    assert (folder.unit_path("unit-000001") / UNIT_RECORD).read_text() == record
    assert temporaries(folder.path) == []


def test_half_written_units_are_found_and_removed(tmp_path):
    out = tmp_path / "run"
    with open_run(out, "sweep", {"unit_size": 2}) as opened:
        (opened.path / "units" / ".tmp-unit-000003-1234-abcdef01").mkdir(parents=True)
        (opened.path / ".tmp-manifest.json-1234-abcdef01").write_text("{")
    with open_run(out, "sweep", {"unit_size": 2}) as again:
        assert again.incomplete == ["unit-000003"] and temporaries(out) == []


def test_another_command_or_other_settings_are_refused(folder):
    out = folder.path
    folder.close()
    with pytest.raises(SinkscopeError, match=r"holds a `sweep` run; pass another --out or --overwrite"):
        open_run(out, "eval", {"unit_size": 2})
    with pytest.raises(SinkscopeError, match=r"holds a `sweep` run"):
        save_run(out, a_run("profile"))
    with pytest.raises(SinkscopeError, match=r"other settings \(unit_size: 2 → 3; zeta: None → 1\).*--overwrite"):
        open_run(out, "sweep", {"unit_size": 3, "zeta": 1})
    assert json.loads((out / RUN_RECORD).read_text())["settings"] == {"unit_size": 2}
    with open_run(out, "sweep", {"unit_size": 2}) as same:  # a resume
        assert same.unit_names() == ["unit-000000", "unit-000001"]
    save_run(out, a_run("sweep"))  # the same command's tables: the units stay
    with open_run(out, "sweep", {"unit_size": 2}) as same:
        assert same.unit_names() == ["unit-000000", "unit-000001"]
        same.write_unit("unit-000002", {"keys": TABLE})
    with open_run(out, "sweep", {"unit_size": 2}, overwrite=True) as restarted:  # overwrite starts over
        assert restarted.unit_names() == [] and not (out / "keys.parquet").exists()
        restarted.write_unit("unit-000000", {"keys": TABLE})
    (out / "mine.txt").write_text("not sinkscope's")
    with open_run(out, "sweep", {"unit_size": 3}, overwrite=True) as fresh:
        assert fresh.unit_names() == [] and json.loads((out / RUN_RECORD).read_text())["settings"]["unit_size"] == 3
    assert (out / "mine.txt").exists()  # overwrite clears only what a run wrote
    save_run(out, a_run("profile"), overwrite=True)
    assert load_run(out).manifest["command"] == "profile" and not (out / RUN_RECORD).exists()


def test_folders_that_are_not_runs(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SinkscopeError, match="is a file; pass a folder"):
        open_run(tmp_path / "file", "sweep")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SinkscopeError, match="not empty and holds no sinkscope run"):
        open_run(other, "sweep", {"a": 1}, overwrite=True)
    save_run(other, a_run())  # a command that does not resume may write beside other files
    assert (other / "notes.txt").exists()


def test_corrupt_settings_are_one_line(folder):
    out = folder.path
    folder.close()
    (out / RUN_RECORD).write_text('{"command": "sweep", "sett')
    with pytest.raises(SinkscopeError, match=r"run.json is corrupt \(JSONDecodeError.*\); delete it, or pass "
                                             r"--overwrite") as err:
        open_run(out, "sweep", {"unit_size": 2})
    assert "\n" not in str(err.value)
    with open_run(out, "sweep", {"unit_size": 2}, overwrite=True) as fresh:
        assert fresh.unit_names() == []


HOLD = """
import sys
from sinkscope.store import open_run
folder = open_run(sys.argv[1], "sweep", {"unit_size": 2})
print("locked", flush=True)
sys.stdin.readline()
"""


def test_a_second_process_gets_one_error_line(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SinkscopeError, match=rf"in use by another sinkscope process \(pid {holder.pid}, sweep\); "
                                                 "wait for it to finish, or pass another --out"):
            open_run(out, "sweep", {"unit_size": 2})
        with pytest.raises(SinkscopeError, match="in use"):
            save_run(out, a_run("sweep"))
        os.kill(holder.pid, signal.SIGKILL)  # a killed holder releases the lock
        holder.wait(timeout=30)
        with open_run(out, "sweep", {"unit_size": 2}) as mine:
            with pytest.raises(SinkscopeError, match=f"pid {os.getpid()}"):  # also within one process
                open_run(out, "sweep", {"unit_size": 2})
            assert mine.unit_names() == []
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_attached_folder_takes_no_lock(tmp_path):
    with open_run(tmp_path / "run", "sweep", {"a": 1}) as main:
        rank1 = RunFolder(main.path, "sweep", {"a": 1})  # a torchrun rank other than 0
        rank1.write_unit("unit-000001", {"x.json": {"v": 1}})
        assert main.unit_done("unit-000001")


def test_write_json_is_atomic_and_readable(tmp_path):
    write_json(tmp_path / "a.json", {"t": (1, 2)})
    assert json.loads((tmp_path / "a.json").read_text()) == {"t": [1, 2]}


STREAMED = pd.DataFrame({"prompt_id": np.arange(10), "token": [f"t{i}" for i in range(10)],
                         "alpha": np.linspace(0, 1, 10, dtype=np.float32), "sink": np.arange(10) % 3 == 0})


def test_streamed_table_is_written_in_row_groups_and_saved(tmp_path):
    manifest = make_manifest("profile", {"name": "m"}, {})
    with open_run(tmp_path / "run", "profile") as folder, folder.table_stream(row_group_rows=4) as stream:
        for start in range(0, 10, 3):  # pieces of 3, 3, 3, 1 rows: row groups of 6 and 4
            stream.append("keys", STREAMED.iloc[start : start + 3])
        assert [p.name.startswith(".tmp-keys.parquet") for p in (tmp_path / "run").iterdir() if p.name != ".lock"] \
            == [True]
        folder.save(Run({"layers": TABLE}, manifest), streams=stream, order=["keys", "layers"])
    run = load_run(tmp_path / "run")  # checks every file's sha256
    assert list(run.tables) == ["keys", "layers"] and run.manifest["tables"] == {"keys": 10, "layers": 3}
    assert run.manifest["files"]["keys.parquet"]["rows"] == 10
    whole = pd.read_parquet(io.BytesIO(STREAMED.to_parquet(index=False)))  # as `save` writes a whole table
    pd.testing.assert_frame_equal(run["keys"], whole, check_exact=True)
    assert pq.ParquetFile(tmp_path / "run" / "keys.parquet").num_row_groups == 2
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "keys.parquet", "layers.parquet",
                                                                       MANIFEST]


def test_streamed_table_not_saved_leaves_nothing(tmp_path):
    with open_run(tmp_path / "run", "profile") as folder, pytest.raises(RuntimeError), \
            folder.table_stream(row_group_rows=2) as stream:
        stream.append("keys", STREAMED)  # one row group on disk
        stream.append("heads", STREAMED.head(1))  # pending only
        raise RuntimeError("the analysis failed")
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]


def test_streamed_pieces_must_match_the_first(tmp_path):
    with open_run(tmp_path / "run", "profile") as folder, folder.table_stream() as stream:
        stream.append("keys", STREAMED)
        with pytest.raises(ValueError, match="alpha"):
            stream.append("keys", STREAMED.assign(alpha=["x"] * 10))
