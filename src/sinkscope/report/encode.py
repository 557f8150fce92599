"""Turn tables and arrays into what the page embeds: JSON that is safe inside <script>, packed float arrays."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np
import pandas as pd

# Arrays up to this many values are embedded exactly (float32); larger ones as float16 (3 significant digits,
# half the bytes), decoded by the page.
EXACT_VALUES = 500_000


def pack(values: np.ndarray, exact: bool | None = None) -> dict[str, Any]:
    """A float array as {"enc": "f32"|"f16", "shape": [...], "b64": little-endian bytes in base64}."""
    arr = np.asarray(values, dtype=np.float64)
    if exact is None:
        exact = arr.size <= EXACT_VALUES
    dtype = "<f4" if exact else "<f2"
    raw = np.ascontiguousarray(arr.astype(dtype)).tobytes()
    return {"enc": "f32" if exact else "f16", "shape": list(arr.shape), "b64": base64.b64encode(raw).decode("ascii")}


def unpack(packed: dict[str, Any]) -> np.ndarray:
    """Inverse of `pack` (what the page decodes), as float64."""
    dtype = "<f4" if packed["enc"] == "f32" else "<f2"
    flat = np.frombuffer(base64.b64decode(packed["b64"]), dtype=dtype).astype(np.float64)
    return flat.reshape(packed["shape"])


def plain(value: Any) -> Any:
    """A JSON-serialisable copy: numpy scalars/arrays to Python, NaN/inf to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if value is pd.NaT:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def script_json(value: Any) -> str:
    """JSON for a <script type="application/json"> element: `<`, `>`, `&` escaped so no text can close it."""
    text = json.dumps(plain(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def round_floats(values: np.ndarray, digits: int = 5) -> list[Any]:
    """A float array as a list with `digits` significant decimals (NaN → None), to keep embedded JSON small."""
    arr = np.asarray(values, dtype=np.float64)
    out = np.round(arr, digits).tolist()
    return [None if (isinstance(v, float) and not math.isfinite(v)) else v for v in out]


def table_json(frame: pd.DataFrame, max_rows: int = 500, sort_by: str | None = None) -> dict[str, Any]:
    """A table for the page's sortable-table widget: columns, kinds, up to `max_rows` rows, total and a note.

    When the table is longer than `max_rows` and `sort_by` names one of its numeric columns, the rows kept are the
    top ones by that column (descending); otherwise the first ones as stored.
    """
    total = len(frame)
    note = ""
    shown = frame
    if total > max_rows:
        if sort_by is not None and sort_by in frame and pd.api.types.is_numeric_dtype(frame[sort_by]):
            shown = frame.nlargest(max_rows, sort_by)
            note = f"top {max_rows} of {total:,} rows by {sort_by}"
        else:
            shown = frame.head(max_rows)
            note = f"first {max_rows} of {total:,} rows"
    return table_rows_json(shown, total, note)


def table_rows_json(shown: pd.DataFrame, total: int, note: str = "") -> dict[str, Any]:
    """`table_json` of rows already chosen from a table of `total` rows (`note` says which)."""
    kinds = []
    for col in shown.columns:
        dtype = shown[col].dtype
        if pd.api.types.is_bool_dtype(dtype):
            kinds.append("bool")
        elif pd.api.types.is_integer_dtype(dtype):
            kinds.append("int")
        elif pd.api.types.is_float_dtype(dtype):
            kinds.append("float")
        else:
            kinds.append("str")
    rows = [[plain(v) for v in row] for row in shown.itertuples(index=False, name=None)]
    return {"columns": [str(c) for c in shown.columns], "kinds": kinds, "rows": rows, "total": total, "note": note}
