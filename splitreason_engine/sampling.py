"""Sampling parameters and the batched sampler, on top of the fused sample-and-detect op.

Randomness is drawn per request from (seed, index of the token in the output), so a seeded
request gets the same tokens whatever else shares its batch, and after a preemption.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection

import numpy as np
import torch

from .kernels.sample import GREEDY_BELOW, STATE_SHIFT

if TYPE_CHECKING:
    from .tags import TagDetector

MODES = ("split", "small", "big", "random")  # SplitReason, either model alone, the random-switch baseline
INT32_MAX = 2**31 - 1
MAX_SPECULATE = 8  # most drafts one big step verifies


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 is greedy. top_k <= 0 and top_p = 1 disable those filters. `stop` strings end
    the request when they appear in the text (they are cut from the returned text);
    `stop_token_ids` end it when sampled (kept). `logprobs` returns the log-probability, under the
    model's unmodified distribution, of every chosen token, and `top_logprobs` (implies `logprobs`)
    the most likely that many alternatives with theirs, computed on the device beside the sample.
    `prompt_logprobs` (None: off; N >= 0) returns every prompt token's log-probability given the
    tokens before it, with the top N alternatives, computed in the prefill (modes small and big,
    whose prompt is the text given; the request then computes its whole prompt, not reading
    the prefix cache); with it `max_tokens` may be 0 (score the prompt only). `logit_bias` ({token id: bias}, as in
    the OpenAI API) is added to the logits of every model that samples for the request.

    `mode`: "split" (the small model writes and hands `<bigmodel>` segments to the big one, at most
    `max_offload_tokens` big tokens each), "small" or "big" alone, or "random" (each chunk of
    `switch_chunk` tokens goes to the big model with probability 1 / (switch_ratio + 1), drawn
    from `seed`). None means "split" on an engine with two models, else "small".

    `speculate`: the most tokens the small model drafts ahead for one big step to verify, in big
    segments (split mode), random mode's big chunks and `big` mode: 0 turns drafting off, None takes
    the engine's default.
    Greedy tokens are the same either way; sampled big tokens keep their distribution.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: "int | None" = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: "int | None" = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    mode: "str | None" = None
    max_offload_tokens: int = 512
    switch_ratio: float = 9.0
    switch_chunk: int = 16
    speculate: "int | None" = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()
        self.logprobs = self.logprobs or self.top_logprobs > 0
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)

    def validate(self) -> None:
        """Raises ValueError naming the first bad field (also run when a request is queued)."""
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not _is_int(self.max_offload_tokens) or not 1 <= self.max_offload_tokens <= INT32_MAX:
            raise ValueError(f"max_offload_tokens must be an integer >= 1, got {self.max_offload_tokens!r}")
        if not _is_number(self.switch_ratio) or not 0 <= self.switch_ratio < math.inf:
            raise ValueError(f"switch_ratio must be a finite number >= 0, got {self.switch_ratio!r}")
        if self.speculate is not None and (not _is_int(self.speculate) or not 0 <= self.speculate <= MAX_SPECULATE):
            raise ValueError(f"speculate must be None or an integer in 0..{MAX_SPECULATE}, got {self.speculate!r}")
        if not _is_int(self.switch_chunk) or not 1 <= self.switch_chunk <= INT32_MAX:
            raise ValueError(f"switch_chunk must be an integer >= 1, got {self.switch_chunk!r}")
        if not isinstance(self.logit_bias, dict) or any(
                not _is_int(k) or not 0 <= k <= INT32_MAX or not _is_number(v) or not -100 <= v <= 100
                for k, v in self.logit_bias.items()):
            raise ValueError(f"logit_bias must map token ids to biases in [-100, 100], got {self.logit_bias!r}")
        if not _is_number(self.temperature) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k):
            raise ValueError(f"top_k must be an integer (<= 0 disables it), got {self.top_k!r}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= INT32_MAX:
            raise ValueError(f"top_logprobs must be an integer >= 0, got {self.top_logprobs!r}")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs) or
                                                 not 0 <= self.prompt_logprobs <= INT32_MAX):
            raise ValueError(f"prompt_logprobs must be None or an integer >= 0, got {self.prompt_logprobs!r}")
        least = 0 if self.prompt_logprobs is not None else 1  # 0: score the prompt, generate nothing
        if not _is_int(self.max_tokens) or not least <= self.max_tokens <= INT32_MAX:
            raise ValueError(f"max_tokens must be an integer in [{least}, 2**31)"
                             f"{'' if least == 0 else ' (0 only with prompt_logprobs)'}, got {self.max_tokens!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or any(
                not _is_int(t) or not 0 <= t <= INT32_MAX for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        """Temperatures this close to 0 would overflow the scaled logits: treat them as greedy."""
        return self.temperature < GREEDY_BELOW or self.top_k == 1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def noise_seed(seed: int, index: int, model: int = 0) -> int:
    """A 63-bit seed for the `index`-th token of a request seeded with `seed`, as `model` draws it
    (splitmix64 mix). The models draw apart: the small model's choice at an index (a decision, a
    draft) and the big model's token there must not share their noise."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + model * 0xD1B54A32D192ED03
         + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 32)) & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class RowInputs:
    """The fused op's per-row inputs on the sampling device: views of one int32 buffer, so they
    reach a GPU in one asynchronous copy from pinned memory while the forward pass still runs."""

    temperature: torch.Tensor  # fp32; 0 for greedy rows
    top_k: torch.Tensor  # int32; 0: off
    top_p: torch.Tensor  # fp32; 1: off
    keys: torch.Tensor  # int64 noise keys
    det_states: torch.Tensor  # int32; -1: no tag detection
    stop_ids: torch.Tensor  # int32 [n, K], -1 padded

    @classmethod
    def build(cls, params: list[SamplingParams], output_indices: list[int], generator: torch.Generator,
              det_states: list[int], stop_ids: list[Collection[int]], device: torch.device,
              model: int = 0) -> "RowInputs":
        """Seeded rows' noise keys come from (seed, index of the token in the output, model); the
        others' are drawn from `generator` (a CPU generator), only when some sampled row needs one."""
        n, width = len(params), max(map(len, stop_ids), default=0)
        buf = np.empty(6 * n + n * width, dtype=np.int32)
        keys = buf[: 2 * n].view(np.int64)
        keys[:] = [noise_seed(p.seed, i, model) if p.seed is not None else 0 for p, i in zip(params, output_indices)]
        drawn = np.array([p.seed is None and not p.greedy for p in params], dtype=bool)
        if drawn.any():
            keys[drawn] = torch.randint(0, 2**63 - 1, (n,), generator=generator).numpy()[drawn]
        buf[2 * n: 3 * n].view(np.float32)[:] = [0.0 if p.greedy else p.temperature for p in params]
        buf[3 * n: 4 * n].view(np.float32)[:] = [1.0 if p.greedy else p.top_p for p in params]
        buf[4 * n: 5 * n] = [0 if p.greedy or p.top_k <= 0 else min(p.top_k, INT32_MAX) for p in params]
        buf[5 * n: 6 * n] = det_states
        stops = buf[6 * n:].reshape(n, width)
        stops[:] = -1
        for row, ids in enumerate(stop_ids):
            stops[row, : len(ids)] = list(ids)
        host = torch.from_numpy(buf)
        t = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
        return cls(t[2 * n: 3 * n].view(torch.float32), t[4 * n: 5 * n], t[3 * n: 4 * n].view(torch.float32),
                   t[: 2 * n].view(torch.int64), t[5 * n: 6 * n], t[6 * n:].view(n, width))


