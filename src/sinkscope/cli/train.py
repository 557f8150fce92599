"""`sinkscope train-lm` and `sinkscope plot-trace`: thin typer front ends over `sinkscope.toy.tinylm`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sinkscope.cli.options import (
    BatchOpt,
    DataOpt,
    DeviceOpt,
    OutPathOpt,
    OverwriteOpt,
    SeedOpt,
    console,
    described,
    progress_bars,
    renamed,
    user_errors,
)
from sinkscope.errors import SinkscopeError

if TYPE_CHECKING:
    from rich.table import Table

VARIANT_HELP = "Attention variant: softmax, off_by_one, sink_logit or gated."
SYNTHETIC_HELP = ("Synthetic task, alone or mixed with --data: bigram_backcopy or trigger_recall; text_recall (mixed "
                  "with --data only).")


@user_errors
def train_lm(
    data: described(DataOpt, ": text to train on, a .txt file (one document), a .jsonl file (its 'text' fields) or "
                             "a folder (its .txt/.jsonl files and each subfolder's test.jsonl, e.g. /work/shared/data)"
                    ) = None,
    synthetic: Annotated[str | None, typer.Option(help=SYNTHETIC_HELP)] = None,
    synthetic_frac: Annotated[float, typer.Option(
        help="Share of each batch from the synthetic task when --data is also given.")] = 0.5,
    synthetic_triggers: Annotated[int, typer.Option(
        help="Trigger tokens of bigram_backcopy (with --data: dedicated tokens <bb0>… added to the tokenizer).")
    ] = 3,
    out: described(OutPathOpt, ": the run folder (checkpoints, final model/, trace.parquet, manifest.json)"
                   ) = Path("runs/tinylm"),
    overwrite: OverwriteOpt = False,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1000,
    batch_size: described(BatchOpt, ": sequences per optimizer step") = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence, BOS included.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW; warmup 5%, cosine to 10%).")] = 3e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay on matrices and embeddings.")] = 0.1,
    d_model: Annotated[int, typer.Option(help="Hidden size.")] = 128,
    n_layers: Annotated[int, typer.Option("--n-layers", help="Decoder layers.")] = 4,
    n_heads: Annotated[int, typer.Option("--n-heads", help="Attention heads per layer.")] = 4,
    vocab_size: Annotated[int, typer.Option(help="Byte-level BPE vocabulary size (text data).")] = 2048,
    variant: Annotated[str, typer.Option(help=VARIANT_HELP)] = "softmax",
    seed: described(SeedOpt, " (initialisation and batches)") = 0,
    eval_every: Annotated[int, typer.Option(help="Trace (and checkpoint) every N steps.")] = 100,
    eval_batch: Annotated[int, typer.Option(help="Held-out sequences in the fixed trace batch.")] = 16,
    device: DeviceOpt = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="bf16 autocast (default: on for cuda).")
                    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in --out from its last checkpoint (its saved options; --steps may grow)."
    )] = False,
    layers: Annotated[int | None, typer.Option("--layers", hidden=True)] = None,
    heads: Annotated[int | None, typer.Option("--heads", hidden=True)] = None,
) -> None:
    """Train a small Llama-style LM (RoPE, RMSNorm, SwiGLU, BOS first) and trace attention-sink emergence.

    It trains on one device: CUDA when present, unless --device says otherwise."""
    from sinkscope.toy.tinylm import TrainConfig, check_synthetic, check_variant, summarise, train

    n_layers = renamed(n_layers, layers)
    n_heads = renamed(n_heads, heads)
    if device == "auto":
        raise SinkscopeError("train-lm trains on one device: pass --device cpu, cuda or cuda:N (default: CUDA when "
                             "present); --device auto (model parallel) is for loading models")
    check_variant(variant)
    check_synthetic(synthetic)
    if data is not None and not Path(data).exists():
        raise SinkscopeError(f"--data {data} does not exist: pass a .txt or .jsonl file or a folder of them")
    if threads is not None:
        import torch

        if not 1 <= threads <= (os.cpu_count() or 1):
            raise SinkscopeError(f"--threads {threads}: pass 1 to {os.cpu_count() or 1}, the CPUs of this machine")
        torch.set_num_threads(threads)
    cfg = TrainConfig(
        data=None if data is None else str(data), synthetic=synthetic, synthetic_frac=synthetic_frac,
        synthetic_triggers=synthetic_triggers, out=str(out),
        steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, weight_decay=weight_decay, d_model=d_model,
        layers=n_layers, heads=n_heads, vocab_size=vocab_size, variant=variant, seed=seed, eval_every=eval_every,
        eval_batch=eval_batch, device=device or "auto", bf16=bf16,
    )
    if not resume:
        cfg.validate()
    with progress_bars() as update:
        result = train(cfg, resume=resume, progress=update, log=console.print, overwrite=overwrite)
    if result.final is not None:
        console.print(summary_table(summarise(result.final)))
    console.print(f"wrote {result.out}/ (model/, checkpoint/, trace.parquet, manifest.json) in "
                  f"{result.elapsed_s:.0f} s; plot it with: sinkscope plot-trace {result.out}")


def summary_table(summary: dict) -> Table:
    """Per-layer sink figures (from `tinylm.summarise`) as a rich table."""
    from rich.table import Table

    table = Table(title=f"held-out loss {summary['eval_loss']:.3f} nats/token")
    for name in ("layer", "α₀ mean", "heads α₀>0.2", "heads α₀>0.3", "‖h₀‖/median", "null mass"):
        table.add_column(name, justify="right")
    for row in summary["layers"]:
        table.add_row(str(row["layer"]), f"{row['alpha0_mean']:.3f}", f"{row['share_02']:.0%}",
                      f"{row['share_03']:.0%}", f"{row['norm_ratio']:.2f}", f"{row['null_mass']:.3f}")
    return table


@user_errors
def plot_trace(
    run: Annotated[Path, typer.Argument(help="A run folder written by train-lm (or its trace.parquet).")],
    out: described(OutPathOpt, ": the PNG (default: RUN/trace.png)") = None,
    title: Annotated[str | None, typer.Option(help="Figure title.")] = None,
) -> None:
    """Plot a train-lm trace: α₀ and share of sink heads per layer, ‖h₀‖/median‖h‖, and loss against the step."""
    from sinkscope.report.figures.tinylm import draw_trace
    from sinkscope.toy.tinylm import read_trace

    if not run.exists():
        raise SinkscopeError(f"{run} does not exist: pass a folder written by `sinkscope train-lm`")
    trace = read_trace(run)
    target = out or ((run.parent if run.is_file() else run) / "trace.png")
    if target.is_dir():
        target = target / "trace.png"
    elif not target.suffix:
        target = target.with_suffix(".png")  # what matplotlib writes for a name without a suffix
    folder = run.parent if run.is_file() else run
    path = draw_trace(trace, target, title=title or f"tiny LM trace: {folder.resolve().name}")  # a name, not a path
    console.print(f"wrote {path}")
