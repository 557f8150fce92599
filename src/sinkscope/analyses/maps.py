"""The optional `maps` table: full attention maps of short prompts, for the report's click-a-head view.

Profile runs keep only per-key statistics; full [query, key] maps are O(n²) per head, so the report shows them
only for prompts of at most 64 tokens. `maps_table` turns a Trace captured with `CaptureConfig(maps=True)` into
the tidy table (prompt_id, layer, head, query, key, weight); `capture_maps` captures the short prompts itself;
`add_maps` adds the table to a Run before `save_run`/`write_report`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from sinkscope.errors import SinkscopeError
from sinkscope.store import Run

MAX_MAP_TOKENS = 64
MAP_COLUMNS = ["prompt_id", "layer", "head", "query", "key", "weight"]


def maps_table(trace: object, prompt_ids: Sequence[int] | None = None, max_tokens: int = MAX_MAP_TOKENS
               ) -> pd.DataFrame:
    """One row per prompt × layer × head × query × key (query, key < the prompt's length) of `trace.maps`.

    Prompts longer than `max_tokens` are left out. `prompt_ids` names the trace's prompts (default 0, 1, …).
    Raises SinkscopeError if the trace has no maps (capture with CaptureConfig(maps=True)).
    """
    maps = getattr(trace, "maps", None)
    if maps is None:
        raise SinkscopeError("this trace has no attention maps; capture with CaptureConfig(maps=True)")
    lengths = [int(n) for n in trace.lengths]  # type: ignore[attr-defined]
    ids = list(prompt_ids) if prompt_ids is not None else list(range(len(lengths)))
    if len(ids) != len(lengths):
        raise SinkscopeError(f"{len(ids)} prompt ids for a trace of {len(lengths)} prompts")
    frames = []
    array = maps.detach().float().cpu().numpy()  # [P, L, H, N, N]
    _, L, H, _, _ = array.shape
    for p, (pid, n) in enumerate(zip(ids, lengths, strict=True)):
        if n > max_tokens:
            continue
        layer, head, query, key = np.meshgrid(np.arange(L), np.arange(H), np.arange(n), np.arange(n), indexing="ij")
        frames.append(pd.DataFrame({
            "prompt_id": np.full(layer.size, pid, dtype=np.int64),
            "layer": layer.ravel(), "head": head.ravel(), "query": query.ravel(), "key": key.ravel(),
            "weight": array[p, :, :, :n, :n].ravel().astype(np.float32),
        }))
    return pd.concat(frames, ignore_index=True) if frames else empty_maps()


def empty_maps() -> pd.DataFrame:
    """A maps table with no rows."""
    return pd.DataFrame({c: pd.Series(dtype="float32" if c == "weight" else "int64") for c in MAP_COLUMNS})


def capture_maps(loaded: object, prompts: Sequence[str], prompt_ids: Sequence[int] | None = None,
                 max_tokens: int = MAX_MAP_TOKENS, batch_size: int = 8) -> pd.DataFrame:
    """Capture full maps of the prompts of at most `max_tokens` tokens and return their `maps` table.

    `loaded` is a sinkscope LoadedModel; prompts that are longer are skipped (an empty table if none is short).
    """
    from sinkscope.capture import CaptureConfig, run_capture

    ids = list(prompt_ids) if prompt_ids is not None else list(range(len(prompts)))
    tokenizer = loaded.tokenizer  # type: ignore[attr-defined]
    short = [(pid, text) for pid, text in zip(ids, prompts, strict=True)
             if isinstance(text, str) and text.strip() and len(tokenizer(text)["input_ids"]) <= max_tokens]
    if not short:
        return empty_maps()
    config = CaptureConfig(rows=None, entropy=False, maps=True, max_map_tokens=max_tokens)
    trace = run_capture(loaded, [t for _, t in short], config, batch_size=batch_size)  # type: ignore[arg-type]
    return maps_table(trace, [pid for pid, _ in short], max_tokens)


def add_maps(run: Run, maps: pd.DataFrame) -> Run:
    """A copy of `run` with the `maps` table added (an empty table leaves the run as it was)."""
    missing = set(MAP_COLUMNS) - set(maps.columns)
    if missing:
        raise SinkscopeError(f"a maps table needs the columns {MAP_COLUMNS}; missing {sorted(missing)}")
    if maps.empty:
        return run
    return Run(tables={**run.tables, "maps": maps[MAP_COLUMNS]}, manifest=dict(run.manifest))
