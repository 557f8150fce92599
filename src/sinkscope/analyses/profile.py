"""`profile`: sinks per prompt, layer and head with any registered detector, as tidy tables.

`profile` holds the whole trace and every table in memory; `profile_in_batches` (what the CLI runs) builds the same
tables a batch at a time and appends them to a run folder, so its memory does not grow with the number of prompts.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping, MutableMapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sinkscope.capture import CaptureConfig, Trace, pad_to, run_capture, tokenize
from sinkscope.detect import detect, get_detector
from sinkscope.errors import SinkscopeError
from sinkscope.models import LoadedModel
from sinkscope.progress import Progress
from sinkscope.store import Run, Tables, make_manifest, open_run

# The order of `profile`'s tables (in `ProfileResult.tables` and in the manifest).
TABLES = ("keys", "heads", "prompts", "layers", "sink_rate", "skipped")


@dataclass
class ProfileResult:
    """The trace, the sink mask and the tables of one profile run."""

    trace: Trace
    sinks: torch.Tensor  # [P, L, H, N] bool
    method: str
    params: dict[str, Any]
    tables: MutableMapping[str, pd.DataFrame] = field(default_factory=dict)  # `Tables`: keys built when read
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def run(self, loaded: LoadedModel, command: str = "profile") -> Run:
        return Run(tables=dict(self.tables), manifest=profile_manifest(loaded, command, self.method, self.params,
                                                                 self.trace.info.get("capture")))

    @property
    def excluded(self) -> int:
        """Keys the column detector left out (seen by too few queries; `min_queries`)."""
        return excluded_keys(self.trace, self.params["min_queries"]) if "min_queries" in self.params else 0

    def _repr_html_(self) -> str:
        """A notebook view: the per-layer table and a layer × head grid of the mass on sinks (mean over prompts)."""
        return profile_html(self)


@dataclass
class ProfileSummary:
    """What `profile_in_batches` keeps in memory: the per-layer table, the skipped prompts and the tables' row counts
    (the long tables themselves are in the run folder `folder`, if one was given)."""

    layers: pd.DataFrame
    skipped: list[tuple[int, str]]
    rows: dict[str, int]  # table name → rows, in `TABLES` order
    method: str
    params: dict[str, Any]
    folder: Path | None = None
    excluded: int = 0  # keys the column detector left out (seen by too few queries; `min_queries`)

    @property
    def n_prompts(self) -> int:
        return self.rows["prompts"]


def profile_manifest(loaded: LoadedModel, command: str, method: str, params: Mapping[str, Any],
                     capture: Any) -> dict[str, Any]:
    """The manifest of a profile run: model, detector and its parameters, capture settings (`Trace.info`)."""
    return make_manifest(command, model_manifest(loaded), {"method": method, **params, "capture": capture})


def model_manifest(loaded: LoadedModel) -> dict[str, Any]:
    info = loaded.info
    return {"name": info.name, "model_type": info.model_type, "revision": info.revision, "dtype": info.dtype,
            "n_layers": info.n_layers, "n_heads": info.n_heads, "n_kv_heads": info.n_kv_heads,
            "adds_bos": info.adds_bos}


MIN_QUERIES = 16
"""Column detectors ignore a key seen by fewer than min(MIN_QUERIES, ⌈MIN_QUERY_SHARE · n⌉) queries (n: the prompt's
tokens): in a causal model the last keys are seen by one to three queries, so their column mean α_k is one query's
attention — on long prompts they were flagged as sinks by most heads. `min_queries=0` turns this off."""
MIN_QUERY_SHARE = 0.1


def queries_needed(lengths: torch.Tensor, min_queries: int = MIN_QUERIES) -> torch.Tensor:
    """Per prompt, how many queries must see a key for column detectors to read it: [P] long (0: no minimum)."""
    share = torch.ceil(lengths.double() * MIN_QUERY_SHARE).long().clamp(min=1)
    return share.clamp(max=max(0, int(min_queries)))


def enough_queries(trace: Trace, min_queries: int = MIN_QUERIES) -> torch.Tensor:
    """[P, L, N] bool: keys seen by at least `queries_needed` queries (per layer: a sliding window sees fewer)."""
    return trace.key_count >= queries_needed(trace.lengths, min_queries)[:, None, None]


def excluded_keys(trace: Trace, min_queries: int = MIN_QUERIES) -> int:
    """How many real keys (prompt × position) the minimum leaves out, in some layer."""
    left_out = trace.valid_keys()[:, None, :] & ~enough_queries(trace, min_queries)  # [P, L, N]
    return int(left_out.any(1).sum())


def resolved_params(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The parameters a run records: the given ones, plus `min_queries` (its default) for column detectors."""
    out = dict(params or {})
    if get_detector(method).statistic == "column":
        out.setdefault("min_queries", MIN_QUERIES)
    elif "min_queries" in out:
        raise SinkscopeError(f"min_queries applies to column detectors; {method} reads the last token's row")
    return out


