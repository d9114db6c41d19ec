"""Tensor parallelism: the rank group, its collectives and the weight-slicing rules. The worker
processes are started and stopped by executor.py, which sits above the runner and the models.

Two groups: the backend group (gloo on the CPU, NCCL on CUDA) carries the model's collectives (one
all-reduce per attention block and per MLP, one all-gather of the vocabulary-split logits) under
`timeout_s`; a gloo group with no practical timeout carries rank 0's step messages, so a worker may
wait for the next step as long as the engine idles. See docs/tensor-parallel.md.
"""

import datetime
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .config import ModelConfig
from .engine_config import EngineConfig


SETUP = 3  # the set-up message: pages, page bytes, step-message size (all zero: stop)
IDLE_TIMEOUT = datetime.timedelta(days=3650)  # the step-message group: workers wait for work indefinitely
START_TIMEOUT_S = 1800.0  # how long live workers may take to start and to load their shards
_REAP_S = 2.0  # after a failed collective, how long to wait for a dying worker to exit (to name its code)


class TPFailure(RuntimeError):
    """A rank died or a collective failed: the ranks are out of step and the engine cannot go on."""


def check_divisible(c: ModelConfig, world: int, source: str) -> None:
    """Refuses, by name, a model whose heads, KV heads or intermediate size `world` ranks cannot split
    (any vocabulary splits: see vocab_per_rank)."""
    for name, value in (("num_attention_heads", c.num_heads), ("intermediate_size", c.intermediate_size)):
        if value % world:
            raise ValueError(f"{source}: {name} {value} is not divisible by tensor_parallel_size {world}")
    kv = c.num_kv_heads
    if (kv >= world and kv % world) or (kv < world and world % kv):
        raise ValueError(f"{source}: num_key_value_heads {kv} and tensor_parallel_size {world}: one must divide "
                         "the other (KV heads are split, or replicated when there are fewer than ranks)")


