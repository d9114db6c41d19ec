"""The tensor-parallel worker processes: rank 0 (the engine process) starts one per other rank
(spawn context) and they join one process group over a TCP store on 127.0.0.1 (gloo on the CPU,
NCCL on CUDA with device cuda:rank); each builds its shards and runs the steps rank 0 sends
(tp_worker.py) until told to stop. Here, above the runner and the models, so that nothing below
imports process start-up. See docs/tensor-parallel.md.
"""

import dataclasses
import datetime
import logging
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .parallel import IDLE_TIMEOUT, TPGroup, WorkerSpec
from .tp_worker import serve_worker

logger = logging.getLogger(__name__)


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
