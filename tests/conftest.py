import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU tensors; it must be chosen before any kernel is
    # defined (Triton reads it when @triton.jit runs).
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker: with as many workers as cores, more threads only
    # oversubscribe the cores (OpenMP spin-waits made the suite several times slower). The same
    # for the servers and CLI runs the tests start (measured: an n=8 request beside a busy worker
    # took 62 s with 2 threads instead of 1.2 s).
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import properties  # noqa: E402,F401  (loads the hypothesis profile before any test module)
from hf_models import CONFIGS, save_tiny_qwen2  # noqa: E402
from split_models import Oracle, save_near_pair, save_pair  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if properties.FUZZ_SCALE:  # tests/fuzz.py: the tests with random inputs only
        def random_inputs(item) -> bool:
            return hasattr(item.obj, "hypothesis") or getattr(item.module, "test_seed", None) is properties.test_seed

        config.hook.pytest_deselected(items=[i for i in items if not random_inputs(i)])
        items[:] = [i for i in items if random_inputs(i)]
    if torch.cuda.is_available():
        # With a GPU, Triton compiles for it: the CPU tensors of the interpreter tests cannot run.
        if os.environ.get("TRITON_INTERPRET") != "1":
            skip = pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")
            for item in items:
                if "interpreter" in item.keywords and "gpu" not in item.keywords:
                    item.add_marker(skip)
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One saved Hugging Face checkpoint per config in hf_models.CONFIGS."""
    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny_qwen2(root / name, name, seed=i) for i, name in enumerate(CONFIGS)}


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"), special_tags=True)


@pytest.fixture(scope="session")
def oracle(pair):
    return Oracle(*pair)


@pytest.fixture(scope="session")
def near_pair(tmp_path_factory, pair):
    """The split pair's small model and a noisy copy of it as the big one: drafts are often kept."""
    return save_near_pair(tmp_path_factory.mktemp("near_pair"), pair[0], noise=0.03)


@pytest.fixture(scope="session")
def near_oracle(near_pair):
    return Oracle(*near_pair)


@pytest.fixture(scope="session")
def text_pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("text_pair"), special_tags=False)


@pytest.fixture(scope="session")
def text_oracle(text_pair):
    return Oracle(*text_pair)
