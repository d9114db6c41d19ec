"""Hypothesis settings shared by the property tests: the same examples on every run, unless fuzzing.

A plain pytest run (CI, a laptop) loads the "repeatable" profile: examples derive from each test's
name alone and no example database is read or written, so a verdict never depends on luck or on
what an earlier run found. `tests/fuzz.py` sets SPLITREASON_FUZZ_SCALE and loads the "fuzz" profile
instead: fresh seeds, and `examples(n)` many times the CI count. A failure found there is pinned
with `@example(...)` (hypothesis prints the call) before it is fixed.

The kernel tests draw their random inputs from `test_seed()`, by the same rule: fixed per test in a
plain run, fresh when fuzzing (they print the seed with every failure).
"""

import os
import zlib

from hypothesis import settings

FUZZ_SCALE = int(os.environ.get("SPLITREASON_FUZZ_SCALE", "0"))

settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, database=None, print_blob=True)
settings.load_profile("fuzz" if FUZZ_SCALE else "repeatable")


def examples(ci_count: int) -> int:
    """A property test's example count: `ci_count` in a plain run, FUZZ_SCALE times it when fuzzing."""
    return ci_count * max(FUZZ_SCALE, 1)


def test_seed() -> int:
    """The seed of a test's random inputs: derived from the running test's id in a plain run, so
    every run checks the same inputs; fresh when fuzzing."""
    if FUZZ_SCALE:
        return int.from_bytes(os.urandom(8), "little") >> 1
    return zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0].encode())


test_seed.__test__ = False  # a helper, not a test
