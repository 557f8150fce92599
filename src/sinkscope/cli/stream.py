"""`sinkscope stream`: a thin front end over `sinkscope.analyses.stream` (StreamingLLM's cache policies)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sinkscope.cli.options import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    PickleOpt,
    TrustOpt,
    console,
    load,
    progress_bars,
    read_text,
    renamed,
    user_errors,
)
from sinkscope.errors import SinkscopeError


@user_errors
def stream_command(
    model: ModelOpt,
    text_file: Annotated[Path | None, typer.Option(
        "--text-file", help="Text file (or JSONL with a text field) to score")] = None,
    sink: Annotated[int, typer.Option(min=0, help="Initial tokens kept in the cache")] = 4,
    window: Annotated[int, typer.Option(min=1, help="Recent tokens kept in the cache")] = 256,
    max_tokens: Annotated[int, typer.Option(min=2, help="Score the first N tokens of the text")] = 1024,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    trust_remote_code: TrustOpt = False,
    allow_pickle: PickleOpt = False,
    old_text: Annotated[Path | None, typer.Option("--text", hidden=True)] = None,
) -> None:
    """Perplexity with the full KV cache, StreamingLLM's sinks + window, and window only, side by side."""
    import numpy as np
    import pandas as pd
    from rich.table import Table

    from sinkscope.analyses.profile import profile
    from sinkscope.analyses.stream import compare, context_length, perplexity
    from sinkscope.store import Run, make_manifest, save_run

    text_file = renamed(text_file, old_text)
    if text_file is None:
        raise SinkscopeError("no text: pass --text-file FILE (a text file, or JSONL with a text field)")
    text = read_text(text_file)
    loaded = load(model, device, dtype, trust_remote_code, allow_pickle)
    ids = loaded.tokenizer(text)["input_ids"][:max_tokens]
    budget = sink + window
    if len(ids) <= budget + 1:
        raise SinkscopeError(f"the text has {len(ids)} tokens: it needs more than sink + window = {budget} to evict")
    context = context_length(loaded)
    prefix = min(256, context // 2) if context else 256  # re-encoded with special tokens it stays in the context
    sinks = profile(loaded, [loaded.tokenizer.decode(ids[:prefix])], "column_mass").tables["layers"]
    with progress_bars() as update:
        results = compare(loaded, ids, sink, window, progress=update)
    table = Table(title=f"{loaded.info.name}: {len(ids)} tokens, cache budget {budget} ({sink} sinks + {window})",
                  title_justify="left")
    for col in ("cache", "tokens", "ppl (all)", f"ppl (tokens ≥ {budget}, after eviction)"):
        table.add_column(col, justify="left" if col == "cache" else "right")
    rows = []
    for r in results:
        after = perplexity(r.nll[budget:])
        rows.append({"policy": r.policy, "sink": sink, "window": window, "n_tokens": r.n_tokens,
                     "ppl": r.perplexity, "ppl_after": after})
        table.add_row(r.policy, str(r.n_tokens), f"{r.perplexity:.2f}", f"{after:.2f}")
    console.print(table)
    short = [r for r in results if r.n_tokens < len(ids)]
    for r in short:
        console.print(f"{r.policy}: scored on the first {r.n_tokens} tokens only, the model's context; the other "
                      "caches stream the whole text", highlight=False)
    strong = sinks[sinks["pos0_alpha"] > 0.2]["layer"].tolist()
    console.print(f"position-0 sink (α₀ > 0.2) in {len(strong)}/{len(sinks)} layers; mean α₀ over layers "
                  f"{sinks['pos0_alpha'].mean():.2f}" + ("" if strong else " — the model has no first-token sink, "
                  "so this comparison tests StreamingLLM's precondition rather than its result"))
    if out is not None:
        width = len(ids) - 1  # a policy scored on fewer tokens (the full cache: the context) is NaN after them
        tokens = pd.DataFrame({f"nll_{r.policy}": np.pad(r.nll.numpy(), (0, width - r.nll.numel()),
                                                         constant_values=np.nan) for r in results})
        tokens.insert(0, "position", range(1, len(ids)))
        manifest = make_manifest("stream", {"name": loaded.info.name}, {"sink": sink, "window": window,
                                 "text": str(text_file), "n_tokens": len(ids)})
        tables = {"perplexity": pd.DataFrame(rows), "tokens": tokens, "layers": sinks}
        folder = save_run(out, Run(tables, manifest), overwrite=overwrite)
        console.print(f"wrote {folder}/")
