"""Per-token cost of `sinkscope generate` against the model's own `model.generate`, measured side by side.

    python bench/generate.py                      # smollm2 (or the tiny Llama when it is absent), 256 new tokens
    python bench/generate.py --tokens 1024 --repeats 2

Ways, greedy, the same prompt and the same number of new tokens (EOS ignored), in one process, in turns (the ratio of
each turn is taken, then the median):
- generate:  `model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)` with the model's SDPA attention;
- decode:    `sinkscope.analyses.generate.generate` up to its last decode step: every generated token runs through
             `run_capture` (its row, entropy and next-token log-probabilities captured) and becomes `steps` rows;
- sinkscope: the whole analysis, i.e. decode plus the end: one capture of the whole sequence for the sink curves and
             the small tables.
Ratios, not seconds, are the result: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

PROMPT = ("A farmer has 17 sheep. All but 9 run away, then he buys twice as many as he has left. How many sheep does "
          "he have now? Think step by step before you answer.")


def load(name: str) -> Any:
    from sinkscope.errors import SinkscopeError
    from sinkscope.models import load_model

    try:
        return load_model(name)
    except SinkscopeError as err:
        print(f"({name} unavailable: {err}; using tiny:llama)", file=sys.stderr)
        return load_model("tiny:llama")


def plain(loaded: Any, ids: list[int], n: int) -> float:
    prompt = torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=0)
    return (time.perf_counter() - start) / n


def captured(loaded: Any, ids: list[int], n: int) -> tuple[float, float]:
    """Seconds per token up to the last decode step, and for the whole analysis."""
    from sinkscope.analyses.generate import GenerateSettings, generate

    marks: list[float] = []
    start = time.perf_counter()
    generate(loaded, [ids], GenerateSettings(max_new_tokens=n, stop_at_eos=False),
             progress=lambda task, done, total, **_: marks.append(time.perf_counter()) if done == total else None)
    end = time.perf_counter()
    return (marks[-1] - start) / n, (end - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = load(args.model)
    tok = loaded.tokenizer
    ids = (list(tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"])
           if getattr(tok, "chat_template", None) else list(tok(PROMPT)["input_ids"]))
    plain(loaded, ids, 4)
    captured(loaded, ids, 4)
    turns = []
    for _ in range(args.repeats):
        base = plain(loaded, ids, args.tokens)
        dec, whole = captured(loaded, ids, args.tokens)
        turns.append((base, dec, whole))
    base = statistics.median(b for b, _, _ in turns)
    print(f"sinkscope generate benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{loaded.info.name}, {len(ids)} prompt tokens + {args.tokens} new, {args.repeats} turns")
    print(f"model.generate {1000 * base:.1f} ms/token")
    print(f"decode / generate {statistics.median(d / b for b, d, _ in turns):.2f}")
    print(f"sinkscope / generate {statistics.median(w / b for b, _, w in turns):.2f}")


if __name__ == "__main__":
    main()
