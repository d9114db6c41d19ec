"""The server's Prometheus /metrics: latency histograms it observes itself, and the engine's gauges
and counters (requests, KV pages, tokens per model, handoffs, held big steps, JIT compiles)."""

from bisect import bisect_left

from .async_engine import AsyncEngine
from .requests import MODEL_NAMES


class Histogram:
    """A Prometheus histogram with fixed buckets (seconds)."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self, name: str, help_: str):
        self.name, self.help = name, help_
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.total, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.BUCKETS, value)] += 1
        self.total += value
        self.n += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.BUCKETS, self.counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.n}', f"{self.name}_sum {self.total}", f"{self.name}_count {self.n}"]
        return lines


class Metrics:
    def __init__(self):
        self.ttft = Histogram("splitreason_time_to_first_token_seconds", "Time from request to first token.")
        self.itl = Histogram("splitreason_inter_token_latency_seconds", "Time between streamed token batches.")
        self.e2e = Histogram("splitreason_e2e_request_latency_seconds", "Time from request to last token.")
        self.rejected = 0

    def render(self, engine: AsyncEngine) -> str:
        snap = engine.snapshot
        stats = engine.engine.stats.summary()
        lines = []
        for name, kind, help_, value in [
            ("splitreason_requests_running", "gauge", "Requests running.", snap.running),
            ("splitreason_requests_waiting", "gauge", "Requests waiting.", snap.waiting),
            ("splitreason_kv_pages_free", "gauge", "KV pages free.", snap.free_pages),
            ("splitreason_kv_pages_total", "gauge", "KV pages in the shared pool.", engine.engine.pool.num_pages),
            ("splitreason_kv_pages_cached", "gauge", "KV pages nobody holds that keep reusable prefix KV "
             "(counted in kv_pages_free too: evicted when needed).", snap.cached_pages),
            ("splitreason_prefix_caching_enabled", "gauge", "1 when full KV pages are kept and shared across "
             "requests (prefix caching), else 0.", int(engine.engine.scheduler.prefix_caching)),
            ("splitreason_requests_finished_total", "counter", "Requests finished.", stats["requests"]),
            ("splitreason_requests_failed_total", "counter", "Requests that failed inside the engine "
             "(finish_reason error).", stats["errors"]),
            ("splitreason_requests_rejected_total", "counter", "Requests refused with 503.", self.rejected),
            ("splitreason_handoffs_total", "counter", "Small-to-big handoffs.", stats["handoffs"]),
            ("splitreason_offloaded_tokens_total", "counter", "Tokens written by the big model.", stats["big_tokens"]),
            ("splitreason_draft_tokens_total", "counter", "Small-model drafts verified by a big step.",
             stats["draft_tokens"]),
            ("splitreason_accepted_draft_tokens_total", "counter", "Drafts kept as big-model tokens.",
             stats["accepted_draft_tokens"]),
            ("splitreason_big_steps_per_offloaded_token", "gauge", "Big-model steps per big-model token, over "
             "finished requests (1 without drafting).", stats["big_steps_per_offloaded_token"] or 0),
            ("splitreason_latency_per_offloaded_token_seconds", "gauge", "Catch-up and big-segment time per "
             "big-model token, over finished requests.", stats["latency_per_offloaded_token_s"] or 0),
            ("splitreason_jit_compiles_total", "counter", "Triton kernel variants compiled (start-up included).",
             stats["jit_compiles_total"]),
            ("splitreason_jit_compiles_after_startup", "gauge", "Triton kernel variants compiled while serving.",
             stats["jit_compiles_after_startup"]),
            ("splitreason_big_held_steps_total", "counter", "Steps in which the policy held the big model back.",
             stats["held_steps"]),
            ("splitreason_big_rows_per_step", "gauge", "Mean rows per big-model step.",
             stats["mean_rows_per_big_step"] or 0),
        ]:
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += ["# HELP splitreason_kv_pages_used KV pages held, per model.", "# TYPE splitreason_kv_pages_used gauge"]
        lines += [f'splitreason_kv_pages_used{{model="{m}"}} {n}' for m, n in zip(MODEL_NAMES, snap.pages_held)]
        lines += ["# HELP splitreason_generated_tokens_total Tokens written, per model.",
                  "# TYPE splitreason_generated_tokens_total counter",
                  f'splitreason_generated_tokens_total{{model="small"}} {stats["small_tokens"]}',
                  f'splitreason_generated_tokens_total{{model="big"}} {stats["big_tokens"]}']
        lines += ["# HELP splitreason_prefix_cache_hit_tokens_total Tokens whose KV came from the prefix cache, per model.",
                  "# TYPE splitreason_prefix_cache_hit_tokens_total counter"]
        lines += [f'splitreason_prefix_cache_hit_tokens_total{{model="{m}"}} {n}' for m, n in
                  zip(MODEL_NAMES, (stats["prefix_cache_hit_tokens_small"], stats["prefix_cache_hit_tokens_big"]))
                  if n is not None]
        lines += ["# HELP splitreason_model_steps_total Engine steps in which each model ran.",
                  "# TYPE splitreason_model_steps_total counter"]
        lines += [f'splitreason_model_steps_total{{model="{m}"}} {n}' for m, n in
                  zip(MODEL_NAMES, (stats["steps_small"], stats["steps_big"])) if n is not None]
        for q in ("p50", "p99"):
            value = stats[f"big_wait_{q}_s"]
            lines += [f"# HELP splitreason_big_wait_{q}_seconds Wait before a big segment's first big step, {q}.",
                      f"# TYPE splitreason_big_wait_{q}_seconds gauge", f"splitreason_big_wait_{q}_seconds {value or 0}"]
        for h in (self.ttft, self.itl, self.e2e):
            lines += h.render()
        return "\n".join(lines) + "\n"
