"""What explain, eval's causal effects, calibrate and bench-mitigation cost next to plain forward passes of the inputs
they run (issue #16 targets 4 and 5).

    python bench/commands.py                     # smollm2 (or the GPT-2-small shape), 3 turns, time and memory
    python bench/commands.py --model gpt2-shape  # the random GPT-2-small shape
    python bench/commands.py --no-memory         # time only

`bench/analyses.py --quick` prints the same ratios (`quick_lines`, one turn, GPT-2-small shape, no memory).

Ways, each beside the plain forward passes of the same inputs, in one process, in turns (a ratio per turn, then the
median; in each turn the plain call runs just before and just after the command, and their mean is the reference):
- explain:          `explain(loaded, text)` on one prompt of n tokens (one input variant) / a plain forward of its ids
                    (`model(input_ids=ids, use_cache=False)`). Target ≤ 1.15.
- eval-causal:      `causal_effects(loaded, prompt, target)` (mask mode: one masked variant per prompt token, run in
                    batches) / (n × a plain forward of prompt + target): the ratio to one forward per token.
- calibrate:        `search_heads` on sst2 examples (layers 0 and 1, --quick layer 0; then the heads of the best
                    layer, if one helps) / (passes × the plain prediction pass `predict(loaded, spec, examples)`),
                    passes = the baseline, one per trial and the calibrated heads. Target ≤ 1.15.
- bench-mitigation: `mitigation_benchmark` on the same examples / (variants × `predict_with_loss`), variants = the
                    methods that change the forward pass (none, mask_pos0, reweight, act_all). Each method's pass
                    gives the predictions and the prompts' loss, so the plain pass it is measured against gives both:
                    the model's own forward with logits at every position (as `model(ids)` returns them, and as the
                    plain forward of every other row here), the loss and the label scoring. `predict` alone keeps
                    logits at the last tokens only: on smollm2 (49,152-token vocabulary) that is a quarter cheaper.
                    Target ≤ 1.15.
Memory (fresh process per way, glibc's mmap threshold at 64 KiB so RSS follows live tensors): the extra peak of each
way over the RSS before it, against the extra peak of the plain pass it is compared with. Target ≤ 1.10.
Ratios, not seconds, are the result: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analyses import load, peak, prompt_of, reset_peak, rss  # bench/ is not a package: its folder is on sys.path

COMMANDS = ("explain", "eval-causal", "calibrate", "bench-mitigation")


def examples(loaded: Any, n: int) -> tuple[Any, list[Any]] | None:
    """sst2's spec and n seeded examples from ../shared/data, or None when the data is absent."""
    from sinkscope.analyses.evaluate.datasets import get_spec, load_examples, sample
    from sinkscope.errors import SinkscopeError

    try:
        spec = get_spec("sst2")
        return spec, sample(load_examples(spec, None).examples, n, 0)
    except SinkscopeError:
        return None


def ways(loaded: Any, tokens: int, n_examples: int, causal_tokens: int, calib_layers: tuple[int, ...] = (0, 1)
         ) -> dict[str, tuple[Callable, Callable, Any]]:
    """name → (the command's call, the plain call it is measured against, the number of plain calls it may cost;
    a callable of the command's result where that number comes from the run)."""
    from sinkscope.analyses.calibrate import mitigation_benchmark, predict, search_heads
    from sinkscope.analyses.evaluate.causal import causal_effects
    from sinkscope.analyses.explain import explain

    model = loaded.model
    text = prompt_of(loaded, tokens)
    ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])
    prompt = loaded.tokenizer(prompt_of(loaded, causal_tokens))["input_ids"]
    target = prompt[-2:]
    seq = torch.tensor([prompt + target[:-1]])
    out: dict[str, tuple[Callable, Callable, Any]] = {
        "explain": (lambda: explain(loaded, text), lambda: model(input_ids=ids, use_cache=False), 1),
        "eval-causal": (lambda: causal_effects(loaded, prompt, target), lambda: model(input_ids=seq, use_cache=False),
                        len(prompt)),
    }
    data = examples(loaded, n_examples)
    if data is not None:
        spec, chosen = data

        def plain() -> Any:
            return predict(loaded, spec, chosen)

        def passes(calibration: Any) -> int:  # the baseline, every trial, the calibrated heads
            return 1 + len(calibration.search) + (calibration.calibrated_accuracy is not None)

        out["calibrate"] = (lambda: search_heads(loaded, spec, chosen, layers=list(calib_layers),
                                                        top_layers=1), plain, passes)
        out["bench-mitigation"] = (lambda: mitigation_benchmark(loaded, spec, chosen),
                                   lambda: predict_with_loss(loaded, spec, chosen), 4)
    return out


