"""The project's Triton launches recorded instead of run, and the CUDA-side launch choices made on
the CPU: what serving would compile on a GPU, seen from a machine without one.

Triton compiles a kernel once per specialization key. `LaunchRecorder` stands in for every
`*_kernel` of the kernel modules and computes each launch's key with Triton's own binder
(triton.runtime.jit's create_function_from_signature, the code JITFunction.run uses: constexprs,
dtypes, integers equal to 1 or multiples of 16, 16-byte aligned pointers, do_not_specialize
honoured); it launches nothing. It also keeps what `triton.compile` needs to build each variant for
a GPU target (`Variant.compile_inputs`). `cuda_like` makes the wrappers' and the runner's CUDA-only
choices on CPU tensors: decode splits from an SM count, the GPU's decode, extend (by compute
capability), sampler and verify launch parameters, the runner's staging layout.

Used by tests/test_warmup.py (the warm-up reaches every variant serving reaches) and
bench/compile_check.py (every such variant compiles for the cards).
"""

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import JITFunction, create_function_from_signature

from splitreason_engine import runner as runner_module
from splitreason_engine.kernels import (activation_triton, linear_triton, norms_triton, paged_attention_triton,
                                        rope_triton, sample_triton, verify_triton)

KERNEL_MODULES = (activation_triton, linear_triton, norms_triton, paged_attention_triton, rope_triton, sample_triton,
                  verify_triton)
# Every kernel the op set launches; a kernel added to a module must be added here (install checks).
KERNELS = {"_silu_and_mul_kernel", "_rms_norm_kernel", "_add_rms_norm_kernel", "_decode_split_kernel",
           "_extend_kernel", "_rope_store_kv_kernel", "_sample_detect_kernel", "_verify_kernel", "_linear_kernel"}

Patch = Callable[[object, str, object], None]  # setattr that is undone later (pytest's monkeypatch.setattr)


@contextlib.contextmanager
def patching() -> Iterator[Patch]:
    """A `Patch` whose attributes are restored when the block ends."""
    saved = []

    def patch(obj, name: str, value) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        yield patch
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def as_jit(kernel) -> JITFunction:
    """The JITFunction Triton builds on a GPU for `kernel` (under TRITON_INTERPRET=1 the module holds an
    InterpretedFunction, which keeps the same jit options)."""
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)


def kernels_of(module) -> dict[str, object]:
    return {name: obj for name, obj in vars(module).items() if name.endswith("_kernel") and hasattr(obj, "fn")}


@dataclass(frozen=True)
class Variant:
    """One compiled variant: a kernel and the arguments of one launch that reaches its key."""

    kernel: str
    jit: JITFunction
    key: str  # JITFunction.run's cache key, less the flags it adds to every launch
    specialization: tuple
    constexprs: dict  # parameter name -> value where Triton folds it in (None elsewhere): what it packs
    launch_options: dict  # the launch's keyword arguments (num_warps, num_stages, ... and constexprs)

    def compile_inputs(self, backend) -> tuple[dict, dict, dict, dict]:
        """(signature, constexprs, attrs, options) for triton.compile(ASTSource(jit, signature,
        constexprs, attrs), target=..., options=options) on `backend`'s target, as JITFunction.run
        packs them."""
        options, signature, constexprs, attrs = self.jit._pack_args(
            backend, dict(self.launch_options), self.constexprs, list(self.specialization), None)
        return signature, constexprs, attrs, options.__dict__


class LaunchRecorder:
    """Stands in for every kernel: records (kernel, key) per phase and the launch's Variant; launches nothing."""

    def __init__(self, backend=BaseBackend):
        self.backend = backend  # whose specialization the binder applies (a CUDA backend to compile)
        self.phase = "warmup"
        self.keys: dict[str, set] = defaultdict(set)  # kernel -> {(phase, key)}
        self.launches: dict[str, int] = defaultdict(int)  # phase -> launches
        self.variants: dict[tuple[str, str], Variant] = {}  # (kernel, key) -> its first launch

    def install(self, patch: Patch) -> None:
        found = set()
        for module in KERNEL_MODULES:
            for name, kernel in kernels_of(module).items():
                found.add(name)
                patch(module, name, _Recording(name, as_jit(kernel), self))
        assert found == KERNELS, f"kernels changed: {sorted(found)}; update launches.KERNELS"

    def seen(self, kernel: str, phase: str) -> set:
        return {key for p, key in self.keys[kernel] if p == phase}


class _Recording:
    def __init__(self, name: str, jit: JITFunction, recorder: LaunchRecorder):
        self.binder = create_function_from_signature(jit.signature, jit.params, recorder.backend)
        self.name, self.jit, self.recorder = name, jit, recorder

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound, specialization, options = self.binder(*args, **kwargs)
            key = str(specialization) + str(options)
            self.recorder.keys[self.name].add((self.recorder.phase, key))
            self.recorder.launches[self.recorder.phase] += 1
            if (self.name, key) not in self.recorder.variants:
                # Constexpr parameters, and integers equal to 1 (Triton folds those in as constants).
                constexprs = {p.name: (bound[p.name] if spec[0] == "constexpr" else None)
                              for p, spec in zip(self.jit.params, specialization)}
                self.recorder.variants[(self.name, key)] = Variant(self.name, self.jit, key, tuple(specialization),
                                                                   constexprs, kwargs)
        return launch


def cuda_like(patch: Patch, sm_count: int, major: int = 9) -> None:
    """The wrappers' and the runner's CUDA-only choices, on CPU tensors, as on a GPU of `sm_count`
    SMs and compute capability `major`.x."""
    pa, st, vt = paged_attention_triton, sample_triton, verify_triton
    cuda = torch.device("cuda")
    decode_heuristic, sample_heuristic, verify_heuristic = pa._decode_heuristic, st._heuristic, vt._heuristic
    patch(pa, "decode_splits", lambda batch, kv_heads, device: pa.splits_for(batch, kv_heads, sm_count))
    patch(pa, "_decode_heuristic", lambda batch, kv_heads, head_dim, dtype, device:
          decode_heuristic(batch, kv_heads, head_dim, dtype, cuda))
    patch(pa, "_extend_launch", lambda q, block_d: pa.extend_launch(q.dtype, block_d, "cuda", major))
    patch(st, "_heuristic", lambda vocab, rows, device: sample_heuristic(vocab, rows, cuda))
    patch(vt, "_heuristic", lambda device: verify_heuristic(cuda))
    patch(runner_module, "stages", lambda device: True)
