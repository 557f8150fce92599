"""Long commands report progress through the one display (`cli.options.progress_bars`: a bar with done/total and an
ETA): each update names a task with a known total, and the last one reaches it."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

from sinkscope.cli.app import app


@pytest.fixture
def updates(monkeypatch):
    """Every (task, done, total) a command sends to its progress bars."""
    import sinkscope.cli.stream
    import sinkscope.cli.toy

    calls: list[tuple[str, int, int | None]] = []

    @contextmanager
    def bars():
        yield lambda task, done, total: calls.append((task, done, total))

    for module in (sinkscope.cli.stream, sinkscope.cli.toy):
        monkeypatch.setattr(module, "progress_bars", bars)
    return calls


def _finished(calls: list[tuple[str, int, int | None]]) -> dict[str, tuple[int, int | None]]:
    last = {}
    for task, done, total in calls:
        last[task] = (done, total)
    return last


@pytest.mark.parametrize("args", [
    ["stream", "--model", "tiny:llama", "--text-file", "{text}", "--sink", "2", "--window", "8", "--max-tokens", "40"],
    ["toy", "train", "--epochs", "2"],
    ["toy", "success-rate", "--c-values", "10", "--seeds", "2", "--epochs", "1"],
    ["toy", "sep2", "--n-heads", "1", "--seeds", "2", "--epochs", "1"],
])
def test_long_commands_show_progress_with_a_total(args, updates, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Attention sinks are tokens that draw attention while carrying little meaning. " * 8)
    res = CliRunner().invoke(app, [a.replace("{text}", str(text)) for a in args])
    assert res.exit_code == 0, res.output
    finished = _finished(updates)
    assert finished, "no progress shown"
    assert all(total and done == total for done, total in finished.values()), finished
    if args[0] == "stream":
        assert set(finished) == {"full", "sink_window", "window"}
    else:
        assert max(total for _, total in finished.values()) == 2
