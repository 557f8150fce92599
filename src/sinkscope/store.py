"""Run folders: one Parquet file per tidy table plus `manifest.json` (model, versions, parameters, seed)."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from sinkscope.errors import SinkscopeError

MANIFEST = "manifest.json"


@dataclass
class Run:
    """Tables of one analysis plus its provenance."""

    tables: dict[str, pd.DataFrame]
    manifest: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("sinkscope", "torch", "transformers", "pandas", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def make_manifest(command: str, model: dict[str, Any] | None, parameters: dict[str, Any], seed: int | None = 0
                  ) -> dict[str, Any]:
    """The provenance written next to every run's tables."""
    return {
        "command": command,
        "argv": sys.argv,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": model or {},
        "parameters": parameters,
        "seed": seed,
        "versions": library_versions(),
    }


def save_run(out: str | Path, run: Run) -> Path:
    """Write each table to `out/<name>.parquet` and the manifest (with table sizes) to `out/manifest.json`.

    Tables are written one by one, so a failure in one keeps the ones written before it.
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise SinkscopeError(f"--out {out} is a file; pass a folder")
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, table in run.tables.items():
        table.to_parquet(folder / f"{name}.parquet", index=False)
        sizes[name] = len(table)
    manifest = {**run.manifest, "tables": sizes}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return folder


def load_run(folder: str | Path) -> Run:
    """Read a run folder back: every table listed in its manifest."""
    path = Path(folder)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise SinkscopeError(f"{folder} is not a sinkscope run folder (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    tables = {name: pd.read_parquet(path / f"{name}.parquet") for name in manifest.get("tables", {})}
    return Run(tables=tables, manifest=manifest)
