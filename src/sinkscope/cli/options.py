"""Every option the commands share, declared once with one meaning; the one console, the one error handler, and the
helpers commands share (loading a model, reading prompts and texts, parsing selections).

Imports nothing heavy: a command imports the library it runs inside its function, so `--help` stays fast.
A command that needs a detail in a shared option's help uses `described(Alias, "...")`: same names, same type,
the shared help first. Old spellings stay for one release as hidden options (`renamed`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_args

import typer
from rich.console import Console
from typer.core import TyperGroup

try:  # typer ≥ 0.22 carries its own click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError

from sinkscope.errors import SinkscopeError

if TYPE_CHECKING:
    from sinkscope.models import LoadedModel
    from sinkscope.progress import Progress

# piped output (a log, a CI run) gets whole tables instead of rich's 80-column default
_width = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200
console = Console(emoji=False, highlight=False, width=_width)
err_console = Console(stderr=True, emoji=False, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------- the options
def described(alias: Any, detail: str) -> Any:
    """The shared option `alias` with a command's `detail` appended to its help (same names, same type)."""
    base, info = get_args(alias)
    info = copy.copy(info)
    info.help = f"{info.help}{detail}"
    return Annotated[base, info]


MODEL_HELP = "Hub id, local folder, GGUF file or built-in name (sinkscope models lists them)"
ModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
ModelsOpt = Annotated[list[str], typer.Option("--model", "-m", help=MODEL_HELP)]  # repeatable
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="Device: cpu, cuda, cuda:1, or auto (model parallel: the layers spread over every GPU, then CPU, "
                     "via accelerate)")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow code from the model repository to run")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickle (.bin) checkpoints; loading them can "
                                                                "run code")]
PromptOpt = Annotated[list[str] | None, typer.Option("--prompt", help="A prompt (repeat for several)")]
PromptsOpt = Annotated[Path | None, typer.Option(
    "--prompts", help="File of prompts: one per line (.txt), or JSONL with a text or prompt field")]

# The shared options below take a command's detail after the shared help (see `described`).
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size")]
BatchSizeOpt = described(BatchOpt, ": prompts per forward pass")
OutPathOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the results")]
OutOpt = described(OutPathOpt, ": a run folder (Parquet tables + manifest.json)")
LayersOpt = Annotated[str, typer.Option("--layers", help="Layers: -1 (last), 'all', '0,2' or '3-6'")]
HeadsOpt = Annotated[str, typer.Option("--heads", help="Heads: 'all', '0,2' or '1-3'")]
MethodOpt = Annotated[str, typer.Option("--method", help="Detector (sinkscope detectors lists them)")]
MethodsOpt = Annotated[list[str] | None, typer.Option("--method", help="Detector (sinkscope detectors lists them)")]
ThresholdOpt = Annotated[float | None, typer.Option(
    "--threshold", help="The detector's threshold (θ, α, τ or ε; sinkscope detectors shows the defaults)")]
MinQueriesOpt = Annotated[int | None, typer.Option(
    "--min-queries", min=0, help="Column detectors ignore keys seen by fewer than min(N, 10% of the prompt's tokens) "
                                 "queries (default 16; 0 reads every key)")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="At most this many")]
