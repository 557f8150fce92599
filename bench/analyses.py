"""What `tags` and `mechanisms` cost next to `profile` on the same prompt, now that all three run on one capture path.

    python bench/analyses.py                      # smollm2 (or the GPT-2-small shape), 1,024 and 4,096 tokens
    python bench/analyses.py --lengths 1024       # one length
    python bench/analyses.py --model gpt2-shape   # the random GPT-2-small shape even when smollm2 is installed
    python bench/analyses.py --ways profile,tags  # a subset (mechanisms at 4,096 tokens takes long on 2 cores)
    python bench/analyses.py --quick              # < 60 s: `<command> <ratio>` lines on the GPT-2-small shape at
                                                  # 512 tokens, the last `profile-end-to-end <ratio>`

Ways, all through the public Python API on one prompt of n tokens:
- profile:    `profile(loaded, [text])` (capture + column_mass detector + tables);
- tags:       `tag_statistics(loaded, [text], eps=0.2)` (`sinkscope tags` without --geometry);
- mechanisms: `analyze(loaded, [text])` with its defaults (native pass with residual sites and the bias read, two
              BOS variants when the tokenizer has a BOS, one pass per ablated head and per ablated layer of layers 0
              and 1).

Time: one process loads the model once, warms every way up on a short prompt, then runs the ways in turns on the
n-token prompt; a way's ratio is the median over turns of its time / profile's time in the same turn. The target for
mechanisms is (number of input variants it runs) × profile's time, and the script prints that bound.
Memory: each way runs once in a fresh process; its extra peak is peak RSS during the call minus RSS before it (model
loaded and warmed up), with glibc's mmap threshold fixed at 64 KiB so RSS follows live tensors. Target: tags' and
mechanisms' extra peak within 1.1× profile's. Ratios, not seconds, are the result: these machines are shared and
noisy.

--quick (issue #16's check): one process, the random GPT-2-small shape, one 512-token prompt, in turns: a plain
forward of the prompt's token ids (the model's own SDPA, `model(input_ids=ids, use_cache=False)` under no_grad, logits
at every position included), `profile(loaded, [text])` end to end (tokenise, capture, detect, tables), `tag_statistics`
and `analyze` (native pass and BOS variants, so it stays short: no ablation), and `sinkscope profile --prompts FILE`
without and with `--out DIR` (Parquet tables and report.html) in this process, the model already loaded
(`cli_profile`). It prints `tags <ratio>` and `mechanisms <ratio>` (to profile, and the passes mechanisms ran),
`explain`, `eval-causal`, `calibrate` and `bench-mitigation <ratio>` (bench/commands.py, one turn: each to the plain
forward passes of the inputs it runs; eval-causal to one forward per token), `profile-cli <ratio>`,
`profile-cli-out <ratio>` and last `profile-end-to-end <ratio>` (all three to the plain forward; target ≤ 1.15).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

WAYS = ("profile", "tags", "mechanisms")
TEXT = ("Attention sinks are tokens that draw a large share of attention while carrying little meaning. "
        "The first token of a prompt, a full stop, a separator or a background patch can each become one. ")


def load(model: str) -> Any:
    """smollm2 when its package is installed (unless gpt2-shape is asked for), else a random GPT-2-small."""
    from sinkscope.errors import SinkscopeError
    from sinkscope.models import LoadedModel, load_model, model_info
    from sinkscope.models.tiny import byte_tokenizer

    if model != "gpt2-shape":
        try:
            return load_model(model)
        except SinkscopeError as err:
            print(f"({model} unavailable: {err}; using the GPT-2-small shape)", file=sys.stderr)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = byte_tokenizer()
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=8192, vocab_size=len(tok))
    net = GPT2LMHeadModel(config).eval()
    net.config._name_or_path = "gpt2-shape"
    return LoadedModel(model=net, tokenizer=tok, info=model_info(net, tok, "gpt2-shape"))


def prompt_of(loaded: Any, n: int) -> str:
    """A text of about n tokens (the decoded first n tokens of a repeated paragraph)."""
    tok = loaded.tokenizer
    ids = tok(TEXT * (n // 20 + 2), add_special_tokens=False)["input_ids"][: n - int(loaded.info.adds_bos)]
    return tok.decode(ids)


def variants(loaded: Any) -> int:
    """How many input variants `analyze` runs with its defaults: native, two BOS variants (if a BOS exists) and one
    per ablated head plus one per ablated layer, for layers 0 and 1."""
    from sinkscope.analyses.mechanisms.bos import resolve_bos
    from sinkscope.errors import SinkscopeError

    try:
        resolve_bos(loaded.tokenizer, loaded.info.adds_bos, None, "the")
        bos = 2
    except SinkscopeError:
        bos = 0
    return 1 + bos + 2 * (loaded.info.n_heads + 1)


def runner(loaded: Any, way: str, text: str):
    if way == "profile":
        from sinkscope.analyses.profile import profile

        return lambda: profile(loaded, [text])
    if way == "tags":
        from sinkscope.analyses.tags import tag_statistics

        return lambda: tag_statistics(loaded, [text], 0.2)
    from sinkscope.analyses.mechanisms import analyze

    return lambda: analyze(loaded, [text])


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Start the process's peak RSS afresh (Linux: `5` to /proc/self/clear_refs resets VmHWM), so `peak()` covers only
    what follows — not the model load, whose peak can exceed a forward's and would hide the difference between ways.
    Where the reset is refused the lifetime peak stays (ru_maxrss)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak() -> int:
    """Peak RSS in bytes since the last `reset_peak()` (VmHWM), else over the process's life (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_worker(model: str, n: int, repeats: int, ways: tuple[str, ...] = WAYS) -> dict:
    loaded = load(model)
    text = prompt_of(loaded, n)
    short = prompt_of(loaded, 32)
    for way in ways:
        runner(loaded, way, short)()
    turns: list[dict[str, float]] = []
    for _ in range(repeats):
        turn = {}
        for way in ways:
            run = runner(loaded, way, text)
            start = time.perf_counter()
            run()
            turn[way] = time.perf_counter() - start
        turns.append(turn)
    n_tokens = len(loaded.tokenizer(text)["input_ids"])
    return {"model": loaded.info.name, "tokens": n_tokens, "variants": variants(loaded), "turns": turns}


