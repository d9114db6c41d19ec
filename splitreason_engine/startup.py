"""Engine start-up, before the first request: the tokenizer (one for both models), the KV pool
sized for the models, the kernel warm-up and CUDA-graph capture, and the co-scheduling policy with
the step costs it reads. Engine._start calls these in that order."""

import logging
import time
from pathlib import Path

import torch

from .config import ModelConfig
from .coschedule import make_policy
from .kv_pool import KVPool, arena_page_bytes, available_bytes, geometry, page_bytes_for
from .parallel import TPGroup, local_heads
from .requests import MODEL_NAMES
from .runner import ModelRunner
from .step_costs import measure
from .tokenizer import Tokenizer
from .warmup import should_warm_up, warm_up_kernels

logger = logging.getLogger(__name__)


def load_tokenizer(folder: Path) -> "Tokenizer | None":
    if not (folder / "tokenizer.json").is_file():
        logger.warning("%s has no tokenizer.json: prompts must be token ids", folder)
        return None
    return Tokenizer(folder)


def check_same_tokenizer(tokenizer: "Tokenizer | None", big_folder: Path) -> None:
    """The protocol moves token ids between the models: their tokenizers must be one."""
    big_tok = load_tokenizer(big_folder) if (big_folder / "tokenizer.json").is_file() else None
    if big_tok is None:
        return
    if tokenizer is None or not tokenizer.same_vocabulary(big_tok):
        raise ValueError(f"the big model's tokenizer ({big_folder / 'tokenizer.json'}) differs from the small "
                         "model's: SplitReason passes token ids between them, so both must use the same tokenizer")


def build_pool(configs: list[ModelConfig], dtype: torch.dtype, device: torch.device, max_model_len: int,
               page_tokens: int, kv_cache_bytes: "int | None", fraction: "float | None",
               tp: "TPGroup | None") -> KVPool:
    """The shared pool: `kv_cache_bytes`, else `fraction` of the memory free now (0.9 on CUDA, 0.05
    on the host); it must hold one request of max_model_len tokens in every model's view."""
    page_bytes = page_bytes_for(configs, dtype, page_tokens)
    measured = kv_cache_bytes is None
    if measured:
        if fraction is None:
            fraction = 0.9 if device.type == "cuda" else 0.05
        kv_cache_bytes = int(available_bytes(device) * fraction)
    num_pages = kv_cache_bytes // page_bytes
    kv_heads = None
    if tp is not None:
        # Each rank holds its KV heads: a fraction of its free memory buys pages at its own page
        # size; kv_cache_bytes counts pages at the full size, so it gives the pages of one process.
        kv_heads = [local_heads(c, tp.world_size)[1] for c in configs]
        if measured:
            num_pages = kv_cache_bytes // arena_page_bytes(configs, dtype, page_bytes, kv_heads)
    # One request may hold a full-length view in every model at once.
    needed = sum(-(-max_model_len // geometry(c, dtype, page_bytes).page_tokens) for c in configs)
    if num_pages < needed:
        views = "a view in each model" if len(configs) > 1 else "its view"
        raise ValueError(
            f"KV pool too small for one request: {kv_cache_bytes} bytes = {num_pages} pages of {page_bytes} "
            f"bytes, but one request of max_model_len {max_model_len} tokens with {views} needs "
            f"{needed} pages; raise kv_cache_bytes or lower max_model_len")
    return KVPool(configs, dtype, device, page_bytes, num_pages, kv_heads)


def warm_up(engine, progress: bool) -> float:
    """Compiles every kernel variant serving can reach (Triton on CUDA), then captures the decode
    graphs, so that no step compiles while serving; returns the seconds it took."""
    start, sched = time.perf_counter(), engine.config.scheduler
    if should_warm_up(engine.ops, engine.device):
        for i, m in enumerate(engine.models):
            warm_up_kernels(m, engine.pool.kv_caches[i], engine.ops, engine.device, max_num_seqs=sched.max_num_seqs,
                            max_num_batched_tokens=sched.max_num_batched_tokens,
                            max_model_len=engine.max_model_len, real_vocab=engine.real_vocab[i],
                            detect_tables=engine.detect_tables,
                            block_table_width=engine.scheduler.max_pages_per_seq(i), name=MODEL_NAMES[i],
                            link=engine.runners[i].link)
    for runner in engine.runners:
        if runner.graphs is not None:
            runner.graphs.capture_all(progress)
    return time.perf_counter() - start


def choose_policy(runners: list[ModelRunner], name: str, costs, max_num_seqs: int, max_num_batched_tokens: int,
                  max_model_len: int, min_share, max_wait_steps, max_wait_s):
    """(policy, step costs): with two models, a policy other than eager and no calibration file,
    the step costs it reads are timed here, on the models as loaded."""
    if len(runners) < 2:
        return make_policy("eager", None), costs
    if costs is None and name != "eager":
        costs = measure(runners, min(max_num_seqs, max_num_batched_tokens),
                        min(max_num_batched_tokens, max_model_len - 1))
    policy = make_policy(name, costs, min_share, max_wait_steps, max_wait_s)
    logger.info("co-scheduling: %s (step costs: %s)", policy.describe(), costs)
    return policy, costs
