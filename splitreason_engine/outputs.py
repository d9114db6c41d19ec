"""What generate() returns and what the streaming form yields."""

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Per-request timings (seconds, from time.perf_counter) and token counts."""

    arrival_time: float
    first_token_time: "float | None" = None
    finished_time: "float | None" = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0

    @property
    def time_to_first_token(self) -> "float | None":
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> "float | None":
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def decode_tokens_per_s(self) -> "float | None":
        """Tokens after the first, over the time after the first."""
        if self.finished_time is None or self.first_token_time is None or self.num_generated_tokens < 2:
            return None
        span = self.finished_time - self.first_token_time
        return (self.num_generated_tokens - 1) / span if span > 0 else None


@dataclass
class RequestOutput:
    """One prompt's result. `finish_reason` is "stop", "length", "abort" (a stream closed early) or
    "error" (then `error` says why and no tokens were generated)."""

    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: "str | None" = None
    logprobs: "list[float] | None" = None
    error: "str | None" = None
    metrics: "RequestMetrics | None" = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StreamEvent:
    """New tokens of one request from one engine step; `output` is set once it has finished."""

    index: int
    token_ids: list[int]
    text: str
    output: "RequestOutput | None" = None
