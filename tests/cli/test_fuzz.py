"""CLI fuzz (issue #15): every command, walked from the app so that a new one is covered, gets a bad value for each of
its options and arguments in turn (bad numbers, unknown names, bad selections, devices and dtypes, and bad files), on
top of a minimal valid command line. A case fails on a traceback, an exit status other than 0 or 2, or an error longer
than one line plus a short hint.

The matrix is fixed (no hypothesis) and fast: the model is `tiny:llama`, the data sets are a few lines written here, and
most bad values are refused before a model is loaded.
"""

from __future__ import annotations

import itertools
import re
import shlex
import traceback
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from sinkscope.cli.app import app

runner = CliRunner()
MODEL = "tiny:llama"
PROMPT = "The cat sat on the mat."

# ------------------------------------------------------------------------------------------------ the commands
Base = tuple[list[str], list[tuple[str, str | None]]]
"""(arguments, (option, value) pairs; None for a flag), with {data} and {tmp} to fill in."""

BASES: dict[str, Base] = {
    "profile": ([], [("--model", MODEL), ("--prompt", PROMPT)]),
    "explain": ([], [("--model", MODEL), ("--text", PROMPT)]),
    "sweep": ([], [("--model", MODEL), ("--prompt", PROMPT), ("--out", "{tmp}/sweep")]),
    "stream": ([], [("--model", MODEL), ("--text-file", "{data}/text.txt"), ("--sink", "2"), ("--window", "8"),
                    ("--max-tokens", "24")]),
    "kv-quant": ([], [("--model", MODEL), ("--text-file", "{data}/text.txt"), ("--bits", "4"), ("--sink", "2"),
                      ("--window", "8"), ("--group", "4"), ("--chunk", "4"), ("--max-tokens", "24")]),
    "generate": ([], [("--model", MODEL), ("--prompt", PROMPT), ("--max-new-tokens", "3"), ("--min-later", "1")]),
    "eval": ([], [("--model", MODEL), ("--dataset", "sst2"), ("--data", "{data}/sst2.jsonl"), ("--limit", "2"),
                  ("--causal-limit", "1"), ("--causal-max-tokens", "48")]),
    "calibrate": ([], [("--model", MODEL), ("--dataset", "sst2"), ("--data", "{data}/sst2.jsonl"), ("--calib", "2"),
                       ("--heldout", "1"), ("--layers", "1"), ("--top-layers", "1"), ("--save", "{tmp}/calib.json")]),
    "bench-mitigation": ([], [("--model", MODEL), ("--dataset", "sst2"), ("--data", "{data}/sst2.jsonl"),
                              ("--limit", "2")]),
    "mechanisms": ([], [("--model", MODEL), ("--prompt", PROMPT), ("--ablate-layers", "1"), ("--ablate-heads", "0"),
                        ("--no-figures", None)]),
    "dormant": ([], [("--model", MODEL), ("--domain", "prose={data}/text.txt"), ("--max-tokens", "8"),
                     ("--no-figures", None)]),
    "overmixing": ([], [("--model", MODEL), ("--prompt", PROMPT), ("--max-tokens", "8"), ("--no-figures", None)]),
    "tags": ([], [("--model", MODEL), ("--prompt", PROMPT), ("--pca-layer", "1"), ("--no-geometry", None),
                  ("--no-figures", None)]),
    "tags-sensitivity": ([], [("--model", MODEL), ("--prompt", PROMPT), ("--thresholds", "0.1,0.2"),
                              ("--no-figures", None)]),
    "probe": ([], [("--model", MODEL), ("--dataset", "geometry_of_truth"), ("--data", "{data}"), ("--limit", "12")]),
    "report": (["{data}/run"], []),
    "demo": ([], [("--models", MODEL)]),
    "train-lm": ([], [("--synthetic", "bigram_backcopy"), ("--steps", "2"), ("--batch-size", "2"), ("--seq-len", "16"),
                      ("--d-model", "16"), ("--n-layers", "1"), ("--n-heads", "2"), ("--eval-every", "1"),
                      ("--eval-batch", "2"), ("--out", "{tmp}/lm")]),
    "plot-trace": (["{data}/lm"], []),
    "toy theorem": ([], [("--c-values", "4"), ("--n-sequences", "16")]),
    "toy train": ([], [("--epochs", "1")]),
    "toy success-rate": ([], [("--c-values", "10"), ("--seeds", "1"), ("--epochs", "1")]),
    "toy sep2": ([], [("--n-heads", "1"), ("--seeds", "1"), ("--epochs", "1")]),
    "toy plot": ([], [("--epochs", "1"), ("--out", "{tmp}/plot")]),
    "vision": ([], [("--model", "tiny:vit"), ("--images", "{data}/images")]),
}
"""A minimal valid command line per command. A command without an entry gets `--model`, `--prompt` and `--text` when
it has them (`test_every_base_is_valid` says when that is not enough)."""


