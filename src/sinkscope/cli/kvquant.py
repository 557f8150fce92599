"""`sinkscope kv-quant`: a thin front end over `sinkscope.analyses.kvquant` (sink-aware KV-cache quantisation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sinkscope.cli.options import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    NoFiguresOpt,
    OutOpt,
    OverwriteOpt,
    PickleOpt,
    TrustOpt,
    console,
    described,
    load,
    progress_bars,
    read_text,
    user_errors,
)
from sinkscope.errors import SinkscopeError


def parse_bits(spec: str) -> list[int]:
    """'8,4,2' → [8, 4, 2]; each a whole number from 1 to 16 (16: no quantisation)."""
    try:
        bits = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise SinkscopeError(f"cannot read --bits '{spec}': pass bit widths like 8,4,2") from None
    if not bits or any(not 1 <= b <= 16 for b in bits):
        raise SinkscopeError(f"--bits '{spec}': pass bit widths from 1 to 16, like 8,4,2 (16 is the unquantised "
                             "baseline, always included)")
    return list(dict.fromkeys(bits))


@user_errors
def kv_quant_command(
    model: ModelOpt,
    text_file: Annotated[Path | None, typer.Option(
        "--text-file", help="Text file (or JSONL with a text field) to score")] = None,
    bits: Annotated[str, typer.Option(help="Bit widths of the quantised cache, comma-separated (the unquantised "
                                           "baseline is always scored)")] = "8,4,2",
    keep_first: Annotated[int, typer.Option(min=0, max=1_000_000, help="The 'first' policy keeps the first K tokens "
                                                                       "in full precision")] = 4,
    group: Annotated[int, typer.Option(min=1, max=1_000_000, help="Tokens per key group: keys are quantised per "
                                                                  "channel over each group (KIVI's G)")] = 32,
    chunk: Annotated[int, typer.Option(min=1, max=1_000_000, help="Tokens fed per forward; 1 is token-by-token "
                                                                  "decoding (slowest, strictest)")] = 32,
    sink: Annotated[int, typer.Option(min=0, max=1_000_000, help="StreamingLLM cache: initial tokens kept")] = 4,
    window: Annotated[int, typer.Option(min=1, max=1_000_000, help="StreamingLLM cache: recent tokens kept")] = 256,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Score the full cache only")] = False,
    prefix: Annotated[int, typer.Option(min=2, max=1_000_000, help="Sinks are detected on the text's first N tokens "
                                                                   "(as a prefill would see them)")] = 256,
    max_tokens: Annotated[int, typer.Option(min=2, max=1_000_000, help="Score the first N tokens of the text")] = 1024,
    out: described(OutOpt, ", with the curve kvquant.png") = None,
    overwrite: OverwriteOpt = False,
    no_figures: NoFiguresOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Perplexity with the KV cache fake-quantised (KIVI: keys per channel, values per token) to each bit width: all
    tokens quantised, the detected sinks kept in full precision, or the first K kept; full cache and StreamingLLM."""
    from rich.table import Table

    from sinkscope.analyses.kvquant import kv_quant

    widths = parse_bits(bits)
    if text_file is None:
        raise SinkscopeError("no text: pass --text-file FILE (a text file, or JSONL with a text field)")
    text = read_text(text_file)
    loaded = load(model, device, dtype, trust_remote_code, allow_pickle)
    ids = loaded.tokenizer(text)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise SinkscopeError(f"{text_file} has {len(ids)} token(s): the text needs at least two")
    caches = ["full"] if no_stream else ["full", "sink_window"]
    if not no_stream and len(ids) <= sink + window + 1:
        raise SinkscopeError(f"the text has {len(ids)} tokens: the StreamingLLM cache needs more than sink + window "
                             f"= {sink + window} to evict (pass a smaller --window, a longer text, or --no-stream)")
    with progress_bars() as update:
        result = kv_quant(loaded, ids, widths, keep_first, caches, sink, window, group, chunk, prefix,
                          progress=update)
    frame, kept = result.tables["kvquant"], result.tables["kept"]
    n = int(frame["n_tokens"].max())
    table = Table(title=f"{loaded.info.name}: {n} tokens, KV cache fake-quantised (keys per channel in groups of "
                        f"{group}, values per token), fed {chunk} at a time", title_justify="left")
    for col in ("cache", "bits", "keep", "kept", "perplexity", "× unquantised"):
        table.add_column(col, justify="left" if col in ("cache", "keep", "kept") else "right")
    for row in frame.itertuples():
        shown = row.kept if len(row.kept) <= 24 else row.kept[:21] + "..."
        table.add_row(row.cache, "none" if row.bits >= 16 else str(row.bits), row.keep if row.bits < 16 else "-",
                      shown, f"{row.perplexity:.2f}", f"{row.ppl_ratio:.3f}")
    console.print(table)
    sinks = kept[kept["keep"] == "sinks"]
    console.print("detected sinks (default detector, ≥ 10% of layer × head pairs, first "
                  f"{min(prefix, len(ids))} tokens): " + (", ".join(
                      f"{r.position}:{r.token!r} ({r.share:.0%})" for r in sinks.itertuples()) or "none"),
                  highlight=False)
    if out is not None:
        from sinkscope.cli.dormant import save_with_figures
        from sinkscope.report.figures.kvquant import plot_kvquant

        params = {"text": str(text_file), "n_tokens": len(ids), "bits": widths, "keep_first": keep_first,
                  "group": group, "chunk": chunk, "sink": sink, "window": window, "caches": caches, "prefix": prefix}
        figures = {} if no_figures else {"kvquant.png": lambda path: plot_kvquant(frame, path, loaded.info.name)}
        save_with_figures(out, result.tables, "kv-quant", loaded, params, {}, overwrite, figures)