def sink_mask(trace: Trace, method: str = "column_mass", **params: Any) -> torch.Tensor:
    """Apply a detector to every prompt × layer × head. Returns a bool mask [P, L, H, N].

    Column detectors read the column mass α_k (`trace.key_mass`) of the keys seen by enough queries (`min_queries`,
    default `MIN_QUERIES`; 0 reads every key); row detectors read the last token's attention row. `sink_rate`
    flags, per head, the keys with α_k > ε (its per-key rate is in the `sink_rate` table).
    """
    detector = get_detector(method)
    params = dict(params)
    min_queries = int(params.pop("min_queries", MIN_QUERIES))
    valid = trace.valid_keys()[:, None, None, :]  # [P, 1, 1, N]
    if detector.statistic == "row":
        return detect(method, trace.last_rows(), valid=valid, **params)
    valid = valid & enough_queries(trace, min_queries)[:, :, None, :]  # [P, L, 1, N]
    if detector.returns == "rate":
        detect(method, trace.key_mass, valid=valid, **params)  # validates the parameters
        eps = float(params.get("eps", detector.params["eps"]))
        return (trace.key_mass > eps) & valid
    return detect(method, trace.key_mass, valid=valid, **params)


def profile(
    loaded: LoadedModel,
    prompts: str | Sequence[str],
    method: str = "column_mass",
    params: Mapping[str, Any] | None = None,
    *,
    capture: CaptureConfig | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> ProfileResult:
    """Capture `prompts` (one string is one prompt), detect sinks with `method`, and build the tables.
    progress: called as progress("capture", done, total) after each batch (`run_capture`).

    Prompts that are empty or longer than the context are skipped and listed in `result.skipped`
    (and the `skipped` table); if none is usable, SinkscopeError.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    params = resolved_params(method, params)
    ids, bad = tokenize(loaded, prompts)  # each prompt is tokenised once, here
    good = [i for i, seq in enumerate(ids) if seq is not None]
    if not good:
        raise _no_usable_prompt(bad)
    trace = run_capture(loaded, [ids[i] for i in good], capture or CaptureConfig(), batch_size=batch_size,
                        progress=progress, texts=[prompts[i] for i in good])
    sinks = sink_mask(trace, method, **params)
    result = ProfileResult(trace=trace, sinks=sinks, method=method, params=params, skipped=bad)
    result.tables = build_tables(trace, sinks, prompt_ids=good, method=method, params=params)
    result.tables["skipped"] = skipped_table(bad)
    return result


def _no_usable_prompt(bad: Sequence[tuple[int, str]]) -> SinkscopeError:
    reasons = "; ".join(f"prompt {i + 1}: {why}" for i, why in bad[:3])
    return SinkscopeError(f"no usable prompt ({reasons})" if bad else "no prompts given")


def _token_ids(loaded: LoadedModel, prompts: Sequence[str], chunk: int = 1024
               ) -> tuple[list[np.ndarray | None], list[tuple[int, str]]]:
    """`tokenize` a chunk of prompts at a time, keeping each prompt's ids as an int32 array (a list of Python ints
    takes about eight times the memory). None for an unusable prompt, with (index, reason) for it."""
    ids: list[np.ndarray | None] = []
    bad: list[tuple[int, str]] = []
    for start in range(0, len(prompts), chunk):
        seqs, why = tokenize(loaded, prompts[start : start + chunk])
        ids.extend(None if seq is None else np.asarray(seq, dtype=np.int32) for seq in seqs)
        bad.extend((start + i, reason) for i, reason in why)
    return ids, bad


# Trace fields the tables read → the dims that index key positions.
_KEY_DIMS: dict[str, list[int]] = {"key_mass": [3], "key_count": [2], "rows": [4],
                                   "entropy": [3], "sink_share": [3]}


def _widened(trace: Trace, n: int) -> Trace:
    """The trace with the statistics the tables read zero-padded to n keys: [b, L, H, N_batch] → [b, L, H, n]. With n
    the longest prompt of the whole run, a batch's tensors are its rows of the whole run's trace, so detectors and
    table builders (row-wise over the key axis) give the same bits."""
    return dataclasses.replace(trace, **{name: pad_to(getattr(trace, name), n, dims)
                                         for name, dims in _KEY_DIMS.items() if getattr(trace, name) is not None})


def profile_in_batches(
    loaded: LoadedModel,
    prompts: str | Sequence[str],
    method: str = "column_mass",
    params: Mapping[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    capture: CaptureConfig | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    command: str = "profile",
    maps: int = 0,
) -> ProfileSummary:
    """`profile` a batch at a time, holding one batch's tables: memory does not grow with the number of prompts.

    Each batch of `batch_size` usable prompts is captured, detected and turned into `profile`'s long tables (`keys`,
    `heads`, `prompts`, and `sink_rate` for that method). With `out`, they are appended to the run folder's Parquet
    files (`TableStream`) and saved there with `layers`, `skipped` and the manifest when every batch is done; the
    folder is opened (checked and locked, `open_run`, refusing another command's run unless `overwrite`) after the
    prompts are tokenised and before any capture. Without `out`, only the summary is kept. `layers` comes from
    running totals (`LayerSummary`).

    The tables equal `profile(...).run(loaded)`'s, row for row and bit for bit: the batches are the ones
    `run_capture` forms, and each batch's statistics are padded to the longest prompt of the run (`_widened`).

    maps: with `out`, also keep the full attention maps of the first `maps` prompts of at most `MAX_MAP_TOKENS`
    tokens (the `maps` table, `analyses.maps`; a second, map-only capture of those short prompts), so the report
    shows a map when a head is clicked. L·H·n² rows per prompt, hence the caps.
    progress: called as progress("profile", done, total) after each batch (done, total: batches).
    """
    from sinkscope.analyses.maps import MAX_MAP_TOKENS, maps_table

    if isinstance(prompts, str):
        prompts = [prompts]
    params = resolved_params(method, params)
    ids, bad = _token_ids(loaded, prompts)
    good = [i for i, seq in enumerate(ids) if seq is not None]
    if not good:
        raise _no_usable_prompt(bad)
    n_max = max(len(ids[i]) for i in good)
    config = capture or CaptureConfig()
    batches = [good[i : i + batch_size] for i in range(0, len(good), batch_size)]
    summary = LayerSummary()
    map_left = max(0, int(maps)) if out is not None else 0
    map_config = CaptureConfig(rows=None, entropy=False, maps=True, max_map_tokens=MAX_MAP_TOKENS)
    excluded = 0
    rows: dict[str, int] = {}
    captured: Any = None
    with ExitStack() as stack:
        folder = stack.enter_context(open_run(out, command, overwrite=overwrite, restart=False)) \
            if out is not None else None
        stream = stack.enter_context(folder.table_stream()) if folder is not None else None
        for done, batch in enumerate(batches, 1):
            trace = run_capture(loaded, [ids[i].tolist() for i in batch], config, batch_size=batch_size,
                                texts=[prompts[i] for i in batch])
            trace = _widened(trace, n_max)  # [b, L, H, n_max]
            sinks = sink_mask(trace, method, **params)  # [b, L, H, n_max] bool
            if "min_queries" in params:
                excluded += excluded_keys(trace, params["min_queries"])
            tables = long_tables(trace, sinks, batch, method, params, keys=stream is not None)
            if "keys" in tables:
                summary.add(tables["heads"], tables["keys"])
            else:  # nothing to write it to: only its row count and the rows the summary reads
                summary.add(tables["heads"], summarised_keys(trace, sinks))
                rows["keys"] = rows.get("keys", 0) + trace.n_layers * trace.n_heads * int(trace.lengths.sum())
            for name, table in tables.items():
                rows[name] = rows.get(name, 0) + len(table)
                if stream is not None:
                    stream.append(name, table)
            short = [i for i in batch if len(ids[i]) <= MAX_MAP_TOKENS][:map_left]
            if short and stream is not None:
                one = run_capture(loaded, [ids[i].tolist() for i in short], map_config, batch_size=batch_size)
                table = maps_table(one, short, MAX_MAP_TOKENS)  # [rows: prompt × layer × head × query × key]
                rows["maps"] = rows.get("maps", 0) + len(table)
                stream.append("maps", table)
                map_left -= len(short)
            captured = trace.info.get("capture")
            if progress is not None:
                progress("profile", done, len(batches))
        small = {"layers": summary.table(), "skipped": skipped_table(bad)}
        rows.update({name: len(table) for name, table in small.items()})
        if folder is not None:
            run = Run(small, profile_manifest(loaded, command, method, params, captured))
            folder.save(run, streams=stream, order=(*TABLES, "maps"))
    return ProfileSummary(layers=small["layers"], skipped=bad,
                          rows={t: rows[t] for t in (*TABLES, "maps") if t in rows},
                          method=method, params=params, folder=None if out is None else Path(out),
                          excluded=excluded)


def skipped_table(bad: Sequence[tuple[int, str]]) -> pd.DataFrame:
    """One row per unusable prompt: its id and why it was skipped."""
    return pd.DataFrame({"prompt_id": [i for i, _ in bad], "reason": [why for _, why in bad]}
                        ).astype({"prompt_id": "int64", "reason": "object"})


def build_tables(
    trace: Trace,
    sinks: torch.Tensor,
    prompt_ids: Sequence[int] | None = None,
    method: str = "column_mass",
    params: Mapping[str, Any] | None = None,
) -> Tables:
    """Tidy tables: `keys` (prompt × layer × head × key, built when first read), `heads`, `layers`, `prompts`; for
    sink_rate, `sink_rate`. `layers` reads only the keys it summarises (position 0 and the sinks), not `keys`."""
    ids = list(prompt_ids) if prompt_ids is not None else list(range(trace.n_prompts))
    tables: dict[str, Any] = long_tables(trace, sinks, ids, method, params, keys=False)
    tables["keys"] = lambda: key_table(trace, sinks, ids)
    tables["layers"] = LayerSummary().add(tables["heads"], summarised_keys(trace, sinks)).table()
    return Tables({name: tables[name] for name in TABLES if name in tables}, order=TABLES)


def long_tables(
    trace: Trace,
    sinks: torch.Tensor,
    prompt_ids: Sequence[int] | None = None,
    method: str = "column_mass",
    params: Mapping[str, Any] | None = None,
    keys: bool = True,
) -> dict[str, pd.DataFrame]:
    """The tables with rows per prompt: `keys` (unless `keys` is False), `heads`, `prompts`, and for sink_rate
    `sink_rate` (trace: [P, L, H, N] statistics, sinks: [P, L, H, N] bool). Built for a batch of prompts, they are
    that batch's rows of the whole run's tables."""
    ids = list(prompt_ids) if prompt_ids is not None else list(range(trace.n_prompts))
    tables = {"keys": key_table(trace, sinks, ids)} if keys else {}
    tables["heads"] = head_table(trace, sinks, ids)
    tables["prompts"] = pd.DataFrame({"prompt_id": ids, "text": trace.prompts, "n_tokens": trace.lengths.tolist()})
    if method == "sink_rate":
        tables["sink_rate"] = sink_rate_table(trace, ids, **dict(params or {}))
    return tables


def _token_frame(trace: Trace, ids: Sequence[int]) -> pd.DataFrame:
    """One row per prompt × real token: prompt_id, position, token."""
    lengths = trace.lengths.numpy()
    return pd.DataFrame({"prompt_id": np.repeat(np.asarray(ids, dtype=np.int64), lengths),
                         "position": np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]),
                         "token": _tokens_at(trace, [np.arange(n) for n in lengths])})


def _tokens_at(trace: Trace, positions: Sequence[np.ndarray]) -> pd.Series:
    """The token strings at `positions[p]` of each prompt p, concatenated: a string column taken by pyarrow from each
    prompt's n tokens, without a Python object per row."""
    import pyarrow as pa

    taken = [pa.array(tokens, type=pa.large_string()).take(pa.array(at))
             for tokens, at in zip(trace.tokens, positions, strict=True)]
    return pd.Series(pa.chunked_array(taken, type=pa.large_string()).combine_chunks(), dtype="str")


def _per_key(x: torch.Tensor, lengths: np.ndarray) -> np.ndarray:
    """x [P, L, H, N] → its values at each prompt's real keys, prompt by prompt in (layer, head, position) order."""
    return np.concatenate([x[p, ..., :n].reshape(-1).numpy() for p, n in enumerate(lengths)])


def key_table(trace: Trace, sinks: torch.Tensor, ids: Sequence[int]) -> pd.DataFrame:
    """One row per prompt × layer × head × key position: α_k (`alpha`), its sum and query count, the last token's
    attention to the key (`last_row`) and whether the detector flagged it (`sink`).

    Built column by column from each prompt's [L, H, n] block (NumPy, and pyarrow for the token strings)."""
    P, L, H, N = trace.key_mass.shape
    lengths = trace.lengths.numpy()
    position = [np.tile(np.arange(n, dtype=np.int64), L * H) for n in lengths]  # [L·H·n] per prompt
    frame = pd.DataFrame({
        "prompt_id": np.repeat(np.asarray(ids, dtype=np.int64), L * H * lengths),
        "layer": np.concatenate([np.repeat(np.arange(L, dtype=np.int64), H * n) for n in lengths]),
        "head": np.concatenate([np.tile(np.repeat(np.arange(H, dtype=np.int64), n), L) for n in lengths]),
        "position": np.concatenate(position),
        "token": _tokens_at(trace, position),
        "alpha": _per_key(trace.key_mass, lengths),
        "mass_sum": _per_key(trace.key_mass_sum, lengths),
        "n_queries": _per_key(trace.key_count[:, :, None].expand(P, L, H, N), lengths).astype("int64"),
        "sink": _per_key(sinks, lengths),
    })
    if trace.rows is not None:
        frame["last_row"] = _per_key(trace.last_rows(), lengths)
    return frame


def summarised_keys(trace: Trace, sinks: torch.Tensor) -> pd.DataFrame:
    """The rows of the `keys` table that `LayerSummary` reads — position 0 and the detector's sinks — without the
    others: layer, position, token, alpha, sink."""
    first = torch.zeros_like(sinks)
    first[..., 0] = True
    p, l, h, k = ((sinks | first) & trace.valid_keys()[:, None, None, :]).nonzero(as_tuple=True)
    tokens = [trace.tokens[pi][ki] for pi, ki in zip(p.tolist(), k.tolist(), strict=True)]
    return pd.DataFrame({"layer": l.numpy(), "position": k.numpy(), "token": pd.Series(tokens, dtype="str"),
                         "alpha": trace.key_mass[p, l, h, k].numpy(), "sink": sinks[p, l, h, k].numpy()})


def head_table(trace: Trace, sinks: torch.Tensor, ids: Sequence[int]) -> pd.DataFrame:
    """One row per prompt × layer × head: number of sinks, the strongest key by α, the mass on sinks."""
    P, L, H, _ = trace.key_mass.shape
    valid = trace.valid_keys()[:, None, None, :]
    alpha = trace.key_mass.masked_fill(~valid, -1.0)
    top_alpha, top_pos = alpha.max(-1)
    n_sinks = sinks.sum(-1)
    sink_alpha = (trace.key_mass * sinks).sum(-1)
    p, l, h = np.meshgrid(np.arange(P), np.arange(L), np.arange(H), indexing="ij")
    frame = pd.DataFrame({
        "prompt_id": np.asarray(ids)[p.ravel()],
        "layer": l.ravel(),
        "head": h.ravel(),
        "n_sinks": n_sinks.numpy().ravel().astype("int64"),
        "sink_alpha": sink_alpha.numpy().ravel(),
        "top_position": top_pos.numpy().ravel(),
        "top_alpha": top_alpha.numpy().ravel(),
    })
    frame["top_token"] = [trace.tokens[pi][pos] for pi, pos in zip(p.ravel(), frame["top_position"], strict=True)]
    flagged = sinks.reshape(P * L * H, -1).nonzero().numpy()  # [(pair, position)], pairs and positions in order
    words = [f"{pos}:{trace.tokens[pair // (L * H)][pos]!r}" for pair, pos in flagged.tolist()]
    joined = pd.Series(words, dtype=object).groupby(flagged[:, 0], sort=False).agg(" ".join)
    frame["sink_tokens"] = pd.Series(joined.reindex(range(P * L * H), fill_value="").to_numpy(dtype=object),
                                     dtype=frame["top_token"].dtype)
    if trace.rows is not None:
        last = trace.last_rows()
        frame["last_row_sink_mass"] = (last * sinks).sum(-1).numpy().ravel()
    if trace.entropy is not None:
        idx = (trace.lengths - 1)[:, None, None, None].expand(P, L, H, 1)
        frame["last_entropy"] = trace.entropy.gather(-1, idx).squeeze(-1).numpy().ravel()
    if trace.sink_share is not None:
        share = trace.sink_share.sum(-1) / trace.lengths[:, None, None]
        frame["learned_sink_share"] = share.numpy().ravel()
    return frame


def layer_summary(heads: pd.DataFrame, keys: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """Per layer: share of (prompt, head) pairs with a sink, mean α at position 0, and the most frequent sink tokens
    with their mean α (see `LayerSummary`, which builds it a batch at a time)."""
    return LayerSummary(top).add(heads, keys).table()


class ExactSums:
    """Exact running sums and counts of float values per group (the columns `by`), whatever the batching.

    Each value is x = m·2^(e−53) with an integer |m| < 2^53 (np.frexp); m is split as hi·2^26 + lo, and the his and
    los of one group and exponent e are added as int64 (exact up to 2^36 values), so `means` is the exact mean
    rounded once to float64.
    """

    def __init__(self, by: Sequence[str]) -> None:
        self.by = list(by)
        self.parts: list[pd.DataFrame] = []  # each: index (*by, exp) → hi, lo, n (int64); merged every 64 adds

    def add(self, frame: pd.DataFrame, column: str) -> None:
        """Add `frame[column]`, grouped by `frame[by]`."""
        mantissa, exp = np.frexp(frame[column].to_numpy(dtype=np.float64))
        m = (mantissa * 2.0**53).astype(np.int64)  # exact: x = m · 2^(exp − 53)
        part = pd.DataFrame({**{c: frame[c].to_numpy() for c in self.by}, "exp": exp, "hi": m >> 26,
                             "lo": m & (2**26 - 1), "n": np.ones(len(m), dtype=np.int64)})
        self.parts.append(part.groupby([*self.by, "exp"], sort=False).sum())
        if len(self.parts) >= 64:
            self.parts = [self._merged()]

    def _merged(self) -> pd.DataFrame:
        return pd.concat(self.parts).groupby(level=[*self.by, "exp"], sort=False).sum()

    def means(self) -> dict[Any, tuple[int, float]]:
        """{group (a scalar for one column, else a tuple): (count, exact mean)}."""
        parts = self._merged().reset_index() if self.parts else None
        if parts is None or parts.empty:
            return {}
        shift = int(parts["exp"].min()) - 53  # every value is an integer multiple of 2^shift
        keys = parts[self.by[0]].tolist() if len(self.by) == 1 else list(parts[self.by].itertuples(False, None))
        totals: dict[Any, int] = {}
        counts: dict[Any, int] = {}
        for key, e, hi, lo, n in zip(keys, parts["exp"].tolist(), parts["hi"].tolist(), parts["lo"].tolist(),
                                     parts["n"].tolist(), strict=True):
            totals[key] = totals.get(key, 0) + (((hi << 26) + lo) << (e - 53 - shift))
            counts[key] = counts.get(key, 0) + n
        scale = Fraction(2) ** shift
        return {key: (counts[key], float(total * scale / counts[key])) for key, total in totals.items()}


class LayerSummary:
    """The `layers` table from running totals, so that it can be built a batch at a time: `add` each batch's `heads`
    and `keys` tables (any batching, any order), then read `table()`.

    Per layer: `head_share` (share of (prompt, head) pairs with a sink), `mean_sinks` (sinks per pair), `pos0_alpha`
    (mean α at position 0) and `sink_tokens`: the `top` most frequent (position, token) among the detector's sinks,
    with their mean α. Counts are integers and the α means exact (`ExactSums`), so the table does not depend on the
    batching.
    """

    def __init__(self, top: int = 3) -> None:
        self.top = top
        self.pairs: pd.DataFrame | None = None  # index layer → pairs, with_sink, n_sinks (int64)
        self.pos0 = ExactSums(["layer"])
        self.sinks = ExactSums(["layer", "position", "token"])

    def add(self, heads: pd.DataFrame, keys: pd.DataFrame) -> LayerSummary:
        n_sinks = heads["n_sinks"].to_numpy(dtype=np.int64)
        part = pd.DataFrame({"layer": heads["layer"].to_numpy(), "pairs": np.ones(len(heads), dtype=np.int64),
                             "with_sink": (n_sinks > 0).astype(np.int64), "n_sinks": n_sinks}).groupby("layer").sum()
        self.pairs = part if self.pairs is None else pd.concat([self.pairs, part]).groupby(level="layer").sum()
        self.pos0.add(keys[keys["position"] == 0], "alpha")
        self.sinks.add(keys[keys["sink"].to_numpy(dtype=bool)], "alpha")
        return self

    def table(self) -> pd.DataFrame:
        """One row per layer: layer, head_share, mean_sinks, pos0_alpha (float64), sink_tokens."""
        if self.pairs is None:
            raise ValueError("LayerSummary.table() before any add()")
        pairs = self.pairs.sort_index()
        pos0 = self.pos0.means()
        frame = pd.DataFrame({
            "layer": pairs.index.to_numpy(dtype=np.int64),
            "head_share": pairs["with_sink"].to_numpy() / pairs["pairs"].to_numpy(),
            "mean_sinks": pairs["n_sinks"].to_numpy() / pairs["pairs"].to_numpy(),
            "pos0_alpha": np.array([pos0[layer][1] if layer in pos0 else np.nan for layer in pairs.index]),
        })
        by_layer: dict[int, list[tuple[tuple[int, str], tuple[int, float]]]] = {}
        for (layer, position, token), stats in sorted(self.sinks.means().items()):
            by_layer.setdefault(int(layer), []).append(((int(position), str(token)), stats))
        described = []
        for layer in frame["layer"]:
            entries = by_layer.get(int(layer), [])
            stats = pd.DataFrame([s for _, s in entries], columns=["size", "mean"],
                                 index=pd.MultiIndex.from_tuples([k for k, _ in entries], names=["position", "token"])
                                 if entries else None)
            stats = stats.sort_values("size", ascending=False)  # pandas' groupby order and sort, as before
            described.append(", ".join(f"{tok!r}@{pos} ({mean:.2f})"
                                       for (pos, tok), mean in zip(stats.index[: self.top],
                                                                   stats["mean"].iloc[: self.top], strict=True)))
        frame["sink_tokens"] = pd.Series(described, dtype="object")
        return frame


def sink_rate_table(trace: Trace, ids: Sequence[int], **params: Any) -> pd.DataFrame:
    """Per prompt and key position: Gu et al.'s sink rate, the fraction of (layer, head) pairs with α_k > ε."""
    params = dict(params)
    enough = enough_queries(trace, int(params.pop("min_queries", MIN_QUERIES)))  # [P, L, N]
    valid = trace.valid_keys()[:, None, None, :] & enough[:, :, None, :]
    rate = detect("sink_rate", trace.key_mass, valid=valid, **params)  # [P, N]
    tokens = _token_frame(trace, ids)
    tokens["sink_rate"] = [float(rate[i, pos]) for i, pos in zip(
        tokens["prompt_id"].map({pid: i for i, pid in enumerate(ids)}), tokens["position"], strict=True)]
    return tokens


def profile_html(result: ProfileResult) -> str:
    """The per-layer table and a layer × head grid of `sink_alpha` (Σ α over the detector's sinks, mean over
    prompts) as plain HTML, no script: cells on the report's heat ramp from 0 to the grid's largest value, which the
    caption states (`report.notebook`)."""
    from sinkscope.report.notebook import heat_grid_html

    layers, heads = result.tables["layers"], result.tables["heads"]
    grid = heads.groupby(["layer", "head"])["sink_alpha"].mean().unstack("head")  # [layer, head]
    cell = "padding:2px 6px;text-align:right"
    rows = "".join(
        f"<tr><td style='{cell}'>{int(r.layer)}</td><td style='{cell}'>{r.head_share:.0%}</td>"
        f"<td style='{cell}'>{r.pos0_alpha:.3f}</td><td style='padding:2px 6px'>{html.escape(r.sink_tokens or '-')}"
        "</td></tr>" for r in layers.itertuples())
    table = ("<table><thead><tr><th>layer</th><th>heads with sink</th><th>α at pos 0</th>"
             f"<th>sink tokens (mean α)</th></tr></thead><tbody>{rows}</tbody></table>")
    info = result.trace.info
    title = html.escape(f"{info.get('model', '')} profile: {result.trace.n_prompts} prompt(s), method "
                        f"{result.method} {result.params or ''}".strip())
    note = ("α_k is key k's attention averaged over the queries that see it; a causal map's column means add up to "
            "more than 1, so this sum can exceed 1")
    grid_html = heat_grid_html(grid.to_numpy(dtype=float), "mass on sinks Σα per layer × head (mean over prompts)",
                               note)
    return (f"<div><p><b>{title}</b></p><div style='display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap'>"
            f"<div>{table}</div><div>{grid_html}</div></div></div>")
