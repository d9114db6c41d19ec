"""Shared bits of the benchmarks: the machine's name, copy bandwidth, and a random HF checkpoint."""

import json
import os
import platform
import time
from pathlib import Path

import torch


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    if l3.is_file():  # a model smaller than the last-level cache can beat the DRAM copy floor
        info["l3_cache"] = l3.read_text().strip()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def copy_bandwidth(device: str = "cpu", mib: int = 512, repeats: int = 10) -> float:
    """STREAM-style copy bandwidth in bytes/s: (bytes read + bytes written) per second."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def save_random_qwen2(folder: Path, seed: int = 0, **config) -> Path:
    """A random Qwen2 checkpoint written by transformers (the same weights for every contender)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**config)).float()
    model.save_pretrained(folder)
    return folder


def write_json(path: "str | None", payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