def predict_with_loss(loaded: Any, spec: Any, chosen: list[Any], batch_size: int = 8) -> tuple[torch.Tensor, float]:
    """Without sinkscope, what one mitigation method's pass gives: the predicted label per example and the prompts'
    mean next-token loss. Per batch of similar length (as `predict`): the model's own forward with logits at every
    position, the loss from them, and the label scoring from the last tokens' log-probabilities."""
    from sinkscope.analyses.calibrate import _length_batches, _prompts
    from sinkscope.analyses.evaluate.classify import label_token_ids, score_labels
    from sinkscope.capture.trace import forward_inputs, next_token_nll, pad_batch, padding_id

    prompts = _prompts(loaded, spec, chosen)
    labels = label_token_ids(loaded.tokenizer, spec.labels, spec.answer_prefix)
    preds = torch.empty(len(prompts), dtype=torch.long)
    nll = count = 0.0
    for idx in _length_batches([len(p) for p in prompts], batch_size):
        batch = [prompts[i] for i in idx]
        ids, mask, _ = pad_batch(batch, padding_id(loaded.tokenizer), "right")
        logits = loaded.model(**forward_inputs(loaded.model, ids, mask, loaded.device)).logits  # [b, n, V]
        last = mask.sum(-1) - 1  # [b]
        first = torch.log_softmax(logits[torch.arange(len(batch)), last.to(logits.device)].float(), -1).cpu()
        total, n = next_token_nll(logits, ids, mask)
        nll, count = nll + float(total.sum()), count + float(n.sum())
        preds[idx] = score_labels(loaded, batch, labels, first, "right", batch_size).argmax(-1)
    return preds, nll / max(1.0, count)


def timed(fn: Callable) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def time_ratios(loaded: Any, repeats: int, tokens: int = 512, n_examples: int = 8, causal_tokens: int = 48,
                only: tuple[str, ...] = COMMANDS, calib_layers: tuple[int, ...] = (0, 1)) -> dict[str, float]:
    """Median over turns of (the command's time) / (passes × its plain call's time), per command."""
    runs = {k: v for k, v in ways(loaded, tokens, n_examples, causal_tokens, calib_layers).items() if k in only}
    with torch.inference_mode():
        for name, (command, plain, _) in runs.items():  # warm-up: kernels, the attention switch
            plain()
            if name in ("explain", "eval-causal"):  # (calibrate and bench-mitigation are long: no second run)
                command()
        ratios: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for name, (command, plain, count) in runs.items():
                before, _ = timed(plain)
                spent, result = timed(command)
                after, _ = timed(plain)  # the plain pass on both sides: a drift in machine speed hits both alike
                n = count(result) if callable(count) else count
                ratios[name].append(spent / (n * (before + after) / 2))
    return {k: statistics.median(v) for k, v in ratios.items()}


def quick_lines(loaded: Any) -> list[str]:
    """`<command> <ratio>` for bench/analyses.py --quick: one turn on small inputs (one sst2 example; calibrate
    searches layer 0)."""
    ratios = time_ratios(loaded, repeats=1, tokens=512, n_examples=1, causal_tokens=32, calib_layers=(0,))
    return [f"{name} {ratio:.2f}" for name, ratio in ratios.items()]


def memory_worker(model: str, way: str, plain: bool, tokens: int, n_examples: int, causal_tokens: int) -> dict:
    """Extra peak RSS of one call (the command, or its plain pass), after a warm-up call."""
    loaded = load(model)
    command, base, _ = ways(loaded, tokens, n_examples, causal_tokens)[way]
    fn = base if plain else command
    with torch.inference_mode():
        fn()
        before = rss()
        reset_peak()
        fn()
    return {"extra": max(0, peak() - before)}


def _sub(*args: str) -> dict | None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"  ({' '.join(args)} failed: {(out.stderr.strip().splitlines() or ['killed'])[-1]})", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=512, help="explain's prompt")
    parser.add_argument("--examples", type=int, default=16, help="calibrate's and bench-mitigation's sst2 examples")
    parser.add_argument("--causal-tokens", type=int, default=64, help="the causal-effects prompt")
    parser.add_argument("--ways", default=",".join(COMMANDS))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-worker", nargs=2, metavar=("WAY", "PLAIN"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    sizes = (args.tokens, args.examples, args.causal_tokens)
    if args.memory_worker:
        way, plain = args.memory_worker
        print(json.dumps(memory_worker(args.model, way, plain == "plain", *sizes)))
        return
    only = tuple(w for w in args.ways.split(",") if w in COMMANDS)
    loaded = load(args.model)
    ratios = time_ratios(loaded, args.repeats, *sizes, only=only)
    print(f"sinkscope commands benchmark: {loaded.info.name}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, median of {args.repeats} turns, load {os.getloadavg()[0]:.1f}")
    print("| command | time / (passes × plain) | extra memory / plain's |")
    print("| --- | --- | --- |")
    for name, ratio in ratios.items():
        memory = "not measured"
        if not args.no_memory:
            base = _sub("--model", args.model, *_size_args(sizes), "--memory-worker", name, "plain")
            mine = _sub("--model", args.model, *_size_args(sizes), "--memory-worker", name, "command")
            if base and mine:
                memory = (f"{mine['extra'] / max(base['extra'], 1):.2f} ({mine['extra'] / 2**20:.0f} MB vs "
                          f"{base['extra'] / 2**20:.0f} MB)")
        print(f"| {name} | {ratio:.2f} | {memory} |", flush=True)


def _size_args(sizes: tuple[int, int, int]) -> list[str]:
    return ["--tokens", str(sizes[0]), "--examples", str(sizes[1]), "--causal-tokens", str(sizes[2])]


if __name__ == "__main__":
    main()
