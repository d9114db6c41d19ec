"""Which machine a figure was measured on: every benchmark and evaluation names it."""

import os
import platform
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


def machine_line(m: dict) -> str:
    """The header line every benchmark table starts with."""
    return (f"machine: {m['host']} | {m['cpu']} | {m['cores']} cores | torch {m['torch']} | Python {m['python']}"
            f" | {m.get('gpu', 'no GPU')}")
