"""Run folders, the one place sinkscope writes results: atomic writes, the manifest, resumable units and the lock.

A run folder holds one Parquet file per tidy table and `manifest.json` (command, settings fingerprint, library
versions, created time, and per file its rows, size and sha256). A command that resumes (`sweep`, `eval`, `train-lm`)
also keeps `run.json` (its command and settings, written when the folder is first opened) and `units/<name>/`: each
unit's files plus `unit.json` listing them with sizes and sha256, written last, so a unit counts as done only when
every file it lists is there and matches.

    folder = open_run(out, "sweep", settings)      # creates, or checks command + settings; takes the lock
    if not folder.unit_done("unit-000002"):        # verifies sizes and checksums
        folder.write_unit("unit-000002", {"keys": table}, {"rank": 0})
    folder.save(Run(tables, manifest))             # tables + manifest, atomically
    folder.close()                                 # releases the lock (a killed process releases it too)

A table too large to hold whole is written a piece at a time through `folder.table_stream()` (a `TableStream`: row
groups appended to a temporary Parquet file) and handed to `folder.save(run, streams=stream)` with the rest.
Read back the same way: `check_run(folder)` verifies every file (hashed in blocks) without loading it, then
`table_batches` and `read_table` read chosen columns, a batch of rows or chosen prompts at a time.

Every file is written to a temporary name in its folder, flushed, fsynced and renamed over the target with
`os.replace`, then the folder is fsynced: a crash leaves the old file or the new one, never a mix. A unit is written
to a temporary folder and renamed into `units/`. The lock is `fcntl.flock` on `.lock`: a second process opening the
same folder gets one error line. Under torchrun only rank 0 opens (and locks) the folder; the other ranks attach to
it with `RunFolder(out, command, settings)` once rank 0 has checked it, and write their own units.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import signal
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from sinkscope.errors import SinkscopeError

MANIFEST = "manifest.json"
RUN_RECORD = "run.json"
UNITS = "units"
UNIT_RECORD = "unit.json"
LOCK = ".lock"
TMP = ".tmp-"
# Test hook: with SINKSCOPE_KILL_BEFORE_RENAME=<unit name> set, the process SIGKILLs itself once that unit's files
# are complete in their temporary folder and before the rename, the worst moment for a crash.
KILL_HOOK = "SINKSCOPE_KILL_BEFORE_RENAME"

log = logging.getLogger("sinkscope")

# What `write_unit` and `save` accept as a file's content: a table (written as Parquet), bytes, text, a JSON-ready
# dict or list, or the path of a finished file (moved in).
Content = pd.DataFrame | bytes | str | dict | list | Path


class Tables(MutableMapping[str, pd.DataFrame]):
    """Tables by name, some built only when first read: a function of no arguments stands for its table until then
    (`profile`'s `keys`, one row per prompt × layer × head × key, 4.7 M rows for one 32,768-token prompt of a 12 × 12
    model; `mechanisms`' `bias_queries`, one per prompt × layer × head × query). A table is built by its first
    `tables[name]`, or when the run is saved. Iteration follows `order`, then insertion."""

    def __init__(self, tables: Mapping[str, pd.DataFrame | Callable[[], pd.DataFrame]], order: Sequence[str] = ()
                 ) -> None:
        self._tables = dict(tables)
        self._order = tuple(order)

    def __getitem__(self, name: str) -> pd.DataFrame:
        table = self._tables[name]
        if callable(table):
            table = self._tables[name] = table()
        return table

    def __setitem__(self, name: str, table: pd.DataFrame | Callable[[], pd.DataFrame]) -> None:
        self._tables[name] = table

    def __delitem__(self, name: str) -> None:
        del self._tables[name]

    def __iter__(self) -> Iterator[str]:
        order = [n for n in self._order if n in self._tables]
        return iter(order + [n for n in self._tables if n not in order])

    def __len__(self) -> int:
        return len(self._tables)

    def built(self, name: str) -> bool:
        """Whether table `name` exists now (not waiting to be built)."""
        return name in self._tables and not callable(self._tables[name])

    def __repr__(self) -> str:
        return f"Tables({', '.join(n if self.built(n) else n + ' (not built yet)' for n in self)})"


@dataclass
class Run:
    """Tables of one analysis plus its provenance."""

    tables: MutableMapping[str, pd.DataFrame]
    manifest: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]


# ---------------------------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(name: str) -> str:
    return f"{TMP}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block finishes, fsync it and rename it over `path` (then
    fsync the folder). If the block raises, the temporary file is removed and `path` keeps its old content."""
    path = Path(path)
    tmp = path.with_name(_tmp_name(path.name))
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def _move_into_place(tmp: Path, path: Path) -> None:
    """fsync a finished temporary file and rename it over `path` (the caller fsyncs the folder)."""
    fsync_path(tmp)
    os.replace(tmp, path)


def dictionary_columns(dtypes: Iterable[tuple[Any, Any]]) -> list[str]:
    """The columns a Parquet file dictionary-encodes: every one but the floating-point ones. (name, dtype) pairs, NumPy
    or pandas dtypes or pyarrow types. Ids, positions, flags and tokens repeat, so a dictionary shrinks them; a float
    column of measurements has about as many distinct values as rows, so its dictionary is built, overflows and is
    thrown away: that was half the time of writing a `keys` table."""
    import pyarrow as pa

    def floating(dtype: Any) -> bool:
        if isinstance(dtype, pa.DataType):
            return pa.types.is_floating(dtype)
        return pd.api.types.is_float_dtype(dtype)

    return [str(name) for name, dtype in dtypes if not floating(dtype)]


def _write_content(path: Path, content: Content) -> None:
    """Write one file's content to `path` (not atomically: callers write into a temporary name or folder)."""
    if isinstance(content, pd.DataFrame):
        content.to_parquet(path, index=False, use_dictionary=dictionary_columns(content.dtypes.items()))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif isinstance(content, dict | list):
        path.write_text(json.dumps(content, indent=2, default=str) + "\n", encoding="utf-8")
    elif isinstance(content, Path):
        shutil.move(content, path)
    else:
        raise TypeError(f"cannot write a {type(content).__name__} to {path.name}")


def write_file(path: str | Path, content: Content) -> None:
    """Write `content` (see `Content`) to `path` atomically."""
    with atomic_path(path) as tmp:
        _write_content(tmp, content)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_file(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; when the block finishes, fsync its files and put it in
    place of `path` (an old `path` is moved aside first and removed after). If the block raises, nothing changes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(_tmp_name(path.name))
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        fsync_path(tmp)
        old = path.with_name(_tmp_name(path.name + "-old"))
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def file_record(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def check_file(path: Path, want: Mapping[str, Any]) -> str | None:
    """Why `path` does not match its record {"bytes", "sha256"} (missing, other size, other checksum), or None."""
    if not path.is_file():
        return f"{path.name} missing"
    size = path.stat().st_size
    if size != want.get("bytes"):
        return f"{path.name} has {size} bytes, {want.get('bytes')} were written"
    if file_record(path)["sha256"] != want.get("sha256"):
        return f"{path.name} does not match its checksum"
    return None


def _read_checked(path: Path, want: Mapping[str, Any]) -> bytes:
    """The bytes of `path` if they match their record; raises ValueError with the reason otherwise."""
    if not path.is_file():
        raise ValueError(f"{path.name} missing")
    data = path.read_bytes()
    if len(data) != want.get("bytes"):
        raise ValueError(f"{path.name} has {len(data)} bytes, {want.get('bytes')} were written")
    if hashlib.sha256(data).hexdigest() != want.get("sha256"):
        raise ValueError(f"{path.name} does not match its checksum")
    return data


def read_json(path: Path, what: str = "") -> Any:
    """Parse a JSON file; a corrupt one is a SinkscopeError that names it and says what to do."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        hint = what or "delete it, or pass --overwrite to start the run over"
        raise SinkscopeError(f"{path} is corrupt ({err.__class__.__name__}: {err}); {hint}") from None


class TableStream:
    """Tables written a piece at a time, for tables too large to hold whole; get one from `RunFolder.table_stream`.

    `append(name, frame)` adds rows to table `name`. Pieces are gathered into row groups of at least `row_group_rows`
    rows (or what is left at the end) and written with pyarrow's `ParquetWriter` to a temporary file in the run
    folder, so memory holds at most one row group per table. The first piece fixes a table's schema (as
    `DataFrame.to_parquet(index=False)` would write it); later pieces must have the same columns and types.
    `RunFolder.save(run, streams=stream)` finishes the files and renames them into place with the rest of the run;
    leaving the `with` block without saving removes them (and after a crash, the next `open_run` does).
    """

    def __init__(self, folder: str | Path, row_group_rows: int = 65_536) -> None:
        self.folder = Path(folder)
        self.row_group_rows = row_group_rows
        self.rows: dict[str, int] = {}  # rows appended per table, in the order the tables were started
        self._paths: dict[str, Path] = {}
        self._schemas: dict[str, Any] = {}  # name → pyarrow.Schema of the first piece
        self._pending: dict[str, list[Any]] = {}  # name → pyarrow tables not written yet
        self._writers: dict[str, Any] = {}  # name → pyarrow.parquet.ParquetWriter

    def __enter__(self) -> TableStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def append(self, name: str, frame: pd.DataFrame) -> None:
        """Add `frame`'s rows to table `name` (started by its first piece)."""
        import pyarrow as pa

        if name not in self.rows:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            self._schemas[name], self._pending[name], self.rows[name] = table.schema, [], 0
            self._paths[name] = self.folder / _tmp_name(f"{name}.parquet")
        else:
            table = pa.Table.from_pandas(frame, schema=self._schemas[name], preserve_index=False)
        self._pending[name].append(table)
        self.rows[name] += len(frame)
        if sum(len(t) for t in self._pending[name]) >= self.row_group_rows:
            self._flush(name)

    def _flush(self, name: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = self._writers.get(name)
        if writer is None:
            schema = self._schemas[name]
            writer = self._writers[name] = pq.ParquetWriter(
                self._paths[name], schema, use_dictionary=dictionary_columns(zip(schema.names, schema.types,
                                                                                 strict=True)))
        if self._pending[name]:
            writer.write_table(pa.concat_tables(self._pending[name]))
            self._pending[name] = []

    def finish(self) -> dict[str, Path]:
        """Write what is pending and close every file. Returns {table: its temporary file}."""
        for name in self.rows:
            self._flush(name)
            self._writers.pop(name).close()
        return dict(self._paths)

    def discard(self) -> None:
        """Close and remove the temporary files (those not yet renamed into place)."""
        for writer in self._writers.values():
            with contextlib.suppress(Exception):
                writer.close()
        self._writers.clear()
        for path in self._paths.values():
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# manifest and settings
# ---------------------------------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("sinkscope", "torch", "transformers", "pandas", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def normalise(settings: Any) -> Any:
    """Settings as plain JSON values (tuples become lists, other objects their str), as they read back from disk."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def fingerprint(settings: Any) -> str:
    """A stable hash of settings: sha256 of their JSON form with sorted keys."""
    text = json.dumps(normalise(settings), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def settings_diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """One phrase per top-level key whose value differs: 'k: old → new' (long values: 'k differs'; a `*_sha256`
    key: 'the * differ')."""
    out = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if key.endswith("_sha256"):
            out.append(f"the {key.removesuffix('_sha256')} differ")
        elif len(repr(old)) + len(repr(new)) > 80:
            out.append(f"{key} differs")
        else:
            out.append(f"{key}: {old!r} → {new!r}")
    return out


def make_manifest(command: str, model: dict[str, Any] | None, parameters: dict[str, Any], seed: int | None = 0
                  ) -> dict[str, Any]:
    """The provenance written next to every run's tables (`save` adds the files' sizes and checksums)."""
    return {
        "command": command,
        "argv": sys.argv,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model or {},
        "parameters": parameters,
        "seed": seed,
        "settings_sha256": fingerprint({"model": model or {}, "parameters": parameters, "seed": seed}),
        "versions": library_versions(),
    }


# ---------------------------------------------------------------------------------------------------------------
# run folders
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """One verified unit: the info it was written with and the bytes of its files."""

    name: str
    info: dict[str, Any]
    files: dict[str, bytes]

    def tables(self) -> dict[str, pd.DataFrame]:
        """Its Parquet files as tables, by name without the suffix."""
        return {name.removesuffix(".parquet"): pd.read_parquet(io.BytesIO(data))
                for name, data in sorted(self.files.items()) if name.endswith(".parquet")}


@dataclass
class RunFolder:
    """A run folder of `command` made with `settings` (None: a command that does not resume).

    Build it with `open_run` (creates or checks the folder and takes the lock). Constructing it directly attaches to
    a folder someone else has opened (a torchrun rank other than 0): no checks, no lock.
    """

    path: Path
    command: str
    settings: dict[str, Any] | None = None
    incomplete: list[str] = field(default_factory=list)  # units a killed process left half-written (found at open)
    _lock: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.settings is not None:
            self.settings = normalise(self.settings)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self.close()

    # -- identity, lock ----------------------------------------------------------------------------------------

    def _take_lock(self) -> None:
        import fcntl

        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SinkscopeError(f"{self.path} is in use by another sinkscope process ({holder}); wait for it to "
                                 "finish, or pass another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, {self.command}".encode())
        self._lock = fd

    def close(self) -> None:
        """Release the lock (if this object holds it)."""
        fd, self._lock = self._lock, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor releases the flock

    def recorded(self) -> dict[str, Any] | None:
        """What the folder says it holds: run.json, else the manifest, else None. Corrupt JSON is a SinkscopeError."""
        for name in (RUN_RECORD, MANIFEST):
            path = self.path / name
            if path.is_file():
                found = read_json(path)
                if not isinstance(found, dict):
                    raise SinkscopeError(f"{path} is corrupt (not a JSON object); delete it, or pass --overwrite to "
                                         "start the run over")
                return found
        return None

    def _holds_foreign_files(self) -> bool:
        return any(not (p.name == LOCK or p.name.startswith(TMP)) for p in self.path.iterdir())

    def _check(self, overwrite: bool, owned: Sequence[str], restart: bool = True) -> None:
        """Check that the folder is empty or holds a run of this command (and these settings). With overwrite, a
        run found here is cleared instead (with restart=False only one of another command)."""
        try:
            found = self.recorded()
        except SinkscopeError:
            if not overwrite:
                raise
            found = {}
        if found is None:
            if self.settings is not None and self._holds_foreign_files():
                raise SinkscopeError(f"{self.path} is not empty and holds no sinkscope run; pass a new or empty "
                                     "--out")
        elif overwrite and (restart or found.get("command") != self.command):
            self.clear(owned)
        elif found.get("command") != self.command:
            raise SinkscopeError(f"{self.path} holds a `{found.get('command')}` run; pass another --out or "
                                 "--overwrite")
        if self.settings is not None:
            self.check_settings(self.settings)

    def check_settings(self, settings: Mapping[str, Any]) -> None:
        """Record `settings` in run.json, or check that they equal the recorded ones (a resume). Refuses a folder
        made with other settings, naming the keys that differ."""
        settings = normalise(dict(settings))
        path = self.path / RUN_RECORD
        found = read_json(path) if path.is_file() else None
        if found is None:
            manifest = self.recorded() or {}
            if manifest.get("command") == self.command:  # no run.json: the folder of an earlier version
                recorded = manifest.get("settings_sha256")
                if recorded is not None and recorded != fingerprint(settings):
                    raise SinkscopeError(f"{self.path} holds a `{self.command}` run made with other settings; pass "
                                         "another --out or --overwrite")
            write_json(path, {"command": self.command, "settings_sha256": fingerprint(settings),
                              "settings": settings, "created": datetime.now(UTC).isoformat(timespec="seconds")})
        elif not isinstance(found, dict) or found.get("settings_sha256") != fingerprint(settings):
            before = found.get("settings") if isinstance(found, dict) else None
            changed = settings_diff(before, settings) if isinstance(before, dict) else ["unreadable settings"]
            raise SinkscopeError(f"{self.path} holds a `{self.command}` run made with other settings "
                                 f"({'; '.join(changed) or 'settings differ'}); rerun with the same settings to "
                                 "resume it, or pass a new --out (or --overwrite to start over)")
        self.settings = settings

    def clear(self, owned: Sequence[str] = ()) -> None:
        """Remove what a run left here: run.json, the manifest and the tables it lists, units/, temporaries, and
        the names in `owned` (a command's own files and folders). Other files are kept."""
        names = {RUN_RECORD, MANIFEST, UNITS, *owned}
        manifest = self.path / MANIFEST
        with contextlib.suppress(Exception):
            names |= set(json.loads(manifest.read_text()).get("files", {}))
            names |= {f"{t}.parquet" for t in json.loads(manifest.read_text()).get("tables", {})}
        for entry in self.path.iterdir():
            if entry.name in names or entry.name.startswith(TMP):
                _remove(entry)
        fsync_path(self.path)

    @property
    def fingerprint(self) -> str | None:
        """The settings fingerprint of this run (None for a command that does not resume and has not saved yet)."""
        if self.settings is not None:
            return fingerprint(self.settings)
        record = self.path / RUN_RECORD
        return read_json(record).get("settings_sha256") if record.is_file() else None

    # -- units -------------------------------------------------------------------------------------------------

    def unit_path(self, name: str) -> Path:
        return self.path / UNITS / name

    def unit_names(self) -> list[str]:
        """Every unit folder present (done or damaged), sorted."""
        units = self.path / UNITS
        return sorted(p.name for p in units.iterdir() if p.is_dir() and not p.name.startswith(TMP)) \
            if units.is_dir() else []

    def _unit_record(self, name: str) -> dict[str, Any]:
        """The unit's record; ValueError with the reason when it is missing or corrupt."""
        path = self.unit_path(name) / UNIT_RECORD
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{UNIT_RECORD} missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{UNIT_RECORD} is corrupt") from None
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            raise ValueError(f"{UNIT_RECORD} is corrupt")
        return record

    def check_unit(self, name: str) -> str | None:
        """Why unit `name` is not done ('missing', a file missing or changed, a corrupt record), or None if every
        file its record lists is there with the recorded size and sha256."""
        if not self.unit_path(name).is_dir():
            return "missing"
        try:
            record = self._unit_record(name)
        except ValueError as err:
            return str(err)
        for fname, want in record["files"].items():
            reason = check_file(self.unit_path(name) / fname, want) if isinstance(want, dict) else "corrupt"
            if reason:
                return reason
        return None

    def unit_done(self, name: str) -> bool:
        """True when the unit is complete and verifies (see `check_unit`)."""
        return self.check_unit(name) is None

    def damaged_units(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """{name: reason} of the units present (or of `names`, where present) that fail verification."""
        present = set(self.unit_names())
        out = {}
        for name in sorted(present if names is None else present & set(names)):
            reason = self.check_unit(name)
            if reason is not None:
                out[name] = reason
        return out

    def unit_info(self, name: str) -> dict[str, Any]:
        """The info a unit was written with (not verified; use `read_unit` for the files)."""
        try:
            return dict(self._unit_record(name).get("info") or {})
        except ValueError as err:
            raise self._damaged(name, err) from None

    def _damaged(self, name: str, reason: object) -> SinkscopeError:
        return SinkscopeError(f"{self.path}: {UNITS}/{name}: {reason}; rerun the same command to recompute it")

    def read_unit(self, name: str) -> Unit:
        """The unit's info and the bytes of its files, verified; a SinkscopeError names what is wrong."""
        try:
            record = self._unit_record(name)
            files = {f: _read_checked(self.unit_path(name) / f, want) for f, want in record["files"].items()}
        except (ValueError, OSError) as err:
            raise self._damaged(name, err) from None
        return Unit(name, dict(record.get("info") or {}), files)

    def discard_unit(self, name: str) -> None:
        """Remove a unit (to recompute it)."""
        shutil.rmtree(self.unit_path(name), ignore_errors=True)

    def write_unit(self, name: str, files: Mapping[str, Content], info: Mapping[str, Any] | None = None) -> Path:
        """Write a unit atomically: its files (a DataFrame `x` becomes `x.parquet`) into a temporary folder in
        units/, then the record listing them with sizes and sha256, then one rename. If another process finished
        the same unit first, its copy is kept. Returns the unit's folder."""
        if not name or name.startswith((".", TMP)) or "/" in name or name in (".", ".."):
            raise ValueError(f"bad unit name {name!r}")
        units = self.path / UNITS
        units.mkdir(parents=True, exist_ok=True)
        tmp = units / _tmp_name(name)
        tmp.mkdir()
        final = self.unit_path(name)
        try:
            listed = {}
            for key, content in files.items():
                fname = f"{key}.parquet" if isinstance(content, pd.DataFrame) and not key.endswith(".parquet") \
                    else key
                _write_content(tmp / fname, content)
                fsync_path(tmp / fname)
                listed[fname] = file_record(tmp / fname)
            record = {"unit": name, "info": dict(info or {}), "files": listed,
                      "written": datetime.now(UTC).isoformat(timespec="seconds")}
            (tmp / UNIT_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
            fsync_path(tmp / UNIT_RECORD)
            fsync_path(tmp)
            if os.environ.get(KILL_HOOK) == name:
                os.kill(os.getpid(), signal.SIGKILL)
            if final.exists():
                if self.unit_done(name):  # another process finished it first; keep its copy
                    shutil.rmtree(tmp, ignore_errors=True)
                    return final
                self.discard_unit(name)
            try:
                os.rename(tmp, final)
            except OSError:
                if not self.unit_done(name):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_path(units)
        return final

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A temporary folder inside units/ (same filesystem, so `write_unit` moves files out of it cheaply);
        removed when the block ends."""
        units = self.path / UNITS
        units.mkdir(parents=True, exist_ok=True)
        tmp = units / _tmp_name("scratch")
        tmp.mkdir()
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove_temporaries(self) -> list[str]:
        """Delete the temporary unit folders of killed processes. Returns the unit names they were for."""
        names = []
        units = self.path / UNITS
        for tmp in units.glob(f"{TMP}*") if units.is_dir() else []:
            name = tmp.name.removeprefix(TMP).rsplit("-", 2)[0]
            if name != "scratch":
                names.append(name)
            shutil.rmtree(tmp, ignore_errors=True)
        for tmp in self.path.glob(f"{TMP}*"):
            _remove(tmp)
        return sorted(set(names))

    # -- tables and manifest -------------------------------------------------------------------------------------

    def table_stream(self, row_group_rows: int = 65_536) -> TableStream:
        """A `TableStream` writing into this folder (use it as a context manager; pass it to `save`)."""
        return TableStream(self.path, row_group_rows)

    def save(self, run: Run, files: Mapping[str, Content] | None = None, *, streams: TableStream | None = None,
             order: Sequence[str] | None = None) -> Path:
        """Write each table to `<name>.parquet` and each extra file atomically, then the manifest (with the run's
        settings fingerprint and every file's rows, size and sha256). `streams`' tables are finished and renamed
        into place as `<name>.parquet` too. The manifest lists the tables in `order` (default: the streamed ones,
        then `run.tables`). Tables an earlier manifest listed and this run lacks are removed after the new manifest
        is in place."""
        manifest_path = self.path / MANIFEST
        old: dict[str, Any] = {}
        if manifest_path.is_file():
            with contextlib.suppress(Exception):
                old = json.loads(manifest_path.read_text())
        listed: dict[str, dict[str, Any]] = {}
        rows: dict[str, int] = {}
        if streams is not None:
            for name, tmp in streams.finish().items():
                path = self.path / f"{name}.parquet"
                _move_into_place(tmp, path)
                rows[name] = streams.rows[name]
                listed[path.name] = {"rows": rows[name], **file_record(path)}
            fsync_path(self.path)
        for name, table in run.tables.items():
            path = self.path / f"{name}.parquet"
            write_file(path, table)
            rows[name] = len(table)
            listed[path.name] = {"rows": rows[name], **file_record(path)}
        for name, content in (files or {}).items():
            write_file(self.path / name, content)
            listed[name] = file_record(self.path / name)
        names = [*(order or ()), *(name for name in rows if name not in (order or ()))]
        manifest = {**run.manifest, "tables": {name: rows[name] for name in names if name in rows}, "files": listed}
        if self.fingerprint is not None:
            manifest["settings_sha256"] = self.fingerprint
        write_json(manifest_path, manifest)
        stale = set(old.get("files", {}) if isinstance(old.get("files"), dict) else {}) | {
            f"{t}.parquet" for t in (old.get("tables") or {})}
        for name in stale - set(listed):
            (self.path / name).unlink(missing_ok=True)
        return self.path


def open_run(out: str | Path, command: str, settings: Mapping[str, Any] | None = None, *, overwrite: bool = False,
             lock: bool = True, owned: Sequence[str] = (), restart: bool = True) -> RunFolder:
    """Create the run folder `out` for `command`, or check that the one there belongs to it, and lock it.

    settings: what a resume must match (None: a command that does not resume; only the command is checked). A
    folder of another command, or made with other settings, is refused with one line. `overwrite` starts over
    instead: a run found here is cleared first (see `RunFolder.clear`; `owned` names the command's own extra
    files; restart=False clears only a run of another command). A resumable run refuses a non-empty folder that
    holds no sinkscope run, even with overwrite. Temporaries of killed processes are removed (their unit names are
    in `.incomplete`). Close the folder (or use it as a context manager) to release the lock.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SinkscopeError(f"--out {out} is a file; pass a folder")
    path.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(path, command, None if settings is None else dict(settings))
    try:
        if lock:
            folder._take_lock()
        folder._check(overwrite, owned, restart)
        if lock:  # only the lock holder knows that no one else is writing
            folder.incomplete = folder.remove_temporaries()
    except BaseException:
        folder.close()
        raise
    return folder


def save_run(out: str | Path, run: Run, *, overwrite: bool = False, files: Mapping[str, Content] | None = None
             ) -> Path:
    """Write a run folder: each table to `out/<name>.parquet`, `files` as given, and the manifest, all atomically.

    Refuses a folder that holds another command's run unless `overwrite` (which clears that run first); replaces
    an earlier run of the same command (its tables that this run lacks are removed; its units are kept, so a
    resumable command's folder stays resumable).
    """
    command = str(run.manifest.get("command") or "unknown")
    with open_run(out, command, overwrite=overwrite, restart=False) as folder:
        return folder.save(run, files)


def _run_manifest(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run folder's manifest and its per-file records ({file name: size and sha256}); one line if it is missing
    or corrupt."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise SinkscopeError(f"{path} is not a sinkscope run folder (no {MANIFEST})")
    manifest = read_json(manifest_path, "rerun the command that wrote this folder")
    if not isinstance(manifest, dict):
        raise SinkscopeError(f"{manifest_path} is corrupt (not a JSON object); rerun the command that wrote it")
    listed = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
    return manifest, listed


def load_run(folder: str | Path) -> Run:
    """Read a run folder back: every table listed in its manifest, checked against the recorded sizes and sha256."""
    path = Path(folder)
    manifest, listed = _run_manifest(path)
    tables = {}
    for name in manifest.get("tables", {}):
        file = path / f"{name}.parquet"
        try:
            data = _read_checked(file, listed[file.name]) if file.name in listed else file.read_bytes()
            tables[name] = pd.read_parquet(io.BytesIO(data))
        except (OSError, ValueError) as err:
            reason = err if isinstance(err, ValueError) else f"{file.name} unreadable ({err})"
            raise SinkscopeError(f"{folder}: {reason}; rerun the command that wrote this folder") from None
    return Run(tables=tables, manifest=manifest)


def check_run(folder: str | Path) -> dict[str, Any]:
    """`load_run`'s checks without loading: the manifest, then every table it lists against its recorded size and
    sha256, each file hashed in 1 MB blocks (a table the manifest lists without a record must open as Parquet).
    Returns the manifest; a damaged folder is the same one-line SinkscopeError as `load_run`'s. Read the tables
    afterwards a piece at a time with `table_batches` and `read_table`."""
    path = Path(folder)
    manifest, listed = _run_manifest(path)
    for name in manifest.get("tables", {}):
        file = path / f"{name}.parquet"
        try:
            if file.name in listed:
                reason = check_file(file, listed[file.name])
                if reason is not None:
                    raise ValueError(reason)
            else:
                import pyarrow.parquet as pq

                pq.ParquetFile(file).close()
        except (OSError, ValueError) as err:
            reason = err if isinstance(err, ValueError) else f"{file.name} unreadable ({err})"
            raise SinkscopeError(f"{folder}: {reason}; rerun the command that wrote this folder") from None
    return manifest


def table_batches(folder: str | Path, name: str, columns: Sequence[str] | None = None, *,
                  batch_rows: int = 65_536) -> Iterator[pd.DataFrame]:
    """Table `name` of a run folder as DataFrames of at most `batch_rows` rows, in file order, reading only
    `columns` (default: all): memory holds one batch, whatever the table's size. Not verified: `check_run` first."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(Path(folder) / f"{name}.parquet", pre_buffer=False) as pf:
        cols = list(columns) if columns is not None else None
        found = False
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            found = True
            yield batch.to_pandas()
        if not found:  # an empty table still has its columns and types
            yield pf.schema_arrow.empty_table().select(cols or pf.schema_arrow.names).to_pandas()


def read_table(folder: str | Path, name: str, columns: Sequence[str] | None = None, *,
               prompt_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """Table `name` of a run folder: only `columns` (default: all) and, with `prompt_ids`, only those prompts' rows
    (row groups whose `prompt_id` statistics exclude them are skipped; the others are read one at a time and
    filtered), in file order. Not verified: `check_run` first."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with pq.ParquetFile(Path(folder) / f"{name}.parquet") as pf:
        schema = pf.schema_arrow
        cols = list(columns) if columns is not None else schema.names
        if prompt_ids is None:
            return pf.read(columns=cols).to_pandas()
        wanted = sorted({int(i) for i in prompt_ids})
        at = schema.get_field_index("prompt_id")
        if at < 0:
            raise ValueError(f"{name}.parquet has no prompt_id column to select prompts by")
        values = pa.array(wanted, type=schema.field(at).type)
        read = cols if "prompt_id" in cols else [*cols, "prompt_id"]
        parts = []
        for i in range(pf.num_row_groups):
            stats = pf.metadata.row_group(i).column(at).statistics
            if stats is not None and stats.has_min_max and not any(stats.min <= p <= stats.max for p in wanted):
                continue
            group = pf.read_row_group(i, columns=read)
            group = group.filter(pc.is_in(group["prompt_id"], value_set=values))
            if group.num_rows:
                parts.append(group.select(cols))
        table = pa.concat_tables(parts) if parts else schema.empty_table().select(cols)
        return table.to_pandas()


def reporter(say: Callable[[str], None] | None) -> Callable[[str], None]:
    """`say`, or the `sinkscope` logger's warning (printed to stderr when nothing else is configured)."""
    return say if say is not None else log.warning
