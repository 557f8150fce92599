"""How long the `sinkscope` command takes to start, next to a bare Python.

    python bench/cli_startup.py                       # 7 turns, medians
    python bench/cli_startup.py --runs 15
    python bench/cli_startup.py --src /tmp/old/src    # another source tree first on the path (e.g. an older commit
                                                      # unpacked with `git archive COMMIT src | tar -x -C /tmp/old`)

Each command runs in a fresh process (`python -m sinkscope ...`, as the `sinkscope` script does). The commands run in
turns, so a change in machine load hits all alike; the result is the median wall time and its ratio to
`python -c pass` in the same run (the machines are shared: compare ratios, not seconds). Target: every `--help`
under 1 s on the 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS: dict[str, list[str]] = {
    "python -c pass": ["-c", "pass"],
    "import sinkscope": ["-c", "import sinkscope"],
    "sinkscope --help": ["-m", "sinkscope", "--help"],
    "sinkscope profile --help": ["-m", "sinkscope", "profile", "--help"],
    "sinkscope toy train --help": ["-m", "sinkscope", "toy", "train", "--help"],
    "sinkscope --version": ["-m", "sinkscope", "--version"],
}


def run_once(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], env=env, check=False, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="turns (each runs every command once)")
    parser.add_argument("--src", help="a source tree to put first on PYTHONPATH instead of the installed package")
    opts = parser.parse_args()
    env = dict(os.environ)
    if opts.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [opts.src, env.get("PYTHONPATH")]))
    where = subprocess.run([sys.executable, "-c", "import sinkscope; print(sinkscope.__file__)"], env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    status = {name: run_once(args, env)[1] for name, args in COMMANDS.items()}  # also warms the file cache
    for _ in range(opts.runs):
        for name, args in COMMANDS.items():
            times[name].append(run_once(args, env)[0])
    base = statistics.median(times["python -c pass"])
    print(f"sinkscope from {where}; {opts.runs} turns; median wall time of a fresh process")
    print(f"{'command':28} {'seconds':>8} {'× python -c pass':>17}")
    for name, values in times.items():
        median = statistics.median(values)
        note = "" if status[name] == 0 else f"  (exit status {status[name]})"
        print(f"{name:28} {median:8.3f} {median / base:17.1f}{note}")


if __name__ == "__main__":
    main()
