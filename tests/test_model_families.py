"""Llama and Qwen3 beside Qwen2: the family comes from config.json, greedy tokens and logits match
Hugging Face transformers on tiny random models, and the Triton path gives the PyTorch path's tokens."""

import json
import shutil

import pytest
import torch

from hf_models import (FAMILY_CONFIGS, LLAMA3_ROPE, assert_greedy_matches_hf, assert_greedy_matches_hf_under_preemption,
                       assert_logits_match_hf, greedy_params, hf_model, ragged_prompts_for, save_tiny)
from splitreason_engine import Engine
from splitreason_engine.config import SUPPORTED_ARCHITECTURES, ModelConfig
from splitreason_engine.kernels import rope_cos_sin

NEW_TOKENS = 40  # prompts up to 47 tokens: positions reach ~86, well past the llama3 configs' original 32
CASES = [(family, name) for family in ("llama", "qwen3") for name in FAMILY_CONFIGS[family]]
IDS = [f"{family}-{name}" for family, name in CASES]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {case: save_tiny(root / "-".join(case), *case, seed=10 + i) for i, case in enumerate(CASES)}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_config_switches_and_parameter_count(checkpoints, case):
    family, name = case
    engine = Engine(checkpoints[case], kv_cache_bytes=1 << 22, progress=False)
    config, over = engine.models[0].config, FAMILY_CONFIGS[family][name]
    assert config.family == family
    assert config.qkv_bias == config.o_bias == over.get("attention_bias", False)
    assert config.mlp_bias == over.get("mlp_bias", False)
    assert config.qk_norm == (family == "qwen3")
    assert (config.rope_scaling is not None) == ("rope_parameters" in over)
    hf = hf_model(checkpoints[case])
    assert config.num_parameters() == sum(p.numel() for p in hf.parameters())  # tied weights counted once
    assert config.num_parameters() == sum(p.numel() for p in engine.models[0].parameters())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_greedy_matches_hf(checkpoints, case):
    assert_greedy_matches_hf(checkpoints[case], ragged_prompts_for(len(case[1]), count=6), NEW_TOKENS)


@pytest.mark.parametrize("case", [("llama", "gqa4-h96-llama3"), ("qwen3", "gqa4-h80-untied")], ids=str)
def test_greedy_matches_hf_under_preemption(checkpoints, case):
    assert_greedy_matches_hf_under_preemption(checkpoints[case], ragged_prompts_for(3 + len(case[1])), NEW_TOKENS)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prefill_and_decode_logits_match_hf(checkpoints, case):
    assert_logits_match_hf(checkpoints[case], ragged_prompts_for(17, count=1, lo=40)[0] + [1, 2, 3])


def test_llama3_rope_table_matches_hf_and_differs_from_plain_rope():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    d, positions = 16, 300
    config = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=8, hidden_size=64,
                                        intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                                        rope_scaling=LLAMA3_ROPE))
    table = rope_cos_sin(d, positions, config.rope_theta, torch.float32, "cpu", config.rope_scaling)
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=dict(LLAMA3_ROPE)))
    x = torch.zeros(1, positions, d)
    cos, sin = hf(x, torch.arange(positions)[None])
    torch.testing.assert_close(table[:, 0], cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(table[:, 1, d // 2:], sin[0, :, d // 2:], atol=1e-6, rtol=0)
    plain = rope_cos_sin(d, positions, config.rope_theta, torch.float32, "cpu")
    assert (table - plain).abs().max() > 0.1


@pytest.mark.parametrize("edit,named", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn'"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "'dynamic'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"), "MistralForCausalLM"),
    (dict(architectures=None, model_type="gemma"), "'gemma'"),
])
def test_unsupported_configs_are_refused_by_name(edit, named):
    raw = {**dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=8, hidden_size=64,
                  intermediate_size=8, num_hidden_layers=1, num_attention_heads=4), **edit}
    with pytest.raises(ValueError, match=named) as info:
        ModelConfig.from_dict(raw, source="some/config.json")
    assert "some/config.json" in str(info.value)
    if "architecture" in str(info.value):
        assert all(a in str(info.value) for a in SUPPORTED_ARCHITECTURES)


def test_bias_tensors_the_config_does_not_declare_are_refused(checkpoints, tmp_path):
    folder = shutil.copytree(checkpoints[("llama", "gqa2-h80-bias")], tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, mlp_bias=False)))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.\w+_proj\.bias' for a llama"):
        Engine(folder, kv_cache_bytes=1 << 22, progress=False)


def test_dummy_weights_set_every_norm_to_one(checkpoints):
    engine = Engine(checkpoints[("qwen3", "gqa2-hd32-tied")] / "config.json", load_format="dummy",
                    kv_cache_bytes=1 << 22, progress=False)
    norms = {n: p for n, p in engine.models[0].named_parameters() if n.endswith("norm.weight")}
    assert any("q_norm" in n for n in norms) and any("k_norm" in n for n in norms)
    assert all(bool((p == 1).all()) for p in norms.values())


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [("llama", "gqa8-hd64"), ("qwen3", "gqa8-hd128-bias")], ids=str)
def test_triton_ops_generate_like_the_torch_ops(tmp_path, case):
    """One layer, head_dim 64 (Llama) and 128 (Qwen3, with its q/k norms), 8 query heads per KV
    head, on the Triton kernels in the interpreter: a chunked prefill and decodes give the PyTorch
    path's tokens."""
    folder = save_tiny(tmp_path / "one-layer", *case, num_layers=1)
    prompts = ragged_prompts_for(5, count=2, lo=6, hi=20)
    kwargs = dict(kv_cache_bytes=1 << 22, page_tokens=7, max_num_batched_tokens=16, progress=False)
    expected = [o.token_ids for o in Engine(folder, kernels="torch", **kwargs).generate(
        prompts, greedy_params(4), use_tqdm=False)]
    engine = Engine(folder, kernels="triton", **kwargs)
    assert engine.ops.name == "triton"
    assert [o.token_ids for o in engine.generate(prompts, greedy_params(4), use_tqdm=False)] == expected