def vocab_per_rank(c: ModelConfig, world: int) -> int:
    """Rows of the vocabulary-split LM head each rank holds: ceil(vocab / world), so a vocabulary the
    ranks do not divide (32001, say) still splits; the rows past the vocabulary are zero padding,
    and their logits are cut off after the all-gather."""
    return -(-c.vocab_size // world)


def local_heads(c: ModelConfig, world: int) -> tuple[int, int]:
    """(q heads, KV heads) on each rank; with fewer KV heads than ranks each rank holds the one its q heads read."""
    return c.num_heads // world, max(c.num_kv_heads // world, 1)


@dataclass(frozen=True)
class Shard:
    """A rank's slice of a checkpoint tensor: `size` rows (or columns) from `start` along `dim` of
    `full`, then `padding` zero rows (the vocabulary's rows past its end)."""

    dim: int
    start: int
    size: int
    full: int
    padding: int = 0


def shard_of(part: str, kind: str, c: ModelConfig, rank: int, world: int) -> "Shard | None":
    """The slice of checkpoint tensor `part`.`kind` (e.g. "k_proj", "bias") rank `rank` holds; None: whole.

    Column-parallel (output rows split): q/k/v, gate/up, an untied lm_head; row-parallel (input
    columns split): o_proj and down_proj weights, whose biases are added once, after the all-reduce.
    The vocabulary is padded to vocab_per_rank rows a rank: the LM head's and the (replicated)
    embedding's rows past the vocabulary are zeros, so a tied head's rows are a view of the embedding."""
    if world == 1:
        return None
    q, kv = local_heads(c, world)
    d = c.head_dim
    if part == "q_proj":
        return Shard(0, rank * q * d, q * d, c.num_heads * d)
    if part in ("k_proj", "v_proj"):
        first = rank * kv if c.num_kv_heads >= world else rank * c.num_kv_heads // world
        return Shard(0, first * d, kv * d, c.num_kv_heads * d)
    if part in ("gate_proj", "up_proj"):
        n = c.intermediate_size // world
        return Shard(0, rank * n, n, c.intermediate_size)
    if part in ("lm_head", "embed_tokens"):
        n, v = vocab_per_rank(c, world), c.vocab_size
        if part == "embed_tokens":
            return Shard(0, 0, v, v, n * world - v)
        start = min(rank * n, v)
        size = min(n, v - start)
        return Shard(0, start, size, v, n - size)
    if kind == "weight" and part in ("o_proj", "down_proj"):
        full = c.num_heads * d if part == "o_proj" else c.intermediate_size
        n = full // world
        return Shard(1, rank * n, n, full)
    return None


def take(tensor: torch.Tensor, shard: "Shard | None") -> torch.Tensor:
    """This rank's part of a one-process tensor, padding included."""
    return tensor if shard is None else pad(tensor.narrow(shard.dim, shard.start, shard.size), shard)


def pad(part: torch.Tensor, shard: "Shard | None") -> torch.Tensor:
    """A rank's slice with its zero padding rows appended (unchanged where it has none)."""
    if shard is None or not shard.padding:
        return part
    shape = list(part.shape)
    shape[shard.dim] = shard.padding
    return torch.cat([part, part.new_zeros(shape)], dim=shard.dim)


@dataclass
class TPGroup:
    """This process's rank in the group; rank 0 also holds the worker processes, to name a dead one."""

    rank: int
    world_size: int
    steps: "dist.ProcessGroup"  # gloo, no practical timeout: rank 0's step messages
    timeout: datetime.timedelta = IDLE_TIMEOUT  # rank 0: how long a step message may take to go out
    workers: list = field(default_factory=list)  # rank 0: the processes of ranks 1..N-1
    failed: bool = False  # a step failed: the ranks are out of step, workers are killed, not told to stop
    message_size: int = SETUP  # rank 0: the int32 message the workers wait for (all zeros: stop)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """Every rank's `x` side by side along the last dimension, cut to the first `size` columns:
        the vocabulary-split logits without the padded ids', so they have the one-process shape."""
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        n = x.shape[-1]
        return torch.cat([p[..., :size - i * n] for i, p in enumerate(parts) if i * n < size], dim=-1)

    def broadcast(self, message: torch.Tensor) -> None:
        """Rank 0 sends a host int32 message, after checking that every worker lives and within its
        timeout; the others receive it, waiting as long as it takes."""
        if self.rank == 0:
            self.check_workers()
            dist.broadcast(message, 0, group=self.steps, async_op=True).wait(timeout=self.timeout)
        else:
            dist.broadcast(message, 0, group=self.steps)

    def send_setup(self, num_pages: int, page_bytes: int, step_message_size: int) -> None:
        """Rank 0: the numbers every rank builds its pool and step buffer from; steps follow. The
        workers take it once their shards are loaded, which may take longer than a step's timeout."""
        setup = torch.tensor([num_pages, page_bytes, step_message_size], dtype=torch.int32)
        work = dist.broadcast(setup, 0, group=self.steps, async_op=True)
        self.wait_for(work.is_completed, "load their shards")
        work.wait()  # raises if the send failed
        self.message_size = step_message_size

    def receive_setup(self) -> tuple[int, int, int]:
        setup = torch.zeros(SETUP, dtype=torch.int32)
        self.broadcast(setup)
        return tuple(setup.tolist())

    def wait_for(self, done, what: str) -> None:
        """Rank 0: polls `done()` while every worker lives, for up to START_TIMEOUT_S."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not done():
            self.check_workers()
            if time.monotonic() > deadline:
                raise TPFailure(f"tensor-parallel workers did not {what} within {START_TIMEOUT_S:g} s")
            time.sleep(0.02)

    def check_workers(self, wait_s: float = 0.0) -> None:
        for rank, proc in enumerate(self.workers, start=1):
            if wait_s:
                proc.join(wait_s)
            if not proc.is_alive():
                raise TPFailure(f"tensor-parallel rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}")

    def failure(self, error: Exception) -> TPFailure:
        """What a failed step means: the rank that died, if one did, else the collective's error."""
        self.failed = True
        try:
            self.check_workers(wait_s=_REAP_S / max(len(self.workers), 1))
        except TPFailure as dead:
            return dead
        return TPFailure(f"tensor-parallel step failed with every rank alive (one is stuck, or a collective "
                         f"took longer than the {self.timeout.total_seconds():g} s timeout): "
                         f"{type(error).__name__}: {error}")


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its shards of the models (picklable: it crosses the spawn): the
    engine's config, and what rank 0 resolved from it and from the checkpoints."""

    config: "EngineConfig"
    sources: tuple  # loader.ModelSource per model (the default model filled in)
    dtype: torch.dtype
    max_model_len: int
    num_threads: int
    port: int = 0  # the TCP store's, filled in by executor.start()

    @property
    def world_size(self) -> int:
        return self.config.parallel.tensor_parallel_size

    @property
    def timeout_s(self) -> float:
        return self.config.parallel.tp_timeout_s

    @property
    def device_type(self) -> str:
        return torch.device(self.config.model.device).type
