"""The `splitreason` command, run as a subprocess the way a user runs it."""

import json
import subprocess
import sys

import pytest

from splitreason_engine.engine import default_model_path

CLI = [sys.executable, "-m", "splitreason_engine.cli"]


def run(*args, stdin: str = ""):
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_generate_on_the_embedded_default():
    r = run("generate", "The answer is", "--max-tokens", "12", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert "[split]" in r.stderr and "12 generated tokens" in r.stderr and "finish: length" in r.stderr


def test_one_model_from_the_command_line():
    tiny = str(default_model_path())
    r = run("generate", "The answer is", "--small", tiny, "--load-format", "dummy", "--max-tokens", "12",
            "--temperature", "0", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert "[small]" in r.stderr and "12 generated tokens" in r.stderr
    r = run("generate", "x", "--big", tiny)
    assert r.returncode == 2 and "--big needs --small" in r.stderr


def test_prompt_from_stdin_and_json_output_match_the_argument_form():
    args = ["--mode", "small", "--max-tokens", "8", "--temperature", "0", "--ignore-eos", "--json"]
    from_arg = json.loads(run("generate", "same prompt", *args).stdout)
    from_stdin = json.loads(run("generate", *args, stdin="same prompt").stdout)
    assert from_arg["token_ids"] == from_stdin["token_ids"] and len(from_arg["token_ids"]) == 8
    assert from_arg["finish_reason"] == "length" and from_arg["prompt_tokens"] == len("same prompt")


def test_json_output_carries_logprobs_with_alternatives_and_the_prompts_scores():
    args = ["--mode", "small", "--max-tokens", "3", "--temperature", "0", "--top-logprobs", "2", "--prompt-logprobs",
            "1", "--json"]
    record = json.loads(run("generate", "abc", *args).stdout)
    assert len(record["logprobs"]) == len(record["top_logprobs"]) == 3
    assert all(len(top) == 2 and top[0][0] == token for top, token in zip(record["top_logprobs"], record["token_ids"]))
    assert record["prompt_logprobs"][0] is None and len(record["prompt_logprobs"]) == record["prompt_tokens"]
    assert all(len(top) == 1 for top in record["prompt_top_logprobs"][1:])


def test_a_piped_question_answers_as_the_argument_does():
    """echo's trailing newline (and a terminal's stray spaces) must not reach the split template:
    the embedded demo pair answers the piped question exactly as it answers the argument."""
    question = "Start at 808; multiply by 3, 7, 7 and 2, keeping three digits."
    args = ["--temperature", "0", "--json"]
    from_arg = json.loads(run("generate", question, *args).stdout)
    assert "\\boxed{552}" in from_arg["text"]
    for piped in (question + "\n", question + "\r\n", "  " + question + " \n\n"):
        from_stdin = json.loads(run("generate", *args, stdin=piped).stdout)
        assert from_stdin["token_ids"] == from_arg["token_ids"], repr(piped)
        assert from_stdin["prompt_tokens"] == from_arg["prompt_tokens"]


def test_a_piped_raw_prompt_loses_only_its_final_line_break():
    args = ["--mode", "small", "--max-tokens", "4", "--temperature", "0", "--ignore-eos", "--json"]
    assert json.loads(run("generate", *args, stdin="two\nlines\n").stdout)["prompt_tokens"] == len("two\nlines")
    assert json.loads(run("generate", *args, stdin=" pad ").stdout)["prompt_tokens"] == len(" pad ")


def test_help_documents_every_option():
    r = run("generate", "--help")
    assert r.returncode == 0
    for option in ("--small", "--big", "--load-format", "--device", "--dtype", "--max-model-len", "--kv-cache-bytes",
                   "--kv-cache-memory-fraction", "--page-tokens", "--max-num-seqs", "--max-num-batched-tokens",
                   "--seed", "--mode", "--max-tokens", "--temperature", "--top-k", "--top-p", "--sampling-seed",
                   "--stop", "--stop-token-id", "--ignore-eos", "--logprobs", "--top-logprobs", "--prompt-logprobs", "--json", "--stats", "--catch-up",
                   "--max-offload-tokens", "--switch-ratio", "--switch-chunk", "--logit-bias",
                   "--tensor-parallel-size", "--tp-timeout-s", "--no-prefix-caching"):
        assert option in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--top-p", "1.5"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--small", "/nonexistent/model"], "/nonexistent/model"),
    (["--max-model-len", "8"], "too long"),
    (["--device", "gpu"], "device"),
    (["--small", str(default_model_path()), "--load-format", "dummy", "--mode", "split"], "needs a big model"),
    (["--logit-bias", "7"], "--logit-bias takes ID=BIAS"),
    (["--max-offload-tokens", "0"], "max_offload_tokens"),
    (["--tensor-parallel-size", "0"], "tensor_parallel_size"),
    (["--tensor-parallel-size", "2", "--tp-timeout-s", "0"], "tp_timeout_s"),
])
def test_bad_input_exits_with_a_message(args, message):
    r = run("generate", "a prompt that is longer than eight tokens", *args)
    assert r.returncode == 2
    assert message in r.stderr


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from split_models import save_pair

    return save_pair(tmp_path_factory.mktemp("pair"), special_tags=True)


def test_split_mode_marks_offloaded_segments_and_prints_stats(pair):
    # <bigmodel> is token 269 in the test pair: a bias makes the small model hand off at once.
    args = ["--small", str(pair[0]), "--big", str(pair[1]), "--max-tokens", "24", "--temperature", "0",
            "--logit-bias", "269=4", "--logit-bias", "270=2", "--max-offload-tokens", "5", "--stats"]
    r = run("generate", "What is 2+2?", *args)
    assert r.returncode == 0, r.stderr
    assert "[big]" in r.stdout and "[/big]" in r.stdout  # not a terminal: plain markers
    assert "[split]" in r.stderr and "handoffs" in r.stderr
    for row in ("big-model tokens", "offload fraction", "catch-up tokens small / big", "tokens rolled back",
                "handoff latency mean (ms)", "latency per offloaded token (ms)", "peak KV pages small / big"):
        assert row in r.stderr
    record = json.loads(run("generate", "What is 2+2?", *args, "--json").stdout)
    assert 1 in record["token_models"] and 0 in record["token_models"]
    assert record["stats"]["big_tokens"] == sum(record["token_models"]) and record["stats"]["handoffs"] >= 1


def test_random_mode_from_the_cli(pair):
    r = run("generate", "Hi", "--small", str(pair[0]), "--big", str(pair[1]), "--mode", "random", "--switch-ratio",
            "1", "--switch-chunk", "4", "--max-tokens", "16", "--sampling-seed", "5", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["token_models"]) == 16
