"""The demo's synthetic reasoning task: a chain of multiplications, keeping two digits each time.

    Start at 36; multiply by 7, 4, 9 and 5, keeping two digits.

The chain of thought has easy steps (copy the running value and the next multiplier, keep the
last two digits of a product, box the result) and one hard step per multiplier: the three-digit
product of a two-digit number and a digit, written in one go. The easy steps are copying at fixed
offsets, within a two-layer model's reach; the hard steps need the product table (800 entries) or
the carries, which a model ten times larger learns far better. In the small model's traces every
hard step is wrapped in the offload tags, as in SplitReason's SFT data:

    36*7 = <bigmodel>252</bigmodel>, keep 52.

Every number has a fixed width, so the close tag always comes after three digits.
"""

import random
import re
from dataclasses import dataclass

OPEN_TAG, CLOSE_TAG = "<bigmodel>", "</bigmodel>"
MULTIPLIERS = range(2, 10)
NUM_STEPS = 4
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class Problem:
    start: int  # 0..99
    multipliers: tuple[int, ...]  # each in 2..9

    def __post_init__(self):
        if not 0 <= self.start <= 99 or len(self.multipliers) != NUM_STEPS \
                or any(m not in MULTIPLIERS for m in self.multipliers):
            raise ValueError(f"not a demo problem: start {self.start}, multipliers {self.multipliers}")

    @property
    def question(self) -> str:
        *head, last = self.multipliers
        return f"Start at {self.start:02d}; multiply by {', '.join(map(str, head))} and {last}, keeping two digits."

    @property
    def answer(self) -> int:
        value = self.start
        for m in self.multipliers:
            value = value * m % 100
        return value

    def trace(self, tagged: bool) -> str:
        """The worked solution the models learn to write after `<think>\\n`; `tagged` wraps every
        hard step in the offload tags (the small model's traces)."""
        lines, value = [], self.start
        for m in self.multipliers:
            product = f"{value * m:03d}"
            hard = f"{OPEN_TAG}{product}{CLOSE_TAG}" if tagged else product
            lines.append(f"{value:02d}*{m} = {hard}, keep {product[1:]}.\n")
            value = value * m % 100
        return "".join(lines) + f"</think>\nThe answer is \\boxed{{{value:02d}}}."

    @property
    def held_out(self) -> bool:
        """One problem in ten never appears in training: those are the evaluation problems."""
        return (self.start * 1009 + sum(m * 31 ** i for i, m in enumerate(self.multipliers))) % 10 == 0


def sample_problem(rng: random.Random, held_out: bool) -> Problem:
    """A uniformly random problem from the training split (held_out=False) or the evaluation split."""
    while True:
        p = Problem(rng.randrange(100), tuple(rng.choice(MULTIPLIERS) for _ in range(NUM_STEPS)))
        if p.held_out == held_out:
            return p


def evaluation_problems(n: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    return [sample_problem(rng, held_out=True) for _ in range(n)]


def parse_answer(text: str) -> "int | None":
    """The number in the last \\boxed{...} of `text`: exactly two digits, else None (malformed)."""
    found = _BOXED.findall(text)
    if not found or not re.fullmatch(r"\d\d", found[-1]):
        return None
    return int(found[-1])


def is_correct(problem: Problem, text: str) -> bool:
    return parse_answer(text) == problem.answer
