"""The engine: loads both models, sizes the shared KV pool, and runs the step loop.

Each step the C++ scheduler plans a batch per model and fills flat arrays; the runners execute
them; the sampler picks tokens; each request's flow (protocol.py) decides what its views read
next and tells the scheduler (append, truncate, foreground / background / idle).
"""

import logging
import time
import weakref
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from . import _C, executor
from .config import parse_dtype
from .coschedule import make_policy
from .decode_graphs import DecodeGraphs
from .engine_config import EngineConfig
from .inflight import Batch, Feed, Results, Step
from .jit import jit_compiles
from .kernels.ops import select_ops
from .kernels.sample import NONFINITE
from .kv_pool import KVPool, arena_page_bytes, available_bytes, geometry, page_bytes_for
from .loader import ModelSource, build_model, load_config
from .outputs import RequestMetrics, RequestOutput, StreamEvent
from .parallel import TPFailure, TPGroup, WorkerSpec, check_divisible, local_heads
from .protocol import RandomFlow, SingleFlow, SplitFlow
from .requests import BIG, MODEL_NAMES, SMALL, FlowContext, Request, RequestBook
from .runner import ModelRunner, StepLink, message_capacity
from .sampling import DetectTables, SamplingParams, sample_and_detect, to_device
from .stats import EngineStats
from .step_costs import StepCosts, WallClock, measure
from .tags import TagDetector, token_bytes
from .tokenizer import IncrementalDetokenizer, Tokenizer
from .warmup import should_warm_up, warm_up_kernels

logger = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3  # failed forward passes of one model in a row before the engine gives up


class EngineBroken(RuntimeError):
    """The engine cannot serve any more (steps keep failing); the message says why."""


def default_model_path() -> Path:
    """The embedded default: a small Qwen2 config (random weights) with a byte-level tokenizer."""
    return Path(str(resources.files("splitreason_engine") / "configs" / "tiny-qwen2"))


