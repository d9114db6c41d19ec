"""The engine: loads both models, sizes the shared KV pool, and runs the step loop.

Each step the C++ scheduler plans a batch per model and fills flat arrays; the runners execute
them; the sampler picks tokens; each request's flow (protocol.py) decides what its views read
next and tells the scheduler (append, truncate, foreground / background / idle).
"""

import logging
import weakref
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from . import _C, executor, startup
from .config import parse_dtype
from .coschedule import make_policy
from .decode_graphs import DecodeGraphs
from .intake import Prompt, RequestIntake
from .engine_config import EngineConfig
from .jit import jit_compiles
from .kernels.ops import select_ops
from .loader import ModelSource, build_model, load_config
from .outputs import RequestOutput, StreamEvent
from .parallel import TPGroup, WorkerSpec, check_divisible
from .requests import FlowContext, Request, RequestBook
from .runner import ModelRunner, StepLink, message_capacity
from .sampling import MAX_SPECULATE, DetectTables, SamplingParams
from .stats import EngineStats
from .step_loop import EngineBroken, StepLoop
from .step_costs import StepCosts, WallClock
from .tags import TagDetector, token_bytes
from .trace import Trace
from .tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

def default_model_path() -> Path:
    """The embedded default: a small Qwen2 config (random weights) with a byte-level tokenizer."""
    return Path(str(resources.files("splitreason_engine") / "configs" / "tiny-qwen2"))