def walk(command: typing.Any = None, path: tuple[str, ...] = ()) -> Iterator[tuple[str, typing.Any]]:
    """(path, click command) for every command of the app, sub-apps included."""
    command = command or typer.main.get_command(app)
    if not hasattr(command, "list_commands"):
        yield " ".join(path), command
        return
    ctx = typer.Context(command)
    for name in command.list_commands(ctx):
        yield from walk(command.get_command(ctx, name), (*path, name))


def base_of(path: str, command: typing.Any) -> Base:
    if path in BASES:
        return BASES[path]
    names = {opt for param in command.params for opt in param.opts}
    defaults = {"--model": MODEL, "--prompt": PROMPT, "--text": PROMPT}
    return [], [(name, value) for name, value in defaults.items() if name in names]


# ------------------------------------------------------------------------------------------------ the bad values
FILES = ("@missing", "@dir", "@file", "@empty", "@garbage", "@badjson")
"""Bad files, made fresh in each case: a missing path, an empty folder, a text file (where a folder is expected), an
empty file, binary garbage, and lines of broken JSON."""
OUTPUTS = ("@dir", "@file", "@under-file")
"""Bad places to write to (--out, --save): a folder, a file (each bad for one kind of output), and a path below a file,
which cannot be created. A new path is the normal case, and the commands' own tests run it."""

INTS = ("-1", "0", str(10**12), "nan", "abc")
FLOATS = ("-1", "0", str(10**12), "nan", "inf", "abc")
SEEDS = ("-1", str(10**12), "nan", "abc")  # 0 is a seed like any other
SELECTIONS = ("99", "0-99999999", "a-b", "-")
NAMES = ("nope", "")
LISTS = ("abc", "", "-1", "1,,x")
STRINGS: dict[str, tuple[str, ...]] = {
    "--model": ("no-such-model-xyz", "tiny:lama", "smollm", ""),
    "--models": ("no-such-model-xyz", "tiny:lama", "", ","),
    "--device": ("gpu", "cuda", "cpu:7"),
    "--dtype": ("float8", "abc"),
    "--layers": SELECTIONS,
    "--heads": SELECTIONS,
    "--ablate-layers": SELECTIONS,
    "--ablate-heads": SELECTIONS,
    "--data": (*FILES, "nope"),
    "--data-dir": (*FILES, "nope"),
    "--dataset": (*NAMES, *FILES),
    "--c-values": LISTS,
    "--thresholds": LISTS,
    "--bits": LISTS,
    "--n-heads": LISTS,
    "--eps": LISTS,
    "--prompt": ("", "x" * 2000),
    "--title": (),  # any text is a title
    "--text": ("", "x" * 2000),
}
"""Values for string options by name; any other string option gets NAMES."""

OVERRIDES: dict[tuple[str, str], tuple[str, ...]] = {
    ("toy sep2", "--heads"): LISTS,  # the old spelling of --n-heads, a list of head counts
}
"""Values for options whose name means something else in one command."""

HUGE_RUNS_LONG = {
    # (command, option): a huge value is valid here and starts that much work
    ("train-lm", "--steps"), ("toy train", "--epochs"), ("toy plot", "--epochs"), ("toy success-rate", "--epochs"),
    ("toy sep2", "--epochs"), ("toy success-rate", "--seeds"), ("toy sep2", "--seeds"),
}


