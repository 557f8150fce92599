"""Train the four attention variants of `sinkscope.toy.tinylm` with one budget and compare their sinks.

Each variant (softmax, off_by_one, sink_logit, gated) is trained with the same data, seed, model size and steps into
OUT/<variant>/ (a normal `sinkscope train-lm` run folder, plot it with `sinkscope plot-trace`); the final held-out
statistics are printed side by side and written to OUT/compare.md and OUT/compare.csv.

    python scripts/compare_variants.py --data /work/shared/data --out runs/variants --steps 300

Columns: held-out loss; α₀ = mean attention on position 0 (mean over heads of layers ≥ 1); the share of heads of
layers ≥ 1 with α₀ > 0.2 and > 0.3; the null mass (mean 1 − Σ_j A_ij, the attention that the extra or learned logit
absorbs; 0 for softmax and gated); ‖h₀‖ / median ‖hᵢ‖ (mean over layers ≥ 1).
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from sinkscope.toy.tinylm import VARIANTS, TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data",
                    help="text file or folder (see sinkscope train-lm); 'none' for the synthetic task alone")
    ap.add_argument("--synthetic", default=None, help="synthetic task to mix in (bigram_backcopy)")
    ap.add_argument("--synthetic-frac", type=float, default=0.5)
    ap.add_argument("--synthetic-triggers", type=int, default=3)
    ap.add_argument("--out", default="runs/variants")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    base = TrainConfig(
        data=None if args.data == "none" else args.data, synthetic=args.synthetic, synthetic_frac=args.synthetic_frac,
        synthetic_triggers=args.synthetic_triggers, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, d_model=args.d_model, layers=args.layers, heads=args.heads,
        vocab_size=args.vocab_size, lr=args.lr, weight_decay=args.weight_decay, eval_every=args.eval_every,
        seed=args.seed, device=args.device,
    )
    rows = []
    for variant in args.variants.split(","):
        run = out / variant
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        result = train(replace(base, variant=variant, out=str(run)).validate(),
                       log=lambda msg, v=variant: print(f"[{v}] {msg}", flush=True))
        stats = result.final
        alpha = stats.alpha0()
        later = alpha[1:] if alpha.shape[0] > 1 else alpha
        rows.append({
            "variant": variant,
            "eval_loss": round(stats.loss, 3),
            "alpha0_l>=1": round(float(later.mean()), 3),
            "heads_a0>0.2": round(float((later > 0.2).float().mean()), 3),
            "heads_a0>0.3": round(float((later > 0.3).float().mean()), 3),
            "null_mass": round(float(stats.null_mass.mean(0)[1:].mean()), 3),
            "norm_ratio": round(float(stats.norm_ratio()[1:].mean()), 2),
            "seconds": round(time.perf_counter() - t0, 1),
        })
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "compare.csv", index=False)
    settings = (f"steps {args.steps}, batch {args.batch_size}×{args.seq_len}, d_model {args.d_model}, "
                f"{args.layers} layers × {args.heads} heads, lr {args.lr}, wd {args.weight_decay}, seed {args.seed}, "
                f"data {args.data}"
                + (f" + {args.synthetic} ({args.synthetic_triggers} triggers)" if args.synthetic else ""))
    (out / "compare.md").write_text(f"{settings}\n\n{table.to_markdown(index=False)}\n"
                                    if _has_tabulate() else f"{settings}\n\n{table.to_string(index=False)}\n")
    print(settings)
    print(table.to_string(index=False))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
