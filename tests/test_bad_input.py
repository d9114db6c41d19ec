"""Bad inputs fail with an error that names the problem; a bad prompt in a batch spoils only itself."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import save_tiny_qwen2
from splitreason_engine import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A pristine single-file checkpoint; tests copy it before breaking it."""
    return save_tiny_qwen2(tmp_path_factory.mktemp("bad") / "single", "gqa2-untied-1e6", seed=3)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return save_tiny_qwen2(tmp_path_factory.mktemp("bad") / "sharded", "gqa2-untied-1e6", seed=3, shards=True)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(kv_cache_bytes=1 << 24, max_model_len=64, progress=False)


def copy(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / folder.name
    shutil.copytree(folder, dest)
    return dest


def make_engine(path, **kwargs) -> Engine:
    return Engine(path, kv_cache_bytes=1 << 22, progress=False, **kwargs)


def rewrite(folder: Path, edit) -> None:
    """Loads model.safetensors, applies `edit` to the state dict, and saves it back."""
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def assert_clean(engine: Engine) -> None:
    """No request left behind in the engine or its scheduler, every page free."""
    assert not engine.has_unfinished()
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 0
    assert engine.scheduler.num_free_pages == engine.pool.num_pages
    engine.scheduler.check_invariants()


# ---- checkpoint folders ---------------------------------------------------------------------------

def test_the_pristine_checkpoint_loads(checkpoint, sharded):
    for folder in (checkpoint, sharded):
        out = make_engine(folder).generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 8


def test_folder_without_config_json(checkpoint, tmp_path):
    folder = copy(checkpoint, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        make_engine(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        make_engine(empty)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        make_engine(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_engine(missing)


def test_config_without_weights(checkpoint, tmp_path):
    folder = copy(checkpoint, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        make_engine(folder)


def test_sharded_checkpoint_with_a_shard_deleted(sharded, tmp_path):
    folder = copy(sharded, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    victim = shards[1]
    (folder / victim).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(victim)):
        make_engine(folder)


def test_corrupt_index_json(sharded, tmp_path):
    folder = copy(sharded, tmp_path)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        make_engine(folder)


@pytest.mark.parametrize("name,bad_shape", [
    ("model.layers.0.mlp.down_proj.weight", lambda s: (s[1], s[0])),  # transposed
    ("model.layers.1.self_attn.v_proj.weight", lambda s: (s[0] - 1, s[1])),  # a fused part
    ("model.layers.0.self_attn.q_proj.bias", lambda s: (s[0] + 2,)),
    ("model.embed_tokens.weight", lambda s: (s[0] + 8, s[1])),  # vocabulary mismatch
])
def test_tensor_with_wrong_shape(checkpoint, tmp_path, name, bad_shape):
    folder = copy(checkpoint, tmp_path)

    def edit(tensors):
        tensors[name] = torch.zeros(bad_shape(tuple(tensors[name].shape)))

    rewrite(folder, edit)
    with pytest.raises(ValueError, match=re.escape(name)) as info:
        make_engine(folder)
    assert "shape" in str(info.value)


@pytest.mark.parametrize("name", ["model.norm.weight", "model.layers.1.post_attention_layernorm.weight",
                                  "lm_head.weight"])
def test_checkpoint_missing_a_tensor(checkpoint, tmp_path, name):
    folder = copy(checkpoint, tmp_path)
    rewrite(folder, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=re.escape(name.removeprefix("model."))):
        make_engine(folder)


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"])
def test_checkpoint_missing_part_of_a_fused_tensor_names_that_part(checkpoint, tmp_path, name):
    """q/k/v and gate/up are fused in the engine; the error must still name the checkpoint tensor
    that is missing (k_proj), not only the engine's fused parameter (qkv_proj)."""
    folder = copy(checkpoint, tmp_path)
    rewrite(folder, lambda t: t.pop(name))
    part = name.removeprefix("model.").rsplit(".", 1)[0]  # layers.1.self_attn.k_proj / layers.0.mlp.up_proj
    with pytest.raises(ValueError, match=re.escape(part)):
        make_engine(folder)


def test_unexpected_tensor(checkpoint, tmp_path):
    folder = copy(checkpoint, tmp_path)
    rewrite(folder, lambda t: t.__setitem__("model.layers.7.mlp.down_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(ValueError, match=re.escape("model.layers.7.mlp.down_proj.weight")):
        make_engine(folder)


@pytest.mark.parametrize("how", ["half", "last_byte", "header", "garbage"])
def test_corrupt_or_truncated_safetensors(checkpoint, tmp_path, how):
    folder = copy(checkpoint, tmp_path)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    data = {"half": data[: len(data) // 2], "last_byte": data[:-1], "header": data[:6],
            "garbage": bytes(range(256)) * 8}[how]
    file.write_bytes(data)
    with pytest.raises(ValueError, match="model.safetensors"):
        make_engine(folder)


@pytest.mark.parametrize("edit,message", [
    (dict(architectures=["GemmaForCausalLM"], model_type="gemma"), "unsupported architecture"),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"), "unsupported architecture"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), "rope scaling"),
    (dict(rope_parameters=None, rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0}),  # v4 style
     "rope scaling"),
    (dict(use_sliding_window=True), "sliding"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
])
def test_unsupported_config(checkpoint, tmp_path, edit, message):
    folder = copy(checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(edit)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as info:
        make_engine(folder)
    assert "config.json" in str(info.value)


def test_config_missing_fields_and_invalid_json(checkpoint, tmp_path):
    folder = copy(checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_size"):
        make_engine(folder)
    (folder / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        make_engine(folder)


# ---- engine arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float8", "int8", "fp64", "half-ish"])
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match="dtype") as info:
        Engine(dtype=dtype, kv_cache_bytes=1 << 24, progress=False)
    assert dtype in str(info.value)


@pytest.mark.parametrize("kwargs,name", [
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_seqs=-3), "max_num_seqs"),
    (dict(max_num_seqs=2.5), "max_num_seqs"),
    (dict(page_tokens=0), "page_tokens"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (dict(max_model_len=1), "max_model_len"),
    (dict(max_model_len=0), "max_model_len"),
    (dict(max_model_len=4097), "max_model_len"),  # past the model's 4096-token context
    (dict(max_model_len="64"), "max_model_len"),
    (dict(kv_cache_bytes=0), "kv_cache_bytes"),
    (dict(kv_cache_bytes=-1), "kv_cache_bytes"),
    (dict(kv_cache_bytes=1.5e7), "kv_cache_bytes"),
    (dict(kv_cache_bytes=None, kv_cache_memory_fraction=0), "kv_cache_memory_fraction"),
    (dict(kv_cache_bytes=None, kv_cache_memory_fraction=1.5), "kv_cache_memory_fraction"),
])
def test_bad_engine_args(kwargs, name):
    kwargs = {"kv_cache_bytes": 1 << 24, **kwargs}
    with pytest.raises(ValueError, match=name):
        Engine(progress=False, **kwargs)


def test_bad_load_format(checkpoint):
    with pytest.raises(ValueError, match="load_format"):
        make_engine(checkpoint, load_format="pickle")


@pytest.mark.parametrize("kv_cache_bytes,max_model_len,pages", [
    (1 << 20, 512, 16),  # 16 pages of 64 KiB (16 tokens each) hold 256 tokens < 512
    (1000, 64, 0),  # less than one page
])
def test_pool_too_small_for_one_request(kv_cache_bytes, max_model_len, pages):
    """The default model: 4 layers x K,V x 2 kv heads x 64 dims x 4 bytes = 4 KiB per token."""
    with pytest.raises(ValueError) as info:
        Engine(kv_cache_bytes=kv_cache_bytes, max_model_len=max_model_len, page_tokens=16, progress=False)
    msg = str(info.value)
    assert "too small" in msg
    assert f"{kv_cache_bytes} bytes" in msg
    assert f"{pages} pages" in msg
    assert f"max_model_len {max_model_len}" in msg
    assert f"needs {max_model_len // 16} pages" in msg


def test_pool_exactly_one_request_is_enough():
    engine = Engine(kv_cache_bytes=4 * 65536, max_model_len=64, page_tokens=16, progress=False)
    out = engine.generate([[1] * 40], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                          use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 64 - 40


# ---- bad prompts in a batch -----------------------------------------------------------------------

GOOD = ["Hello world", "The quick brown fox", [5, 6, 7, 8]]


def good_run(engine: Engine) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(GOOD, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("bad,message", [
    ("x" * 100, r"100 tokens.*max_model_len=64"),
    ([3] * 64, r"64 tokens.*max_model_len=64"),  # exactly max_model_len: no room for a new token
    ([5, 320, 7], r"token id 320.*vocabulary"),
    ([5, -1, 7], r"token id -1.*vocabulary"),
    ("", "empty prompt"),
    ([], "empty prompt"),
    ([1.5, 2], "list of token ids"),
    ({"text": "hi"}, "list of token ids"),
])
def test_bad_prompt_in_a_batch_spoils_only_itself(engine, bad, message):
    expected = good_run(engine)
    for position in (0, 2, 3):
        prompts = list(GOOD)
        prompts.insert(position, bad)
        outputs = engine.generate(prompts, GREEDY, use_tqdm=False)
        assert len(outputs) == 4
        assert outputs[position].finish_reason == "error"
        assert re.search(message, outputs[position].error), outputs[position].error
        assert outputs[position].token_ids == []
        others = [o for i, o in enumerate(outputs) if i != position]
        assert [o.token_ids for o in others] == expected
        assert all(o.finish_reason == "length" and o.error is None for o in others)
        assert [o.index for o in outputs] == [0, 1, 2, 3]
        assert_clean(engine)


def test_longest_allowed_prompt_gets_one_token(engine):
    out = engine.generate([[3] * 63], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                          use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 1
    assert_clean(engine)


def test_big_mode_without_a_big_model(engine):
    outputs = engine.generate(GOOD + ["abc"], [GREEDY] * 3 + [SamplingParams(mode="big")], use_tqdm=False)
    assert outputs[3].finish_reason == "error" and "big" in outputs[3].error
    assert [o.token_ids for o in outputs[:3]] == good_run(engine)
    assert_clean(engine)


def test_wrong_number_of_sampling_params(engine):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        engine.generate(GOOD, [GREEDY, GREEDY], use_tqdm=False)
    assert_clean(engine)


def test_bad_prompt_in_a_stream_comes_first(engine):
    events = list(engine.generate_stream(["Hello world", "x" * 100], GREEDY))
    assert events[0].index == 1 and events[0].output.finish_reason == "error"
    assert "max_model_len" in events[0].output.error
    done = [e.output for e in events if e.output is not None and e.index == 0]
    assert len(done) == 1 and done[0].token_ids == good_run(engine)[0]
    assert_clean(engine)


def test_prompt_ids_in_the_embedding_padding_are_rejected(engine):
    """The default model's embedding has 320 rows but its tokenizer only 260 tokens; ids 260..319
    are padding the sampler never emits, and no tokenizer produces them, so as prompt ids they are
    out of the vocabulary too."""
    real = engine.real_vocab[0]
    assert real == 260 < engine.models[0].config.vocab_size
    out = engine.generate([[5, real, 7]], GREEDY, use_tqdm=False)[0]
    assert out.finish_reason == "error" and str(real) in out.error
    assert_clean(engine)


def test_stop_strings_without_a_tokenizer_reject_only_that_prompt(checkpoint):
    """A checkpoint with no tokenizer.json cannot match stop strings: that prompt gets an error and
    must not be left behind in the scheduler, and the other prompts still run."""
    engine = make_engine(checkpoint)
    assert engine.tokenizer is None
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8]]
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=8, stop=["x"]), GREEDY]
    expected = [o.token_ids for o in engine.generate([prompts[0], prompts[2]], GREEDY, use_tqdm=False)]
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert outputs[1].finish_reason == "error" and "tokenizer" in outputs[1].error
    assert [outputs[0].token_ids, outputs[2].token_ids] == expected
    assert_clean(engine)
