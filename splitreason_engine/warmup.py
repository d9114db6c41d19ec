"""Start-up warm-up: launches every Triton kernel variant a model's serving can reach, so that no
step compiles a kernel in the middle of serving.

Triton compiles a kernel once per specialization key: the constexprs, the launch options, each
pointer's dtype and (unless the argument is in `do_not_specialize`) whether an integer argument is
1 or a multiple of 16 and whether a pointer is 16-byte aligned. The kernels (kernels/*_triton.py)
keep every argument that changes from step to step out of the key (do_not_specialize: block-table
and stop-id widths, max_splits, the step's metadata pointers), and no constexpr is chosen from a
step's shape, so what is left depends on the model (head counts, head dim, hidden and vocabulary
sizes, page size, dtype), the device, and one step-dependent class: the 16-byte alignment of
q[num_decodes:] for extend attention, which num_decodes 0 and 1 both reach.

The warm-up runs, per model, through a ModelRunner like serving's (the same tensor layout):
  - decode-only steps at batch sizes 1, 2, 3, 16 and 17 (integer classes 1 / other / multiple of
    16, should any argument still specialize), with contexts of 1 to 16 pages and more;
  - extend-only steps (num_decodes 0) and mixed steps (num_decodes 1, 2 and 16 beside chunks with
    and without a cached prefix), with every row, no row and some rows sampled;
  - one-chunk steps of LINEAR_ROWS tokens: the decode GEMV (kernels/linear_triton.py) compiles
    per row bucket (1, 2, 4, 8 and 16 rows), and any step of up to 16 tokens, decode or prefill,
    reaches one;
  - the sampler on the logits of those steps: greedy, temperature, top-k, top-p, both, logprobs,
    logit bias, tag detection on and off, and stop-id widths 0, 1, 3 and 40;
  - the speculative verify op (ops.verify_rows), once, on the logits of the step that sampled the
    most rows, as speculation.verify calls it: every kind of row above, with a draft and without
    (its one variant per model depends on no step's shape).
Every step is a padding step: every slot is -1, so nothing is written into the KV pool; the
block tables point at page 0, which attention only reads (the outputs are thrown away). The
shapes are clipped to the engine's limits (max_num_seqs, max_num_batched_tokens, max_model_len),
and every step carries at most 64 tokens, so the warm-up costs a few small forward passes per
model once the kernels are compiled (or loaded from Triton's on-disk cache).
"""

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from .jit import jit_compiles
from .runner import ModelRunner, StepLink
from .sampling import DetectTables, SamplingParams, sample_and_detect
from .speculation import VerifyGroup, verify

logger = logging.getLogger(__name__)

DECODE_BATCHES = (1, 2, 3, 16, 17)
MIXED_DECODES = (0, 1, 2, 16)
MAX_WARMUP_TOKENS = 64
STOP_WIDTHS = (0, 1, 3, 40)
LINEAR_ROWS = (1, 2, 3, 5, 9)  # one token count in each of linear_triton.ROW_BUCKETS


@dataclass(frozen=True)
class WarmupReport:
    seconds: float  # wall time, device work included
    steps: int  # forward steps run
    samples: int  # sampler calls
    compiled: int  # Triton variants compiled meanwhile (jit_compiles() growth; 0 off CUDA)


@dataclass(frozen=True)
class _Step:
    decode_lens: tuple[int, ...]  # context (new token included) of each decoding sequence
    chunks: tuple[tuple[int, int], ...]  # (new tokens, cached prefix) of each extending sequence
    sample: str  # "all": every sequence's last token; "none"; "some": every other sequence


def should_warm_up(ops, device: torch.device) -> bool:
    """Only the Triton op set on CUDA compiles anything."""
    return getattr(ops, "name", None) == "triton" and torch.device(device).type == "cuda"


def warmup_steps(page_tokens: int, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int) -> list[_Step]:
    """The steps the warm-up runs, clipped to the engine's limits (each fits in one step)."""
    tokens = min(max_num_batched_tokens, MAX_WARMUP_TOKENS)
    longest = max(1, min(max_model_len, 16 * page_tokens + 1))  # block-table widths 1 .. 17
    contexts = sorted({1, min(page_tokens, longest), min(page_tokens + 1, longest), longest})
    steps = []
    for batch in DECODE_BATCHES:
        if batch <= min(max_num_seqs, tokens):
            steps.append(_Step(tuple(contexts[i % len(contexts)] for i in range(batch)), (), "all"))
    # Extends: a whole short prompt, one crossing pages, one after a cached prefix, a 1-token chunk.
    shapes = [((17, 0),), ((2, 0), (9, page_tokens + 1)), ((1, 3),), ((tokens, 0),)]
    samples = ("all", "some", "none", "none")
    for decodes in MIXED_DECODES:
        for shape, sample in zip(shapes, samples):
            left, chunks = tokens - decodes, []
            for length, prefix in shape:
                length = min(length, left, max_model_len)
                prefix = min(prefix, max_model_len - length)
                if length >= 1 and decodes + len(chunks) < max_num_seqs:
                    chunks.append((length, prefix))
                    left -= length
            if chunks and decodes <= tokens:
                lens = tuple(contexts[i % len(contexts)] for i in range(decodes))
                steps.append(_Step(lens, tuple(chunks), sample))
    steps += [_Step((), ((rows, 0),), "none") for rows in LINEAR_ROWS if rows <= min(tokens, max_model_len)]
    return steps


