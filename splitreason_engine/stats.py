"""Engine-wide SplitReason figures: per-request metrics summed as requests finish, plus the time
each model's forward passes took."""

from dataclasses import dataclass, field

from .outputs import RequestMetrics


@dataclass
class EngineStats:
    num_models: int
    requests: int = 0
    small_tokens: int = 0
    big_tokens: int = 0
    handoffs: int = 0
    rolled_back_tokens: int = 0
    catch_up_tokens: list[int] = field(default_factory=lambda: [0, 0])
    tokens_processed: list[int] = field(default_factory=lambda: [0, 0])
    handoff_latencies: list[float] = field(default_factory=list)
    offloaded_time: float = 0.0  # catch-up plus big-segment wall time, summed over requests
    model_time: list[float] = field(default_factory=lambda: [0.0, 0.0])  # forward + sampling seconds

    def add(self, m: RequestMetrics) -> None:
        self.requests += 1
        self.small_tokens += m.small_tokens
        self.big_tokens += m.big_tokens
        self.handoffs += m.handoffs
        self.rolled_back_tokens += m.rolled_back_tokens
        for i in range(2):
            self.catch_up_tokens[i] += m.catch_up_tokens[i]
            self.tokens_processed[i] += m.tokens_processed[i]
        self.handoff_latencies += m.handoff_latencies
        self.offloaded_time += m.catch_up_time + m.big_time

    @property
    def offload_fraction(self) -> float:
        total = self.small_tokens + self.big_tokens
        return self.big_tokens / total if total else 0.0

    def summary(self) -> dict:
        """Plain numbers, for JSON and for `splitreason generate --stats`."""
        lat = sorted(self.handoff_latencies)
        return {
            "requests": self.requests,
            "small_tokens": self.small_tokens,
            "big_tokens": self.big_tokens,
            "offload_fraction": self.offload_fraction,
            "handoffs": self.handoffs,
            "catch_up_tokens_small": self.catch_up_tokens[0],
            "catch_up_tokens_big": self.catch_up_tokens[1],
            "tokens_processed_small": self.tokens_processed[0],
            "tokens_processed_big": self.tokens_processed[1],
            "rolled_back_tokens": self.rolled_back_tokens,
            "handoff_latency_mean_s": sum(lat) / len(lat) if lat else None,
            "handoff_latency_p50_s": lat[len(lat) // 2] if lat else None,
            "latency_per_offloaded_token_s": self.offloaded_time / self.big_tokens if self.big_tokens else None,
            "small_model_time_s": self.model_time[0],
            "big_model_time_s": self.model_time[1] if self.num_models > 1 else None,
        }
