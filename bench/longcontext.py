"""A 32,768-token profile on CPU against a plain forward of the same tokens: extra peak memory and time (issue #16
target 6).

    python bench/longcontext.py                   # 32,768 tokens, the ways one after another (long on 2 cores)
    python bench/longcontext.py --tokens 8192     # a shorter check
    python bench/longcontext.py --parallel        # the ways at once, one thread each (memory exact, time rough)

Model: the GPT-2-small shape with random weights (12 layers × 12 heads, d = 768) with n_positions raised to the
prompt's length and sinkscope's byte tokenizer (vocabulary 262, as `bench/analyses.py --quick`), so that the LM head is
small: with GPT-2's 50,257 tokens, logits at every position would add 6.6 GB at 32,768 tokens to the plain forward
and hide the profile's cost. One prompt: a text of n tokens. Ways, each in its own fresh process:
- plain:   `model(input_ids=ids, use_cache=False)` under no_grad: the model's own SDPA forward, logits included;
- capture: `run_capture(loaded, [ids])` with the profile's CaptureConfig (key mass, last row, entropy): the trace;
- profile: `profile(loaded, [text])`, the public API end to end (tokenise, capture, detector, tables).
Memory: peak RSS during the call minus RSS before it (model built, one 16-token warm-up), glibc's mmap threshold fixed
at 64 KiB so that RSS follows live tensors (as in bench/capture.py and bench/analyses.py). Extra = a way's peak − the
plain forward's peak; target ≤ 10 % of the plain forward's peak. Time: one call per way, so the ratio is one sample,
not a median; with --parallel the ways share the cores and the time ratio is rougher still.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from analyses import peak, reset_peak, rss  # bench/ is not a package: its folder is on sys.path

WAYS = ("plain", "capture", "profile")


def build(n: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    from sinkscope.models import LoadedModel, model_info
    from sinkscope.models.tiny import byte_tokenizer

    torch.manual_seed(0)
    tok = byte_tokenizer()
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=n, vocab_size=len(tok))
    model = GPT2LMHeadModel(config).eval()
    model.set_attn_implementation("sdpa")
    model.config._name_or_path = "gpt2-shape"
    return LoadedModel(model=model, tokenizer=tok, info=model_info(model, tok, "gpt2-shape"))


TEXT = ("Attention sinks are tokens that draw a large share of attention while carrying little meaning. "
        "The first token of a prompt, a full stop, a separator or a background patch can each become one. ")


def text_of(loaded, n: int) -> str:
    """A text of n tokens (special tokens included)."""
    tok = loaded.tokenizer
    ids = tok(TEXT * (n // 150 + 2), add_special_tokens=False)["input_ids"][: n - int(loaded.info.adds_bos)]
    return tok.decode(ids)


def call(loaded, way: str, text: str) -> None:
    from sinkscope.analyses.profile import profile
    from sinkscope.capture import CaptureConfig, run_capture

    if way == "plain":
        ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])
        loaded.model(input_ids=ids, use_cache=False)
    elif way == "capture":
        run_capture(loaded, [text], CaptureConfig())
    else:
        profile(loaded, [text])


def worker(way: str, n: int) -> dict:
    torch.set_grad_enabled(False)
    loaded = build(n)
    call(loaded, way, text_of(loaded, 16))  # kernels and libraries loaded
    text = text_of(loaded, n)
    before = rss()
    reset_peak()
    start = time.perf_counter()
    call(loaded, way, text)
    seconds = time.perf_counter() - start
    return {"way": way, "before": before, "peak": peak(), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    parser.add_argument("--parallel", action="store_true", help="run the ways at once, one thread each")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens)))
        return
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    if args.parallel:
        env["OMP_NUM_THREADS"] = "1"
    print(f"sinkscope long context: gpt2-shape, {args.tokens} tokens, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f}{', ways in parallel, 1 thread each' if args.parallel else ''}", flush=True)
    cmds = {w: [sys.executable, __file__, "--tokens", str(args.tokens), "--worker", w] for w in args.ways}
    if args.parallel:
        procs = {w: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for w, c in cmds.items()}
        outs = {w: (*p.communicate(), p.returncode) for w, p in procs.items()}
    else:
        outs = {}
        for w, c in cmds.items():
            done = subprocess.run(c, capture_output=True, text=True, env=env)
            outs[w] = (done.stdout, done.stderr, done.returncode)
    res = {}
    for w, (out, err, code) in outs.items():
        if code != 0:
            print(f"  ({w} failed: {(err.strip().splitlines() or ['killed'])[-1]})", file=sys.stderr)
            continue
        res[w] = json.loads(out.strip().splitlines()[-1])
    plain = res.get("plain")
    print(f"{'way':<8} {'peak MB':>8} {'+MB vs plain':>13} {'+% vs plain':>12} {'seconds':>8} {'time / plain':>13}")
    for w, r in res.items():
        extra = r["peak"] - plain["peak"] if plain else float("nan")
        pct = 100 * extra / plain["peak"] if plain else float("nan")
        ratio = r["seconds"] / plain["seconds"] if plain else float("nan")
        print(f"{w:<8} {r['peak'] / 2**20:>8.0f} {extra / 2**20:>13.0f} {pct:>11.1f}% {r['seconds']:>8.1f} "
              f"{ratio:>13.2f}", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
