"""Co-scheduling the two models: in which engine steps the big model runs.

A big-model step is weight-bound: on an H200 the 32B costs about the same with 1 row as with 16.
A loop that runs the big model whenever any row needs it pays a full read of its weights for a
few big tokens per step, and in a batch split mode then loses to the big model alone.

Two policies, chosen per engine:
- `eager`: the big model runs in every step in which any row needs it (the engine's first
  behaviour; lowest latency per handoff).
- `gather`: rows that need the big model wait, holding their pages and their place, while the
  small model has other work; the big model then runs for many rows at once. It runs as soon as
  `min_rows` rows wait, or the small model has nothing else to do, or the oldest wait reaches
  the bound (`max_wait_steps` steps or `max_wait_s` seconds, whichever comes first): no request
  waits longer, so nothing starves.

`auto` picks from the engine's measured step costs (step_costs.py): `gather` when a big step is
weight-bound (a step of 2 rows costs under 1.5x a step of one) and dearer than a small step,
else `eager`. The gather defaults come from the same costs: `min_rows` is where the big step's
per-row part reaches its fixed part (gathering more saves little), and the wait bound is the time
of WAIT_BOUND_BIG_STEPS one-row big steps, so a handoff's wait costs at most that many big
tokens of latency.

A policy changes only when a model runs, never what any request generates: the tokens and which
model wrote each stay equal to the protocol oracle under every policy.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

from .step_costs import StepCosts

SMALL, BIG = 0, 1
POLICIES = ("auto", "eager", "gather")
WAIT_BOUND_BIG_STEPS = 16  # default wait bound of `gather`, in one-row big-step times


class Policy(ABC):
    name: str

    @abstractmethod
    def hold_big(self, ready: list[int], now: float) -> bool:
        """Whether the big model sits out this step; `ready[m]`: rows model m would run now."""

    def observe(self, big_ran: bool, now: float) -> None:
        """What the step actually did (a held model runs anyway when nothing else can)."""

    def describe(self) -> dict:
        return {"policy": self.name}


class EagerPolicy(Policy):
    name = "eager"

    def hold_big(self, ready, now):
        return False


@dataclass
class GatherPolicy(Policy):
    """Holds the big model while the small one has work, until `min_rows` rows wait for it or the
    oldest has waited `max_wait_steps` steps or `max_wait_s` seconds."""

    min_rows: int
    max_wait_steps: "int | None" = None
    max_wait_s: "float | None" = None
    name = "gather"

    def __post_init__(self):
        if not isinstance(self.min_rows, int) or self.min_rows < 1:
            raise ValueError(f"min_rows must be a positive integer, got {self.min_rows!r}")
        if self.max_wait_steps is None and self.max_wait_s is None:
            raise ValueError("gather needs a wait bound: max_wait_steps or max_wait_s")
        if self.max_wait_steps is not None and (not isinstance(self.max_wait_steps, int) or self.max_wait_steps < 0):
            raise ValueError(f"max_wait_steps must be an integer >= 0, got {self.max_wait_steps!r}")
        if self.max_wait_s is not None and not (isinstance(self.max_wait_s, (int, float)) and self.max_wait_s >= 0):
            raise ValueError(f"max_wait_s must be a number >= 0, got {self.max_wait_s!r}")
        self._since: "float | None" = None  # when the current run of held steps began
        self._held = 0  # steps held in a row; every waiting row has waited at most this long

    def hold_big(self, ready, now):
        if ready[BIG] == 0 or ready[SMALL] == 0 or ready[BIG] >= self.min_rows:
            return False
        if self._since is None:
            self._since = now
        return not ((self.max_wait_steps is not None and self._held >= self.max_wait_steps)
                    or (self.max_wait_s is not None and now - self._since >= self.max_wait_s))

    def observe(self, big_ran, now):
        if big_ran:
            self._since, self._held = None, 0
        elif self._since is not None:
            self._held += 1

    def describe(self):
        return {"policy": self.name, "min_rows": self.min_rows, "max_wait_steps": self.max_wait_steps,
                "max_wait_s": self.max_wait_s}


def gathering_pays(costs: StepCosts) -> bool:
    """A big step is weight-bound (2 rows cost under 1.5x one) and dearer than a small step."""
    small, big = costs.models[SMALL], costs.models[BIG]
    return big(2, 2) < 1.5 * big(1, 1) and big(1, 1) > small(1, 1)


def make_policy(name: str, costs: "StepCosts | None", max_rows: int, min_rows: "int | None" = None,
                max_wait_steps: "int | None" = None, max_wait_s: "float | None" = None) -> Policy:
    """The policy `name` ("auto", "eager", "gather"); `auto` and gather's defaults read `costs`."""
    if name not in POLICIES:
        raise ValueError(f"coschedule must be one of {POLICIES}, got {name!r}")
    if name == "auto":
        name = "gather" if costs is not None and gathering_pays(costs) else "eager"
    if name == "eager":
        return EagerPolicy()
    big = costs.models[BIG] if costs is not None else None
    if min_rows is None:
        min_rows = max_rows if big is None else max(1, round(min(max_rows, big.saturation_rows)))
    if max_wait_steps is None and max_wait_s is None:
        if big is None:
            raise ValueError("coschedule='gather' without step costs needs max_wait_steps or max_wait_s")
        max_wait_s = WAIT_BOUND_BIG_STEPS * big(1, 1)
    return GatherPolicy(min_rows, max_wait_steps, max_wait_s)
