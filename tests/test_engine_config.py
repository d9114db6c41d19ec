"""EngineConfig: the engine's options in one place. Each bad value is refused by name; the keyword
form, the whole config and the CLI's flags build the same config; an unknown option is named."""

import argparse
import dataclasses

import pytest

from splitreason_engine import Engine, EngineConfig
from splitreason_engine.engine_config import PARTS, add_options, config_from_args


@pytest.mark.parametrize("options, field", [
    (dict(page_tokens=0), "page_tokens"), (dict(max_num_seqs=-1), "max_num_seqs"),
    (dict(max_num_batched_tokens=1.5), "max_num_batched_tokens"), (dict(kv_cache_bytes=0), "kv_cache_bytes"),
    (dict(kv_cache_memory_fraction=1.5), "kv_cache_memory_fraction"), (dict(max_model_len=1), "max_model_len"),
    (dict(coschedule="sometimes"), "coschedule"), (dict(catch_up="never"), "catch_up"),
    (dict(kernels="cuda"), "kernels"), (dict(load_format="gguf"), "load_format"), (dict(device="gpu"), "device"),
    (dict(dtype="int8"), "dtype"), (dict(tensor_parallel_size=0), "tensor_parallel_size"),
    (dict(tensor_parallel_size=2, tp_timeout_s=0), "tp_timeout_s"),
    (dict(tensor_parallel_size=2, cuda_graphs=True), "cuda_graphs"),
    (dict(tensor_parallel_size=2, overlap=True), "overlap"),
    (dict(cuda_graphs=True), "cuda_graphs"), (dict(device="cuda", cuda_graphs=True, kernels="torch"), "cuda_graphs"),
])
def test_a_bad_option_is_refused_by_name(options, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig.from_options(**options)
    with pytest.raises(ValueError, match=field):
        Engine(**options, progress=False)


def test_an_unknown_option_is_named():
    with pytest.raises(TypeError, match="page_size"):
        Engine(page_size=16)


def test_keywords_a_whole_config_and_the_flags_give_one_config():
    options = dict(page_tokens=7, max_num_seqs=5, kv_cache_bytes=1 << 20, max_model_len=64, catch_up="eager",
                   prefix_caching=False, coschedule="eager", max_big_wait_s=0.5)
    config = EngineConfig.from_options(**options)
    assert config.cache.page_tokens == 7 and config.protocol.catch_up == "eager" and not config.cache.prefix_caching
    parser = argparse.ArgumentParser()
    add_options(parser)
    args = parser.parse_args(["--page-tokens", "7", "--max-num-seqs", "5", "--kv-cache-bytes", str(1 << 20),
                              "--max-model-len", "64",
                              "--catch-up", "eager", "--no-prefix-caching", "--coschedule", "eager",
                              "--max-big-wait-s", "0.5"])
    assert config_from_args(args) == config
    assert config_from_args(parser.parse_args([])) == EngineConfig()  # the flags' defaults are the fields'
    engine = Engine(config=config, progress=False)
    assert engine.config is config and engine.scheduler.prefix_caching is False
    assert engine.pool.geometries[0].page_tokens == 7
    with pytest.raises(TypeError, match="either config"):
        Engine(config=config, page_tokens=8)


def test_every_option_is_a_documented_flag_or_says_why_not():
    parser = argparse.ArgumentParser()
    add_options(parser)
    dests = {a.dest for a in parser._actions}
    for part in PARTS.values():
        for f in dataclasses.fields(part):
            assert f.metadata["help"], f.name
            assert (f.name in dests) == f.metadata["cli"], f.name
