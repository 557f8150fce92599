"""`sinkscope train-lm` and `sinkscope plot-trace`: thin typer front ends over `sinkscope.toy.tinylm`.

Both are plain functions with typer `Annotated` options; `sinkscope.cli.app` registers them as top-level commands.
Bad input raises `SinkscopeError` (one line, printed without a traceback by the CLI's error wrapper).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sinkscope.errors import SinkscopeError
from sinkscope.toy.tinylm import (
    SYNTHETIC,
    VARIANTS,
    TrainConfig,
    check_synthetic,
    check_variant,
    draw_trace,
    read_trace,
    summarise,
    train,
)

_console = Console(emoji=False, highlight=False)


def train_lm(
    data: Annotated[Path | None, typer.Option(
        help="Text to train on: a .txt file (one document), a .jsonl file (its 'text' fields) or a folder "
             "(its .txt/.jsonl files and each subfolder's test.jsonl, e.g. /work/shared/data).")] = None,
    synthetic: Annotated[str | None, typer.Option(
        help=f"Synthetic task, alone or mixed with --data: {', '.join(SYNTHETIC)}.")] = None,
    synthetic_frac: Annotated[float, typer.Option(
        help="Share of each batch from the synthetic task when --data is also given.")] = 0.5,
    synthetic_triggers: Annotated[int, typer.Option(
        help="Trigger tokens of bigram_backcopy (with --data: dedicated tokens <bb0>… added to the tokenizer).")
    ] = 3,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Run folder: checkpoints, final model/, trace.parquet, manifest.json.")] = Path(
        "runs/tinylm"),
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence, BOS included.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW; warmup 5%, cosine to 10%).")] = 3e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay on matrices and embeddings.")] = 0.1,
    d_model: Annotated[int, typer.Option(help="Hidden size.")] = 128,
    layers: Annotated[int, typer.Option(help="Decoder layers.")] = 4,
    heads: Annotated[int, typer.Option(help="Attention heads per layer.")] = 4,
    vocab_size: Annotated[int, typer.Option(help="Byte-level BPE vocabulary size (text data).")] = 2048,
    variant: Annotated[str, typer.Option(help=f"Attention variant: {', '.join(VARIANTS)}.")] = "softmax",
    seed: Annotated[int, typer.Option(help="Random seed (initialisation and batches).")] = 0,
    eval_every: Annotated[int, typer.Option(help="Trace (and checkpoint) every N steps.")] = 100,
    eval_batch: Annotated[int, typer.Option(help="Held-out sequences in the fixed trace batch.")] = 16,
    device: Annotated[str, typer.Option(help="auto (cuda if available), cpu or cuda.")] = "auto",
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="bf16 autocast (default: on for cuda).")
                    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in --out from its last checkpoint (its saved options; --steps may grow)."
    )] = False,
) -> None:
    """Train a small Llama-style LM (RoPE, RMSNorm, SwiGLU, BOS first) and trace attention-sink emergence."""
    check_variant(variant)
    check_synthetic(synthetic)
    if data is not None and not data.exists():
        raise SinkscopeError(f"--data {data} does not exist: pass a .txt or .jsonl file or a folder of them")
    if threads is not None:
        import torch

        if threads < 1:
            raise SinkscopeError("--threads must be at least 1")
        torch.set_num_threads(threads)
    cfg = TrainConfig(
        data=None if data is None else str(data), synthetic=synthetic, synthetic_frac=synthetic_frac,
        synthetic_triggers=synthetic_triggers, out=str(out),
        steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, weight_decay=weight_decay, d_model=d_model,
        layers=layers, heads=heads, vocab_size=vocab_size, variant=variant, seed=seed, eval_every=eval_every,
        eval_batch=eval_batch, device=device, bf16=bf16,
    )
    if not resume:
        cfg.validate()
    result = train(cfg, resume=resume, progress=True, log=_console.print)
    if result.final is not None:
        _console.print(summary_table(summarise(result.final)))
    _console.print(f"wrote {result.out}/ (model/, checkpoint/, trace.parquet, manifest.json) in "
                   f"{result.elapsed_s:.0f} s; plot it with: sinkscope plot-trace {result.out}")


def summary_table(summary: dict) -> Table:
    """Per-layer sink figures (from `tinylm.summarise`) as a rich table."""
    table = Table(title=f"held-out loss {summary['eval_loss']:.3f} nats/token")
    for name in ("layer", "α₀ mean", "heads α₀>0.2", "heads α₀>0.3", "‖h₀‖/median", "null mass"):
        table.add_column(name, justify="right")
    for row in summary["layers"]:
        table.add_row(str(row["layer"]), f"{row['alpha0_mean']:.3f}", f"{row['share_02']:.0%}",
                      f"{row['share_03']:.0%}", f"{row['norm_ratio']:.2f}", f"{row['null_mass']:.3f}")
    return table


def plot_trace(
    run: Annotated[Path, typer.Argument(help="A run folder written by train-lm (or its trace.parquet).")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="PNG to write (default: RUN/trace.png).")] = None,
    title: Annotated[str | None, typer.Option(help="Figure title.")] = None,
) -> None:
    """Plot a train-lm trace: α₀ and share of sink heads per layer, ‖h₀‖/median‖h‖, and loss against the step."""
    if not run.exists():
        raise SinkscopeError(f"{run} does not exist: pass a folder written by `sinkscope train-lm`")
    trace = read_trace(run)
    target = out or ((run.parent if run.is_file() else run) / "trace.png")
    path = draw_trace(trace, target, title=title or str(run))
    _console.print(f"wrote {path}")
