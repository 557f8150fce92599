"""Capture cost vs a plain SDPA forward and vs eager `output_attentions`, measured side by side in one run.

    python bench/capture_overhead.py [--shape gpt2|llama] [--lengths 128 512 2048] [--batch 1] [--device cpu]

For random models of GPT-2-small shape (12 layers × 12 heads, d = 768) or a Llama shape with GQA (12 layers,
12 heads, 4 KV heads, d = 768), prints per prompt length the median time of: a plain SDPA forward, a full profile
capture (key mass, last-token rows, entropies) with the native output, the same with `fused=True`, and eager
`output_attentions=True`; the ratios to the plain forward; and the extra peak memory of each over the plain forward
(peak RSS on CPU, `max_memory_allocated` on CUDA). Each way runs in its own process so peaks do not mix. Ratios only:
these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

MODES = ("plain", "capture", "fused", "eager")


def build(shape: str, n: int, device: str, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if shape == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=max(n, 1024)))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                                             hidden_size=768, intermediate_size=2048, max_position_embeddings=n + 1))
    return model.to(device=device, dtype=dtype).eval()


def worker(mode: str, shape: str, n: int, batch: int, repeats: int, device: str, dtype_name: str) -> dict:
    """Time one way of running the model and measure its peak memory above the loaded model."""
    from sinkscope.capture import CaptureConfig, capture_session

    dtype = getattr(torch, dtype_name)
    model = build(shape, n, device, dtype)
    ids = torch.randint(0, 1000, (batch, n), device=device)
    mask = torch.ones_like(ids)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def run() -> None:
        with torch.inference_mode():
            if mode == "plain":
                model(ids)
            elif mode == "eager":
                model.set_attn_implementation("eager")
                model(ids, output_attentions=True)
                model.set_attn_implementation("sdpa")
            else:
                rows = torch.full((batch, 1), n - 1, device=device)
                with capture_session(model, CaptureConfig(fused=mode == "fused"), mask, rows):
                    model(ids)
        if device == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"mode": mode, "time": statistics.median(times), "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, n = args.worker.split(":")
        print(json.dumps(worker(mode, args.shape, int(n), args.batch, args.repeats, args.device, args.dtype)))
        return
    print(f"shape {args.shape}, batch {args.batch}, {args.device} {args.dtype}, median of {args.repeats}")
    print(f"{'tokens':>7} " + " ".join(f"{m + ' s':>10}" for m in args.modes)
          + " " + " ".join(f"{m + '/plain':>13}" for m in args.modes if m != "plain")
          + " " + " ".join(f"{'+MB ' + m:>13}" for m in args.modes if m != "plain"))
    for n in args.lengths:
        res = {}
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--worker", f"{mode}:{n}", "--shape", args.shape, "--batch",
                   str(args.batch), "--repeats", str(args.repeats), "--device", args.device, "--dtype", args.dtype]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                res[mode] = {"time": float("nan"), "peak": float("nan")}
                print(f"  {mode} at {n} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        plain = res.get("plain", {"time": float("nan"), "peak": 0.0})
        line = f"{n:>7} " + " ".join(f"{res[m]['time']:>10.3f}" for m in args.modes)
        line += " " + " ".join(f"{res[m]['time'] / plain['time']:>13.2f}" for m in args.modes if m != "plain")
        line += " " + " ".join(f"{(res[m]['peak'] - plain['peak']) / 2**20:>13.0f}" for m in args.modes if m != "plain")
        print(line, flush=True)


if __name__ == "__main__":
    main()