def element_type(param: typing.Any) -> typing.Any:
    """The parameter's value type without Optional or list: `list[str] | None` → str."""
    if not hasattr(param, "type_descriptor"):  # typer before it vendored click
        return {"text": str, "integer": int, "float": float, "boolean": bool, "path": Path}.get(param.type.name)
    kind = param.type_descriptor.annotation
    while typing.get_origin(kind) in (list, types.UnionType, typing.Union):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def bad_values(path: str, name: str, param: typing.Any) -> tuple[str, ...]:
    """The values to try for one option: by its type, or for strings by its name. A value equal to the option's
    default or to its value in the base is left out (the base already runs it)."""
    kind = element_type(param)
    if kind is bool:
        return ()
    if (path, name) in OVERRIDES:
        values = OVERRIDES[path, name]
    elif kind is int or kind is float:
        values = SEEDS if name == "--seed" else INTS if kind is int else FLOATS
        values = tuple(v for v in values if not (v == str(10**12) and (path, name) in HUGE_RUNS_LONG))
    elif kind is Path:
        values = OUTPUTS if name in ("--out", "--save") else FILES
    else:
        values = STRINGS.get(name, NAMES)
    given = {value for option, value in BASES.get(path, ([], []))[1] if option in param.opts}
    default = param.default if isinstance(param.default, list | tuple) else [param.default]
    given |= {str(d) for d in default if d is not None}
    numbers = {_number(g) for g in given} - {None}
    return tuple(v for v in values if v not in given and not (kind in (int, float) and _number(v) in numbers))


def _number(text: str | None) -> float | None:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def cases() -> Iterator[typing.Any]:
    for path, command in walk():
        for param in command.params:
            if param.name == "_cli":
                continue
            name = param.opts[0] if param.param_type_name == "argument" else next(
                o for o in param.opts if o.startswith("--"))
            for value in bad_values(path, name, param):
                label = value if len(value) < 20 else f"{value[:8]}…x{len(value)}"
                yield pytest.param(path, param.param_type_name, param.opts, value, id=f"{path}|{name}={label}")


COMMANDS = dict(walk())
CASES = list(cases())


# ------------------------------------------------------------------------------------------------ the fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small valid inputs: a text, sst2 rows, labelled statements, a profile run folder and a train-lm run."""
    return make_data(tmp_path_factory.mktemp("fuzz-data"))


def make_data(folder: Path) -> Path:
    import json

    (folder / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 2)
    (folder / "images").mkdir()
    for i, colour in enumerate([(200, 40, 40), (40, 40, 200)]):  # two small PNGs for `vision`
        from PIL import Image

        Image.new("RGB", (40, 30), colour).save(folder / "images" / f"square{i}.png")
    (folder / "sst2.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in [
        ("great fun", "positive"), ("dull", "negative"), ("fine film", "positive"), ("awful", "negative")]))
    (folder / "geometry_of_truth").mkdir()
    (folder / "geometry_of_truth" / "test.jsonl").write_text("".join(
        json.dumps({"text": f"Fact {i} is {'true' if i % 2 else 'false'}.", "label": i % 2}) + "\n"
        for i in range(12)))
    for line in (["profile", "--model", MODEL, "--prompt", PROMPT, "--out", str(folder / "run")],
                 base_line("train-lm", BASES["train-lm"], folder, folder)):
        result = runner.invoke(app, line)
        assert result.exit_code == 0, result.output
    return folder


def base_line(path: str, base: Base, data: Path, tmp: Path) -> list[str]:
    """The command line of `base`, with {data} and {tmp} filled in."""
    args, options = base
    line = [*path.split(), *(a.format(data=data, tmp=tmp) for a in args)]
    return line + [name if value is None else f"{name}={value.format(data=data, tmp=tmp)}" for name, value in options]


def make_file(kind: str, where: Path) -> str:
    """A fresh bad file of `kind` (see FILES and OUTPUTS) under `where`."""
    target = where / f"bad-{kind[1:]}"
    if kind == "@dir":
        target.mkdir()
    elif kind == "@under-file":
        target.write_text("a file, not a folder\n")
        target = target / "run"
    elif kind == "@file":
        target.write_text("just some text\n")
    elif kind == "@empty":
        target.write_bytes(b"")
    elif kind == "@garbage":
        target.write_bytes(bytes(range(0, 256, 5)))  # NUL, a newline, bytes that are not UTF-8
    elif kind == "@badjson":
        target = target.with_suffix(".jsonl")
        target.write_text('{"text": "unterminated\n[1, 2\n{"label": }\n')
    return str(target)


def command_line(path: str, kind: str, opts: list[str], value: str, data: Path, tmp: Path) -> list[str]:
    """The base of `path` with `value` as the argument, or as the option `opts` (replacing it when the base has it)."""
    args, options = base_of(path, COMMANDS[path])
    if value.startswith("@"):
        value = make_file(value, tmp)
    if kind == "argument":
        return base_line(path, ([value.replace("{", "{{").replace("}", "}}")], options), data, tmp)
    options = [(name, v) for name, v in options if name not in opts]
    return [*base_line(path, (args, options), data, tmp), f"{next(o for o in opts if o.startswith('--'))}={value}"]