Prompt = Union[str, list[int]]


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
        self._ahead: "Step | None" = None  # a step launched before the last one's tokens were applied
        cuda_graphs = sched.cuda_graphs
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and self.ops.name == "triton" and tp_size == 1
        if cuda_graphs and self.ops.name != "triton":
            raise ValueError("cuda_graphs=True needs the Triton kernels (the PyTorch reference ops sync with the host)")
        self.clock = clock or WallClock()
        self.catch_up, self.seed = config.protocol.catch_up, model.seed
        self.template, self.tags = config.protocol.template, config.protocol.tags
        small, load_format = model.small, model.load_format
        if small is None:
            small, load_format = default_model_path(), "dummy"
        sources = [ModelSource(Path(small), load_format)]
        if model.big is not None:
            sources.append(ModelSource(Path(model.big), load_format))
        configs = [load_config(s) for s in sources]
        self.tokenizer = self._load_tokenizer(sources[0].folder)
        if model.big is not None:
            self._check_same_tokenizer(sources[1].folder)
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
        self.pool = self._build_pool(configs, cache.page_tokens, cache.kv_cache_bytes, cache.kv_cache_memory_fraction)
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
        self._warm_up(max_num_seqs, max_num_batched_tokens, progress)
        step_costs = cosched.step_costs
        if isinstance(step_costs, (str, Path)):
            step_costs = StepCosts.load(step_costs)
        self.policy, self.step_costs = self._choose_policy(cosched.coschedule, step_costs, max_num_seqs,
                                                           max_num_batched_tokens, cosched.gather_min_share,
                                                           cosched.max_big_wait_steps, cosched.max_big_wait_s)
        self.stats.policy = self.policy.describe()
        self.stats.jit_compiles_at_startup = jit_compiles()
        self._counts = self.scheduler.counts().reshape(len(self.models), _C.NUM_COUNT_FIELDS)
        self._generator = torch.Generator().manual_seed(seed)  # noise keys are drawn on the host
        self.book = RequestBook(self.scheduler, self.tokenizer, max_model_len, len(self.models), self.stats)
        self._requests = self.book.live
        self._next_id = 0
        self.broken: "EngineBroken | None" = None  # set once the engine has given up
        self._failed_runs = [0] * len(self.models)  # failed forward passes in a row, per model
        self.flow_context = FlowContext(self.book, self.tokenizer, self.tags, self.detector, self.catch_up,
                                        len(self.models))

    def close(self) -> None:
        """Stops the tensor-parallel workers (also done at exit); nothing to do in one process."""
        if self._close is not None:
            self._close()

    # ---- set-up -------------------------------------------------------------------------------

    def _warm_up(self, max_num_seqs: int, max_num_batched_tokens: int, progress: bool) -> None:
        """Compiles every kernel variant serving can reach (Triton on CUDA), then captures the decode
        graphs, so that no step compiles while serving; the time it takes is in stats.warmup_s."""
        start = time.perf_counter()
        if should_warm_up(self.ops, self.device):
            for i, m in enumerate(self.models):
                warm_up_kernels(m, self.pool.kv_caches[i], self.ops, self.device, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens, max_model_len=self.max_model_len,
                                real_vocab=self.real_vocab[i], detect_tables=self.detect_tables,
                                block_table_width=self.scheduler.max_pages_per_seq(i), name=MODEL_NAMES[i],
                                link=self.runners[i].link)
        for runner in self.runners:
            if runner.graphs is not None:
                runner.graphs.capture_all(progress)
        self.stats.warmup_s = time.perf_counter() - start

    @staticmethod
    def _load_tokenizer(folder: Path) -> "Tokenizer | None":
        if not (folder / "tokenizer.json").is_file():
            logger.warning("%s has no tokenizer.json: prompts must be token ids", folder)
            return None
        return Tokenizer(folder)

    def _check_same_tokenizer(self, big_folder: Path) -> None:
        """The protocol moves token ids between the models: their tokenizers must be one."""
        big_tok = self._load_tokenizer(big_folder) if (big_folder / "tokenizer.json").is_file() else None
        if big_tok is None:
            return
        if self.tokenizer is None or not self.tokenizer.same_vocabulary(big_tok):
            raise ValueError(f"the big model's tokenizer ({big_folder / 'tokenizer.json'}) differs from the small "
                             "model's: SplitReason passes token ids between them, so both must use the same tokenizer")

    def _choose_policy(self, name, costs, max_num_seqs, max_num_batched_tokens, min_share, max_wait_steps,
                       max_wait_s):
        """The co-scheduling policy; with two models, a policy other than eager and no calibration
        file, the step costs it reads are timed here, on the models as loaded."""
        if len(self.models) < 2:
            return make_policy("eager", None), costs
        if costs is None and name != "eager":
            costs = measure(self.runners, min(max_num_seqs, max_num_batched_tokens),
                            min(max_num_batched_tokens, self.max_model_len - 1))
        policy = make_policy(name, costs, min_share, max_wait_steps, max_wait_s)
        logger.info("co-scheduling: %s (step costs: %s)", policy.describe(), costs)
        return policy, costs

    def use_policy(self, coschedule: str, **bounds) -> None:
        """Switches the co-scheduling policy (`bounds`: make_policy's min_share, max_wait_steps,
        max_wait_s); a benchmark compares policies on one engine this way."""
        if len(self.models) > 1:
            self.policy = make_policy(coschedule, self.step_costs, **bounds)
            self.stats.policy = self.policy.describe()

    def _build_pool(self, configs, page_tokens, kv_cache_bytes, fraction) -> KVPool:
        page_bytes = page_bytes_for(configs, self.dtype, page_tokens)
        measured = kv_cache_bytes is None
        if measured:
            if fraction is None:
                fraction = 0.9 if self.device.type == "cuda" else 0.05
            kv_cache_bytes = int(available_bytes(self.device) * fraction)
        num_pages = kv_cache_bytes // page_bytes
        kv_heads = None
        if self.tp is not None:
            # Each rank holds its KV heads: a fraction of its free memory buys pages at its own page
            # size; kv_cache_bytes counts pages at the full size, so it gives the pages of one process.
            kv_heads = [local_heads(c, self.tp.world_size)[1] for c in configs]
            if measured:
                num_pages = kv_cache_bytes // arena_page_bytes(configs, self.dtype, page_bytes, kv_heads)
        # One request may hold a full-length view in every model at once.
        needed = sum(-(-self.max_model_len // geometry(c, self.dtype, page_bytes).page_tokens) for c in configs)
        if num_pages < needed:
            views = "a view in each model" if len(configs) > 1 else "its view"
            raise ValueError(
                f"KV pool too small for one request: {kv_cache_bytes} bytes = {num_pages} pages of {page_bytes} "
                f"bytes, but one request of max_model_len {self.max_model_len} tokens with {views} needs "
                f"{needed} pages; raise kv_cache_bytes or lower max_model_len")
        return KVPool(configs, self.dtype, self.device, page_bytes, num_pages, kv_heads)

    # ---- requests -----------------------------------------------------------------------------

    def _mode(self, params: SamplingParams) -> str:
        mode = params.mode or ("split" if len(self.models) > 1 else "small")
        if mode != "small" and len(self.models) < 2:
            raise ValueError(f"mode {mode!r} needs a big model: Engine(small=..., big=...)")
        return mode

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer.json: pass the prompt as a list of token ids")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def _check_prompt(self, ids: list[int], vocab: int, what: str = "prompt") -> None:
        if not ids:
            raise ValueError(f"empty {what}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"{what} of {len(ids)} tokens is too long: this engine's context is "
                             f"max_model_len={self.max_model_len} tokens, prompt plus at least one new token")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def add_request(self, prompt: Prompt, params: SamplingParams, index: int = 0) -> int:
        """Queues one prompt; raises ValueError naming the problem if it cannot be served.

        In split and random modes the prompt is the question, a string, put into the template."""
        params.validate()
        mode = self._mode(params)
        vocab = min(self.real_vocab)
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias token id {max(params.logit_bias)} is outside the vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        rid = self._next_id
        metrics = RequestMetrics(self.clock.now(), mode=mode)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_token_ids))
        req = Request(rid, index, [], params, metrics, stop_ids)
        if mode in ("small", "big"):
            model = SMALL if mode == "small" else BIG
            req.prompt = self._tokenize(prompt)
            self._check_prompt(req.prompt, self.real_vocab[model])
            req.flow = SingleFlow(self.flow_context, req, model)
        else:
            if not isinstance(prompt, str) or self.tokenizer is None:
                raise ValueError(f"mode {mode!r} needs the question as a string (it is put into the prompt template)")
            small_ids = self.tokenizer.encode(self.template.small(prompt), add_special_tokens=False)
            big_ids = self.tokenizer.encode(self.template.big(prompt), add_special_tokens=False)
            self._check_prompt(small_ids, vocab, "templated prompt")
            self._check_prompt(big_ids, vocab, "templated prompt")
            req.prompt = small_ids
            if mode == "split":
                req.flow = SplitFlow(self.flow_context, req, small_ids, big_ids)
            else:
                seed = params.seed if params.seed is not None else self.seed * 1_000_003 + rid
                req.flow = RandomFlow(self.flow_context, req, small_ids, big_ids, seed)
        metrics.num_prompt_tokens = len(req.prompt)
        self.scheduler.add_request(rid, *req.flow.initial_views())
        self._next_id += 1
        self._requests[rid] = req
        return rid

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

    # ---- the step loop ------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> int:
        """One engine step over every queued request, whoever submitted it; returns how many
        sequences ran (0: nothing to do). Results accumulate on the requests themselves.

        With overlap, the next step is launched before this one's tokens reach the host, whenever
        every sampled row lets it (see _launch_ahead); the tokens are the same as without.

        Faults stay with the requests they belong to: a row with non-finite logits, or a flow or
        detokenizer that raises, fails its request only; a forward pass or sampler that raises
        fails the requests of that model's batch. Either way they end with finish_reason "error"
        and their pages go back to the pool, and the other requests go on. After
        MAX_FAILED_STEPS failed forward passes of one model in a row the engine gives up: EngineBroken."""
        if self.broken is not None:
            raise self.broken
        current, self._ahead = self._ahead, None
        if current is None:
            self._plan(self.clock.now())
            current = self._launch()
        ahead = self._launch_ahead(current) if self.overlap else None
        self._apply(current, ahead)
        if ahead is not None and ahead.ran:
            self._ahead = ahead
        if self.broken is not None:
            raise self.broken
        return current.ran

    def _launch(self, feeds: "dict | None" = None, sources: "dict | None" = None) -> Step:
        """Runs the planned step's models up to their sampled tokens, without waiting for them.
        `feeds` {(model, request id): (source row, view size)}: views that end in a placeholder for
        the token that row of `sources[model]` (the previous step's results) sampled."""
        step = Step(placeholders=set(feeds or ()))
        for m, runner in enumerate(self.runners):
            num_seqs, num_tokens, num_decodes, num_samples, width = self._counts[m].tolist()
            step.ran += num_seqs
            if num_seqs == 0:
                continue
            self.stats.count_step(m, num_seqs)
            if m == BIG:
                self.book.mark_big_started(runner.buffers["seq_request_ids"][:num_seqs].tolist(), self.clock.now())
            began = self.clock.now()
            try:
                batch = self._run_model(m, runner, num_seqs, num_tokens, num_decodes, num_samples, width, feeds,
                                        sources)
                if batch is not None:
                    step.batches.append(batch)
                self._failed_runs[m] = 0
            except Exception as e:  # the whole batch: its requests fail, the engine goes on
                step.failures += self._batch_failure(m, runner.buffers["seq_request_ids"][:num_seqs].tolist(), e)
            self.clock.charge(m, num_seqs, num_tokens)
            self.stats.model_time[m] += self.clock.now() - began
        return step

    def _run_model(self, m: int, runner: ModelRunner, num_seqs: int, num_tokens: int, num_decodes: int,
                   num_samples: int, width: int, feeds: "dict | None", sources: "dict | None") -> "Batch | None":
        """One model's forward pass and sampling, launched: the results stay on their way to the host."""
        b = runner.buffers
        reqs = [self._requests[i] for i in b["sample_request_ids"][:num_samples].tolist()]
        fed = {row: feeds[(m, r.id)] for row, r in enumerate(reqs) if (m, r.id) in feeds} if feeds else {}
        feed = self._feed(m, b, num_seqs, reqs, fed, sources[m]) if fed else None
        logits = runner.execute(num_seqs, num_tokens, num_decodes, num_samples, width, feed)
        if num_samples == 0:
            return None
        # A row fed from the previous step samples the token after the one the host has not seen.
        indices = [r.flow.next_index() + (row in fed) for row, r in enumerate(reqs)]
        state_feed = (feed.sample_rows, feed.source.words, feed.state_rows) if feed is not None else None
        tokens, words, logprobs = sample_and_detect(
            logits, [r.params for r in reqs], indices, self._generator, self.real_vocab[m], self.ops.sample_and_detect,
            [r.flow.detect_state(m) for r in reqs], self.detect_tables, [r.stop_ids for r in reqs], state_feed)
        results = Results.copy_back(tokens, words, logprobs)
        return Batch(m, reqs, results, {row: size for row, (_, size) in fed.items()})

    def _feed(self, m: int, buffers: dict, num_seqs: int, reqs: list[Request], fed: dict, source: Results) -> Feed:
        """Where the placeholders of this model's planned step are, and which rows of the previous
        step's samples replace them. A fed view computes exactly its placeholder: a decode row."""
        seq_of = {rid: j for j, rid in enumerate(buffers["seq_request_ids"][:num_seqs].tolist())}
        starts = buffers["query_start_loc"]
        positions = [int(starts[seq_of[reqs[row].id]]) for row in fed]
        assert all(buffers["input_ids"][p] == _C.PLACEHOLDER for p in positions), "a placeholder was not planned"
        detecting = [row for row in fed if reqs[row].flow.detect_state(m) >= 0]
        device = self.device
        return Feed(to_device(np.array(positions, dtype=np.int64), device),
                    to_device(np.array([source for source, _ in fed.values()], dtype=np.int64), device),
                    source,
                    to_device(np.array(detecting, dtype=np.int64), device),
                    to_device(np.array([fed[row][0] for row in detecting], dtype=np.int64), device))

    def _launch_ahead(self, current: Step) -> "Step | None":
        """Launches the next step before `current`'s tokens reach the host, if nothing the host will
        decide can change its inputs: every sampled row of `current` either ends its request
        whatever the token (its view gets nothing more), or feeds its view's next step (a
        placeholder the device fills in). None (nothing launched) when a row needs the host first."""
        fed = []
        for batch in current.batches:
            for row, req in enumerate(batch.reqs):
                if req.finish_reason is not None or (batch.valid is not None and not batch.valid[row]):
                    continue
                m = batch.model
                size = self.scheduler.view_size(req.id, m)
                if len(req.tokens) + 1 >= req.params.max_tokens or size + 1 >= self.max_model_len:
                    continue  # its request ends with this token
                if not req.flow.samples_on(m):
                    return None
                fed.append((batch, row, req, size + 1))
        if not fed:
            return None
        for batch, row, req, _ in fed:
            self.scheduler.append_placeholder(req.id, batch.model)
        self._plan(self.clock.now())
        ahead = self._launch({(batch.model, req.id): (row, size) for batch, row, req, size in fed},
                             {batch.model: batch.results for batch in current.batches})
        self.stats.steps_ahead += 1
        return ahead

    def _apply(self, step: Step, ahead: "Step | None") -> None:
        """Brings a launched step's tokens to the host and hands them to the flows. Views that the
        step launched `ahead` planned with a placeholder get their token first; after the flows,
        the rows of `ahead` whose view no longer continues from that token are dropped."""
        now = self.clock.now()
        # Failures end their requests once every model has run: a request in both batches stays
        # live for the second one, whose token for it is then dropped.
        for req, message in step.failures:
            if req.finish_reason is None:
                self.book.fail(req, message, now)
        rows = []
        for batch in step.batches:
            m, began = batch.model, self.clock.now()
            tokens, words, logprobs = batch.results.wait()
            self.stats.model_time[m] += self.clock.now() - began
            for row, (req, token, word, logprob) in enumerate(zip(batch.reqs, tokens, words, logprobs)):
                if batch.valid is not None and not batch.valid[row]:
                    self.stats.rows_dropped += 1
                    continue
                if ahead is not None and (m, req.id) in ahead.placeholders and req.finish_reason is None:
                    self.scheduler.set_last_token(req.id, m, token)
                    req.ahead[m] = token
                if not word & NONFINITE:
                    rows.append((m, req, token, word, logprob))
                elif req.finish_reason is None:
                    self.book.fail(req, f"the {MODEL_NAMES[m]} model's logits for this request are not finite "
                                        f"(NaN or inf) after {len(req.tokens)} tokens", now)
                    req.ahead[m] = None
        now = self.clock.now()
        # The small model's rows first: in a big segment they decide whether the big token
        # sampled in the same step is still wanted.
        for m, req, token, word, logprob in rows:
            if req.finish_reason is None:
                try:
                    req.flow.on_token(m, token, word, logprob, now)
                except Exception as e:
                    self.book.fail(req, f"{type(e).__name__} while applying a {MODEL_NAMES[m]}-model token: {e}", now)
            self.book.drop_ahead(req, m)
        if ahead is not None:
            for batch in ahead.batches:
                batch.valid = [self._continues(batch.model, req, batch.planned_sizes.get(row))
                               for row, req in enumerate(batch.reqs)]

    def _continues(self, m: int, req: Request, planned_size: "int | None") -> bool:
        """Whether a row of a step launched ahead still samples what this request needs next: the
        request is live and, for a fed row, its view ends exactly at the fed token, computed, and
        still samples."""
        if req.finish_reason is not None:
            return False
        if planned_size is None:
            return True
        s = self.scheduler
        return (s.view_size(req.id, m) == planned_size == s.view_computed(req.id, m)
                and s.view_run(req.id, m) == _C.RUN_FOREGROUND and req.flow.samples_on(m))

    def _batch_failure(self, m: int, request_ids: list[int], error: Exception) -> list[tuple]:
        """A forward pass or its sampling raised: every request in that batch fails. An out-of-memory
        error also hands the allocator's cached blocks back to the device; MAX_FAILED_STEPS in a
        row break the engine."""
        fault = f"{type(error).__name__}: {error}"
        logger.error("the %s model's step failed for %d requests: %s", MODEL_NAMES[m], len(request_ids), fault)
        self._failed_runs[m] += 1
        if self._failed_runs[m] >= MAX_FAILED_STEPS:
            self.broken = EngineBroken(f"the {MODEL_NAMES[m]} model failed {MAX_FAILED_STEPS} times in a row; "
                                       f"last: {fault}")
        if isinstance(error, TPFailure):  # the ranks are out of step: no later step can run
            self.broken = EngineBroken(str(error))
        if isinstance(error, torch.OutOfMemoryError) and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return [(self._requests[rid], f"the {MODEL_NAMES[m]} model's step failed: {fault}") for rid in request_ids]

    def _plan(self, now: float) -> None:
        """The scheduler plans the step; the co-scheduling policy says whether the big model sits
        it out. A held big model runs after all when nothing else could."""
        hold = len(self.runners) > 1 and self.policy.hold_big(self.scheduler, now)
        self.scheduler.schedule(1 << BIG if hold else 0)
        if hold and not self._counts[:, 0].any():
            hold = False
            self.scheduler.schedule(0)
        if hold:
            self.stats.held_steps += 1
        self.policy.observe(len(self.runners) > 1 and self._counts[BIG, 0] > 0)

    # ---- front doors --------------------------------------------------------------------------

    def _submit(self, prompts, params, stream: bool) -> tuple[list[RequestOutput], list[Request]]:
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

    def _finalize(self, req: Request) -> RequestOutput:
        out = req.output
        out.token_ids = req.tokens
        out.token_models = req.token_models
        out.stop_reason = req.stop_reason
        out.finish_reason = req.finish_reason
        out.error = req.error
        out.logprobs = req.logprobs if req.params.logprobs else None
        if req.detokenizer is not None:
            out.text = req.text
        elif self.tokenizer is not None:
            out.text = self.tokenizer.decode(req.tokens)
        return out

    def _event(self, req: Request) -> "StreamEvent | None":
        """What a stream of `req` has not yielded yet (None: nothing new). Text that could still
        turn out to be part of a stop string is held back until it cannot."""
        done = req.finish_reason is not None
        tokens, models = req.tokens[req.sent_tokens:], req.token_models[req.sent_tokens:]
        visible = len(req.text) if done else max(req.sent_text, len(req.text) - req.holdback)
        text = req.text[req.sent_text:visible]
        req.sent_tokens, req.sent_text = len(req.tokens), visible
        if not tokens and not done:
            return None
        return StreamEvent(req.index, tokens, text, self._finalize(req) if done else None, models)

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
