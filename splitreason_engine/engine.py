"""The engine: loads the models, sizes the shared KV pool, and runs the step loop.

Each step the C++ scheduler plans a batch per model and fills flat arrays; the runners execute
them; the sampler picks tokens; the scheduler applies them (append, stop, free pages).
"""

import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
from tqdm.auto import tqdm

from . import _C
from .config import parse_dtype
from .kv_pool import KVPool, available_bytes, geometry, page_bytes_for
from .loader import ModelSource, build_model, load_config
from .outputs import RequestMetrics, RequestOutput, StreamEvent
from .runner import ModelRunner
from .sampling import MODES, SamplingParams, sample
from .tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

_FINISH_REASONS = {_C.FINISH_STOP: "stop", _C.FINISH_LENGTH: "length"}


def default_model_path() -> Path:
    """The embedded default: a small Qwen2 config (random weights) with a byte-level tokenizer."""
    return Path(str(resources.files("splitreason_engine") / "configs" / "tiny-qwen2"))


@dataclass
class _Request:
    id: int
    index: int
    prompt: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # streamed text so far (only kept when streaming or matching stop strings)
    detokenizer: "IncrementalDetokenizer | None" = None
    finish_reason: "str | None" = None
    stopped_by_string: bool = False
    output: "RequestOutput | None" = None  # filled in when the request finishes
    sent_tokens: int = 0  # how much a stream has already yielded
    sent_text: int = 0

    @property
    def holdback(self) -> int:
        """Trailing characters that could still start a stop string."""
        return max((len(s) for s in self.params.stop), default=1) - 1


Prompt = Union[str, list[int]]


