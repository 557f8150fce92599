"""Per-token cost of StreamingLLM's sink + window cache against the model's own incremental decode.

    python bench/stream.py                         # smollm2 (or the tiny Llama when it is absent), 512 tokens
    python bench/stream.py --tokens 1024 --window 64

Ways, on the same tokens, one token per forward, in one process, in turns (the ratio of each turn is taken, then
the median):
- decode:      the model's own loop — `model(input_ids=x_t, past_key_values=DynamicCache)`, log-softmax of the logits;
- sink_window: `sinkscope.analyses.stream.stream_nll(policy="sink_window")` with a budget of sink + window, so every
               token after the first sink + window evicts (the cache copy and the sinks' rotation are its extra cost).
Target (issue #16): sink_window ≤ 1.5× decode per token. Ratios, not seconds, are the result: these machines are
shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch


def load(name: str) -> Any:
    from sinkscope.errors import SinkscopeError
    from sinkscope.models import load_model

    try:
        return load_model(name)
    except SinkscopeError as err:
        print(f"({name} unavailable: {err}; using tiny:llama)", file=sys.stderr)
        return load_model("tiny:llama")


def decode(loaded: Any, ids: list[int]) -> float:
    from transformers import DynamicCache

    model = loaded.model
    cache = DynamicCache(config=model.config)
    tokens = torch.tensor(ids)
    start = time.perf_counter()
    with torch.inference_mode():
        for t in range(len(ids) - 1):
            out = model(input_ids=tokens[t : t + 1][None], past_key_values=cache, use_cache=True)
            torch.log_softmax(out.logits[0, -1].float(), dim=-1)[tokens[t + 1]]
    return (time.perf_counter() - start) / (len(ids) - 1)


def streamed(loaded: Any, ids: list[int], sink: int, window: int) -> float:
    from sinkscope.analyses.stream import stream_nll

    start = time.perf_counter()
    stream_nll(loaded, ids, "sink_window", sink=sink, window=window)
    return (time.perf_counter() - start) / (len(ids) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    from sinkscope.analyses.stream import context_length

    loaded = load(args.model)
    text = "Attention sinks are tokens that draw a large share of attention while carrying little meaning. " * 200
    n = min(args.tokens, context_length(loaded) or args.tokens)
    ids = loaded.tokenizer(text)["input_ids"][:n]
    decode(loaded, ids[:16])
    streamed(loaded, ids[:16], args.sink, 4)
    turns = []
    for _ in range(args.repeats):
        base = decode(loaded, ids)
        mine = streamed(loaded, ids, args.sink, args.window)
        turns.append((base, mine))
    ratio = statistics.median(m / b for b, m in turns)
    base = statistics.median(b for b, _ in turns)
    print(f"sinkscope stream benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{loaded.info.name}, {len(ids)} tokens, sink {args.sink} + window {args.window}")
    print(f"decode {1000 * base:.1f} ms/token")
    print(f"sink_window / decode {ratio:.2f}")


if __name__ == "__main__":
    main()
