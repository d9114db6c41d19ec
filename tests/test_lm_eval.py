"""lm-evaluation-harness's own CLI against a real `splitreason serve` on the demo pair, through
both `local-completions` and `local-chat-completions` (docs/lm-eval.md): a task generated here from
held-out demo problems, run offline, its reported exact_match checked against the demo's checker
on the answers the server gave."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from splitreason_engine.demo.task import Problem, evaluation_problems, is_correct
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
