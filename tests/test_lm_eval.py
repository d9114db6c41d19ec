"""lm-evaluation-harness's own CLI against a real `splitreason serve` on the demo pair, through
both `local-completions` and `local-chat-completions` (docs/lm-eval.md): a task generated here from
held-out demo problems, run offline, its reported exact_match checked against the demo's checker
on the answers the server gave."""

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from splitreason_engine.demo import pair_paths
from splitreason_engine.demo.task import OPEN_TAG, Problem, evaluation_problems, is_correct
from splitreason_engine.protocol import PromptTemplate
from test_server import Server

TASK = "splitreason_demo"
# Seed 1's eight problems: the demo pair gets one wrong (greedy, split mode), so the metric is not
# trivially 1.
NUM_PROBLEMS, SEED = 8, 1


def write_task(folder: Path, problems: list[Problem]) -> None:
    """A generate_until task over a local JSONL file: the question as the prompt, the last
    \\boxed{...} (the demo checker's regex) against the three-digit answer."""
    data = folder / "problems.jsonl"
    data.write_text("".join(json.dumps({"question": p.question, "answer": f"{p.answer:03d}"}) + "\n"
                            for p in problems))
    task = {
        "task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "generate_until",
        "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 400, "temperature": 0, "do_sample": False},
        "filter_list": [{"name": "boxed", "filter": [
            {"function": "regex", "regex_pattern": r"\\boxed\{([^{}]*)\}", "group_select": -1},
            {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def start_lm_eval(model: str, url: str, tasks: Path, out: Path, env: dict, *extra: str) -> subprocess.Popen:
    model_args = f"base_url={url},model=splitreason-demo,tokenizer_backend=None,num_concurrent={NUM_PROBLEMS}"
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args,
           "--tasks", TASK, "--include_path", str(tasks), "--output_path", str(out), "--log_samples", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def read_run(out: Path) -> tuple[dict, list[dict]]:
    """lm-eval's results JSON and its logged samples, in document order."""
    [results] = out.rglob("results_*.json")
    [samples] = out.rglob(f"samples_{TASK}_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return json.loads(results.read_text()), sorted(rows, key=lambda s: s["doc_id"])


def test_lm_eval_cli_scores_the_demo_server_as_its_checker_does(tmp_path):
    problems = evaluation_problems(NUM_PROBLEMS, SEED)
    write_task(tmp_path, problems)
    # No hub access: the data is local and no tokenizer is fetched (tokenizer_backend=None).
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    server = Server()
    runs: dict[str, subprocess.Popen] = {}
    try:
        before = server.metric("splitreason_requests_finished_total")
        # Both clients at once: each spends most of its start-up indexing lm-eval's built-in tasks.
        runs["completions"] = start_lm_eval("local-completions", server.url + "/v1/completions", tmp_path,
                                            tmp_path / "completions", env)
        runs["chat"] = start_lm_eval("local-chat-completions", server.url + "/v1/chat/completions", tmp_path,
                                     tmp_path / "chat", env, "--apply_chat_template")
        logs = {name: proc.communicate(timeout=300)[0] for name, proc in runs.items()}
        for name, proc in runs.items():
            assert proc.returncode == 0, f"{name}:\n{logs[name][-4000:]}"
        assert server.metric("splitreason_requests_finished_total") - before == 2 * NUM_PROBLEMS
    finally:
        for proc in runs.values():
            proc.kill()  # only a timed-out run is still alive
            proc.wait()
        server.close()

    texts = {}
    for name in runs:
        results, samples = read_run(tmp_path / name)
        assert results["n-samples"][TASK] == {"original": NUM_PROBLEMS, "effective": NUM_PROBLEMS}
        assert [s["doc"]["question"] for s in samples] == [p.question for p in problems]
        texts[name] = [s["resps"][0][0] for s in samples]
        correct = [is_correct(p, text) for p, text in zip(problems, texts[name])]
        assert [s["exact_match"] for s in samples] == [float(c) for c in correct], name
        assert results["results"][TASK]["exact_match,boxed"] == sum(correct) / NUM_PROBLEMS, name
        assert sum(correct) >= NUM_PROBLEMS - 2, (name, texts[name])  # the demo pair is ~90% right in split mode
    # Split mode templates the question itself, so both routes give the same greedy answers.
    assert texts["completions"] == texts["chat"]


# --- loglikelihood: a multiple-choice task scored through echo ---------------------------------

MC_TASK = "splitreason_demo_mc"
# Seed 2's twelve problems: the small model picks the right final product for most, not all.
MC_PROBLEMS, MC_SEED = 12, 2


def options(problem: Problem, rng: random.Random) -> tuple[list[str], int]:
    """Four three-digit options, the answer among them, and its index: the wrong three are near
    misses (off by 1, 2, 10 or 100) or the answer's digits permuted, which a model that half knows
    the product finds plausible."""
    a, digits = problem.answer, f"{problem.answer:03d}"
    near = {(a + d) % 1000 for d in (-100, -10, -2, -1, 1, 2, 10, 100)}
    permuted = {int("".join(p)) for p in itertools.permutations(digits)}
    wrong = sorted((near | permuted) - {a})
    chosen = [f"{x:03d}" for x in rng.sample(wrong, 3)] + [digits]
    rng.shuffle(chosen)
    return chosen, chosen.index(digits)


def mc_context(problem: Problem) -> str:
    """The small model's prompt and its own trace, cut inside the last hard step after the product's
    first digit: the options are that product's last three digits, which the trace keeps as the
    answer. Earlier cuts (`\\boxed{`, `keep `) leave only copying, which the model never misses."""
    trace = problem.trace(tagged=True)
    last = trace.rindex(OPEN_TAG) + len(OPEN_TAG)
    return PromptTemplate().small(problem.question) + trace[: last + 1]


def write_mc_task(folder: Path, problems: list[Problem]) -> list[dict]:
    """A multiple_choice task over a local JSONL file (the options joined to the context with no
    delimiter); returns its documents."""
    rng = random.Random(MC_SEED)
    docs = []
    for p in problems:
        choices, label = options(p, rng)
        docs.append({"context": mc_context(p), "choices": choices, "label": label})
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    task = {
        "task": MC_TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "target_delimiter": "",
        "doc_to_text": "context", "doc_to_choice": "choices", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{MC_TASK}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return docs


def tokenizer_folder(folder: Path) -> Path:
    """The demo tokenizer alone. transformers' AutoTokenizer on the checkpoint folder reads
    config.json's qwen2 and builds a Qwen2Tokenizer that drops the spaces; without config.json it
    builds the tokenizer.json as written (the engine's own tokenization)."""
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pair_paths()[0] / name, folder / name)
    return folder


def reference_scores(docs: list[dict]) -> list[list[tuple[float, bool]]]:
    """Per document, each option's (summed log-probability, every token the argmax) under
    transformers, over the tokenizer's real ids (the engine's distribution)."""
    folder = pair_paths()[0]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for doc in docs:
        context = tok.encode(doc["context"], add_special_tokens=False).ids
        row = []
        for choice in doc["choices"]:
            ids = tok.encode(doc["context"] + choice, add_special_tokens=False).ids
            assert ids[: len(context)] == context
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :, :vocab].float(), dim=-1)
            scored = range(len(context), len(ids))
            row.append((sum(lp[i - 1, ids[i]].item() for i in scored),
                        all(lp[i - 1].argmax().item() == ids[i] for i in scored)))
        out.append(row)
    return out


def test_lm_eval_multiple_choice_scores_equal_transformers(tmp_path, monkeypatch):
    """local-completions on a loglikelihood task: it tokenizes locally, sends the token ids with
    echo and logprobs, and sums the continuation's scores. The request body carries nothing but
    lm-eval's fixed fields, so the mode is the server's default: it serves the small model alone."""
    problems = evaluation_problems(MC_PROBLEMS, MC_SEED)
    docs = write_mc_task(tmp_path, problems)
    tok = tokenizer_folder(tmp_path / "tokenizer")
    # The server takes this process's intra-op threads (one under xdist): more spin-wait beside a busy worker.
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    server = Server("--small", str(pair_paths()[0]), "--served-model-name", "splitreason-demo",
                    "--kv-cache-bytes", str(1 << 24))
    try:
        before = server.metric("splitreason_requests_finished_total")
        model_args = (f"base_url={server.url}/v1/completions,model=splitreason-demo,tokenizer_backend=huggingface,"
                      f"tokenizer={tok},num_concurrent=8")
        proc = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
                               "--model_args", model_args, "--tasks", MC_TASK, "--include_path", str(tmp_path),
                               "--output_path", str(tmp_path / "out"), "--log_samples"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-4000:]
        assert server.metric("splitreason_requests_finished_total") - before == 4 * MC_PROBLEMS
    finally:
        server.close()

    [results] = (tmp_path / "out").rglob("results_*.json")
    [logged] = (tmp_path / "out").rglob(f"samples_{MC_TASK}_*.jsonl")
    samples = sorted((json.loads(line) for line in logged.read_text().splitlines()), key=lambda s: s["doc_id"])
    expected = reference_scores(docs)
    predicted = [max(range(4), key=lambda i: row[i][0]) for row in expected]
    correct = [float(p == d["label"]) for p, d in zip(predicted, docs)]
    assert 0 < sum(correct) < MC_PROBLEMS, correct  # neither trivial nor hopeless: the comparison means something
    assert [s["doc"] for s in samples] == docs
    for sample, row in zip(samples, expected):
        # The samples file writes each (loglik, is_greedy) pair as two strings.
        got = [(float(loglik), greedy == "True") for loglik, greedy in sample["filtered_resps"]]
        assert [r[0] for r in sample["resps"]] == sample["filtered_resps"]
        assert max(abs(a[0] - b[0]) for a, b in zip(got, row)) <= 1e-4, (got, row)
        assert [g for _, g in got] == [g for _, g in row]
    assert [s["acc"] for s in samples] == correct
    assert json.loads(results.read_text())["results"][MC_TASK]["acc,none"] == pytest.approx(sum(correct) / MC_PROBLEMS)