def memory_worker(model: str, way: str, n: int) -> dict:
    loaded = load(model)
    text = prompt_of(loaded, n)
    runner(loaded, way, prompt_of(loaded, 32))()
    before = rss()
    reset_peak()
    runner(loaded, way, text)()
    high = peak()
    return {"before": before, "peak": high, "extra": max(0, high - before)}


def _sub(*args: str) -> dict | None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["killed"])[-1]
        print(f"  ({' '.join(args)} failed: {tail})", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def mem_ratio(extra: dict[str, Any], way: str) -> str:
    if not extra.get(way) or not extra.get("profile"):
        return "n/a"
    return f"{extra[way] / extra['profile']:.2f} ({extra[way] / 2**20:.0f} MB)"


def cli_profile(loaded: Any, text: str, out: bool = False) -> Any:
    """`sinkscope profile --prompts FILE` run in this process on the loaded model (the command's model load replaced by
    it): tokenise, capture, detect, tables, the summary printed. With `out`, `--out DIR --overwrite` as well: the
    tables written to the run folder, and report.html."""
    import tempfile
    from pathlib import Path
    from unittest import mock

    from typer.testing import CliRunner

    from sinkscope.cli.app import app

    folder = Path(tempfile.mkdtemp(prefix="sinkscope-bench-"))
    (folder / "prompts.txt").write_text(text.replace("\n", " ") + "\n", encoding="utf-8")
    args = ["profile", "--model", "loaded", "--prompts", str(folder / "prompts.txt")]
    if out:
        args += ["--out", str(folder / "run"), "--overwrite"]

    def run() -> None:
        with mock.patch("sinkscope.cli.profile.load", lambda *a, **k: loaded):
            result = CliRunner().invoke(app, args)
        if result.exit_code != 0:
            raise RuntimeError(f"sinkscope profile failed: {result.output[-500:]}")

    return run


def quick(repeats: int = 2) -> None:
    """The --quick lines (see the module docstring)."""
    from sinkscope.analyses.mechanisms import analyze
    from sinkscope.analyses.profile import profile
    from sinkscope.analyses.tags import tag_statistics

    loaded = load("gpt2-shape")
    text = prompt_of(loaded, 512)
    ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])
    model = loaded.model

    def plain() -> None:
        model(input_ids=ids, use_cache=False)

    def all_ways(text: str) -> dict[str, Any]:
        return {"plain": plain, "profile": lambda: profile(loaded, [text]),
                "tags": lambda: tag_statistics(loaded, [text], 0.2),
                "mechanisms": lambda: analyze(loaded, [text], ablate_layers=[]),
                "profile-cli": cli_profile(loaded, text), "profile-cli-out": cli_profile(loaded, text, out=True)}

    ways = all_ways(text)
    for name, run in all_ways(prompt_of(loaded, 64)).items():  # warm-up: every code path once, on a short prompt
        if name != "plain":
            run()
    plain()
    turns = []
    for _ in range(repeats):
        turn = {}
        for name, run in ways.items():
            start = time.perf_counter()
            run()
            turn[name] = time.perf_counter() - start
        turns.append(turn)

    def ratio(a: str, b: str) -> float:
        return statistics.median(t[a] / t[b] for t in turns)

    passes = variants(loaded) - 2 * (loaded.info.n_heads + 1)  # native + BOS variants (no ablation here)
    print(f"sinkscope analyses --quick: {loaded.info.name}, {ids.shape[1]} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {repeats} turns")
    print(f"tags {ratio('tags', 'profile'):.2f}")
    print(f"mechanisms {ratio('mechanisms', 'profile'):.2f} (passes: {passes})")
    from commands import quick_lines  # bench/commands.py: explain, eval-causal, calibrate, bench-mitigation

    print("\n".join(quick_lines(loaded)), flush=True)
    print(f"profile-cli {ratio('profile-cli', 'plain'):.2f}")
    print(f"profile-cli-out {ratio('profile-cli-out', 'plain'):.2f}")
    print(f"profile-end-to-end {ratio('profile', 'plain'):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--ways", default=",".join(WAYS), help="profile is always run (the reference)")
    parser.add_argument("--quick", action="store_true", help="< 60 s: ratios at 512 tokens on the GPT-2-small shape")
    parser.add_argument("--time-worker", type=int)
    parser.add_argument("--memory-worker", nargs=2, metavar=("WAY", "N"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    ways = tuple(w for w in WAYS if w == "profile" or w in args.ways.split(","))
    if args.quick:
        quick()
        return
    if args.time_worker:
        print(json.dumps(time_worker(args.model, args.time_worker, args.repeats, ways)))
        return
    if args.memory_worker:
        way, n = args.memory_worker
        print(json.dumps(memory_worker(args.model, way, int(n))))
        return
    print(f"sinkscope analyses benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | tokens | profile s | tags / profile | mechanisms / profile | mechanisms bound (variants) "
          "| profile extra MB | tags extra / profile | mechanisms extra / profile |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in [int(x) for x in args.lengths.split(",")]:
        timed = _sub("--model", args.model, "--repeats", str(args.repeats), "--ways", ",".join(ways),
                     "--time-worker", str(n))
        if timed is None:
            continue
        ratios = {w: statistics.median(t[w] / t["profile"] for t in timed["turns"]) if w in ways else math.nan
                  for w in WAYS}
        base = statistics.median(t["profile"] for t in timed["turns"])
        mem = {} if args.no_memory else {w: _sub("--model", args.model, "--memory-worker", w, str(n)) for w in ways}
        extra = {w: (m or {}).get("extra") for w, m in mem.items()}
        profile_mb = f"{extra['profile'] / 2**20:.0f}" if extra.get("profile") else "n/a"
        print(f"| {timed['model']} | {timed['tokens']} | {base:.2f} | {ratios['tags']:.2f} | "
              f"{ratios['mechanisms']:.2f} | ≤ {timed['variants']} | {profile_mb} | {mem_ratio(extra, 'tags')} | "
              f"{mem_ratio(extra, 'mechanisms')} |", flush=True)


if __name__ == "__main__":
    main()
