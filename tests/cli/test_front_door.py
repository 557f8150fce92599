"""One front door: a light `import sinkscope`, one meaning per shared option in every command, one kind of user error,
and the lazily imported public API."""

from __future__ import annotations

import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import typer
import typer.main
from typer.testing import CliRunner

import sinkscope
from sinkscope.cli import app
from sinkscope.cli.options import SHARED

runner = CliRunner()
HEAVY = ("torch", "transformers", "pandas", "matplotlib", "sinkscope.analyses", "sinkscope.capture", "sinkscope.models")
SAFETY = ("--device", "--dtype", "--trust-remote-code", "--allow-pickle")
OLD_SPELLINGS = ("--eps", "--max-prompts", "--n", "--data-dir")


def commands(command=None, path=()):
    """(path, click command) for every command of the app, sub-apps included."""
    command = command or typer.main.get_command(app)
    ctx = typer.Context(command)
    if not hasattr(command, "list_commands"):
        yield " ".join(path), command
        return
    for name in command.list_commands(ctx):
        yield from commands(command.get_command(ctx, name), (*path, name))


def options(command) -> dict[str, typing.Any]:
    """Visible and hidden options by their first long name."""
    return {next(o for o in p.opts if o.startswith("--")): p for p in command.params if p.param_type_name == "option"}


CLICK_TYPES = {"text": str, "integer": int, "float": float, "boolean": bool, "path": Path}


def element_type(param) -> typing.Any:
    """The option's value type without Optional or list: `list[str] | None` → str."""
    if not hasattr(param, "type_descriptor"):  # typer before it vendored click
        return CLICK_TYPES.get(param.type.name, param.type)
    kind = param.type_descriptor.annotation
    while typing.get_origin(kind) in (list, types.UnionType, typing.Union):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


ALL = list(commands())