def _sampling_rows(n: int, turn: int, real_vocab: int, detect: bool):
    """Params, output indices, detection states and stop ids for n sampled rows."""
    kinds = [dict(temperature=0.0), dict(temperature=0.8), dict(temperature=0.8, top_k=5),
             dict(temperature=0.8, top_p=0.9), dict(temperature=0.7, top_k=40, top_p=0.8, logprobs=True),
             dict(temperature=0.0, logit_bias={0: 1.0})]
    params, stops = [], []
    for i in range(n):
        k = (turn + i) % len(kinds)
        params.append(SamplingParams(seed=turn * 1009 + i, max_tokens=1, **kinds[k]))
        width = STOP_WIDTHS[(turn + i) % len(STOP_WIDTHS)]
        stops.append(frozenset(range(max(0, real_vocab - width), real_vocab)))
    states = [(0 if detect and i % 2 else -1) for i in range(n)]
    return params, list(range(n)), states, stops


def _verify(logits: torch.Tensor, real_vocab: int, generator: torch.Generator, op) -> None:
    """speculation.verify over `logits`' rows as the step loop calls it: groups of up to four rows
    (the drafts and the row after them), the sampling kinds taking turns by group."""
    size = min(4, logits.shape[0])
    params = _sampling_rows(logits.shape[0] // size, 0, real_vocab, False)[0]
    q = torch.full((real_vocab,), 1 / real_vocab, device=logits.device)
    groups = [VerifyGroup(p, [(size * g + i) % real_vocab for i in range(size - 1)],
                          None if p.greedy else [q] * (size - 1), 0) for g, p in enumerate(params)]
    verify(logits[: size * len(groups)], groups, real_vocab, generator, 0, op)


@torch.inference_mode()
def warm_up_kernels(model, kv_caches, ops, device, *, max_num_seqs: int, max_num_batched_tokens: int,
                    max_model_len: int, real_vocab: int, detect_tables: "DetectTables | None" = None,
                    block_table_width: "int | None" = None, name: str = "model",
                    link: "StepLink | None" = None) -> WarmupReport:
    """Launches every Triton kernel variant that serving `model` can reach (see the module doc).

    `kv_caches`: the model's per-layer (k, v) views of the KV pool (KVPool.kv_caches[i]); nothing is
    written into them. `ops`: the engine's op set (its sample_and_detect and verify_rows are warmed
    up; the model holds the others). `real_vocab`: the ids the sampler may pick (Engine.real_vocab[i]);
    `detect_tables`: the engine's DetectTables (None, or the stand-in of an engine without a
    detector: no row detects). `block_table_width`: the scheduler's max_pages_per_seq for the model (default
    ceil(max_model_len / page_tokens)). Call it after the KV pool exists and before CUDA-graph
    capture; it is meant for the Triton ops on CUDA (should_warm_up), but runs on any op set.
    `link`: with tensor parallelism, the model's runner's, so every rank runs the steps.
    """
    device = torch.device(device)
    start, compiled = time.perf_counter(), jit_compiles()
    page_tokens = kv_caches[0][0].shape[1]
    width = block_table_width or -(-max_model_len // page_tokens)
    seqs = max_num_seqs
    buffers = {name_: np.zeros(n, dtype=np.int32) for name_, n in (
        ("input_ids", max_num_batched_tokens), ("positions", max_num_batched_tokens),
        ("slot_mapping", max_num_batched_tokens), ("query_start_loc", seqs + 1), ("seq_lens", seqs),
        ("block_tables", seqs * width), ("logits_indices", seqs))}
    buffers["slot_mapping"][:] = -1  # padding: nothing is stored
    runner = ModelRunner(model, kv_caches, buffers, width, device, link=link)
    tables = detect_tables if detect_tables is not None else DetectTables.build(None, device)
    detect = tables.next_state.shape[-1] >= real_vocab  # a real detector's tables (not the 1 x 1 stand-in)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    num_steps = num_samples = 0
    widest = None  # the logits of the step that sampled the most rows: the verify op's input
    for step in warmup_steps(page_tokens, max_num_seqs, max_num_batched_tokens, max_model_len):
        lens = [1] * len(step.decode_lens) + [length for length, _ in step.chunks]
        contexts = list(step.decode_lens) + [length + prefix for length, prefix in step.chunks]
        starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        n_seqs, n_tokens = len(lens), int(starts[-1])
        buffers["query_start_loc"][: n_seqs + 1] = starts
        buffers["seq_lens"][:n_seqs] = contexts
        positions = np.concatenate([np.arange(c - q, c) for q, c in zip(lens, contexts)])
        buffers["positions"][:n_tokens] = positions
        buffers["input_ids"][:n_tokens] = np.arange(n_tokens) % vocab
        buffers["block_tables"][: n_seqs * width] = 0
        rows = {"all": range(n_seqs), "none": range(0), "some": range(0, n_seqs, 2)}[step.sample]
        buffers["logits_indices"][: len(rows)] = [starts[i + 1] - 1 for i in rows]
        step_width = max(-(-c // page_tokens) for c in contexts)
        logits = runner.execute(n_seqs, n_tokens, len(step.decode_lens), len(rows), step_width)
        num_steps += 1
        if len(rows):
            params, indices, states, stops = _sampling_rows(len(rows), num_steps, real_vocab, detect)
            sample_and_detect(logits, params, indices, generator, real_vocab, ops.sample_and_detect, states,
                              tables, stops)
            num_samples += 1
            if widest is None or len(rows) > widest.shape[0]:
                widest = logits
    if widest is not None:
        _verify(widest, real_vocab, generator, ops.verify_rows)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report = WarmupReport(time.perf_counter() - start, num_steps, num_samples, jit_compiles() - compiled)
    logger.info("kernel warm-up (%s): %d steps, %d sampler calls, %d Triton variants compiled, %.2f s",
                name, report.steps, report.samples, report.compiled, report.seconds)
    return report
