"""Co-scheduling the two models: in which engine steps the big model runs.

A big-model step is weight-bound: on an H200 the 32B costs about the same with 1 row as with 16.
A loop that runs the big model whenever any row needs it pays a full read of its weights for a
few big tokens per step, and in a batch split mode then loses to the big model alone.

Two policies, chosen per engine:
- `eager`: the big model runs in every step in which any row needs it (the engine's first
  behaviour; lowest latency per handoff).
- `gather`: rows that need the big model wait, holding their pages and their place, while the
  small model has other work; the big model then runs for many rows at once, in rounds that last
  until the rows waiting at their start are through their segments. A round starts when enough
  rows wait (`min_share` of the rows with work), or the small model has nothing else to do, or
  the oldest wait reaches the bound (`max_wait_steps` steps or `max_wait_s` seconds, whichever
  comes first): no request waits longer, so nothing starves. Rows drafting for a verify step
  (speculation) stay in their round while they draft, and the round's big step waits for them, so
  the round's verifies run together (within the same wait bound).

`auto` picks from the engine's measured step costs (step_costs.py): `gather` when a big step is
weight-bound (a step of 2 rows costs under 1.5x a step of one) and dearer than a small step,
else `eager`. The gather defaults come from the same costs:
- a round starts once the waiting rows are a share T_big / (T_small + T_big) of the rows with work
  (step costs at one row each): below it, a step of the small model alone writes more tokens per
  second ((n - k) / T_small) than a step of both ((n) / (T_small + T_big));
- the wait bound is the time of WAIT_BOUND_BIG_STEPS one-row big steps, so a handoff's wait costs
  at most that many big tokens of latency.

A policy changes only when a model runs, never what any request generates: the tokens and which
model wrote each stay equal to the protocol oracle under every policy.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

from .requests import BIG, SMALL
from .step_costs import StepCosts

POLICIES = ("auto", "eager", "gather")
WAIT_BOUND_BIG_STEPS = 64  # default wait bound of `gather`, in one-row big-step times


class Policy(ABC):
    name: str

    @abstractmethod
    def hold_big(self, sched, now: float, drafting: "set[int]") -> bool:
        """Whether the big model sits out this step; `sched`: the scheduler, asked for ready rows;
        `drafting`: the requests whose small model drafts for a big step to verify."""

    def observe(self, big_ran: bool) -> None:
        """What the step actually did (a held model runs anyway when nothing else can)."""

    def describe(self) -> dict:
        return {"policy": self.name}


class EagerPolicy(Policy):
    name = "eager"

    def hold_big(self, sched, now, drafting):
        return False


@dataclass
class GatherPolicy(Policy):
    """Holds the big model while the small one has work; then runs it in rounds.

    A round starts when the rows waiting for the big model are `min_share` of the rows with work
    (waiting or ready for the small model), or the small model has nothing else to do, or the
    oldest wait reaches `max_wait_steps` steps or `max_wait_s` seconds. Its
    members are the rows waiting then; it runs the big model every step until no member needs it
    (a member leaves once it stops needing the big model: its segment, or the rest of one, is
    done), and rows that come to need it meanwhile ride along. Rows still mid-segment when it
    ends wait for the next round, their wait counted from there.

    A member drafting for a verify step still needs the big model: it stays in the round, and the
    round's big step waits until no member drafts (or the wait bound is reached), so the members
    verify together in one weight-bound step instead of one step each."""

    min_share: float
    max_wait_steps: "int | None" = None
    max_wait_s: "float | None" = None
    name = "gather"

    def __post_init__(self):
        if not isinstance(self.min_share, (int, float)) or not 0 < self.min_share <= 1:
            raise ValueError(f"min_share must be in (0, 1], got {self.min_share!r}")
        if self.max_wait_steps is None and self.max_wait_s is None:
            raise ValueError("gather needs a wait bound: max_wait_steps or max_wait_s")
        if self.max_wait_steps is not None and (not isinstance(self.max_wait_steps, int) or self.max_wait_steps < 0):
            raise ValueError(f"max_wait_steps must be an integer >= 0, got {self.max_wait_steps!r}")
        if self.max_wait_s is not None and not (isinstance(self.max_wait_s, (int, float)) and self.max_wait_s >= 0):
            raise ValueError(f"max_wait_s must be a number >= 0, got {self.max_wait_s!r}")
        self._round: set[int] = set()  # request ids the current round runs the big model for
        self._since: "float | None" = None  # when the current run of held steps began
        self._held = 0  # steps held in a row; every waiting row has waited at most this long

    def hold_big(self, sched, now, drafting):
        waiting = sched.ready_requests(BIG)
        if self._round:
            # A member leaves for good once it neither waits for the big model nor drafts for it.
            self._round.intersection_update(set(waiting) | drafting)
            if self._round:
                if not self._round & drafting or self._bound_reached(now):
                    return False
                if self._since is None:
                    self._since = now
                return True
        if not waiting:  # nobody waits (any earlier waiter was aborted): no wait is running
            self._since, self._held = None, 0
            return False
        if self._since is None:
            self._since = now
        small = sched.ready_rows(SMALL)
        if small == 0 or len(waiting) >= self.min_share * (len(waiting) + small) or self._bound_reached(now):
            self._round = set(waiting)
            return False
        return True

    def _bound_reached(self, now: float) -> bool:
        return ((self.max_wait_steps is not None and self._held >= self.max_wait_steps)
                or (self.max_wait_s is not None and self._since is not None and now - self._since >= self.max_wait_s))

    def observe(self, big_ran):
        if big_ran:
            self._since, self._held = None, 0
        elif self._since is not None:
            self._held += 1

    def describe(self):
        return {"policy": self.name, "min_share": self.min_share, "max_wait_steps": self.max_wait_steps,
                "max_wait_s": self.max_wait_s}


def gathering_pays(costs: StepCosts) -> bool:
    """A big step is weight-bound (2 rows cost under 1.5x one) and dearer than a small step."""
    small, big = costs.models[SMALL], costs.models[BIG]
    return big(2, 2) < 1.5 * big(1, 1) and big(1, 1) > small(1, 1)


def make_policy(name: str, costs: "StepCosts | None", min_share: "float | None" = None,
                max_wait_steps: "int | None" = None, max_wait_s: "float | None" = None) -> Policy:
    """The policy `name` ("auto", "eager", "gather"); `auto` and gather's defaults read `costs`."""
    if name not in POLICIES:
        raise ValueError(f"coschedule must be one of {POLICIES}, got {name!r}")
    if name == "auto":
        name = "gather" if costs is not None and gathering_pays(costs) else "eager"
    if name == "eager":
        return EagerPolicy()
    if costs is None and (min_share is None or (max_wait_steps is None and max_wait_s is None)):
        raise ValueError("coschedule='gather' without step costs needs min_share and max_wait_steps or max_wait_s")
    if min_share is None:
        t_small, t_big = costs.models[SMALL](1, 1), costs.models[BIG](1, 1)
        min_share = t_big / (t_small + t_big)
    if max_wait_steps is None and max_wait_s is None:
        max_wait_s = WAIT_BOUND_BIG_STEPS * costs.models[BIG](1, 1)
    return GatherPolicy(min_share, max_wait_steps, max_wait_s)