DataOpt = Annotated[str | None, typer.Option("--data", help="Data")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Random seed")]  # numpy's range
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Start over in an --out folder that holds another run, instead of refusing")]

SHARED: dict[str, tuple[type, str, bool]] = {
    # option: (element type, help, whether every command shows exactly this help (else it starts with it))
    "--model": (str, MODEL_HELP, True),
    "--device": (str, get_args(DeviceOpt)[1].help, True),
    "--dtype": (str, get_args(DtypeOpt)[1].help, True),
    "--trust-remote-code": (bool, get_args(TrustOpt)[1].help, True),
    "--allow-pickle": (bool, get_args(PickleOpt)[1].help, True),
    "--prompt": (str, get_args(PromptOpt)[1].help, True),
    "--prompts": (Path, get_args(PromptsOpt)[1].help, True),
    "--batch-size": (int, get_args(BatchOpt)[1].help, False),
    "--out": (Path, get_args(OutPathOpt)[1].help, False),
    "--layers": (str, get_args(LayersOpt)[1].help, False),
    "--heads": (str, get_args(HeadsOpt)[1].help, False),
    "--method": (str, get_args(MethodOpt)[1].help, False),
    "--threshold": (float, get_args(ThresholdOpt)[1].help, False),
    "--limit": (int, get_args(LimitOpt)[1].help, False),
    "--data": (str, get_args(DataOpt)[1].help, False),
    "--seed": (int, get_args(SeedOpt)[1].help, False),
    "--overwrite": (bool, get_args(OverwriteOpt)[1].help, True),
}
"""The shared options: one meaning each. `tests/cli/test_front_door.py` checks every command against this table."""

DATA_HELP = ": a JSONL/CSV file, a folder of <name>/test.jsonl, or 'hub' (default: ../shared/data, else the Hub)"
CalibrationOpt = Annotated[Path | None, typer.Option(
    "--calibration", help="An ACT calibration JSON written by sinkscope calibrate")]
NoFiguresOpt = Annotated[bool, typer.Option("--no-figures", help="Write tables only")]


def renamed(value: T, old: T | None) -> T:
    """The value of a renamed option: the old spelling (a hidden option, kept for one release and listed in the
    README) wins when it is given."""
    return value if old is None else old


# ------------------------------------------------------------------------------------------------ the error handler
def fail(message: str) -> typer.Exit:
    """Print one red line on stderr; return the exit (status 2) to raise."""
    err_console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def user_errors(fn: F) -> F:
    """Run a command: a `SinkscopeError`, a file or folder that cannot be read or written, or sizes that do not fit in
    memory become one red line on stderr and exit status 2, without a traceback; a float option given nan or inf is
    refused before any work. Called from Python rather than the command line, the function raises as usual.

    typer hands the wrapper the command-line context through an extra `typer.Context` parameter; a direct call has
    none.
    """
    if getattr(fn, "__user_errors__", False):
        return fn
    signature = inspect.signature(fn, eval_str=True)

    @functools.wraps(fn)
    def command(*args: Any, _cli: typer.Context | None = None, **kwargs: Any) -> Any:
        if _cli is None:
            return fn(*args, **kwargs)
        try:
            check_finite(_cli, kwargs)
            if isinstance(kwargs.get("out"), Path):
                check_out(kwargs["out"])  # before any work: an unusable --out must not cost a computation
            return fn(*args, **kwargs)
        except SinkscopeError as err:
            raise fail(str(err)) from None
        except (MemoryError, RuntimeError) as err:
            if not out_of_memory(err):
                raise
            raise fail(f"not enough memory: {out_of_memory(err)}; use smaller sizes (batch size, sequence length, "
                       "model size, number of examples) or a machine with more memory") from None
        except OSError as err:
            if err.filename is None:
                raise
            raise fail(f"cannot use {err.filename}: {err.strerror or err}; check the path and its permissions, or "
                       "pass another one") from None

    context = inspect.Parameter("_cli", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=typer.Context)
    command.__signature__ = signature.replace(parameters=[*signature.parameters.values(), context])  # type: ignore[attr-defined]
    command.__user_errors__ = True  # type: ignore[attr-defined]
    return command  # type: ignore[return-value]


class OneLineErrors(TyperGroup):
    """The group class of the app: a usage error (an unknown option or command, a missing option, a value of the
    wrong type) is one red line and a hint, like every other user error, instead of click's usage box."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with _one_line_usage():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage():
            return super().invoke(ctx)


@contextmanager
def _one_line_usage() -> Iterator[None]:
    try:
        yield
    except UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # no arguments: the help is shown instead
            raise
        exit_ = fail(err.format_message())
        ctx = err.ctx
        if ctx is not None and ctx.help_option_names:
            err_console.print(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.", highlight=False,
                              soft_wrap=True)
        raise exit_ from None


# ------------------------------------------------------------------------------------------------------ the helpers
def check_finite(ctx: typer.Context, values: dict[str, Any]) -> None:
    """A float option (or each value of a repeated one) must be a finite number: nan and inf mean nothing here."""
    for param in ctx.command.params:
        given = values.get(param.name or "")
        for value in given if isinstance(given, list | tuple) else [given]:
            if isinstance(value, float) and not math.isfinite(value):
                name = next((o for o in param.opts if o.startswith("--")), param.name)
                raise SinkscopeError(f"{name} {value}: pass a finite number")


def out_of_memory(err: BaseException) -> str | None:
    """What an allocation that failed asked for (torch's CPU and CUDA allocators, Python's MemoryError), else None."""
    text = str(err)
    if isinstance(err, MemoryError):
        return "an allocation failed"
    if "can't allocate memory" in text:  # torch's CPU allocator: "... you tried to allocate N bytes ..."
        asked = text.split("tried to allocate ", 1)[-1].split(" bytes", 1)[0]
        return f"the run asked for {int(asked) / 2**30:,.1f} GiB at once" if asked.isdigit() else "an allocation failed"
    if type(err).__name__ == "OutOfMemoryError" or "out of memory" in text.lower():
        return text.splitlines()[0][:160] if text else "an allocation failed"
    return None


def check_out(out: Path) -> None:
    """--out must be a folder this process can create and write into; checked before a command computes anything.
    Creates nothing: it probes the nearest existing ancestor."""
    if out.exists() and not out.is_dir():
        raise SinkscopeError(f"--out {out} is a file; pass a folder")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise SinkscopeError(f"cannot write to --out {out}: {probe} is not writable; check its permissions or "
                             "pass another folder")


@contextmanager
def progress_bars() -> Iterator[Progress]:
    """The one progress display of long commands: a bar per task with done/total, elapsed time, an ETA and the task's
    status text, on stderr, gone when finished; nothing when stderr is not a terminal (a pipe or a log would get only
    a stray blank line). Yields `update(task, done, total, status=None)`, a `sinkscope.progress.Progress` to pass to
    library functions."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    # lines printed meanwhile go above the bars when both streams are the terminal, to stdout as they are otherwise
    with RichProgress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal,
                      redirect_stdout=sys.stdout.isatty()) as bar:
        tasks: dict[str, Any] = {}

        def update(task: str, done: int, total: int | None, *, status: str | None = None) -> None:
            if task not in tasks:
                tasks[task] = bar.add_task(task, total=total, status="")
            fields = {} if status is None else {"status": status}
            bar.update(tasks[task], completed=done, total=total, **fields)

        yield update


