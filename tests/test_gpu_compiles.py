"""No Triton compile after start-up, on CUDA (skipped without a GPU).

A fresh engine once compiled kernels in the middle of serving (0.3-0.9 s per step, the extend
kernel going from 0 to 7 variants over a few requests). Here an engine over two dummy models at
head dim 128 serves a mixed workload (split, random, big and small modes; batches of 1 to 64;
prompts of many lengths; every sampling option) and the project's compiled-variant count
(splitreason_engine.jit) must not grow after Engine() returns.

The vocabulary is 520 (not a multiple of 16) so that the sampler's variant differs from those
compiled by the GPU tests that run earlier in the same process, which could otherwise hide a
variant the warm-up misses; head dim 128 and 4 / 2 heads set the other kernels apart.
"""

import json
import sys
from pathlib import Path

import pytest

from mixed_workload import mixed_workload
from splitreason_engine import Engine
from splitreason_engine.jit import jit_compiles, jit_variants
from splitreason_engine.warmup import warm_up_kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

SEQS, TOKENS = 64, 512


def dummy_pair(root: Path) -> tuple[Path, Path]:
    from common import write_dummy_pair  # bench/common.py

    small, big = write_dummy_pair(root, hidden=512, small_layers=2, big_layers=3, max_positions=2048)
    for folder in (small, big):
        path = folder / "config.json"
        config = json.loads(path.read_text())
        config.update(num_attention_heads=4, num_key_value_heads=2, head_dim=128, vocab_size=520)
        path.write_text(json.dumps(config, indent=2))
    return small, big


def new_variants(before: dict, after: dict) -> dict:
    return {name: sorted(set(keys) - set(before.get(name, ()))) for name, keys in after.items()
            if set(keys) - set(before.get(name, ()))}


@pytest.mark.gpu
def test_no_triton_compiles_after_startup(tmp_path):
    from common import printable_ascii_bias

    small, big = dummy_pair(tmp_path)
    engine = Engine(small, big, device="cuda", load_format="dummy", kv_cache_bytes=1 << 28, max_model_len=1024,
                    max_num_seqs=SEQS, max_num_batched_tokens=TOKENS, catch_up="eager", progress=False)
    startup, at_startup = jit_compiles(), jit_variants()
    assert startup > 0, "nothing compiled at start-up: are the Triton kernels in use?"

    # Warm up again explicitly: nothing new once Engine.__init__ warms up; before that, this
    # still tests the warm-up's coverage on its own.
    for i, model in enumerate(engine.models):
        warm_up_kernels(model, engine.pool.kv_caches[i], engine.ops, engine.device, max_num_seqs=SEQS,
                        max_num_batched_tokens=TOKENS, max_model_len=engine.max_model_len,
                        real_vocab=engine.real_vocab[i], detect_tables=engine.detect_tables,
                        block_table_width=engine.runners[i].stride, name=f"model {i}")
    warmed, at_warm = jit_compiles(), jit_variants()

    tags = {engine.tokenizer.hf.token_to_id(t): 4.0 for t in ("<bigmodel>", "</bigmodel>")}
    outs = mixed_workload(engine, tags, printable_ascii_bias(engine), max_prompt=400)
    assert all(o.error is None for o in outs), [o.error for o in outs if o.error][:3]
    assert sum(o.metrics.handoffs for o in outs) > 0
    served = jit_compiles()

    report = {"compiled at start-up": startup, "by the explicit warm-up": warmed - startup,
              "while serving": served - warmed,
              "new while serving": new_variants(at_warm, jit_variants()),
              "new in the explicit warm-up (Engine.__init__ should have)": new_variants(at_startup, at_warm)}
    text = json.dumps(report, indent=1)[:8000]
    assert served == warmed, f"the workload compiled kernels the warm-up had not: {text}"
    assert warmed == startup, f"Engine() returned without warming every kernel up: {text}"