def test_import_is_light_and_version_prints():
    code = (f"import sys, sinkscope, sinkscope.cli; heavy = [m for m in sys.modules if m.startswith({HEAVY!r})]; "
            "assert not heavy, heavy; print(sinkscope.__version__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == sinkscope.__version__ != ""
    version = subprocess.run([sys.executable, "-m", "sinkscope", "--version"], capture_output=True, text=True,
                             check=False)
    assert version.returncode == 0 and version.stdout.strip() == f"sinkscope {sinkscope.__version__}"


def test_help_of_every_command_imports_nothing_heavy():
    paths = [path for path, _ in ALL]
    code = ("import sys; from typer.testing import CliRunner; from sinkscope.cli import app; r = CliRunner(); "
            f"bad = [p for p in {paths!r} if r.invoke(app, [*p.split(), '--help']).exit_code != 0]; "
            f"heavy = [m for m in sys.modules if m.startswith({HEAVY!r})]; assert not bad and not heavy, (bad, heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_every_registered_command_is_walked():
    paths = {path for path, _ in ALL}
    assert {"profile", "explain", "stream", "eval", "calibrate", "bench-mitigation", "tags", "tags-sensitivity",
            "probe", "mechanisms", "sweep", "train-lm", "toy theorem", "toy train", "datasets"} <= paths


@pytest.mark.parametrize(("path", "command"), ALL, ids=[p for p, _ in ALL])
def test_shared_options_mean_one_thing(path, command):
    opts = options(command)
    visible = {name: p for name, p in opts.items() if not p.hidden}
    if "--model" in visible:
        assert set(SAFETY) <= set(visible), f"{path} loads a model without {set(SAFETY) - set(visible)}"
    for name, param in visible.items():
        if name not in SHARED:
            continue
        kind, help_text, exact = SHARED[name]
        assert element_type(param) is kind, f"{path} {name}: {element_type(param)} is not {kind}"
        if exact:
            assert param.help == help_text, f"{path} {name}: {param.help!r}"
        else:
            assert param.help.startswith(help_text), f"{path} {name}: {param.help!r}"
    assert not set(OLD_SPELLINGS) & set(visible), f"{path} still shows {set(OLD_SPELLINGS) & set(visible)}"
    assert all(opts[name].hidden for name in OLD_SPELLINGS if name in opts)


def test_shared_options_have_the_same_names_everywhere():
    spellings: dict[str, set[tuple[str, ...]]] = {}
    for _, command in ALL:
        for name, param in options(command).items():
            if name in SHARED and not param.hidden:
                spellings.setdefault(name, set()).add(tuple(param.opts))
    assert set(spellings) == set(SHARED)
    assert {name: s for name, s in spellings.items() if len(s) > 1} == {}


def test_spelled_out_choices_match_their_registries():
    from sinkscope.toy.averaging import DEFAULT_THEOREM_C
    from sinkscope.toy.tinylm import SYNTHETIC, VARIANTS

    by_path = dict(ALL)
    train = options(by_path["train-lm"])
    assert all(v in train["--variant"].help for v in VARIANTS)
    assert all(s in train["--synthetic"].help for s in SYNTHETIC)
    theorem = options(by_path["toy theorem"])
    assert [float(c) for c in theorem["--c-values"].default.split(",")] == list(DEFAULT_THEOREM_C)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profile", "-m", "tiny:llama", "--prompts", "{tmp}/missing.txt"], "does not exist"),
        (["profile", "-m", "tiny:llama", "--prompts", "{tmp}"], "is a folder; pass a text or JSONL file"),
        (["profile", "-m", "tiny:nope", "--prompt", "hi"], "tiny"),
        (["explain", "-m", "no-org/no-model", "--text", "hi"], "Hub"),
        (["calibrate", "-m", "no-org/no-model"], "Hub"),
        (["bench-mitigation", "-m", "no-org/no-model", "-d", "sst2"], "Hub"),
        (["tags", "-m", "tiny:llama", "--prompts", "{tmp}/missing.txt"], "does not exist"),
        (["probe", "-m", "tiny:llama", "--test-size", "2"], "test-size"),
        (["stream", "-m", "tiny:llama", "--text-file", "{tmp}/missing.txt"], "does not exist"),
        (["stream", "-m", "tiny:llama", "--text", "{tmp}/old.txt"], "old.txt does not exist"),  # the old spelling
        (["tags", "-m", "tiny:llama", "--prompt", "hi", "--max-prompts", "0"], "--limit"),  # the old spelling
        (["sweep", "-m", "tiny:llama", "--prompt", "hi"], "--out"),
        (["eval", "-m", "tiny:llama"], "--dataset"),
        (["train-lm", "--device", "auto", "--synthetic", "bigram_backcopy"], "one device"),
        (["plot-trace", "{tmp}/nothing"], "does not exist"),
        (["report", "{tmp}/nothing"], "not a folder"),
    ],
)
def test_user_errors_are_one_line_with_status_2(tmp_path, args, message):
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_unwritable_out_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = runner.invoke(app, ["profile", "-m", "tiny:llama", "--prompt", "hi there", "--out",
                                 str(tmp_path / "file" / "run")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"error: cannot write to --out {tmp_path / 'file' / 'run'}" in result.output  # checked before any work


def test_commands_called_from_python_raise():
    from sinkscope.cli.report import report_command
    from sinkscope.errors import SinkscopeError

    with pytest.raises(SinkscopeError, match="not a folder"):
        report_command(Path("/nonexistent/run"))


def test_public_api(tiny_llama):
    assert sinkscope.__version__
    names = dir(sinkscope)
    assert "profile" in names and set(sinkscope.__all__) <= set(names)
    for name in sinkscope.__all__:
        assert getattr(sinkscope, name) is not None
    result = sinkscope.profile(tiny_llama, "one string, one prompt")
    assert result.trace.n_prompts == 1 and len(result.tables["prompts"]) == 1
    import torch

    import sinkscope.detect as detect_module

    assert detect_module.list_detectors() == sinkscope.list_detectors()
    sinks = sinkscope.detect("column_mass", torch.tensor([0.5, 0.1, 0.4]), eps=0.3)
    assert sinks.tolist() == [True, False, True]
    with pytest.raises(AttributeError):
        _ = sinkscope.no_such_name


def test_profile_result_renders_escaped_html(tiny_llama):
    result = sinkscope.profile(tiny_llama, ["The cat sat.", "A dog ran."])
    result.tables["layers"].loc[0, "sink_tokens"] = "'<script>'@0 (0.90)"
    page = result._repr_html_()
    assert "&lt;script&gt;" in page and "<script" not in page
    n_layers, n_heads = result.trace.key_mass.shape[1:3]
    assert page.count("<td title='layer ") == n_layers * n_heads