def check(line: list[str], result: typing.Any, command: typing.Any) -> None:
    """No traceback, status 0 or 2, and on status 2 an error of one line (plus at most a hint) that names only options
    the command has."""
    shown = f"sinkscope {shlex.join(line)}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"{shown}\nraised\n{trace}", pytrace=False)
    assert result.exit_code in (0, 2), f"{shown}\nexit {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output, f"{shown}\n{result.output}"
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert 1 <= len(lines) <= 2, f"{shown}\nexit 2 with {len(lines)} lines on stderr:\n{result.stderr}"
        assert any(line.startswith("error: ") for line in lines), f"{shown}\nno 'error: ' line:\n{result.stderr}"
        quoted = re.sub(r"`[^`]*`", "", result.stderr)  # a quoted command line: another program's options
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", quoted))
        known = {opt for param in command.params for opt in param.opts} | {"--help"}
        assert named <= known, f"{shown}\nthe error names {sorted(named - known)}, which this command lacks:\n" \
                               f"{result.stderr}"


@pytest.fixture(scope="module", autouse=True)
def _command_built_once() -> Iterator[None]:
    """typer's CliRunner builds the click command from the app on every call (tens of ms on a busy machine, most of a
    refused case): build it once for this module."""
    import typer.testing

    build = getattr(typer.testing, "_get_command", None)
    if build is None:  # another typer: slower, the same cases
        yield
        return
    built = build(app)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(typer.testing, "_get_command", lambda typer_app: built if typer_app is app else build(typer_app))
        yield


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """The tiny models gain nothing from threads, and on a busy machine torch's and BLAS's threads wait for each
    other: one thread makes these runs many times faster. (A BLAS library first loaded here keeps one thread.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            patch.setenv(name, "1")  # read by a BLAS library when it loads (scipy's, with the first probe)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover (scikit-learn brings it)
            yield
        else:
            with threadpool_limits(1):  # the BLAS libraries loaded already
                yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Iterator[Path]]:
    """A fresh folder per case (cheaper than tmp_path a thousand times), and the working directory meanwhile, where
    relative defaults such as calibrate's --save calibration.json land."""
    root = tmp_path_factory.mktemp("fuzz-cases")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        yield (root / str(i) for i in itertools.count())


@pytest.fixture
def tmp(cases_dir: Iterator[Path]) -> Path:
    folder = next(cases_dir)
    folder.mkdir()
    return folder


# ------------------------------------------------------------------------------------------------ the tests
def test_every_command_has_cases() -> None:
    from sinkscope.cli.app import COMMANDS as REGISTERED

    assert set(REGISTERED) <= set(COMMANDS) and any(path.startswith("toy ") for path in COMMANDS)
    with_options = {path for path, command in COMMANDS.items() if any(p.name != "_cli" for p in command.params)}
    assert with_options == {p.values[0] for p in CASES}
    assert set(BASES) <= set(COMMANDS), f"bases of commands that are gone: {set(BASES) - set(COMMANDS)}"


@pytest.mark.parametrize("path", list(COMMANDS))
def test_every_base_is_valid(path: str, data: Path, tmp: Path) -> None:
    line = base_line(path, base_of(path, COMMANDS[path]), data, tmp)
    result = runner.invoke(app, line)
    check(line, result, COMMANDS[path])
    assert result.exit_code == 0, f"the base of {path} fails; give it a valid one in BASES:\n{result.output}"


@pytest.mark.parametrize(("path", "kind", "opts", "value"), CASES)
def test_bad_value(path: str, kind: str, opts: list[str], value: str, data: Path, tmp: Path) -> None:
    line = command_line(path, kind, opts, value, data, tmp)
    check(line, runner.invoke(app, line), COMMANDS[path])


@pytest.mark.parametrize("spelling", ["--limit", "--n"])
def test_probe_without_statements_names_its_own_option(spelling: str, tmp: Path) -> None:
    """Issue #15: `probe --n 0` named --prompt and --prompts, which probe does not have."""
    result = runner.invoke(app, ["probe", "--model", MODEL, f"{spelling}=0"])
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    assert "--limit" in result.stderr and "--prompt" not in result.stderr, result.stderr
