"""Cost of detect-mask-renormalise per example (seed 000 claims about 5 ms per sample), next to a forward pass.

For prompts of n tokens: the time of Algorithm 1 on one last-token attention vector a [n] (one example at a time,
as `sinkscope eval` runs it), of the same on a batch [B, n] divided by B, and of the whole per-example
post-processing (mean over the last layer's heads of [L, H, n] rows, then DMR). The last line puts DMR next to one
forward pass of the model over a prompt of the same length, measured in the same run.

    python bench/dmr_cost.py                       # tiny:llama for the forward-pass reference
    python bench/dmr_cost.py --model smollm2 --lengths 64,256
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from sinkscope.analyses.mitigate import aggregate_rows, detect_mask_renormalise
from sinkscope.models import load_model

METHODS = ("zscore", "entropy_delta", "mean_multiple")


def attention_vector(n: int, gen: torch.Generator, batch: int | None = None) -> torch.Tensor:
    """A sink-shaped distribution: softmax of Gaussian scores with a large logit at position 0. → [n] or [B, n]."""
    shape = (n,) if batch is None else (batch, n)
    scores = torch.randn(shape, generator=gen)
    scores[..., 0] += 4.0
    return torch.softmax(scores, -1)


def per_call_ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, minimum) wall time of fn() in milliseconds, after a warm-up call. On a shared machine the minimum
    is the closer estimate of the cost itself, the median of what a run sees."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def cell(times: tuple[float, float], divide: int = 1, width: int = 20) -> str:
    """'median (min)' per example."""
    return f"{times[0] / divide:.4f} ({times[1] / divide:.4f})".rjust(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:llama", help="model for the forward-pass reference")
    parser.add_argument("--lengths", default="32,64,128,256,512,1024", help="prompt lengths n")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="B for the batched variant")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per example, median (min) of "
          f"{args.repeats} calls; (1): one example per call, (B={args.batch}): a batch per call, divided by B")
    header = f"{'n':>6} " + " ".join(f"{m + ' (1)':>20} {m + f' (B={args.batch})':>22}" for m in METHODS)
    print(header + f" {'rows→a→DMR zscore (1)':>22}")
    loaded = load_model(args.model)
    n_layers, n_heads = loaded.info.n_layers, loaded.info.n_heads
    for n in lengths:
        a = attention_vector(n, gen)
        batch = attention_vector(n, gen, args.batch)
        cells = []
        for method in METHODS:
            one = per_call_ms(lambda a=a, m=method: detect_mask_renormalise(a, m), args.repeats)
            many = per_call_ms(lambda b=batch, m=method: detect_mask_renormalise(b, m), max(20, args.repeats // 4))
            cells.append(f"{cell(one)} {cell(many, args.batch, 22)}")
        rows = torch.softmax(torch.randn(n_layers, n_heads, n, generator=gen), -1)  # [L, H, n]
        full = per_call_ms(lambda r=rows: detect_mask_renormalise(aggregate_rows(r), "zscore"), args.repeats)
        print(f"{n:>6} " + " ".join(cells) + f" {cell(full, width=22)}")
    n_ref = lengths[min(1, len(lengths) - 1)]
    ids = torch.randint(0, min(1000, loaded.model.config.vocab_size), (1, n_ref))
    with torch.inference_mode():
        forward = per_call_ms(lambda: loaded.model(input_ids=ids), max(5, args.repeats // 20))
    a = attention_vector(n_ref, gen)
    dmr = per_call_ms(lambda: detect_mask_renormalise(a, "zscore"), args.repeats)
    print(f"{args.model}: one forward pass over {n_ref} tokens {forward[0]:.2f} ms (min {forward[1]:.2f}); zscore "
          f"DMR {dmr[0]:.4f} ms (min {dmr[1]:.4f}) = {dmr[0] / forward[0]:.3%} of it "
          "(seed 000 claims about 5 ms per sample)")


if __name__ == "__main__":
    main()
