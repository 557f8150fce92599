"""`sweep`: `profile` over a large prompt set, data-parallel over processes and resumable after any crash.

The prompts are cut into units of `unit_size` consecutive prompts (unit u holds prompts u·size … (u+1)·size − 1);
process `rank` of `world` does the units with u % world == rank. Each finished unit's tables (`profile`'s, with the
global prompt ids) are a store unit `out/units/unit-<u>/` (`sinkscope.store`: written atomically, its files listed
with sizes and sha256), so a process killed at any moment loses at most the unit it was working on, a rerun never
repeats a finished one, and a unit whose files were deleted or damaged since is recomputed (and reported). When every
unit is done, rank 0 merges the units into a run folder in `out/`, a unit at a time (their tables are appended to the
run's Parquet files and `layers` comes from running totals), so the merge's memory does not grow with the prompts.
The folder records the sweep's settings (model, dtype, method, parameters, prompt-set hash, unit size); resuming with
different settings is refused. The number of processes and the batch size may change between resumes. Rank 0 holds
the folder's lock for the whole launch.

Test hook (tests/analyses/test_sweep.py): with `SINKSCOPE_KILL_BEFORE_RENAME=unit-<u>` set (`KILL_HOOK`), the process
SIGKILLs itself after unit u's files are in their temporary folder and before the rename, the worst moment.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist

from sinkscope.analyses.profile import (
    TABLES,
    LayerSummary,
    ProfileSummary,
    long_tables,
    model_manifest,
    resolved_params,
    sink_mask,
    skipped_table,
)
from sinkscope.capture import CaptureConfig, run_capture, validate_prompts
from sinkscope.detect import get_detector
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel, parse_dtype
from sinkscope.progress import Progress
from sinkscope.store import (
    KILL_HOOK,
    UNITS,
    Run,
    RunFolder,
    TableStream,
    make_manifest,
    normalise,
    open_run,
    reporter,
)

COMMAND = "sweep"
SHARDS = UNITS  # where the units live: out/units/unit-<u>/
__all__ = ["KILL_HOOK", "SHARDS", "Ranks", "SweepConfig", "SweepPlan", "SweepResult", "merge_units", "plan_sweep",
           "plan_units", "process_group", "profile_unit", "resolve_device", "run_units", "sweep", "sweep_run",
           "sweep_settings", "unit_name", "unit_path"]
# Ranks that finish early wait for the slowest one at the final barrier; the default (30 min) is too short for that.
BARRIER_TIMEOUT = timedelta(hours=24)
# Row order of each table: the order `profile` builds them in.
SORT_KEYS: dict[str, list[str]] = {
    "keys": ["prompt_id", "layer", "head", "position"],
    "heads": ["prompt_id", "layer", "head"],
    "prompts": ["prompt_id"],
    "sink_rate": ["prompt_id", "position"],
    "skipped": ["prompt_id"],
}


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel launch (torchrun, accelerate launch); one process: 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Ranks:
        """RANK, WORLD_SIZE and LOCAL_RANK as torchrun and accelerate set them (absent: a single process)."""
        env = os.environ if env is None else env
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise SinkscopeError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (launch with torchrun)") from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise SinkscopeError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world}); launch with torchrun")
        return cls(rank, world, local)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class SweepConfig:
    """What each unit computes (method, params: a registered detector and its parameters) and how the work is cut."""

    method: str = "column_mass"
    params: Mapping[str, Any] = field(default_factory=dict)
    unit_size: int = 32
    batch_size: int = 8

    def __post_init__(self) -> None:
        get_detector(self.method)
        if self.unit_size < 1:
            raise SinkscopeError("--unit-size must be at least 1")
        if self.batch_size < 1:
            raise SinkscopeError("--batch-size must be at least 1")


@dataclass
class SweepPlan:
    """A checked output folder and the prompts it covers; `units` holds each unit's prompt range."""

    out: Path
    prompts: list[str]
    config: SweepConfig
    settings: dict[str, Any]
    units: list[range]
    folder: RunFolder  # rank 0: opened and locked; other ranks: attached


@dataclass
class SweepResult:
    """One process's outcome: units done by this call, units found done (all ranks), the units of this process that
    were recomputed because they were damaged or left half-written ({unit: reason}), and (rank 0) the merged run's
    summary (its `layers` table, skipped prompts and row counts; the tables are in the run folder)."""

    n_units: int
    done_now: list[int]
    done_before: int
    summary: ProfileSummary | None = None
    damaged: dict[int, str] = field(default_factory=dict)


