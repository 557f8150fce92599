"""What a full sinkscope profile costs next to a plain SDPA forward and to eager `output_attentions`.

    python bench/capture.py                 # the full table (GPT-2-small and Llama/GQA shapes, 128/512/2048, b 1 and 8)
    python bench/capture.py --quick         # < 45 s: profile / plain at 512 tokens, on the last line
    python bench/capture.py --long 16384    # peak memory of plain vs profile on one 16,384-token prompt
    python bench/capture.py --device cuda --dtype bfloat16

Ways of running the same random model on the same token ids, all with `use_cache=False`:
- plain:   the model's own SDPA forward;
- profile: the forward under a sinkscope capture session collecting what `sinkscope profile` needs for every layer and
           head — key mass (sum and query count), the last token's row, the entropy of every row — with the layer
           output computed from the same float32 chunks (`fused`, the default);
- native:  the same statistics, but the layer output from the native SDPA kernel as well (`fused=False`);
- eager:   `attn_implementation="eager"` with `output_attentions=True` (skipped, with the memory it would need, when
           its attention maps alone would take more than half the free memory).

Time: one process per (shape, batch, length) builds the model once and runs the ways in turns (warm-up first), so a
change in machine load hits every way alike; each ratio is the median over turns of that turn's time / plain's time.
Memory: each way runs once in a fresh process; extra peak is its peak minus the plain forward's peak (peak RSS on CPU,
with glibc's mmap threshold fixed at 64 KiB so RSS follows live tensors; `max_memory_allocated` on CUDA). Ratios,
not seconds, are the result: these machines are shared and noisy.

Shapes: gpt2 = GPT-2 small (12 layers × 12 heads, d = 768, vocabulary 50,257); llama = 12 layers, 12 query heads
sharing 4 KV heads (GQA), d = 768, MLP 2,048, vocabulary 32,000.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

WAYS = ("plain", "profile", "native", "eager")


def build(shape: str, n: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if shape == "gpt2":
        config = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=max(n, 1024))
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, hidden_size=768,
                             intermediate_size=2048, max_position_embeddings=max(n, 1024), vocab_size=32000)
        model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model.to(device=device, dtype=dtype).eval()


def eager_map_bytes(shape: str, batch: int, n: int) -> int:
    """Bytes of the attention maps `output_attentions` returns: layers × batch × heads × n² float32."""
    return 12 * batch * 12 * n * n * 4


def runner(model: torch.nn.Module, way: str, ids: torch.Tensor, device: str):
    """A closure running one forward of `way` (synchronised on CUDA)."""
    from sinkscope.capture import CaptureConfig
    from sinkscope.capture.attention import capture_session  # the engine alone, without run_capture's batching

    batch, n = ids.shape
    mask = torch.ones_like(ids)
    rows = torch.full((batch, 1), n - 1, device=device)
    config = CaptureConfig(rows="last", entropy=True, fused=way == "profile")

    def run() -> None:
        with torch.inference_mode():
            if way == "plain":
                model(ids, use_cache=False)
            elif way == "eager":
                model.set_attn_implementation("eager")
                try:
                    model(ids, use_cache=False, output_attentions=True)
                finally:
                    model.set_attn_implementation("sdpa")
            else:
                with capture_session(model, config, mask, rows) as session:
                    model(ids, use_cache=False)
                assert len(session.records) == 12
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def free_bytes(device: str) -> int:
    from sinkscope.capture import free_memory

    return free_memory(torch.device(device)) or 2**40


def time_worker(shape: str, n: int, batch: int, repeats: int, device: str, dtype: str, ways: list[str]) -> dict:
    """Times of each way, run in turns in this one process."""
    model = build(shape, n, device, getattr(torch, dtype))
    ids = torch.randint(0, 1000, (batch, n), device=device)
    skipped = {}
    if "eager" in ways and eager_map_bytes(shape, batch, n) > free_bytes(device) // 2:
        skipped["eager"] = eager_map_bytes(shape, batch, n)
        ways = [w for w in ways if w != "eager"]
    runs = {way: runner(model, way, ids, device) for way in ways}
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way, run in runs.items():
            start = time.perf_counter()
            run()
            times[way].append(time.perf_counter() - start)
    result = {"times": {w: statistics.median(t) for w, t in times.items()}, "skipped": skipped}
    if "plain" in times:
        result["ratios"] = {w: statistics.median(a / p for a, p in zip(t, times["plain"], strict=True))
                            for w, t in times.items() if w != "plain"}
    return result


def memory_worker(way: str, shape: str, n: int, batch: int, device: str, dtype: str) -> dict:
    """Peak memory of one forward of `way`, in this fresh process."""
    model = build(shape, n, device, getattr(torch, dtype))
    runner(model, way, torch.randint(0, 1000, (batch, 16), device=device), device)()  # load kernels and libraries
    ids = torch.randint(0, 1000, (batch, n), device=device)
    run = runner(model, way, ids, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak": peak, "time": seconds}


def _sub(args: argparse.Namespace, *extra: str) -> dict | None:
    cmd = [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype, *extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if "--memory-worker" in extra:
        # A fixed mmap threshold makes glibc return freed blocks over 64 KiB to the system at once, so peak RSS
        # measures live tensors; with its default (a threshold that rises with every large free) the heap keeps
        # freed memory and peak RSS of the *same* forward varies by ±200 MB from run to run. Same for every way.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["killed"])[-1]
        print(f"  ({' '.join(extra)} failed: {tail})", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def timing_table(args: argparse.Namespace, shapes: list[str], batches: list[int], lengths: list[int],
                 ways: list[str]) -> list[dict]:
    others = [w for w in ways if w != "plain"]
    print(f"\nTime ({args.device}, {args.dtype}; median of {args.repeats} turns; ratios to plain SDPA; "
          "eager/profile = how many times faster the profile is than output_attentions)")
    head = f"{'shape':<6} {'batch':>5} {'tokens':>6} {'plain s':>8} " + " ".join(f"{w + '/plain':>13}" for w in others)
    if "eager" in ways and "profile" in ways:
        head += f" {'eager/profile':>13}"
    print(head)
    results = []
    for shape in shapes:
        for batch in batches:
            for n in lengths:
                res = _sub(args, "--time-worker", f"{shape}:{n}:{batch}", "--repeats", str(args.repeats),
                           "--ways", *ways)
                if res is None:
                    continue
                ratios = res.get("ratios", {})
                line = f"{shape:<6} {batch:>5} {n:>6} {res['times'].get('plain', float('nan')):>8.3f} "
                cells = []
                for w in others:
                    if w in res["skipped"]:
                        cells.append(f"{'(' + format(res['skipped'][w] / 2**30, '.0f') + ' GB)':>13}")
                    else:
                        cells.append(f"{ratios.get(w, float('nan')):>13.2f}")
                line += " ".join(cells)
                if "eager" in ratios and "profile" in ratios:
                    line += f" {ratios['eager'] / ratios['profile']:>13.2f}"
                print(line, flush=True)
                results.append({"shape": shape, "batch": batch, "n": n, **res})
    return results


def memory_table(args: argparse.Namespace, shape: str, lengths: list[int], ways: list[str]) -> None:
    print(f"\nPeak memory ({args.device}, {args.dtype}, {shape}, batch 1; one forward per fresh process; "
          "eager's attention maps alone shown when it is not run)")
    print(f"{'tokens':>7} {'plain MB':>9} " + " ".join(f"{w + ' +MB':>11} {w + ' +%':>9}" for w in ways if w != "plain")
          + f" {'profile s':>10} {'plain s':>8}")
    for n in lengths:
        res = {}
        for way in ways:
            if way == "eager" and eager_map_bytes(shape, 1, n) > free_bytes(args.device) // 2:
                res[way] = {"skip": eager_map_bytes(shape, 1, n)}
                continue
            res[way] = _sub(args, "--memory-worker", f"{way}:{shape}:{n}:1")
        plain = res.get("plain")
        if plain is None:
            continue
        cells = []
        for way in ways:
            if way == "plain":
                continue
            r = res.get(way)
            if r is None:
                cells.append(f"{'failed':>11} {'':>9}")
            elif "skip" in r:
                cells.append(f"{'>' + format(r['skip'] / 2**20, '.0f'):>11} {'':>9}")
            else:
                extra = r["peak"] - plain["peak"]
                cells.append(f"{extra / 2**20:>11.0f} {100 * extra / plain['peak']:>8.1f}%")
        prof = res.get("profile") or {}
        print(f"{n:>7} {plain['peak'] / 2**20:>9.0f} " + " ".join(cells)
              + f" {prof.get('time', float('nan')):>10.1f} {plain['time']:>8.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="profile vs plain at 512 tokens only (< 45 s)")
    parser.add_argument("--long", type=int, nargs="*", metavar="TOKENS",
                        help="only the peak-memory table, at these lengths (GPT-2 shape), e.g. --long 16384")
    parser.add_argument("--shapes", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--time-worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_worker:
        shape, n, batch = args.time_worker.split(":")
        print(json.dumps(time_worker(shape, int(n), int(batch), args.repeats, args.device, args.dtype, args.ways)))
        return
    if args.memory_worker:
        way, shape, n, batch = args.memory_worker.split(":")
        print(json.dumps(memory_worker(way, shape, int(n), int(batch), args.device, args.dtype)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    print(f"sinkscope capture benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.device} {args.dtype}")
    if args.quick:
        args.repeats = 3
        res = timing_table(args, ["gpt2"], [1], [512], ["plain", "profile"])
        if not res:
            sys.exit("the quick benchmark failed")
        print(f"headline: profile / plain SDPA forward at 512 tokens (gpt2 shape, batch 1) = "
              f"{res[0]['ratios']['profile']:.2f}x")
        return
    if args.long is not None:
        memory_table(args, "gpt2", args.long or [16384], [w for w in args.ways if w != "native"])
        return
    timing_table(args, args.shapes, args.batches, args.lengths, args.ways)
    memory_table(args, "gpt2", args.memory_lengths, args.ways)


if __name__ == "__main__":
    main()
