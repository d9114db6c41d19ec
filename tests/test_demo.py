"""The demo pair: its task and checker, its tokenizer, training, the main command, and the engine
against the from-scratch protocol oracle on demo problems (multi-token tags end to end)."""

import json
import random
import subprocess
import sys

import pytest
import torch

from split_models import Oracle, Request
from splitreason_engine import Engine, SamplingParams
from splitreason_engine.demo import pair_paths
from splitreason_engine.demo.chartok import build_tokenizer
from splitreason_engine.demo.task import (MULTIPLIERS, NUM_STEPS, Problem, evaluation_problems, is_correct, parse_answer,
                                          sample_problem)
from splitreason_engine.demo.train import TrainingQwen2, ModelShape


def random_problems(n: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    return [Problem(rng.randrange(1000), tuple(rng.choice(MULTIPLIERS) for _ in range(NUM_STEPS))) for _ in range(n)]


def test_every_trace_checks_as_correct():
    for p in random_problems(5000, seed=0) + [Problem(0, (2,) * NUM_STEPS), Problem(999, (9,) * NUM_STEPS)]:
        for tagged in (False, True):
            assert is_correct(p, p.trace(tagged)), p


def test_answer_is_the_chain_of_products_mod_1000():
    rng = random.Random(1)
    for _ in range(200):
        p = sample_problem(rng, held_out=bool(rng.getrandbits(1)))
        value = p.start
        for m in p.multipliers:
            value = (value * m) % 1000
        assert p.answer == value and f"\\boxed{{{value:03d}}}" in p.trace(False)


def test_trace_format():
    p = Problem(347, (6, 2, 9, 4))  # 347 -> 082 -> 164 -> 476 -> 904
    assert p.trace(tagged=True) == (
        "We start at 347 and multiply 4 times.\n"
        "347*6 = <bigmodel>2082</bigmodel>, keep 082.\n"
        "082*2 = <bigmodel>0164</bigmodel>, keep 164.\n"
        "164*9 = <bigmodel>1476</bigmodel>, keep 476.\n"
        "476*4 = <bigmodel>1904</bigmodel>, keep 904.\n"
        "So 347 -> 082 -> 164 -> 476 -> 904.\n"
        "</think>\nThe answer is \\boxed{904}.")
    assert p.trace(tagged=False) == p.trace(tagged=True).replace("<bigmodel>", "").replace("</bigmodel>", "")
    assert p.question == "Start at 347; multiply by 6, 2, 9 and 4, keeping three digits."


@pytest.mark.parametrize("text", ["The answer is 904.", "\\boxed{94}", "\\boxed{0904}", "\\boxed{ 904}",
                                  "\\boxed{9a4}", "\\boxed{}", "\\boxed{904", "boxed{904}", "\\boxed{-904}",
                                  "\\boxed{90.4}", "\\boxed{９０４}"])
def test_malformed_answers_are_rejected(text):
    assert parse_answer(text) is None
    assert not is_correct(Problem(347, (6, 2, 9, 4)), text)


def test_checker_takes_the_last_box_and_compares_exactly():
    p = Problem(347, (6, 2, 9, 4))
    assert p.answer == 904
    assert is_correct(p, "\\boxed{111} no, \\boxed{904}") and not is_correct(p, "\\boxed{904} no, \\boxed{111}")
    assert not is_correct(p, "\\boxed{476}") and not is_correct(p, "\\boxed{409}")


@pytest.mark.parametrize("start, multipliers", [(1000, (2, 3, 4, 5)), (-1, (2, 3, 4, 5)), (5, (1, 3, 4, 5)),
                                                (5, (2, 3, 4)), (5, (2, 3, 4, 10))])
def test_problem_rejects_values_outside_the_task(start, multipliers):
    with pytest.raises(ValueError, match="not a demo problem"):
        Problem(start, multipliers)


def test_held_out_split_is_a_tenth_and_disjoint_from_training():
    problems = random_problems(20000, seed=1)
    assert abs(sum(p.held_out for p in problems) / len(problems) - 0.1) < 0.01
    rng = random.Random(3)
    assert not any(sample_problem(rng, held_out=False).held_out for _ in range(2000))
    assert all(p.held_out for p in evaluation_problems(50, seed=4))
    assert evaluation_problems(20, seed=4) == evaluation_problems(20, seed=4)


def test_tags_are_ordinary_text_and_markers_are_special():
    tok = build_tokenizer()
    assert len(tok.encode("<bigmodel>", add_special_tokens=False).ids) == 10
    assert len(tok.encode("</bigmodel>", add_special_tokens=False).ids) == 11
    added = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    assert added["<｜User｜>"] and added["<｜Assistant｜>"] and added["<｜end▁of▁sentence｜>"]
    assert added["<think>"] is False and added["</think>"] is False
    trace = Problem(347, (6, 2, 9, 4)).trace(tagged=True)
    ids = tok.encode(trace, add_special_tokens=False).ids
    assert tok.decode(ids) == trace


# ---- the shipped pair ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair():
    return pair_paths()


def test_shipped_pair_is_small_enough_and_ten_times_apart(pair):
    sizes = [sum(f.stat().st_size for f in folder.iterdir()) for folder in pair]
    assert sum(sizes) <= 30 * 2**20
    params = [json.loads((folder / "training_log.json").read_text())["parameters"] for folder in pair]
    assert 7 <= params[1] / params[0] <= 14


def test_split_mode_equals_the_oracle_on_demo_problems(pair):
    """Greedy, 20 held-out problems: every token and its writer equal the from-scratch protocol."""
    oracle = Oracle(*pair)
    problems = evaluation_problems(20, seed=11)
    engine = Engine(*pair, kv_cache_bytes=1 << 24, progress=False)
    params = SamplingParams(temperature=0, max_tokens=400, mode="split")
    outs = engine.generate([p.question for p in problems], params, use_tqdm=False)
    handoffs = 0
    for p, out in zip(problems, outs):
        tokens, writers = oracle.run(Request(p.question, "split", 400))
        assert out.token_ids == tokens, f"problem {p} differs from the oracle"
        assert out.token_models == writers
        handoffs += out.metrics.handoffs
    assert handoffs >= 20  # the small model hands off on its own: the multi-token tag path is exercised


def test_main_command_prints_a_boxed_answer_and_a_summary_line():
    question = Problem(347, (6, 2, 9, 4)).question
    r = subprocess.run([sys.executable, "-m", "splitreason_engine.cli", "generate", question], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert parse_answer(r.stdout) is not None, r.stdout
    assert "[big]" in r.stdout  # offloaded segments are marked
    summary = [line for line in r.stderr.splitlines() if line.startswith("[split]")]
    assert len(summary) == 1 and "small " in summary[0] and "big " in summary[0] and "offload" in summary[0] \
        and "tok/s" in summary[0], r.stderr


def test_eval_demo_reports_every_mode(tmp_path):
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "splitreason_engine.cli", "eval-demo", "--problems", "6", "--batch-size",
                        "3", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    modes = report["modes"]
    assert list(modes) == ["small", "big", "split", "random"]
    for name, m in modes.items():
        assert 0 <= m["accuracy"] <= 1 and m["wall_s"] > 0 and m["accuracy"] * 6 == round(m["accuracy"] * 6)
        assert name in r.stdout
    assert modes["small"]["offload_fraction"] == 0 and modes["big"]["offload_fraction"] == 1
    assert 0 < modes["split"]["offload_fraction"] < 1
    assert modes["random"]["switch_ratio"] == pytest.approx(1 / modes["split"]["offload_fraction"] - 1)


# ---- training -----------------------------------------------------------------------------------

def test_training_a_few_steps_writes_loadable_checkpoints(tmp_path):
    r = subprocess.run([sys.executable, "-m", "splitreason_engine.cli", "train-demo", "--out", str(tmp_path),
                        "--small-steps", "3", "--big-steps", "2", "--batch-size", "4"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for name, steps in (("small", 3), ("big", 2)):
        log = json.loads((tmp_path / name / "training_log.json").read_text())
        assert log["config"]["steps"] == steps and log["steps"][-1]["step"] == steps - 1
    engine = Engine(tmp_path / "small", tmp_path / "big", kv_cache_bytes=1 << 24, progress=False)
    out = engine.generate([Problem(1, (2, 3, 4, 5)).question], SamplingParams(max_tokens=8, seed=0), use_tqdm=False)[0]
    assert out.error is None and len(out.token_ids) >= 1


def test_saved_checkpoint_matches_transformers(tmp_path):
    """The training model's parameter names and maths are Hugging Face Qwen2's: same logits."""
    from transformers import Qwen2ForCausalLM

    from splitreason_engine.demo.train import save_checkpoint

    torch.manual_seed(0)
    shape = ModelShape(hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=96)
    model = TrainingQwen2(shape, 104)
    for p in model.parameters():  # biases and norms off their initial zeros and ones
        p.data.add_(torch.randn_like(p) * 0.05)
    tok = build_tokenizer()
    save_checkpoint(model, shape, 104, tok, tmp_path)
    hf = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 103, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_training_is_deterministic_from_the_seed(tmp_path):
    from safetensors.torch import load_file

    from splitreason_engine.demo.train import TrainConfig, train_model

    shape = ModelShape(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    weights = []
    for run, seed in (("a", 5), ("b", 5), ("c", 6)):
        log = train_model(TrainConfig(shape=shape, tagged=True, steps=3, batch_size=2, seed=seed), tmp_path / run,
                          progress=False)
        assert [e["step"] for e in log["steps"]] == [0, 2] and all(e["loss"] > 0 for e in log["steps"])
        weights.append(load_file(str(tmp_path / run / "model.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
