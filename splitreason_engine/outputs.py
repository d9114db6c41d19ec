"""What generate() returns and what the streaming form yields."""

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Per-request timings (seconds on the engine's clock: time.perf_counter, or simulated) and token counts."""

    arrival_time: float
    first_token_time: "float | None" = None
    finished_time: "float | None" = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    # SplitReason figures. Index 0 is the small model, 1 the big one.
    mode: str = ""
    small_tokens: int = 0  # output tokens written by the small model (forced close tags included)
    big_tokens: int = 0  # output tokens written by the big model (offloaded)
    handoffs: int = 0  # small -> big switches
    catch_up_tokens: list[int] = field(default_factory=lambda: [0, 0])  # text a model read but did not write
    tokens_processed: list[int] = field(default_factory=lambda: [0, 0])  # run through each model, recomputation included
    rolled_back_tokens: int = 0  # generated ahead or tentatively, then discarded
    small_time: float = 0.0  # wall seconds with the small model writing
    big_time: float = 0.0  # wall seconds with the big model writing (first big token to segment end)
    catch_up_time: float = 0.0  # wall seconds from a handoff to the first big token
    handoff_latencies: list[float] = field(default_factory=list)  # each handoff: tag sampled -> first big token
    big_waits: list[float] = field(default_factory=list)  # each handoff: tag sampled -> the big model first runs for it
    peak_pages: list[int] = field(default_factory=lambda: [0, 0])  # most KV pages held at once, per model
    cached_tokens: list[int] = field(default_factory=lambda: [0, 0])  # KV taken from the prefix cache, per model
    big_steps: int = 0  # big-model steps that sampled for this request (verify steps included)
    draft_tokens: int = 0  # small-model drafts a big step verified
    accepted_draft_tokens: int = 0  # ... and kept as big tokens

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

    @property
    def offload_fraction(self) -> float:
        total = self.small_tokens + self.big_tokens
        return self.big_tokens / total if total else 0.0

    @property
    def acceptance_rate(self) -> "float | None":
        """Drafts kept over drafts verified."""
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else None

    @property
    def big_steps_per_offloaded_token(self) -> "float | None":
        return self.big_steps / self.big_tokens if self.big_tokens else None

    @property
    def latency_per_offloaded_token(self) -> "float | None":
        """Wall time of the offloaded segments, handoffs included, per big-model token."""
        return (self.catch_up_time + self.big_time) / self.big_tokens if self.big_tokens else None


@dataclass
class RequestOutput:
    """One prompt's result. `finish_reason` is "stop", "length", "abort" (a stream closed early) or
    "error" (then `error` says why: the prompt was refused, or the request failed while running and
    keeps the tokens it had)."""

    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: "str | None" = None
    logprobs: "list[float] | None" = None
    error: "str | None" = None
    # SamplingParams.top_logprobs: per token, [(token id, logprob)] most likely first.
    top_logprobs: "list[list[tuple[int, float]]] | None" = None
    # SamplingParams.prompt_logprobs: per prompt token its logprob given the ones before (None
    # for the first), and its top alternatives.
    prompt_logprobs: "list[float | None] | None" = None
    prompt_top_logprobs: "list[list[tuple[int, float]] | None] | None" = None
    metrics: "RequestMetrics | None" = None
    token_models: list[int] = field(default_factory=list)  # per token: 0 small model, 1 big model
    stop_reason: "str | int | None" = None  # with finish_reason "stop": the stop string, or the token id

    def segments(self, decode) -> list[tuple[int, str]]:
        """(model, text) runs of consecutive tokens from the same model, decoded with `decode`."""
        runs: list[tuple[int, list[int]]] = []
        for token, model in zip(self.token_ids, self.token_models):
            if runs and runs[-1][0] == model:
                runs[-1][1].append(token)
            else:
                runs.append((model, [token]))
        return [(model, decode(ids)) for model, ids in runs]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StreamEvent:
    """New tokens of one request from one engine step (`token_models`: which model wrote each);
    `output` is set once it has finished."""

    index: int
    token_ids: list[int]
    text: str
    output: "RequestOutput | None" = None
    token_models: list[int] = field(default_factory=list)
    logprobs: "list[float] | None" = None  # of the new tokens, with SamplingParams.logprobs
    top_logprobs: "list | None" = None  # of the new tokens, with SamplingParams.top_logprobs
    # With SamplingParams.prompt_logprobs, on a request's first event: its prompt and their scores.
    prompt_token_ids: "list[int] | None" = None
    prompt_logprobs: "list[float | None] | None" = None
    prompt_top_logprobs: "list | None" = None
