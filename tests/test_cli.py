"""The `splitreason` command, run as a subprocess the way a user runs it."""

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "splitreason_engine.cli"]


def run(*args, stdin: str = ""):
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_generate_on_the_embedded_default():
    r = run("generate", "The answer is", "--max-tokens", "12", "--temperature", "0", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert "12 generated tokens" in r.stderr and "finish: length" in r.stderr


def test_prompt_from_stdin_and_json_output_match_the_argument_form():
    args = ["--max-tokens", "8", "--temperature", "0", "--ignore-eos", "--json"]
    from_arg = json.loads(run("generate", "same prompt", *args).stdout)
    from_stdin = json.loads(run("generate", *args, stdin="same prompt").stdout)
    assert from_arg["token_ids"] == from_stdin["token_ids"] and len(from_arg["token_ids"]) == 8
    assert from_arg["finish_reason"] == "length" and from_arg["prompt_tokens"] == len("same prompt")


def test_help_documents_every_option():
    r = run("generate", "--help")
    assert r.returncode == 0
    for option in ("--small", "--big", "--load-format", "--device", "--dtype", "--max-model-len", "--kv-cache-bytes",
                   "--kv-cache-memory-fraction", "--page-tokens", "--max-num-seqs", "--max-num-batched-tokens",
                   "--seed", "--mode", "--max-tokens", "--temperature", "--top-k", "--top-p", "--sampling-seed",
                   "--stop", "--stop-token-id", "--ignore-eos", "--logprobs", "--json"):
        assert option in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--top-p", "1.5"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--small", "/nonexistent/model"], "/nonexistent/model"),
    (["--max-model-len", "8"], "too long"),
    (["--device", "gpu"], "device"),
])
def test_bad_input_exits_with_a_message(args, message):
    r = run("generate", "a prompt that is longer than eight tokens", *args)
    assert r.returncode == 2
    assert message in r.stderr
