"""Random exploration for the property tests, with fresh seeds, for a number of minutes.

    python tests/fuzz.py --minutes 30            # every property test, 20x its CI examples per round
    python tests/fuzz.py --minutes 5 --scale 50 tests/test_prefix_cache.py

CI runs the same tests derandomized (tests/properties.py), so its verdict is repeatable; this is
where new failures are looked for. Each round is one pytest run over the tests with random inputs
only (the property tests: scheduler, prefix cache, boundary, co-scheduling, split, overlap and
engine-level ones, and any later ones; and the kernel tests, whose seeds come from
tests/properties.py) with a fresh --hypothesis-seed, fresh kernel-test seeds and
SPLITREASON_FUZZ_SCALE times the CI example counts. The table counts the examples tried per
property test over all rounds, and the kernel tests' runs. A failure stops the run and
prints hypothesis's falsifying example, the call to pin with `@example`, and the seed to replay it.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# "tests/test_x.py::test_y:" then, per phase, "- 30 passing, 0 failing, and 2 invalid test cases"
TEST_LINE = re.compile(r"^(tests/\S+::\S+):$")
COUNT_LINE = re.compile(r"- (\d+) passing(?: examples?)?, (\d+) failing(?: examples?)?,(?: and)? (\d+) invalid")


def parse_statistics(output: str) -> dict[str, list[int]]:
    """{test id: [passing, failing, invalid]} summed over the phases hypothesis reports."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    test = None
    for line in output.splitlines():
        head = TEST_LINE.match(line.strip())
        if head:
            test = head.group(1)
            continue
        found = COUNT_LINE.search(line)
        if found and test is not None:
            for k in range(3):
                counts[test][k] += int(found.group(k + 1))
    return dict(counts)


def run_round(paths: list[str], scale: int, seed: int, workers: int, timeout: float) -> tuple[int, str]:
    env = dict(os.environ, SPLITREASON_FUZZ_SCALE=str(scale))
    cmd = [sys.executable, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
           f"--hypothesis-seed={seed}", "-x"]
    if workers > 1:
        cmd += ["-n", str(workers)]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out + f"\nround timed out after {timeout:.0f} s"
    return r.returncode, r.stdout + r.stderr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", default=["tests"], help="test files or folders (default: every test)")
    p.add_argument("--minutes", type=float, default=30.0, help="stop starting rounds after this long")
    p.add_argument("--scale", type=int, default=20, help="examples per round, as a multiple of the CI count")
    p.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (1: none)")
    args = p.parse_args()

    deadline = time.monotonic() + 60 * args.minutes
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    rounds, started, code, test_runs = 0, time.monotonic(), 0, 0
    while time.monotonic() < deadline:
        seed = random.SystemRandom().randrange(2**32)
        code, output = run_round(args.paths, args.scale, seed, args.workers,
                                 timeout=max(600.0, deadline - time.monotonic() + 600))
        rounds += 1
        passed = re.search(r"(\d+) passed", output)
        test_runs += int(passed.group(1)) if passed else 0
        for test, c in parse_statistics(output).items():
            totals[test] = [a + b for a, b in zip(totals[test], c)]
        print(f"round {rounds}: seed {seed}, exit {code}, {time.monotonic() - started:.0f} s so far", flush=True)
        if code != 0:
            print(output[-20000:])
            print(f"\nFAILED in round {rounds}. Replay: SPLITREASON_FUZZ_SCALE={args.scale} python -m pytest "
                  f"{' '.join(args.paths)} -p no:cacheprovider --hypothesis-seed={seed}; pin the falsifying "
                  "example above with @example(...).")
            break
    width = max((len(t) for t in totals), default=10)
    print(f"\n{'test':<{width}}  {'passing':>8} {'failing':>8} {'invalid':>8}")
    for test in sorted(totals):
        ok, bad, invalid = totals[test]
        print(f"{test:<{width}}  {ok:>8} {bad:>8} {invalid:>8}")
    total = [sum(c[k] for c in totals.values()) for k in range(3)]
    print(f"{'all ' + str(len(totals)) + ' tests, ' + str(rounds) + ' rounds':<{width}}  "
          f"{total[0]:>8} {total[1]:>8} {total[2]:>8}  in {(time.monotonic() - started) / 60:.1f} min")
    print(f"test runs passed, kernel tests with fresh seeds included: {test_runs}")
    return 0 if code == 0 and total[1] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
