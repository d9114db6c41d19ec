"""How many Triton kernel variants this process has compiled, over the project's own kernels.

Triton compiles a @triton.jit kernel once per specialization key (constexpr values, pointer dtypes,
and the integer / alignment classes of the arguments it specializes on) and keeps each compiled
variant in the JITFunction's per-device kernel cache. A compile in the middle of serving stalls a
step for 0.3-1 s, so the engine warms every reachable variant up at start-up (warmup.py) and
snapshots `jit_compiles()` then: any growth afterwards is a variant the warm-up missed.

Nothing here imports Triton: only kernel modules that are already imported are looked at, so on a
machine without Triton, on the CPU path (the Triton ops never imported) and in Triton's
interpreter (kernels are not JITFunctions there, and nothing is compiled) the count is 0.
Works with Triton 3.6 and 3.9 (and 3.3+): each entry of `JITFunction.device_caches` is a tuple
whose first element is that device's {key: compiled kernel} dict.
"""

import sys

# The modules of splitreason_engine.kernels that define @triton.jit kernels.
KERNEL_MODULES = ("activation_triton", "linear_triton", "norms_triton", "paged_attention_triton", "rope_triton",
                  "sample_triton", "verify_triton")


def _kernels():
    """(qualified name, JITFunction) of every jit function in the imported kernel modules, once each."""
    seen = set()
    for name in KERNEL_MODULES:
        module = sys.modules.get(f"splitreason_engine.kernels.{name}")
        if module is None:
            continue
        for attr, obj in sorted(vars(module).items()):
            caches = getattr(obj, "device_caches", None)
            if caches is None or not isinstance(caches, dict) or id(obj) in seen:
                continue
            seen.add(id(obj))
            yield f"{name}.{attr}", obj


def _cache_keys(fn) -> list[str]:
    keys = []
    # .values() of the defaultdict: looking a device up would build a binder (and need a driver).
    for entry in list(fn.device_caches.values()):
        kernel_cache = entry[0] if isinstance(entry, tuple) else None
        if isinstance(kernel_cache, dict):
            keys.extend(str(k) for k in list(kernel_cache))
    return keys


def jit_variants() -> dict[str, list[str]]:
    """Per kernel (module.function), the specialization keys of its compiled variants, every
    device together. Empty kernels are left out. For diagnostics: the difference of two snapshots
    names the variant a warm-up missed."""
    out = {}
    for name, fn in _kernels():
        keys = _cache_keys(fn)
        if keys:
            out[name] = keys
    return out


def jit_compiles() -> int:
    """Compiled variants over all the project's Triton kernels in this process (0 without Triton,
    on the CPU, or in the interpreter)."""
    return sum(len(_cache_keys(fn)) for _, fn in _kernels())