def load(model: str, device: str | None = None, dtype: str = "float32", trust_remote_code: bool = False,
         allow_pickle: bool = False, *, images: bool = False) -> LoadedModel:
    """`sinkscope.models.load_model` with the shared options, behind a spinner. A command that reads text refuses a
    vision model in one line; `images=True` (`sinkscope vision`) refuses a text model instead."""
    from sinkscope.capture.images import is_vision
    from sinkscope.models import load_model

    with console.status(f"loading {model}"):
        loaded = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                            allow_pickle=allow_pickle)
    if is_vision(loaded) and not images:
        raise SinkscopeError(f"{loaded.info.name} is a vision model: it reads images, not text; run `sinkscope vision "
                             f"--model {model} --images DIR`")
    if images and not is_vision(loaded):
        raise SinkscopeError(f"{loaded.info.name} is a text model; sinkscope vision needs a vision transformer (ViT, "
                             "DeiT, DINOv2, CLIP or SigLIP vision tower; `sinkscope models` lists tiny:vit and others)")
    return loaded


def method_params(method: str, threshold: float | None, min_queries: int | None = None) -> dict[str, Any]:
    """{first parameter of the detector: threshold} (nothing without a threshold) and `min_queries` when given; an
    unknown detector, or a minimum for a row detector, is an error."""
    from sinkscope.detect import get_detector

    detector = get_detector(method)
    params: dict[str, Any] = {}
    if threshold is not None:
        params[next(iter(k for k in detector.params if k != "dims"))] = threshold
    if min_queries is not None:
        if detector.statistic != "column":
            raise SinkscopeError(f"--min-queries applies to column detectors; {method} reads the last token's row")
        params["min_queries"] = min_queries
    return params


