"""Where the report reads a run's tables: a Run in memory, or a run folder read a piece at a time, so that the page
of a run of any number of prompts is built in memory that does not grow with them.

`run_tables(run_or_folder)` gives a `RunTables`: the names, columns and row counts of the tables, their rows in
batches (`batches`, only the columns asked for), one prompt's rows (`read(..., prompt_ids=)`), and `by_prompt`, which
hands a reduction the rows cut into chunks of whole prompts. A folder is verified first (`store.check_run`: every
file against its size and sha256, hashed in blocks) and read with pyarrow (`store.table_batches`, `store.read_table`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from sinkscope.errors import SinkscopeError
from sinkscope.store import Run, check_run, read_table, table_batches

BATCH_ROWS = 65_536  # rows per batch read from a folder's table (a few MB for the keys table)

T = TypeVar("T")


class RunTables:
    """A run's tables as the report reads them (see the module docstring); `MemoryTables` and `FolderTables`."""

    manifest: dict[str, Any]

    def names(self) -> list[str]:
        """The tables, in the run's order."""
        raise NotImplementedError

    def columns(self, name: str) -> list[str]:
        raise NotImplementedError

    def rows(self, name: str) -> int:
        raise NotImplementedError

    def batches(self, name: str, columns: Sequence[str] | None = None, rows: int | None = None
                ) -> Iterator[pd.DataFrame]:
        """The table's rows in order, a batch (of at most `rows` rows, default BATCH_ROWS) at a time, `columns` only
        (default all)."""
        raise NotImplementedError

    def read(self, name: str, columns: Sequence[str] | None = None, *,
             prompt_ids: Sequence[int] | None = None) -> pd.DataFrame:
        """The table whole (`columns` only), or only the rows of `prompt_ids`, in order."""
        raise NotImplementedError

    def run(self) -> Run:
        """A Run for contributed sections' render functions (a folder's tables are read when first asked for)."""
        raise NotImplementedError

    def file(self, name: str) -> bytes | None:
        """The bytes of a file the run lists besides its tables (a figure, say), checked against its recorded size
        and sha256; None when the run has no such file (a Run in memory has none)."""
        return None

    def has(self, name: str, columns: Iterable[str] = ()) -> bool:
        """True when table `name` has rows and every one of `columns`."""
        return name in self.names() and self.rows(name) > 0 and set(columns) <= set(self.columns(name))

    def head(self, name: str, n: int) -> pd.DataFrame:
        """The first `n` rows (all columns)."""
        parts, got = [], 0
        for batch in self.batches(name, rows=max(n, 1)):
            parts.append(batch.head(n - got))
            got += len(parts[-1])
            if got >= n:
                break
        return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)

    def by_prompt(self, name: str, columns: Sequence[str], reduce: Callable[[Iterable[pd.DataFrame]], T]) -> T:
        """`reduce(chunks)`, where each chunk holds every row of its prompts (`columns`, which include prompt_id).
        Batches are cut at prompt boundaries while the table's prompt_id does not decrease (as profile and sweep
        write it); at the first decrease `reduce` starts over on the table read whole, as one chunk."""
        try:
            return reduce(_prompt_chunks(self.batches(name, columns)))
        except _NotSorted:
            return reduce([self.read(name, columns)])


class _NotSorted(Exception):
    """The table's prompt_id decreases somewhere: its prompts cannot be cut into chunks on the fly."""