class Engine:
    """Both models, one KV pool, one step loop.

    small / big: a checkpoint folder (or a config.json path with load_format="dummy"); small
    defaults to the embedded tiny model with random weights. KV memory is `kv_cache_bytes` if
    given, else `kv_cache_memory_fraction` of the memory free after loading (defaults 0.9 on
    CUDA, 0.05 on the host).
    """

    def __init__(self, small: "str | Path | None" = None, big: "str | Path | None" = None, *,
                 device: str = "cpu", dtype: "str | torch.dtype | None" = None, load_format: str = "auto",
                 page_tokens: int = 16, kv_cache_bytes: "int | None" = None,
                 kv_cache_memory_fraction: "float | None" = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, max_model_len: "int | None" = None, seed: int = 0,
                 progress: bool = True):
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device must be 'cpu' or 'cuda' (optionally 'cuda:N'), got {device!r}") from e
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available to PyTorch")
        self.dtype = parse_dtype(dtype or ("bfloat16" if self.device.type == "cuda" else "float32"))
        for name, value in (("page_tokens", page_tokens), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if small is None:
            small, load_format = default_model_path(), "dummy"
        sources = [ModelSource(Path(small), load_format)]
        if big is not None:
            sources.append(ModelSource(Path(big), load_format))
        configs = [load_config(s) for s in sources]
        self.tokenizer = self._load_tokenizer(sources[0].folder)
        context = min(c.max_position_embeddings for c in configs)
        if max_model_len is None:
            max_model_len = context
        if not isinstance(max_model_len, int) or not 2 <= max_model_len <= context:
            raise ValueError(f"max_model_len must be an integer in [2, {context}] (the models' context), got {max_model_len!r}")
        self.max_model_len = max_model_len

        self.models = [build_model(s, c, self.dtype, self.device, max_model_len, seed + i, progress)
                       for i, (s, c) in enumerate(zip(sources, configs))]
        self.pool = self._build_pool(configs, page_tokens, kv_cache_bytes, kv_cache_memory_fraction)
        logger.info("KV pool: %s", self.pool.describe())
        self.scheduler = _C.Scheduler(self.pool.num_pages, max_num_seqs, max_num_batched_tokens, max_model_len,
                                      [g.page_tokens for g in self.pool.geometries])
        self.runners = [ModelRunner(m, self.pool.kv_caches[i], self.scheduler.buffers(i),
                                    self.scheduler.max_pages_per_seq(i), self.device)
                        for i, m in enumerate(self.models)]
        self._counts = self.scheduler.counts().reshape(len(self.models), _C.NUM_COUNT_FIELDS)
        self._finished_ids = self.scheduler.finished_ids()
        self._finished_reasons = self.scheduler.finished_reasons()
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._requests: dict[int, _Request] = {}
        self._next_id = 0
        eos = {t for c in configs for t in c.eos_token_ids} | set(self.tokenizer.eos_token_ids if self.tokenizer else ())
        self.eos_token_ids = sorted(eos)
        # Ids past the tokenizer's entries (padding rows of the embedding) are never valid.
        self.real_vocab = [min(self.tokenizer.vocab_size, c.vocab_size) if self.tokenizer else c.vocab_size
                           for c in configs]

    # ---- set-up -------------------------------------------------------------------------------

    @staticmethod
    def _load_tokenizer(folder: Path) -> "Tokenizer | None":
        if not (folder / "tokenizer.json").is_file():
            logger.warning("%s has no tokenizer.json: prompts must be token ids", folder)
            return None
        return Tokenizer(folder)

    def _build_pool(self, configs, page_tokens, kv_cache_bytes, fraction) -> KVPool:
        page_bytes = page_bytes_for(configs, self.dtype, page_tokens)
        if kv_cache_bytes is None:
            if fraction is None:
                fraction = 0.9 if self.device.type == "cuda" else 0.05
            if not 0 < fraction <= 1:
                raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {fraction}")
            kv_cache_bytes = int(available_bytes(self.device) * fraction)
        if not isinstance(kv_cache_bytes, int) or kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be a positive integer, got {kv_cache_bytes!r}")
        num_pages = kv_cache_bytes // page_bytes
        for i, c in enumerate(configs):
            per_page = geometry(c, self.dtype, page_bytes).page_tokens
            if num_pages * per_page < self.max_model_len:
                raise ValueError(
                    f"KV pool too small for one request: {kv_cache_bytes} bytes = {num_pages} pages of "
                    f"{page_bytes} bytes hold {num_pages * per_page} tokens of model {i}, but max_model_len "
                    f"is {self.max_model_len} (needs {-(-self.max_model_len // per_page)} pages); "
                    "raise kv_cache_bytes or lower max_model_len"
                )
        return KVPool(configs, self.dtype, self.device, page_bytes, num_pages)

    # ---- requests -----------------------------------------------------------------------------

    def _model_index(self, params: SamplingParams) -> int:
        if params.mode == "big" and len(self.models) < 2:
            raise ValueError("mode 'big' needs a big model: Engine(big=...)")
        return MODES.index(params.mode)

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer.json: pass the prompt as a list of token ids")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def add_request(self, prompt: Prompt, params: SamplingParams, index: int = 0) -> int:
        """Queues one prompt; raises ValueError naming the problem if it cannot be served."""
        ids = self._tokenize(prompt)
        model = self._model_index(params)
        vocab = self.real_vocab[model]
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens is too long: this engine's context is "
                             f"max_model_len={self.max_model_len} tokens, prompt plus at least one new token")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        stop_ids = list(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids += self.eos_token_ids
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        rid = self._next_id
        self._next_id += 1
        self.scheduler.add_request(rid, model, ids, params.max_tokens, stop_ids)
        self._requests[rid] = _Request(rid, index, ids, params,
                                       RequestMetrics(time.perf_counter(), num_prompt_tokens=len(ids)))
        return rid

    def abort(self, request_id: int) -> None:
        """Ends a queued or running request now (finish_reason "abort") and frees its pages."""
        req = self._requests.get(request_id)
        if req is not None:
            self.scheduler.finish(request_id)
            self._finish(req, "abort", time.perf_counter())

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ---- the step loop ------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> int:
        """One engine step over every queued request, whoever submitted it; returns how many
        sequences ran (0: nothing to do). Results accumulate on the requests themselves."""
        self.scheduler.schedule()
        ran = 0
        for m, runner in enumerate(self.runners):
            num_seqs, num_tokens, num_decodes, num_samples, width = self._counts[m].tolist()
            ran += num_seqs
            if num_seqs == 0:
                continue
            logits = runner.execute(num_seqs, num_tokens, num_decodes, num_samples, width)
            if num_samples == 0:
                continue
            reqs = [self._requests[i] for i in runner.buffers["sample_request_ids"][:num_samples].tolist()]
            tokens, logprobs = sample(logits, [r.params for r in reqs], [len(r.tokens) for r in reqs],
                                      self._generator, self.real_vocab[m])
            tokens_np = tokens.cpu().numpy()
            num_finished = self.scheduler.update(m, tokens_np)
            finished = {int(i): _FINISH_REASONS[int(r)] for i, r in
                        zip(self._finished_ids[:num_finished], self._finished_reasons[:num_finished])}
            lp = logprobs.tolist() if logprobs is not None else None
            now = time.perf_counter()
            for k, (req, token) in enumerate(zip(reqs, tokens_np.tolist())):
                self._advance(req, token, lp[k] if lp else None, finished.get(req.id), now)
        return ran

    def _advance(self, req: _Request, token: int, logprob, reason, now: float) -> None:
        req.tokens.append(token)
        if req.params.logprobs:
            req.logprobs.append(logprob)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        if req.detokenizer is not None:
            delta = req.detokenizer.step(req.tokens)
            req.text += delta
            cut = self._find_stop(req, len(delta)) if req.params.stop else None
            if cut is not None:
                req.text, req.stopped_by_string = req.text[:cut], True
                if reason is None:
                    self.scheduler.finish(req.id)
                reason = "stop"
        if reason is not None:
            if req.detokenizer is not None and not req.stopped_by_string:
                req.text = self.tokenizer.decode(req.tokens)  # flush text held back mid-character
            self._finish(req, reason, now)

    def _finish(self, req: _Request, reason: str, now: float) -> None:
        req.finish_reason = reason
        req.metrics.finished_time = now
        req.metrics.num_generated_tokens = len(req.tokens)
        del self._requests[req.id]

    @staticmethod
    def _find_stop(req: _Request, delta_len: int) -> "int | None":
        """Where the earliest stop string that ends in the new text starts, if any."""
        start = max(0, len(req.text) - delta_len - req.holdback)
        hits = [i for i in (req.text.find(s, start) for s in req.params.stop) if i >= 0]
        return min(hits) if hits else None

    # ---- front doors --------------------------------------------------------------------------

    def _submit(self, prompts, params, stream: bool) -> tuple[list[RequestOutput], list[_Request]]:
        """Queues every servable prompt; the others get an "error" output. On an unexpected
        exception nothing stays queued."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None:
            params = SamplingParams()
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        bad = [type(p).__name__ for p in per_prompt if not isinstance(p, SamplingParams)]
        if bad:
            raise TypeError(f"params must be SamplingParams, got {bad[0]}")
        outputs, reqs = [], []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, per_prompt)):
                out = RequestOutput(index=i, prompt_token_ids=[])
                outputs.append(out)
                try:
                    rid = self.add_request(prompt, p, index=i)
                except ValueError as e:
                    logger.warning("prompt %d rejected: %s", i, e)
                    out.finish_reason, out.error = "error", str(e)
                    continue
                req = self._requests[rid]
                req.output, out.prompt_token_ids, out.metrics = out, req.prompt, req.metrics
                if (stream or p.stop) and self.tokenizer is not None:
                    req.detokenizer = IncrementalDetokenizer(self.tokenizer)
                reqs.append(req)
        except BaseException:
            for req in reqs:
                self.abort(req.id)
            raise
        return outputs, reqs

    def _finalize(self, req: _Request) -> RequestOutput:
        out = req.output
        out.token_ids = req.tokens
        out.finish_reason = req.finish_reason
        out.logprobs = req.logprobs if req.params.logprobs else None
        if req.detokenizer is not None:
            out.text = req.text
        elif self.tokenizer is not None:
            out.text = self.tokenizer.decode(req.tokens)
        return out

    def _step_for(self, pending: list[_Request]) -> None:
        if self.step() == 0 and any(r.finish_reason is None for r in pending):
            raise RuntimeError("engine stalled: requests are pending but nothing was scheduled")

    def generate_stream(self, prompts: "Prompt | Sequence[Prompt]",
                        params: "SamplingParams | Sequence[SamplingParams] | None" = None) -> Iterator[StreamEvent]:
        """Yields each request's new tokens and text as the engine produces them; the event that
        finishes a request carries its output. Rejected prompts come first, as events whose output
        has finish_reason "error". Text that could still turn out to be part of a stop string is
        held back until it cannot."""
        outputs, pending = self._submit(prompts, params, stream=True)
        for out in outputs:
            if out.error:
                yield StreamEvent(out.index, [], "", out)
        try:
            while pending:
                self._step_for(pending)
                still = []
                for req in pending:
                    done = req.finish_reason is not None
                    tokens = req.tokens[req.sent_tokens:]
                    visible = len(req.text) if done else max(req.sent_text, len(req.text) - req.holdback)
                    text = req.text[req.sent_text:visible]
                    req.sent_tokens, req.sent_text = len(req.tokens), visible
                    if tokens or done:
                        yield StreamEvent(req.index, tokens, text, self._finalize(req) if done else None)
                    if not done:
                        still.append(req)
                pending = still
        finally:
            for req in pending:  # the consumer stopped early: free what is left
                self.abort(req.id)

    def generate(self, prompts: "Prompt | Sequence[Prompt]",
                 params: "SamplingParams | Sequence[SamplingParams] | None" = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in prompt order. A prompt that cannot
        be served gets finish_reason "error" and an `error` message; the others still run."""
        outputs, pending = self._submit(prompts, params, stream=False)
        # A bar in tokens: its total is the token budget, shrunk as requests stop early.
        budget = sum(r.params.max_tokens for r in pending)
        bar = tqdm(total=budget, desc="generate", unit="tok", disable=not use_tqdm or budget < 256)
        try:
            while pending:
                self._step_for(pending)
                still = []
                for req in pending:
                    if req.finish_reason is None:
                        still.append(req)
                        continue
                    self._finalize(req)
                    bar.total -= req.params.max_tokens - len(req.tokens)
                pending = still
                if not bar.disable:
                    bar.n = sum(len(o.token_ids) for o in outputs) + sum(len(r.tokens) for r in pending)
                    bar.update(0)
        finally:
            bar.close()
            for req in pending:
                self.abort(req.id)
        return outputs