_MAX_SELECTION = 100_000


def parse_selection(spec: str | None) -> list[int] | None:
    """'all' or None → None; '-1' → [-1]; '0,2,5' → [0, 2, 5]; '3-6' → [3, 4, 5, 6]."""
    if spec is None or spec == "all":
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                if int(hi) - int(lo) >= _MAX_SELECTION:  # checked before the range is expanded
                    raise SinkscopeError(f"the selection '{part}' names more than {_MAX_SELECTION:,} layers or "
                                         "heads; no model has that many")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise SinkscopeError(f"cannot read the selection '{spec}': use 'all', '-1', '0,2,5' or '3-6'") from None
    return out


def check_selection(selection: list[int] | None, size: int, option: str, what: str = "layers") -> None:
    """Every index of a parsed selection must name one of the model's `size` layers or heads (negative counts from the
    end)."""
    bad = [i for i in selection or [] if not -size <= i < size]
    if bad:
        raise SinkscopeError(f"{option} names {what} {', '.join(map(str, bad))}, but the model has {size} {what} "
                             f"(0 to {size - 1}, or -1 for the last)")


def read_prompts(path: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """Prompts from a text file (one per line) or JSONL (a "text" or "prompt" field per line).

    Returns the prompts (unreadable lines become "" so line numbers stay aligned) and (line index, reason) for
    unreadable lines."""
    if not path.exists():
        raise SinkscopeError(f"prompt file {path} does not exist")
    if path.is_dir():
        raise SinkscopeError(f"prompt file {path} is a folder; pass a text or JSONL file")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not _json_lines(path, lines):
        return lines, []
    prompts, bad = [], []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
            text = record.get("text", record.get("prompt")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError("no 'text' or 'prompt' string field")
            prompts.append(text)
        except ValueError as err:
            prompts.append("")
            bad.append((i, f"not a JSON object with a text field ({err})"))
    if lines and len(bad) == len(lines):
        raise SinkscopeError(f"no line of {path} is a JSON object with a \"text\" or \"prompt\" string field "
                             f"(line 1: {bad[0][1]}); use one such object per line, or plain text with one prompt "
                             "per line in a .txt file")
    return prompts, bad


def _json_lines(path: Path, lines: list[str]) -> bool:
    """JSONL by suffix (.jsonl, .json) or by content: the first non-empty line is a JSON object."""
    if path.suffix in (".jsonl", ".json"):
        return True
    first = next((line for line in lines if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def gather_prompts(prompt: list[str] | None, prompts: Path | None) -> tuple[list[str], list[tuple[int, str]]]:
    """--prompt texts followed by the --prompts file's lines, and (index, reason) for unreadable lines."""
    texts = list(prompt or [])
    file_bad: list[tuple[int, str]] = []
    if prompts is not None:
        from_file, bad = read_prompts(prompts)
        file_bad = [(len(texts) + i, why) for i, why in bad]
        texts.extend(from_file)
    if not texts:
        raise SinkscopeError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE (one per line)")
    return texts, file_bad


def read_text(path: Path) -> str:
    """A text file, or a JSONL file whose `text` fields are joined with blank lines."""
    if not path.exists():
        raise SinkscopeError(f"text file {path} does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for i, line in enumerate(raw.splitlines()):
        try:
            texts.append(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError):
            raise SinkscopeError(f"{path} line {i + 1} is not a JSON object with a 'text' field") from None
    return "\n\n".join(texts)