@dataclass(frozen=True)
class DetectTables:
    """A TagDetector's tables on the sampling device; a single all-zero state when there is none."""

    next_state: torch.Tensor  # [S, V] int32
    flags: torch.Tensor  # [S, V] uint8: OPEN / CLOSE completed inside the token
    closing: torch.Tensor  # [S] bool: the text ends in a proper prefix of a close tag

    @classmethod
    def build(cls, detector: "TagDetector | None", device) -> "DetectTables":
        if detector is None:
            return cls(torch.zeros(1, 1, dtype=torch.int32, device=device),
                       torch.zeros(1, 1, dtype=torch.uint8, device=device),
                       torch.zeros(1, dtype=torch.bool, device=device))
        return cls(*(torch.from_numpy(t).to(device) for t in (detector.next_state, detector.flags, detector.closing)))


def to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on `device` without waiting for the work queued there: a copy from
    pageable memory would synchronise with the stream, so CUDA copies go through pinned memory."""
    host = torch.from_numpy(np.ascontiguousarray(values))
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host


def sample_and_detect(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int],
                      generator: torch.Generator, real_vocab: int, op: Callable, det_states: list[int],
                      tables: DetectTables, stop_ids: list[Collection[int]],
                      state_feed: "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None" = None, model: int = 0,
                      with_logprobs: bool = False) -> tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]:
    """Picks one token per row of fp32 `logits` [n, V] and steps its tag automaton in one op
    (`op`: kernels.sample.sample_and_detect_ref or the Triton kernel); returns (token ids int32,
    detection words int32, logprobs or None).

    `output_indices[i]` is how many tokens row i's request has generated so far (the noise index);
    `det_states[i]` its automaton state (-1: no detection), `stop_ids[i]` the ids that stop it;
    `generator` (on the CPU) draws unseeded rows' noise keys. Ids >= `real_vocab` (padding rows of
    the embedding) are never chosen. `state_feed` (rows, words, word rows): those rows' automaton
    states are the states in the detection words of a step whose results are still on the device.
    `model` picks the noise stream of seeded rows (noise_seed). Logprobs come back when a row asks
    for them or `with_logprobs` (drafting reads the small model's confidence in its drafts).
    """
    rows = RowInputs.build(params, output_indices, generator, det_states, stop_ids, logits.device, model)
    if state_feed is not None:
        feed_rows, words, word_rows = state_feed
        rows.det_states.index_copy_(0, feed_rows, words.index_select(0, word_rows) >> STATE_SHIFT)
    x = with_logit_bias(logits, params)
    biased = x is not logits
    filters = any(not p.greedy and (p.top_k > 0 or p.top_p < 1) for p in params)
    tokens, words, logprobs = op(x, rows.temperature, rows.top_k, rows.top_p, rows.keys, real_vocab, rows.det_states,
                                 tables.next_state, tables.flags, tables.closing, rows.stop_ids, filters=filters)
    if not with_logprobs and not any(p.logprobs for p in params):
        return tokens, words, None
    if biased:  # logprobs are those of the unbiased distribution
        logprobs = torch.log_softmax(logits[:, :real_vocab].float(), dim=-1).gather(1, tokens.long()[:, None]).squeeze(1)
    return tokens, words, logprobs


def with_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`logits` with each row's logit_bias added (a copy), or `logits` itself when no row has one."""
    biased = [(row, p.logit_bias) for row, p in enumerate(params) if p.logit_bias]
    if not biased:
        return logits
    x = logits.clone()
    for row, bias in biased:
        ids = to_device(np.array(list(bias), dtype=np.int64), logits.device)
        x[row, ids] += to_device(np.array(list(bias.values()), dtype=np.float32), logits.device).to(x.dtype)
    return x


def generation_defaults(folder: Path) -> dict:
    """Sampling defaults a checkpoint sets in generation_config.json (as vLLM reads them): only the
    fields it spells out; `"do_sample": false` means greedy."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    defaults = {key: raw[key] for key in ("temperature", "top_p", "top_k") if isinstance(raw.get(key), (int, float))}
    if raw.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults
