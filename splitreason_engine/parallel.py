"""Tensor parallelism: the rank group, its collectives, the weight-slicing rules and the worker processes.

Rank 0 is the engine process; it starts one worker process per other rank (spawn context) and
they join one process group over a TCP store on 127.0.0.1 (gloo on the CPU, NCCL on CUDA with
device cuda:rank). Two groups: the backend group carries the model's collectives (one all-reduce
per attention block and per MLP, one all-gather of the vocabulary-split logits) under
`timeout_s`; a gloo group with no practical timeout carries rank 0's step messages, so a worker
may wait for the next step as long as the engine idles. See docs/tensor-parallel.md.
"""

import dataclasses
import datetime
import logging
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .config import ModelConfig

logger = logging.getLogger(__name__)

SETUP = 3  # the set-up message: pages, page bytes, step-message size (all zero: stop)
IDLE_TIMEOUT = datetime.timedelta(days=3650)  # the step-message group: workers wait for work indefinitely
START_TIMEOUT_S = 1800.0  # how long live workers may take to start and to load their shards
_REAP_S = 2.0  # after a failed collective, how long to wait for a dying worker to exit (to name its code)


class TPFailure(RuntimeError):
    """A rank died or a collective failed: the ranks are out of step and the engine cannot go on."""


def check_divisible(c: ModelConfig, world: int, source: str) -> None:
    """Refuses, by name, a model whose heads, KV heads, intermediate size or vocabulary `world` ranks cannot split."""
    for name, value in (("num_attention_heads", c.num_heads), ("intermediate_size", c.intermediate_size),
                        ("vocab_size", c.vocab_size)):
        if value % world:
            raise ValueError(f"{source}: {name} {value} is not divisible by tensor_parallel_size {world}")
    kv = c.num_kv_heads
    if (kv >= world and kv % world) or (kv < world and world % kv):
        raise ValueError(f"{source}: num_key_value_heads {kv} and tensor_parallel_size {world}: one must divide "
                         "the other (KV heads are split, or replicated when there are fewer than ranks)")


def local_heads(c: ModelConfig, world: int) -> tuple[int, int]:
    """(q heads, KV heads) on each rank; with fewer KV heads than ranks each rank holds the one its q heads read."""
    return c.num_heads // world, max(c.num_kv_heads // world, 1)


@dataclass(frozen=True)
class Shard:
    """A rank's slice of a checkpoint tensor: `size` rows (or columns) from `start` along `dim` of `full`."""

    dim: int
    start: int
    size: int
    full: int


def shard_of(part: str, kind: str, c: ModelConfig, rank: int, world: int) -> "Shard | None":
    """The slice of checkpoint tensor `part`.`kind` (e.g. "k_proj", "bias") rank `rank` holds; None: whole.

    Column-parallel (output rows split): q/k/v, gate/up, an untied lm_head; row-parallel (input
    columns split): o_proj and down_proj weights, whose biases are added once, after the all-reduce."""
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
    if part == "lm_head":
        n = c.vocab_size // world
        return Shard(0, rank * n, n, c.vocab_size)
    if kind == "weight" and part in ("o_proj", "down_proj"):
        full = c.num_heads * d if part == "o_proj" else c.intermediate_size
        n = full // world
        return Shard(1, rank * n, n, full)
    return None


def take(tensor: torch.Tensor, shard: "Shard | None") -> torch.Tensor:
    return tensor if shard is None else tensor.narrow(shard.dim, shard.start, shard.size)


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

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` side by side along the last dimension (the vocabulary-split logits)."""
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

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
    """What a worker needs to build its shards of the models (picklable: it crosses the spawn)."""

    sources: tuple  # loader.ModelSource per model
    dtype: torch.dtype
    device_type: str
    max_model_len: int
    seed: int
    kernels: str
    world_size: int
    timeout_s: float
    num_threads: int
    port: int = 0  # the TCP store's, filled in by start()


def _ready(rank: int) -> str:
    return f"splitreason/ready/{rank}"


def _backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _join(store, rank: int, world: int, device_type: str, timeout_s: float) -> "dist.ProcessGroup":
    dist.init_process_group(_backend(device_type), store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def start(spec: WorkerSpec) -> TPGroup:
    """Rank 0: starts ranks 1..N-1 and joins the group with them (the store on a free port of 127.0.0.1)."""
    if dist.is_initialized():
        raise RuntimeError("a tensor-parallel engine is already running in this process (one per process); "
                           "close() it first")
    world, device_type, timeout_s = spec.world_size, spec.device_type, spec.timeout_s
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    spec = dataclasses.replace(spec, port=store.port)
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_worker_main, args=(rank, spec), name=f"splitreason-tp{rank}", daemon=True)
               for rank in range(1, world)]
    for p in workers:
        p.start()
    group = TPGroup(0, world, None, datetime.timedelta(seconds=timeout_s), workers)
    try:  # the group's timeout is the collectives': join only once every worker has started
        group.wait_for(lambda: store.check([_ready(r) for r in range(1, world)]), "start")
        group.steps = _join(store, 0, world, device_type, timeout_s)
    except Exception as e:
        failure = group.failure(e)
        _stop(workers, wait_s=0.0)
        raise failure from e
    logger.info("tensor parallel: %d ranks (%s), workers %s", world, _backend(device_type),
                [p.pid for p in workers])
    return group


def shutdown(group: TPGroup) -> None:
    """Rank 0: tells the workers to stop and waits for them (killing what does not exit), then leaves
    the group. After a failed step the workers are killed at once: they may be stuck in a collective."""
    if not group.failed:
        try:
            group.broadcast(torch.zeros(group.message_size, dtype=torch.int32))
        except Exception as e:  # a worker died since the last step
            logger.warning("tensor parallel: stop message not delivered: %s", e)
            group.failed = True
    _stop(group.workers, wait_s=0.0 if group.failed else 10.0)
    dist.destroy_process_group()


def _stop(workers: list, wait_s: float) -> None:
    for p in workers:
        p.join(wait_s)
        if p.is_alive():
            logger.warning("tensor-parallel worker %s did not exit; killing it", p.pid)
            p.kill()
            p.join()


def _worker_main(rank: int, spec: WorkerSpec) -> None:
    """A worker rank: joins the group, builds its shards, then runs the steps rank 0 sends until told to stop."""
    from .tp_worker import serve_worker  # here, not at the top: it imports the models, which import this module

    logging.basicConfig(level=logging.WARNING, format=f"[tp rank {rank}] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(spec.num_threads)
    device = torch.device(f"cuda:{rank}" if spec.device_type == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", spec.port, spec.world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=spec.timeout_s))
    store.set(_ready(rank), "1")
    group = TPGroup(rank, spec.world_size, _join(store, rank, spec.world_size, spec.device_type, spec.timeout_s))
    try:
        serve_worker(spec, group, device)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", rank)
        os._exit(1)  # no clean-up: the group is out of step, and rank 0 names this exit
    dist.destroy_process_group()
