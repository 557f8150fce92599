"""Peak memory of `sinkscope profile` against the number of prompts: it should stay flat.

    python bench/profile_memory.py                          # 300 and 3,000 prompts of about 91 tokens
    python bench/profile_memory.py --counts 300 1000 --ways api
    python bench/profile_memory.py --src /tmp/old/src       # another source tree first on the path (e.g. an older
                                                            # commit: `git worktree add /tmp/old COMMIT`)

The model is the built-in `sinkscope-tiny` (3 layers × 4 heads, float32, CPU). Each (way, count) runs once in a fresh
process; the figure is that process's peak resident set size (`wait4`'s ru_maxrss), so the model, torch and the
libraries are in every figure alike. Ways:

- `cli`: `sinkscope profile --prompts FILE --out DIR` (tables, manifest and report.html)
- `summary`: `sinkscope profile --prompts FILE` (the per-layer summary only)
- `api`: the Python call the CLI makes to write the run folder, without the report (`profile_in_batches`, or
  `profile` + `save_run` in a tree that predates it)
- `report`: `sinkscope report DIR` on the folder `api` wrote (written first, unmeasured, when `api` is not measured)

The last column is each figure's ratio to the smallest count's figure of the same way (flat: about 1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ["the", "a", "of", "attention", "sink", "token", "model", "layer", "head", "query", "key", "value", "mass",
         "first", "last", "prompt", "text", "cat", "dog", "sat", "on", "mat", "river", "bank", "quick", "brown",
         "fox", "jumps", "over", "lazy"]

API = """
import sys
from sinkscope.models import load_model
from sinkscope.analyses import profile as analysis
prompts, out = [line.rstrip("\\n") for line in open(sys.argv[1])], sys.argv[2]
loaded = load_model("sinkscope-tiny")
if hasattr(analysis, "profile_in_batches"):
    analysis.profile_in_batches(loaded, prompts, out=out)
else:
    from sinkscope.store import save_run
    save_run(out, analysis.profile(loaded, prompts).run(loaded))
"""


def write_prompts(path: Path, count: int, words: int, seed: int = 0) -> None:
    """`count` prompts of `words` random words each (40 words are about 91 tokens of sinkscope-tiny)."""
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(words)) + "\n" for _ in range(count)))


def command(way: str, prompts: Path, out: Path) -> list[str]:
    if way == "api":
        return [sys.executable, "-c", API, str(prompts), str(out)]
    if way == "report":
        return [sys.executable, "-m", "sinkscope", "report", str(out)]
    cli = [sys.executable, "-m", "sinkscope", "profile", "-m", "sinkscope-tiny", "--prompts", str(prompts)]
    return cli + (["--out", str(out)] if way == "cli" else [])


def peak_rss(args: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(peak RSS in MB, wall seconds, exit status) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(proc.stderr.read().decode(errors="replace")[-2000:], file=sys.stderr)
    proc.stderr.close()
    return usage.ru_maxrss / 1024, time.perf_counter() - start, proc.returncode  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[300, 3000], help="numbers of prompts")
    parser.add_argument("--words", type=int, default=40, help="words per prompt (40: about 91 tokens)")
    parser.add_argument("--ways", nargs="+", default=["api", "cli"], choices=["api", "cli", "summary", "report"])
    parser.add_argument("--src", help="a source tree to put first on PYTHONPATH instead of the installed package")
    opts = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if opts.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [opts.src, env.get("PYTHONPATH")]))
    where = subprocess.run([sys.executable, "-c", "import sinkscope; print(sinkscope.__file__)"], env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    print(f"sinkscope from {where}; sinkscope-tiny, {opts.words} words per prompt; one fresh process each")
    print(f"{'way':8} {'prompts':>8} {'peak MB':>9} {'seconds':>8} {'× first':>8}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for way in opts.ways:
            first = None
            for count in opts.counts:
                prompts = Path(tmp) / f"prompts-{count}.txt"
                if not prompts.exists():
                    write_prompts(prompts, count, opts.words)
                out = Path(tmp) / f"run-{'api' if way == 'report' else way}-{count}"
                if way == "report" and not out.exists():
                    subprocess.run(command("api", prompts, out), env=env, check=True, capture_output=True)
                mb, seconds, status = peak_rss(command(way, prompts, out), env)
                first = first or mb
                note = "" if status == 0 else f"  (exit status {status})"
                print(f"{way:8} {count:8d} {mb:9.0f} {seconds:8.1f} {mb / first:8.2f}{note}", flush=True)
                results.append({"way": way, "prompts": count, "peak_mb": round(mb), "seconds": round(seconds, 1)})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