class Engine:
    """Both models, one KV pool, one step loop.

    `Engine(small, big, **options)`: the options are EngineConfig's fields by name (engine_config.py
    documents each); `Engine(config=EngineConfig(...))` takes a whole config. Without `small` the
    engine runs the embedded tiny model with random weights. `clock` (a step_costs clock; default:
    wall time) and `progress` (bars while loading and capturing) are not options of the engine's
    behaviour. With tensor_parallel_size > 1 this process is rank 0; close() stops the others.
    """

    def __init__(self, small: "str | Path | None" = None, big: "str | Path | None" = None, *,
                 config: "EngineConfig | None" = None, clock=None, progress: bool = True, **options):
        if config is None:
            config = EngineConfig.from_options(small=small, big=big, **options)
        elif small is not None or big is not None or options:
            raise TypeError("pass either config or the models and options, not both")
        self.config = config
        model, sched = config.model, config.scheduler
        self.device = torch.device(model.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available to PyTorch")
        self.dtype = parse_dtype(model.dtype or ("bfloat16" if self.device.type == "cuda" else "float32"))
        self.ops = select_ops(model.kernels, self.device)
        tp_size = config.parallel.tensor_parallel_size
        self.overlap = self.device.type == "cuda" and tp_size == 1 if sched.overlap is None else bool(sched.overlap)
        cuda_graphs = sched.cuda_graphs
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and self.ops.name == "triton" and tp_size == 1
        self.clock = clock or WallClock()
        tracing = config.tracing  # the timeline (trace.py): written at close() and at exit
        self.trace = None if tracing.trace is None else Trace(tracing.trace, tracing.trace_max_events)
        self._write_trace = None if self.trace is None else weakref.finalize(self, self.trace.flush)
        self.catch_up, self.seed = config.protocol.catch_up, model.seed
        self.template, self.tags = config.protocol.template, config.protocol.tags
        small, load_format = model.small, model.load_format
        if small is None:
            small, load_format = default_model_path(), "dummy"
        sources = [ModelSource(Path(small), load_format)]
        if model.big is not None:
            sources.append(ModelSource(Path(model.big), load_format))
        configs = [load_config(s) for s in sources]
        self.tokenizer = startup.load_tokenizer(sources[0].folder)
        if model.big is not None:
            startup.check_same_tokenizer(self.tokenizer, sources[1].folder)
        context = min(c.max_position_embeddings for c in configs)
        max_model_len = context if sched.max_model_len is None else sched.max_model_len
        if not 2 <= max_model_len <= context:
            raise ValueError(f"max_model_len must be an integer in [2, {context}] (the models' context), "
                             f"got {max_model_len!r}")
        self.max_model_len = max_model_len
        self.tp: "TPGroup | None" = None
        self._close = None  # with tensor parallelism: stops the workers (a weakref.finalize)
        if tp_size > 1:
            for s, c in zip(sources, configs):
                check_divisible(c, tp_size, str(s.config_file))
            self.tp = executor.start(WorkerSpec(config, tuple(sources), self.dtype, max_model_len,
                                                torch.get_num_threads()))
            self._close = weakref.finalize(self, executor.shutdown, self.tp)
        try:
            self._start(configs, sources, cuda_graphs, progress)
        except BaseException:
            self.close()
            raise

    def _start(self, configs, sources, cuda_graphs: bool, progress: bool) -> None:
        """Everything after the workers (if any) are started: models, pool, scheduler, runners, policy."""
        seed, max_model_len, big = self.seed, self.max_model_len, len(sources) > 1
        cache, sched, cosched = self.config.cache, self.config.scheduler, self.config.coschedule
        max_num_seqs, max_num_batched_tokens = sched.max_num_seqs, sched.max_num_batched_tokens
        self.models = [build_model(s, c, self.dtype, self.device, max_model_len, seed + i, progress, self.ops,
                                   self.tp) for i, (s, c) in enumerate(zip(sources, configs))]
        self.pool = startup.build_pool(configs, self.dtype, self.device, max_model_len, cache.page_tokens,
                                       cache.kv_cache_bytes, cache.kv_cache_memory_fraction, self.tp)
        logger.info("KV pool: %s", self.pool.describe())
        self.scheduler = _C.Scheduler(self.pool.num_pages, max_num_seqs, max_num_batched_tokens, max_model_len,
                                      [g.page_tokens for g in self.pool.geometries],
                                      prefix_caching=cache.prefix_caching)
        eos = {t for c in configs for t in c.eos_token_ids} | set(self.tokenizer.eos_token_ids if self.tokenizer else ())
        self.eos_token_ids = sorted(eos)
        # Ids past the tokenizer's entries (padding rows of the embedding) are never valid.
        self.real_vocab = [min(self.tokenizer.vocab_size, c.vocab_size) if self.tokenizer else c.vocab_size
                           for c in configs]
        self.detector = None  # split mode needs it, so only an engine with two models builds it
        if self.tokenizer is not None:
            self.tokenizer.keep_in_text(self.tags.all)  # tags are text, also for one model alone
            if big:
                self.detector = TagDetector(self.tags, token_bytes(self.tokenizer))
        self.detect_tables = DetectTables.build(self.detector, self.device)

        self.runners = []
        capacity = max(message_capacity(self.scheduler.buffers(i)) for i in range(len(self.models)))
        if self.tp is not None:  # the workers build their pools and wait for steps
            self.tp.send_setup(self.pool.num_pages, self.pool.page_bytes, capacity)
        for i, m in enumerate(self.models):
            width = self.scheduler.max_pages_per_seq(i)
            graphs = DecodeGraphs(m, self.pool.kv_caches[i], max_num_seqs, width, self.device) if cuda_graphs else None
            link = StepLink(self.tp, i, capacity) if self.tp is not None else None
            self.runners.append(ModelRunner(m, self.pool.kv_caches[i], self.scheduler.buffers(i), width, self.device,
                                            graphs, link))
        self.stats = EngineStats(len(self.models), jit_counter=jit_compiles)
        self.stats.warmup_s = startup.warm_up(self, progress)
        step_costs = cosched.step_costs
        if isinstance(step_costs, (str, Path)):
            step_costs = StepCosts.load(step_costs)
        policy, self.step_costs = startup.choose_policy(self.runners, cosched.coschedule, step_costs, max_num_seqs,
                                                        max_num_batched_tokens, max_model_len,
                                                        cosched.gather_min_share, cosched.max_big_wait_steps,
                                                        cosched.max_big_wait_s)
        self.stats.policy = policy.describe()
        self.stats.jit_compiles_at_startup = jit_compiles()
        self.book = RequestBook(self.scheduler, self.tokenizer, max_model_len, len(self.models), self.stats)
        self._requests = self.book.live
        self.loop = StepLoop(self.scheduler, self.runners, self.book, self.stats, self.clock, policy,
                             self.ops.sample_and_detect, self.ops.verify_rows, self.detect_tables, self.real_vocab, seed, self.device,
                             max_model_len, self.overlap, self.pool, trace=self.trace)
        flows = FlowContext(self.book, self.tokenizer, self.tags, self.detector, self.catch_up, len(self.models),
                            self.config.protocol.speculate, self.step_costs, min(MAX_SPECULATE, max_num_batched_tokens - 1),
                            trace=self.trace)
        self.intake = RequestIntake(flows, self.template, self.real_vocab, max_model_len, self.eos_token_ids, seed,
                                    self.clock)

    def close(self) -> None:
        """Stops the tensor-parallel workers and writes the trace, if any (both also done at exit)."""
        if self._close is not None:
            self._close()
        if self._write_trace is not None:
            self._write_trace()

    # ---- set-up -------------------------------------------------------------------------------

    def use_policy(self, coschedule: str, **bounds) -> None:
        """Switches the co-scheduling policy (`bounds`: make_policy's min_share, max_wait_steps,
        max_wait_s); a benchmark compares policies on one engine this way."""
        if len(self.models) > 1:
            self.loop.policy = make_policy(coschedule, self.step_costs, **bounds)
            self.stats.policy = self.loop.policy.describe()

    @property
    def policy(self):
        return self.loop.policy

    @property
    def broken(self) -> "EngineBroken | None":
        """Why the engine gave up, once it has (every later step raises it)."""
        return self.loop.broken

    def step(self) -> int:
        """One engine step over every queued request (StepLoop.step); returns how many sequences ran."""
        return self.loop.step()

    # ---- requests -----------------------------------------------------------------------------

    def add_request(self, prompt: Prompt, params: SamplingParams, index: int = 0,
                    sample_of: "int | None" = None) -> int:
        """Queues one prompt (RequestIntake.add); raises ValueError naming the problem if it cannot
        be served. In split and random modes the prompt is the question, put into the template.
        `sample_of`: a live request with the same prompt and params but its seed (another of n
        samples) whose computed prompt this one copies instead of computing it: its full pages
        through the prefix cache, its partial last page by a page copy (in one process only)."""
        copy_from = sample_of if self.tp is None and sample_of in self._requests else None
        return self.intake.add(prompt, params, index, copy_from)

    def abort(self, request_id: int, error: "str | None" = None) -> None:
        """Ends a queued or running request now and frees its pages: finish_reason "abort", or
        "error" with `error` as its message (a server shutting down)."""
        req = self._requests.get(request_id)
        if req is None:
            return
        if error is None:
            self.book.end(req, "abort", self.clock.now())
        else:
            self.book.fail(req, error, self.clock.now())

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ---- front doors --------------------------------------------------------------------------

    def _submit(self, prompts, params, stream: bool,
                sample_of: "int | None" = None) -> tuple[list[RequestOutput], list[Request]]:
        """Queues every servable prompt; the others get an "error" output. On an unexpected
        exception nothing stays queued. `sample_of`: add_request's."""
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
                    rid = self.add_request(prompt, p, index=i, sample_of=sample_of)
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

    def _finalize(self, req: Request) -> RequestOutput:
        out = req.output
        out.token_ids = req.tokens
        out.token_models = req.token_models
        out.stop_reason = req.stop_reason
        out.finish_reason = req.finish_reason
        out.error = req.error
        p = req.params
        values, tops = _scores(req.logprobs)
        out.logprobs = values if p.logprobs else None
        out.top_logprobs = tops if p.top_logprobs else None
        if req.prompt_logprobs is not None:
            out.prompt_logprobs, out.prompt_top_logprobs = _scores(req.prompt_logprobs)
        if req.detokenizer is not None:
            out.text = req.text
        elif self.tokenizer is not None:
            out.text = self.tokenizer.decode(req.tokens)
        return out

    def _event(self, req: Request) -> "StreamEvent | None":
        """What a stream of `req` has not yielded yet (None: nothing new). Text that could still
        turn out to be part of a stop string is held back until it cannot."""
        done = req.finish_reason is not None
        sent, p = req.sent_tokens, req.params
        tokens, models = req.tokens[sent:], req.token_models[sent:]
        values, tops = _scores(req.logprobs[sent:])
        logprobs, top = (values if p.logprobs else None), (tops if p.top_logprobs else None)
        visible = len(req.text) if done else max(req.sent_text, len(req.text) - req.holdback)
        text = req.text[req.sent_text:visible]
        req.sent_tokens, req.sent_text = len(req.tokens), visible
        if not tokens and not done:
            return None
        event = StreamEvent(req.index, tokens, text, self._finalize(req) if done else None, models, logprobs, top)
        if sent == 0 and req.prompt_logprobs is not None:
            event.prompt_token_ids = req.prompt
            event.prompt_logprobs, event.prompt_top_logprobs = _scores(req.prompt_logprobs)
        return event

    def _step_for(self, pending: list[Request]) -> None:
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
                    event = self._event(req)
                    if event is not None:
                        yield event
                    if event is None or event.output is None:  # not finished when this event was made
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


def _scores(logprobs: list) -> tuple[list, list]:
    """Plain logprobs and their top alternatives (logprobs.TokenLogprob); None for a token the
    sampler did not choose (a forced close tag, a prompt's first token)."""
    return [None if lp is None else float(lp) for lp in logprobs], [getattr(lp, "top", None) for lp in logprobs]