def _prompt_chunks(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Re-cut batches of a table sorted by prompt_id into chunks of whole prompts (memory: one batch plus the rows of
    the prompt that crosses it). Raises _NotSorted on a decrease."""
    pending: list[pd.DataFrame] = []
    last: int | None = None
    for batch in batches:
        if batch.empty:
            continue
        ids = batch["prompt_id"].to_numpy()
        if (last is not None and ids[0] < last) or (len(ids) > 1 and bool(np.any(ids[1:] < ids[:-1]))):
            raise _NotSorted
        last = int(ids[-1])
        cut = int(np.searchsorted(ids, ids[-1], side="left"))  # where the batch's last prompt starts
        if cut > 0:
            yield pd.concat([*pending, batch.iloc[:cut]], ignore_index=True) if pending \
                else batch.iloc[:cut].reset_index(drop=True)
            pending = []
        pending.append(batch.iloc[cut:])
    if pending:
        yield pd.concat(pending, ignore_index=True) if len(pending) > 1 else pending[0].reset_index(drop=True)


class MemoryTables(RunTables):
    """The tables of a Run held in memory: one batch is the whole table."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self.manifest = run.manifest or {}

    def names(self) -> list[str]:
        return list(self._run.tables)

    def columns(self, name: str) -> list[str]:
        return [str(c) for c in self._run.tables[name].columns]

    def rows(self, name: str) -> int:
        return len(self._run.tables[name])

    def batches(self, name: str, columns: Sequence[str] | None = None, rows: int | None = None
                ) -> Iterator[pd.DataFrame]:
        yield self.read(name, columns)

    def read(self, name: str, columns: Sequence[str] | None = None, *,
             prompt_ids: Sequence[int] | None = None) -> pd.DataFrame:
        frame = self._run.tables[name]
        if prompt_ids is not None:
            frame = frame[frame["prompt_id"].isin(list(prompt_ids))]
        return frame if columns is None else frame[list(columns)]

    def run(self) -> Run:
        return self._run


class FolderTables(RunTables):
    """The tables of a run folder, verified when opened and read with pyarrow a piece at a time."""

    def __init__(self, folder: str | Path) -> None:
        import pyarrow.parquet as pq

        self.folder = Path(folder)
        self.manifest = check_run(self.folder)
        self._names = [str(name) for name in self.manifest.get("tables", {})]
        self._meta: dict[str, tuple[list[str], int]] = {}
        for name in self._names:
            with pq.ParquetFile(self.folder / f"{name}.parquet") as pf:
                self._meta[name] = (list(pf.schema_arrow.names), pf.metadata.num_rows)

    def names(self) -> list[str]:
        return list(self._names)

    def columns(self, name: str) -> list[str]:
        return list(self._meta[name][0])

    def rows(self, name: str) -> int:
        return self._meta[name][1]

    def batches(self, name: str, columns: Sequence[str] | None = None, rows: int | None = None
                ) -> Iterator[pd.DataFrame]:
        return table_batches(self.folder, name, columns, batch_rows=min(rows or BATCH_ROWS, BATCH_ROWS))

    def read(self, name: str, columns: Sequence[str] | None = None, *,
             prompt_ids: Sequence[int] | None = None) -> pd.DataFrame:
        return read_table(self.folder, name, columns, prompt_ids=prompt_ids)

    def run(self) -> Run:
        return Run(tables=_LazyTables(self), manifest=self.manifest)  # type: ignore[arg-type]

    def file(self, name: str) -> bytes | None:
        listed = self.manifest.get("files")
        want = listed.get(name) if isinstance(listed, dict) else None
        if not isinstance(want, dict) or "/" in name or name.endswith(".parquet"):
            return None
        path = self.folder / name
        data = path.read_bytes() if path.is_file() else b""
        if len(data) != want.get("bytes") or hashlib.sha256(data).hexdigest() != want.get("sha256"):
            raise SinkscopeError(f"{self.folder}: {name} does not match its record in the manifest; rerun the command "
                                 "that wrote this folder")
        return data


class _LazyTables(Mapping[str, pd.DataFrame]):
    """A folder's tables by name, each read whole when first asked for (for contributed sections)."""

    def __init__(self, tables: FolderTables) -> None:
        self._tables = tables
        self._read: dict[str, pd.DataFrame] = {}

    def __getitem__(self, name: str) -> pd.DataFrame:
        if name not in self._tables.names():
            raise KeyError(name)
        if name not in self._read:
            self._read[name] = self._tables.read(name)
        return self._read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables.names())

    def __len__(self) -> int:
        return len(self._tables.names())


def run_tables(run: Run | RunTables | str | Path) -> RunTables:
    """A RunTables for a Run in memory, a run folder (verified now), or itself. The Run a report hands to section
    render functions gives back the folder it reads (so a section can read a growing table a piece at a time)."""
    if isinstance(run, RunTables):
        return run
    if isinstance(run, Run):
        return run.tables._tables if isinstance(run.tables, _LazyTables) else MemoryTables(run)
    return FolderTables(run)
