"""Engine-wide SplitReason figures: per-request metrics summed as requests finish, plus what each
model's forward steps took and how the co-scheduling policy ran them."""

import math
from dataclasses import dataclass, field
from typing import Callable

from .outputs import RequestMetrics


@dataclass
class EngineStats:
    num_models: int
    requests: int = 0
    errors: int = 0  # requests that ended with finish_reason "error" (counted in requests too)
    small_tokens: int = 0
    big_tokens: int = 0
    handoffs: int = 0
    rolled_back_tokens: int = 0
    catch_up_tokens: list[int] = field(default_factory=lambda: [0, 0])
    tokens_processed: list[int] = field(default_factory=lambda: [0, 0])
    cached_tokens: list[int] = field(default_factory=lambda: [0, 0])  # prefix-cache hits: KV not computed
    handoff_latencies: list[float] = field(default_factory=list)
    big_steps: int = 0  # big-model steps that sampled for a request, summed over requests
    draft_tokens: int = 0  # drafts verified (speculation)
    accepted_draft_tokens: int = 0  # ... and kept
    offloaded_time: float = 0.0  # catch-up plus big-segment wall time, summed over requests
    model_time: list[float] = field(default_factory=lambda: [0.0, 0.0])  # forward + sampling seconds
    steps: list[int] = field(default_factory=lambda: [0, 0])  # engine steps in which each model ran
    rows: list[int] = field(default_factory=lambda: [0, 0])  # sequences those steps carried, summed
    steps_ahead: int = 0  # steps launched before the previous step's tokens reached the host (overlap)
    rows_dropped: int = 0  # rows of those steps thrown away: the previous token ended or redirected the request
    held_steps: int = 0  # steps in which the policy held the big model back while rows waited for it
    big_waits: list[float] = field(default_factory=list)  # per handoff: tag sampled -> the big model runs for it
    policy: dict = field(default_factory=dict)  # the co-scheduling policy and its parameters
    jit_counter: Callable[[], int] = lambda: 0  # Triton kernel variants compiled so far (the engine sets it)
    jit_compiles_at_startup: int = 0  # ... when start-up ended
    warmup_s: float = 0.0  # start-up time spent compiling kernel variants and capturing decode graphs

    def count_step(self, model: int, rows: int) -> None:
        self.steps[model] += 1
        self.rows[model] += rows

    def add(self, m: RequestMetrics, failed: bool = False) -> None:
        self.requests += 1
        self.errors += failed
        self.small_tokens += m.small_tokens
        self.big_tokens += m.big_tokens
        self.handoffs += m.handoffs
        self.rolled_back_tokens += m.rolled_back_tokens
        self.big_steps += m.big_steps
        self.draft_tokens += m.draft_tokens
        self.accepted_draft_tokens += m.accepted_draft_tokens
        for i in range(2):
            self.catch_up_tokens[i] += m.catch_up_tokens[i]
            self.tokens_processed[i] += m.tokens_processed[i]
            self.cached_tokens[i] += m.cached_tokens[i]
        self.handoff_latencies += m.handoff_latencies
        self.big_waits += m.big_waits
        self.offloaded_time += m.catch_up_time + m.big_time

    @property
    def offload_fraction(self) -> float:
        total = self.small_tokens + self.big_tokens
        return self.big_tokens / total if total else 0.0

    @property
    def jit_compiles_after_startup(self) -> int:
        return self.jit_counter() - self.jit_compiles_at_startup

    def summary(self) -> dict:
        """Plain numbers, for JSON and for `splitreason generate --stats`."""
        lat, waits = sorted(self.handoff_latencies), sorted(self.big_waits)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "small_tokens": self.small_tokens,
            "big_tokens": self.big_tokens,
            "offload_fraction": self.offload_fraction,
            "handoffs": self.handoffs,
            "catch_up_tokens_small": self.catch_up_tokens[0],
            "catch_up_tokens_big": self.catch_up_tokens[1],
            "tokens_processed_small": self.tokens_processed[0],
            "tokens_processed_big": self.tokens_processed[1],
            "rolled_back_tokens": self.rolled_back_tokens,
            "prefix_cache_hit_tokens_small": self.cached_tokens[0],
            "prefix_cache_hit_tokens_big": self.cached_tokens[1] if self.num_models > 1 else None,
            "prefix_cache_hit_rate_small": _share(self.cached_tokens[0], self.tokens_processed[0]),
            "prefix_cache_hit_rate_big": (_share(self.cached_tokens[1], self.tokens_processed[1])
                                          if self.num_models > 1 else None),
            "handoff_latency_mean_s": sum(lat) / len(lat) if lat else None,
            "handoff_latency_p50_s": lat[len(lat) // 2] if lat else None,
            "latency_per_offloaded_token_s": self.offloaded_time / self.big_tokens if self.big_tokens else None,
            "draft_tokens": self.draft_tokens,
            "accepted_draft_tokens": self.accepted_draft_tokens,
            "acceptance_rate": self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else None,
            "big_steps_per_offloaded_token": self.big_steps / self.big_tokens if self.big_tokens else None,
            "small_model_time_s": self.model_time[0],
            "big_model_time_s": self.model_time[1] if self.num_models > 1 else None,
            "coschedule": self.policy,
            "steps_small": self.steps[0],
            "steps_big": self.steps[1] if self.num_models > 1 else None,
            "mean_rows_per_big_step": self.rows[1] / self.steps[1] if self.steps[1] else None,
            "held_steps": self.held_steps,
            "steps_ahead": self.steps_ahead,
            "rows_dropped": self.rows_dropped,
            "big_wait_p50_s": quantile(waits, 0.5),
            "big_wait_p99_s": quantile(waits, 0.99),
            "big_wait_max_s": waits[-1] if waits else None,
            "jit_compiles_total": self.jit_counter(),
            "jit_compiles_after_startup": self.jit_compiles_after_startup,
            "warmup_s": self.warmup_s,
        }


def _share(cached: int, processed: int) -> "float | None":
    """Of the tokens whose KV a model needed, the share taken from the prefix cache."""
    return cached / (cached + processed) if cached + processed else None


def quantile(sorted_values: list[float], q: float) -> "float | None":
    """The nearest-rank quantile (None when empty)."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]
