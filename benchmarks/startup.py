"""Start-up benchmark: how long the installed ``kerasbn`` script takes to answer ``--help`` and ``--version``.

The CLI imports neither TensorFlow nor the kerasbn library for these
(`tests/cli/test_startup.py` asserts that, deterministically); this measures
what that buys. Each command runs as a fresh process, alternating with a
bare ``python -c pass`` of the same interpreter (so a noisy neighbour slows
both alike), after one warm-up round; the figures are medians, and the
ratio is the median of the per-round ratios to the bare interpreter. The
suite asserted ``--help`` ≤ 0.3 s until a fresh clone on a loaded 2-core
machine took 0.43–0.50 s. On 2 shared x86_64 cores, 15 rounds: at a load
average of 0.7, ``--help`` 0.075 s against 0.022 s for the bare interpreter
(ratio 3.5); at a load average of 7 (5 rounds), 0.66 s against 0.19 s. A duration says as much about the neighbours as about the
import graph: it is measured here, never asserted in the suite.

Run: ``.venv/bin/python benchmarks/startup.py [--rounds 15]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

KERASBN = Path(sys.executable).with_name("kerasbn")
COMMANDS = {
    "kerasbn --help": [str(KERASBN), "--help"],
    "kerasbn --version": [str(KERASBN), "--version"],
    "kerasbn fold --help": [str(KERASBN), "fold", "--help"],
}
BARE = [sys.executable, "-c", "pass"]


def wall(command: list[str]) -> float:
    """Seconds from starting ``command`` to its exit (it must succeed)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds after one warm-up round")
    args = parser.parse_args()
    if not KERASBN.exists():
        sys.exit(f"{KERASBN} not found: install the package (make install) first")

    times: dict[str, list[float]] = {name: [] for name in ["python -c pass", *COMMANDS]}
    ratios: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for round_ in range(args.rounds + 1):
        for name, command in COMMANDS.items():
            bare, ours = wall(BARE), wall(command)
            if round_:  # the first round warms the file cache
                times["python -c pass"].append(bare)
                times[name].append(ours)
                ratios[name].append(ours / bare)

    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, {args.rounds} rounds")
    print(f"{'command':<22} {'median s':>9} {'÷ bare python':>14}")
    print(f"{'python -c pass':<22} {statistics.median(times['python -c pass']):>9.3f} {'1.00':>14}")
    for name in COMMANDS:
        print(f"{name:<22} {statistics.median(times[name]):>9.3f} {statistics.median(ratios[name]):>14.2f}")


if __name__ == "__main__":
    main()
