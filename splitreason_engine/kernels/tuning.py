"""Per-card kernel configurations: `kernels/configs/<card>.json`, written by bench/tune_kernels.py.

A kernel asks `tuned(kernel, key, device)` for the launch parameters of one shape (block sizes,
warps, split counts, or whether to run at all) and falls back to its own heuristics when the card
has no file or the file has no entry. The file is read once per process, at the first lookup,
which the engine's kernel warm-up makes happen at start-up: CUDA graphs capture the tuned choice.

File format: {"card": "NVIDIA H200", "kernels": {kernel: {key: {param: value}}}}; keys are
strings each kernel builds from its shape (see the kernels' `*_key` functions). Off CUDA (Triton's
interpreter) nothing is tuned and every kernel runs its heuristics.
"""

import functools
import json
import logging
import os
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
# A file to use instead of the card's own (the sweep, and tests, point it at a candidate).
CONFIG_ENV = "SPLITREASON_KERNEL_CONFIG"


def card_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (the same slug bench/device_check.sh names its results by)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", name.lower())).strip("-")


def config_path(device: "torch.device | str") -> "Path | None":
    """The configuration file for `device`'s card (or $SPLITREASON_KERNEL_CONFIG); None off CUDA."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return CONFIG_DIR / f"{card_slug(torch.cuda.get_device_name(index))}.json"


@functools.lru_cache(maxsize=None)
def load_table(path: "Path | None") -> dict:
    """{kernel: {key: params}} from `path`; {} when there is no file. A file that is not a valid
    configuration is reported and ignored: the kernels still run, on their heuristics."""
    if path is None or not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        kernels = raw["kernels"]
        if not isinstance(kernels, dict) or not all(isinstance(v, dict) for v in kernels.values()):
            raise ValueError("'kernels' must map kernel names to {key: params} objects")
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("kernel configuration %s ignored (kernels use their heuristics): %s", path, e)
        return {}
    logger.info("kernel configuration: %s (%d kernels)", path, len(kernels))
    return kernels


def tuned(kernel: str, key: str, device: "torch.device | str") -> "dict | None":
    """The tuned parameters of `kernel` for shape `key` on `device`'s card, or None."""
    return load_table(config_path(device)).get(kernel, {}).get(key)
