"""Capture cost vs a plain SDPA forward and vs eager `output_attentions`, measured side by side in one run.

    python bench/capture_overhead.py [--lengths 128 512] [--repeats 5] [--layers 12]

Prints, per prompt length, the median time of each way and the ratios capture/plain and eager/capture, for a
random GPT-2-small-shaped model (12 layers × 12 heads, d = 768). Ratios only: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sinkscope.capture import CaptureConfig
from sinkscope.models import load_model
from sinkscope.trace import run_capture


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_head=12, n_embd=768, n_positions=max(args.lengths) + 1)
    model = GPT2LMHeadModel(config).eval()
    from sinkscope.models import byte_tokenizer

    loaded = load_model(model, tokenizer=byte_tokenizer())
    print(f"{'tokens':>7} {'plain s':>8} {'capture s':>10} {'eager s':>8} {'capture/plain':>14} {'eager/capture':>14}")
    for n in args.lengths:
        text = "x" * (n - 1)  # the byte tokenizer gives one token per byte, plus BOS
        ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
        assert ids.shape[1] == n

        def plain(ids=ids) -> None:
            with torch.inference_mode():
                model(ids)

        def eager(ids=ids) -> None:
            model.set_attn_implementation("eager")
            with torch.inference_mode():
                model(ids, output_attentions=True)
            model.set_attn_implementation("sdpa")

        def capture(text=text) -> None:
            run_capture(loaded, [text], CaptureConfig())

        t_plain = _median_time(plain, args.repeats)
        t_capture = _median_time(capture, args.repeats)
        t_eager = _median_time(eager, args.repeats)
        print(f"{n:>7} {t_plain:>8.3f} {t_capture:>10.3f} {t_eager:>8.3f} {t_capture / t_plain:>14.2f} "
              f"{t_eager / t_capture:>14.2f}")


if __name__ == "__main__":
    main()