def resolve_device(device: str | None, ranks: Ranks) -> str | None:
    """The device of this process: with several processes on CUDA, `cuda:LOCAL_RANK`; otherwise `device` as given
    (None: where the model loads)."""
    cuda = device == "cuda" or (device is None and ranks.distributed and torch.cuda.is_available())
    if cuda and ranks.distributed:
        return f"cuda:{ranks.local_rank}"
    return device


@contextmanager
def process_group(ranks: Ranks, device: str | None) -> Iterator[str | None]:
    """Join the launch's process group when there are several processes (nccl on CUDA, gloo otherwise) and leave it
    on exit. Yields this process's device (see `resolve_device`)."""
    device = resolve_device(device, ranks)
    if not ranks.distributed or dist.is_initialized():
        yield device
        return
    backend = "nccl" if device is not None and device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    try:
        dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    except ValueError as err:
        raise SinkscopeError(f"WORLD_SIZE={ranks.world} but the process group cannot start ({err}); launch with "
                             "torchrun or accelerate launch") from None
    try:
        yield device
    finally:
        dist.destroy_process_group()


def prompt_hash(prompts: Iterable[str]) -> str:
    """sha256 over the prompts in order (each JSON-encoded, one per line)."""
    digest = hashlib.sha256()
    for text in prompts:
        digest.update(json.dumps(text, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def capture_settings(capture: CaptureConfig) -> dict[str, Any]:
    """The capture configuration as JSON-ready values (as `Trace.info["capture"]` records it)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(capture).items()}


def sweep_settings(model: str, dtype: str | torch.dtype, prompts: Sequence[str], config: SweepConfig
                   ) -> dict[str, Any]:
    """Everything that changes a unit's tables: a resume must match it exactly (device and batch size may change)."""
    return {
        "model": model,
        "dtype": str(parse_dtype(dtype)).removeprefix("torch."),
        "method": config.method,
        "params": dict(get_detector(config.method).params) | dict(config.params),  # defaults filled in
        "capture": capture_settings(CaptureConfig()),
        "n_prompts": len(prompts),
        "prompts_sha256": prompt_hash(prompts),
        "unit_size": config.unit_size,
    }


def plan_units(n_prompts: int, unit_size: int) -> list[range]:
    """Unit u covers prompts [u·size, min((u+1)·size, n))."""
    return [range(start, min(start + unit_size, n_prompts)) for start in range(0, n_prompts, unit_size)]


def unit_name(unit: int) -> str:
    return f"unit-{unit:06d}"


def unit_path(out: Path, unit: int) -> Path:
    return Path(out) / SHARDS / unit_name(unit)


def _on_rank0(ranks: Ranks, fn: Callable[[], None]) -> None:
    """Run `fn` on rank 0 and raise its SinkscopeError on every rank (so all processes stop with the same line)."""
    message: str | None = None
    if ranks.main:
        try:
            fn()
        except SinkscopeError as err:
            message = str(err)
    if ranks.distributed:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise SinkscopeError(message)


def plan_sweep(out: str | Path, prompts: Sequence[str], model: str, dtype: str | torch.dtype, config: SweepConfig,
               ranks: Ranks | None = None, *, overwrite: bool = False) -> SweepPlan:
    """Check (or start) the sweep folder `out` for these prompts and settings. Collective when distributed.

    Rank 0 opens and locks the folder (`sinkscope.store.open_run`): a folder of another command, a sweep with other
    settings, or one in use by another launch is refused on every rank with the same line; `overwrite` clears a
    folder of another command or other settings instead. The lock is released when `sweep_run` ends.
    """
    ranks = ranks or Ranks()
    prompts = list(prompts)
    if not prompts:
        raise SinkscopeError("no prompts given: pass --prompt TEXT, --prompts FILE or --dataset NAME")
    settings = normalise(sweep_settings(model, dtype, prompts, config))
    opened: list[RunFolder] = []
    _on_rank0(ranks, lambda: opened.append(open_run(out, COMMAND, settings, overwrite=overwrite)))
    folder = opened[0] if opened else RunFolder(Path(out), COMMAND, settings)
    return SweepPlan(Path(out), prompts, config, settings, plan_units(len(prompts), config.unit_size), folder)


def profile_unit(loaded: LoadedModel, prompts: Sequence[str], ids: Sequence[int], config: SweepConfig
                 ) -> dict[str, pd.DataFrame]:
    """`profile`'s tables for one unit (prompt ids `ids`, global), without `layers` (recomputed at the merge).

    A unit whose prompts are all unusable has only its `skipped` table.
    """
    good, bad = validate_prompts(loaded, prompts)
    tables: dict[str, pd.DataFrame] = {}
    if good:
        trace = run_capture(loaded, [prompts[i] for i in good], CaptureConfig(), batch_size=config.batch_size)
        sinks = sink_mask(trace, config.method, **config.params)  # [P, L, H, N] bool
        tables = long_tables(trace, sinks, prompt_ids=[ids[i] for i in good], method=config.method,
                             params=config.params)
    tables["skipped"] = skipped_table([(ids[i], why) for i, why in bad])
    return tables


def pending_units(plan: SweepPlan, ranks: Ranks | None = None) -> tuple[list[int], dict[int, str]]:
    """This process's units (u % world == rank) that are not done, and why each present one is not: a unit whose
    files were deleted or changed since it was written, or one a killed process left half-written (rank 0 knows
    those). Damaged units are removed, so that they are recomputed."""
    ranks = ranks or Ranks()
    mine = [u for u in range(len(plan.units)) if u % ranks.world == ranks.rank]
    half_written = set(plan.folder.incomplete)
    todo, damaged = [], {}
    for u in mine:
        reason = plan.folder.check_unit(unit_name(u))
        if reason is None:
            continue
        todo.append(u)
        if reason != "missing":
            damaged[u] = reason
            plan.folder.discard_unit(unit_name(u))
        elif unit_name(u) in half_written:
            damaged[u] = "left half-written by an interrupted run"
    return todo, damaged


def run_units(loaded: LoadedModel, plan: SweepPlan, ranks: Ranks | None = None,
              progress: Progress | None = None, todo: Sequence[int] | None = None) -> list[int]:
    """Do this process's unfinished units (`todo`, default `pending_units`); returns the units done.
    progress: called as progress("units (this process)", done, total) after each unit."""
    ranks = ranks or Ranks()
    todo = pending_units(plan, ranks)[0] if todo is None else list(todo)
    done: list[int] = []
    for u in todo:
        start = time.perf_counter()
        ids = list(plan.units[u])
        tables = profile_unit(loaded, [plan.prompts[i] for i in ids], ids, plan.config)
        info = {"unit": u, "prompt_ids": [ids[0], ids[-1]], "rank": ranks.rank, "world_size": ranks.world,
                "device": str(loaded.device), "seconds": round(time.perf_counter() - start, 3)}
        plan.folder.write_unit(unit_name(u), tables, info)
        done.append(u)
        if progress is not None:
            progress("units (this process)", len(done), len(todo))
    return done


def merge_units(folder: RunFolder, n_units: int, stream: TableStream) -> tuple[dict[str, pd.DataFrame], list[int]]:
    """Append the units' long tables to `stream` a unit at a time, in `profile`'s row order, and build `layers` from
    running totals (`LayerSummary`). Unit u holds prompts u·size … (u+1)·size − 1, so unit order is prompt order: each
    unit's rows, sorted by `SORT_KEYS`, follow the previous unit's. Returns the small tables (`layers`, `skipped`) and
    the world sizes the units were computed with. A missing or damaged unit is a SinkscopeError that says to rerun."""
    missing = [u for u in range(n_units) if not folder.unit_path(unit_name(u)).is_dir()]
    if missing:
        raise SinkscopeError(f"{len(missing)} of {n_units} units are not done (first: {missing[0]}); rerun the same "
                             "command to finish them")
    summary = LayerSummary()
    skipped: list[pd.DataFrame] = []
    worlds: set[int] = set()
    for u in range(n_units):
        unit = folder.read_unit(unit_name(u))
        tables = {name: table.sort_values(SORT_KEYS[name], kind="stable").reset_index(drop=True)
                  for name, table in unit.tables().items()}
        if "keys" in tables:
            summary.add(tables["heads"], tables["keys"])
        for name in ("keys", "heads", "prompts", "sink_rate"):
            if name in tables:
                stream.append(name, tables[name])
        skipped.append(tables["skipped"])
        worlds.add(int(unit.info["world_size"]))
    merged = pd.concat(skipped, ignore_index=True)
    if "keys" not in stream.rows:
        reasons = "; ".join(f"prompt {r.prompt_id + 1}: {r.reason}" for r in merged.head(3).itertuples())
        raise SinkscopeError(f"no usable prompt ({reasons})")
    return {"layers": summary.table(), "skipped": merged}, sorted(worlds)


def _sum_over_ranks(ranks: Ranks, value: int) -> int:
    if not ranks.distributed:
        return value
    values: list[Any] = [None] * ranks.world
    dist.all_gather_object(values, value)
    return sum(values)


def sweep_run(loaded: LoadedModel, plan: SweepPlan, ranks: Ranks | None = None,
              progress: Progress | None = None, source: Any = None,
              log: Callable[[str], None] | None = None) -> SweepResult:
    """Do this process's units, wait for the others, and (rank 0) merge them into a run folder in `plan.out`.

    Collective when distributed: every rank calls it. `source` (e.g. the dataset) goes into the manifest. progress:
    `run_units`'s, for this process's units. Each
    damaged unit that is recomputed is reported through `log` (default: the `sinkscope` logger), e.g.
    "unit 2: keys.parquet missing — recomputing". Releases the folder's lock at the end.
    """
    ranks = ranks or Ranks()
    say = reporter(log)
    n_units = len(plan.units)
    try:
        todo, damaged = pending_units(plan, ranks)
        for u, reason in damaged.items():
            say(f"unit {u}: {reason} — recomputing")
        mine = sum(1 for u in range(n_units) if u % ranks.world == ranks.rank)
        before = _sum_over_ranks(ranks, mine - len(todo))
        done = run_units(loaded, plan, ranks, progress, todo)
        if ranks.distributed:
            dist.barrier()
        if not ranks.main:
            return SweepResult(n_units, done, before, damaged=damaged)
        config = plan.config
        with plan.folder.table_stream() as stream:
            tables, worlds = merge_units(plan.folder, n_units, stream)
            params = {"method": config.method, **config.params, "capture": plan.settings["capture"],
                      "batch_size": config.batch_size}
            manifest = make_manifest(COMMAND, model_manifest(loaded), params)
            manifest["sweep"] = {"world_size": ranks.world, "world_sizes_of_units": worlds,
                                 "unit_size": config.unit_size, "n_units": n_units, "n_prompts": len(plan.prompts),
                                 "prompts_sha256": plan.settings["prompts_sha256"], "source": source}
            plan.folder.save(Run(tables=tables, manifest=manifest), streams=stream, order=TABLES)
        rows = {**stream.rows, **{name: len(table) for name, table in tables.items()}}
        skipped = tables["skipped"]
        summary = ProfileSummary(layers=tables["layers"],
                                 skipped=list(zip(skipped["prompt_id"].tolist(), skipped["reason"].tolist(),
                                                  strict=True)),
                                 rows={name: rows[name] for name in TABLES if name in rows},
                                 method=config.method, params=dict(config.params), folder=plan.out)
        return SweepResult(n_units, done, before, summary, damaged)
    finally:
        plan.folder.close()


def sweep(loaded: LoadedModel, prompts: Sequence[str], out: str | Path, method: str = "column_mass",
          params: Mapping[str, Any] | None = None, *, unit_size: int = 32, batch_size: int = 8,
          ranks: Ranks | None = None, overwrite: bool = False, log: Callable[[str], None] | None = None
          ) -> SweepResult:
    """`profile(loaded, prompts, method, params)` written unit by unit to `out` and merged there; resumable.

    Rerunning on the same `out` finishes what is left, recomputes damaged units (reported through `log`) or only
    re-merges a finished sweep. `overwrite` replaces a folder of another command or other settings. Under torchrun,
    call it on every rank inside `process_group(...)`. The run folder holds the tables `profile` builds, plus
    `skipped`; rank 0's result holds its summary.
    """
    ranks = ranks or Ranks()
    config = SweepConfig(method, resolved_params(method, params), unit_size, batch_size)
    plan = plan_sweep(out, prompts, loaded.info.name, loaded.info.dtype, config, ranks, overwrite=overwrite)
    return sweep_run(loaded, plan, ranks, log=log)
