"""Sampling parameters and the batched sampler (PyTorch; the CPU path and the kernels' oracle).

Randomness is drawn per request from (seed, index of the token in the output), so a seeded
request gets the same tokens whatever else shares its batch, and after a preemption.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODES = ("split", "small", "big", "random")  # SplitReason, either model alone, the random-switch baseline
INT32_MAX = 2**31 - 1
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 is greedy. top_k <= 0 and top_p = 1 disable those filters. `stop` strings end
    the request when they appear in the text (they are cut from the returned text);
    `stop_token_ids` end it when sampled (kept). `logprobs` returns the log-probability, under the
    model's unmodified distribution, of every chosen token. `logit_bias` ({token id: bias}, as in
    the OpenAI API) is added to the logits of every model that samples for the request.

    `mode`: "split" (the small model writes and hands `<bigmodel>` segments to the big one, at most
    `max_offload_tokens` big tokens each), "small" or "big" alone, or "random" (each chunk of
    `switch_chunk` tokens goes to the big model with probability 1 / (switch_ratio + 1), drawn
    from `seed`). None means "split" on an engine with two models, else "small".
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
    logit_bias: dict[int, float] = field(default_factory=dict)
    mode: "str | None" = None
    max_offload_tokens: int = 512
    switch_ratio: float = 9.0
    switch_chunk: int = 16

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)

    def validate(self) -> None:
        """Raises ValueError naming the first bad field (also run when a request is queued)."""
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not _is_int(self.max_offload_tokens) or not 1 <= self.max_offload_tokens <= INT32_MAX:
            raise ValueError(f"max_offload_tokens must be an integer >= 1, got {self.max_offload_tokens!r}")
        if not _is_number(self.switch_ratio) or not 0 <= self.switch_ratio < math.inf:
            raise ValueError(f"switch_ratio must be a finite number >= 0, got {self.switch_ratio!r}")
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
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT32_MAX:
            raise ValueError(f"max_tokens must be an integer in [1, 2**31), got {self.max_tokens!r}")
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


def _noise_seed(seed: int, index: int) -> int:
    """A 63-bit seed for the `index`-th token of a request seeded with `seed` (splitmix64 mix)."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 32)) & 0x7FFFFFFFFFFFFFFF


def exponential_noise(vocab: int, seeds: list["int | None"], indices: list[int],
                      generator: torch.Generator, device) -> torch.Tensor:
    """Exp(1) noise per row: seeded rows from their own stream, the others from `generator`."""
    noise = torch.empty(len(seeds), vocab, device=device)
    noise.exponential_(generator=generator)
    for row, (seed, index) in enumerate(zip(seeds, indices)):
        if seed is not None:
            g = torch.Generator(device=device).manual_seed(_noise_seed(seed, index))
            noise[row].exponential_(generator=g)
    return noise


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Temperature-scaled logits with entries outside each row's top-k / top-p set to -inf."""
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    if bool((k < vocab).any()) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)[None, :]
        drop = rank >= k[:, None]
        # top-p measures mass within the top-k set, renormalised (as HF generate and vLLM do); keep
        # the smallest prefix whose mass reaches top_p (the token that crosses it stays).
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        drop |= ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (top_p < 1)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int],
           generator: torch.Generator, real_vocab: int) -> tuple[torch.Tensor, "torch.Tensor | None"]:
    """Picks one token per row of fp32 `logits` [n, V]; returns (token ids int32, logprobs or None).

    `output_indices[i]` is how many tokens row i's request has generated so far (the noise index).
    Ids >= `real_vocab` (padding rows of the embedding) are never chosen.
    """
    if logits.shape[-1] > real_vocab:
        logits = logits[:, :real_vocab]
    biased = [(row, p.logit_bias) for row, p in enumerate(params) if p.logit_bias]
    if biased:
        unbiased = logits
        logits = logits.clone()
        for row, bias in biased:
            ids = torch.tensor(list(bias), device=logits.device)
            logits[row, ids] += torch.tensor(list(bias.values()), device=logits.device, dtype=logits.dtype)
    else:
        unbiased = logits
    greedy = [p.greedy for p in params]
    tokens = logits.argmax(dim=-1)
    if not all(greedy):
        device = logits.device
        temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
        top_k = torch.tensor([0 if p.greedy else p.top_k for p in params], device=device)
        top_p = torch.tensor([1.0 if p.greedy else p.top_p for p in params], device=device)
        probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
        noise = exponential_noise(logits.shape[-1], [p.seed for p in params], output_indices, generator, device)
        sampled = (probs / noise).argmax(dim=-1)  # exponential race: P(i wins) = probs[i]
        tokens = torch.where(torch.tensor(greedy, device=device), tokens, sampled)
    logprobs = None
    if any(p.logprobs for p in params):
        logprobs = torch.log_softmax(unbiased, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens.to(torch.int32), logprobs


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
