"""Long commands report progress through the one display (`cli.options.progress_bars`: a bar with done/total and an
ETA): each update names a task with a known total, and the last one reaches it."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sinkscope
from sinkscope.cli.app import app


@pytest.fixture
def updates(monkeypatch):
    """Every (task, done, total) a command sends to its progress bars; the status texts go to `updates.status`.
    Every command module that imports `progress_bars` gets the recording one."""
    import importlib
    import pkgutil

    import sinkscope.cli

    calls = _Calls()

    @contextmanager
    def bars():
        def update(task: str, done: int, total: int | None, *, status: str | None = None) -> None:
            calls.append((task, done, total))
            if status is not None:
                calls.status.append((task, status))

        yield update

    patched = []
    for info in pkgutil.iter_modules(sinkscope.cli.__path__):
        module = importlib.import_module(f"sinkscope.cli.{info.name}")
        if info.name != "options" and hasattr(module, "progress_bars"):
            monkeypatch.setattr(module, "progress_bars", bars)
            patched.append(info.name)
    assert {"profile", "tags", "mechanisms", "train", "stream", "toy", "generate", "kvquant", "sweep"} \
        <= set(patched), patched
    return calls


class _Calls(list):
    """The (task, done, total) updates, and the (task, status) texts sent with some of them."""

    def __init__(self) -> None:
        super().__init__()
        self.status: list[tuple[str, str]] = []


def _finished(calls: list[tuple[str, int, int | None]]) -> dict[str, tuple[int, int | None]]:
    last = {}
    for task, done, total in calls:
        last[task] = (done, total)
    return last


PROMPTS = ["The cat sat on the mat.", "Attention sinks draw attention.", "A third prompt here.",
           "Tokens carry meaning.", "The last one."]


@pytest.mark.parametrize(("args", "tasks"), [
    (["stream", "--model", "tiny:llama", "--text-file", "{text}", "--sink", "2", "--window", "8", "--max-tokens",
      "40"], {"full": None, "sink_window": None, "window": None}),
    # 24 tokens: 23 next-token predictions through each cache
    (["kv-quant", "--model", "tiny:llama", "--text-file", "{text}", "--bits", "4", "--sink", "2", "--window", "8",
      "--group", "4", "--chunk", "4", "--max-tokens", "24"], {"full": 23, "sink_window": 23}),
    # five prompts, three new tokens each
    (["generate", "--model", "tiny:llama", "--prompts", "{prompts}", "--max-new-tokens", "3", "--ignore-eos",
      "--no-figures"], {"generating": 15}),
    # five prompts in units of two: three units
    (["sweep", "--model", "tiny:llama", "--prompts", "{prompts}", "--unit-size", "2", "--out", "{tmp}/sweep"],
     {"units (this process)": 3}),
    (["toy", "train", "--epochs", "2"], {"training (epochs)": 2}),
    (["toy", "success-rate", "--c-values", "10", "--seeds", "2", "--epochs", "1"], {"training runs": 2}),
    (["toy", "sep2", "--n-heads", "1", "--seeds", "2", "--epochs", "1"], {"training runs": 2}),
    # five prompts in batches of two: three batches
    (["profile", "--model", "tiny:llama", "--prompts", "{prompts}", "--batch-size", "2"], {"profile": 3}),
    (["tags", "--model", "tiny:llama", "--prompts", "{prompts}", "--batch-size", "2", "--pca-layer", "1",
      "--no-geometry", "--no-figures"], {"tags": 3}),
    (["tags", "--model", "tiny:llama", "--prompts", "{prompts}", "--batch-size", "2", "--pca-layer", "1",
      "--no-figures"], {"tags": 3}),
    (["probe", "--model", "tiny:llama", "--dataset", "{statements}", "--limit", "12", "--batch-size", "5"],
     {"tags": 3}),
    # the native pass, the two other BOS encodings and one ablated head
    (["mechanisms", "--model", "tiny:llama", "--prompts", "{prompts}", "--ablate-layers", "1", "--ablate-heads", "0",
      "--no-figures"], {"mechanism passes": 4}),
    (["vision", "--model", "tiny:vit", "--images", "{images}", "--batch-size", "1", "--no-figures"], {"capture": 2}),
    (["train-lm", "--synthetic", "bigram_backcopy", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
      "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--eval-every", "2", "--eval-batch", "2", "--out",
      "{tmp}/lm"], {"train": 3}),
    (["eval", "--model", "tiny:llama", "--dataset", "sst2", "--data", "{sst2}", "--limit", "3", "--batch-size", "2",
      "--causal-limit", "1", "--causal-max-tokens", "48"], {"sst2": 3}),
    (["calibrate", "--model", "tiny:llama", "--dataset", "sst2", "--data", "{sst2}", "--calib", "2", "--heldout", "1",
      "--layers", "1", "--top-layers", "1", "--save", "{tmp}/calib.json"], {"ACT search: layer trials": 1}),
    (["bench-mitigation", "--model", "tiny:llama", "--dataset", "sst2", "--data", "{sst2}", "--limit", "2"],
     {"sst2": None}),
], ids=["stream", "kv-quant", "generate", "sweep",
        "toy-train", "toy-success-rate", "toy-sep2", "profile", "tags", "tags-geometry", "probe",
        "mechanisms", "vision", "train-lm", "eval", "calibrate", "bench-mitigation"])
def test_long_commands_show_progress_with_a_total(args, tasks, updates, tmp_path):
    """Each task of the command was shown, its last update reaches its total (`tasks`: the expected totals, None
    where it depends on the model or the data)."""
    import json

    from PIL import Image

    text = tmp_path / "text.txt"
    text.write_text("Attention sinks are tokens that draw attention while carrying little meaning. " * 8)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "statements.jsonl").write_text("".join(
        json.dumps({"text": f"Fact {i} is {'true' if i % 2 else 'false'}.", "label": i % 2}) + "\n"
        for i in range(12)))
    (tmp_path / "sst2.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in [
        ("great fun", "positive"), ("dull", "negative"), ("fine film", "positive"), ("awful", "negative")]))
    (tmp_path / "images").mkdir()
    for i, colour in enumerate([(200, 40, 40), (40, 40, 200)]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / "images" / f"square{i}.png")
    fill = {"{text}": text, "{prompts}": tmp_path / "prompts.txt", "{statements}": tmp_path / "statements.jsonl",
            "{sst2}": tmp_path / "sst2.jsonl", "{images}": tmp_path / "images", "{tmp}": tmp_path}
    line = []
    for a in args:
        for key, value in fill.items():
            a = a.replace(key, str(value))
        line.append(a)
    res = CliRunner().invoke(app, line)
    assert res.exit_code == 0, res.output
    finished = _finished(updates)
    assert set(finished) == set(tasks), finished
    assert all(total and done == total for done, total in finished.values()), finished
    assert {task: total for task, (_, total) in finished.items() if tasks[task] is not None} == \
        {task: total for task, total in tasks.items() if total is not None}
    if args[0] == "train-lm":  # the trainer's loss and α₀ beside its bar, a number once evaluated
        assert updates.status and updates.status[-1][0] == "train"
        assert re.fullmatch(r"loss \d+\.\d{3}  α₀ \d\.\d{3}", updates.status[-1][1]), updates.status[-1]


def test_library_modules_never_render():
    """Analyses return data: no module of the library outside `sinkscope.cli` imports rich (a bar, a console, a
    table); they report progress through the `sinkscope.progress.Progress` callback they are given."""
    root = Path(sinkscope.__file__).parent
    renders = [str(path.relative_to(root)) for path in sorted(root.rglob("*.py"))
               if path.relative_to(root).parts[0] != "cli"
               and re.search(r"^\s*(from|import)\s+rich\b", path.read_text(encoding="utf-8"), re.MULTILINE)]
    assert renders == []
    assert re.search(r"^\s*from rich\.progress import", (root / "cli" / "options.py").read_text(encoding="utf-8"),
                     re.MULTILINE), "the one display moved: update this test"


def test_the_one_display_shows_a_status_text(monkeypatch):
    """`progress_bars` takes a task's status text as a keyword and shows it beside the bar."""
    import io

    from rich.console import Console

    from sinkscope.cli import options

    out = io.StringIO()
    monkeypatch.setattr(options, "err_console", Console(file=out, force_terminal=True, width=120))
    with options.progress_bars() as update:
        update("train", 1, 4, status="loss 3.530  α₀ 0.410")
        update("train", 2, 4)  # no status: the last one stays
        update("capture", 1, 2)
    seen = out.getvalue()
    assert "train" in seen and "loss 3.530  α₀ 0.410" in seen and "capture" in seen
