"""The demo's synthetic reasoning task: a chain of multiplications, keeping three digits each time.

    Start at 347; multiply by 6, 2, 9 and 4, keeping three digits.

The chain of thought has easy steps (restate the start, copy the running value and the next
multiplier, keep the last three digits of a product, recap the chain, box the result) and one
hard step per multiplier: the four-digit product of a three-digit number and a digit, written in
one go, most significant digit first, so every carry must be worked out before the first digit.
A two-layer model learns the easy steps quickly but not the products; a model ten times larger
learns both. In the small model's traces every hard step is wrapped in the offload tags, as in
SplitReason's SFT data:

    347*6 = <bigmodel>2082</bigmodel>, keep 082.

Every number has a fixed width, so the close tag always comes after four digits.
"""

import random
import re
from dataclasses import dataclass

OPEN_TAG, CLOSE_TAG = "<bigmodel>", "</bigmodel>"
MULTIPLIERS = range(2, 10)
NUM_STEPS = 4
DIGITS = 3  # width of the running value; products have DIGITS + 1
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class Problem:
    start: int  # 0..999
    multipliers: tuple[int, ...]  # NUM_STEPS of them, each in 2..9

    def __post_init__(self):
        if not 0 <= self.start < 10 ** DIGITS or len(self.multipliers) != NUM_STEPS \
                or any(m not in MULTIPLIERS for m in self.multipliers):
            raise ValueError(f"not a demo problem: start {self.start}, multipliers {self.multipliers}")

    @property
    def question(self) -> str:
        *head, last = self.multipliers
        return (f"Start at {self.start:03d}; multiply by {', '.join(map(str, head))} and {last}, "
                "keeping three digits.")

    def values(self) -> list[int]:
        """The running value: the start, then after each multiplication."""
        out = [self.start]
        for m in self.multipliers:
            out.append(out[-1] * m % 10 ** DIGITS)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def trace(self, tagged: bool) -> str:
        """The worked solution the models learn to write after `<think>\\n`; `tagged` wraps every
        hard step in the offload tags (the small model's traces)."""
        values = self.values()
        lines = [f"We start at {self.start:03d} and multiply {NUM_STEPS} times.\n"]
        for value, m in zip(values, self.multipliers):
            product = f"{value * m:04d}"
            hard = f"{OPEN_TAG}{product}{CLOSE_TAG}" if tagged else product
            lines.append(f"{value:03d}*{m} = {hard}, keep {product[1:]}.\n")
        lines.append("So " + " -> ".join(f"{v:03d}" for v in values) + ".\n")
        return "".join(lines) + f"</think>\nThe answer is \\boxed{{{self.answer:03d}}}."

    @property
    def held_out(self) -> bool:
        """One problem in ten never appears in training: those are the evaluation problems."""
        return (self.start * 1009 + sum(m * 31 ** i for i, m in enumerate(self.multipliers))) % 10 == 0


def sample_problem(rng: random.Random, held_out: bool) -> Problem:
    """A uniformly random problem from the training split (held_out=False) or the evaluation split."""
    while True:
        p = Problem(rng.randrange(10 ** DIGITS), tuple(rng.choice(MULTIPLIERS) for _ in range(NUM_STEPS)))
        if p.held_out == held_out:
            return p


def evaluation_problems(n: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    return [sample_problem(rng, held_out=True) for _ in range(n)]


def parse_answer(text: str) -> "int | None":
    """The number in the last \\boxed{...} of `text`: exactly three digits, else None (malformed)."""
    found = _BOXED.findall(text)
    if not found or not re.fullmatch(r"[0-9]{3}", found[-1]):
        return None
    return int(found[-1])


def is_correct(problem: Problem, text: str) -> bool:
    return parse_answer(text) == problem.answer
