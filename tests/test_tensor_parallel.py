"""Tensor parallelism on the CPU: 2 ranks over gloo, tokens identical to one process.

The split pair's big model has 6 q heads and 1 KV head, so under TP=2 each rank holds a copy of
the KV head its 3 q heads read; the small one splits its 4 KV heads. Each engine starts a worker
process (a few seconds), so engines are shared where a test does not break one.
"""

import dataclasses
import multiprocessing
import os
import signal
import time

import pytest
import torch

from hf_models import LogitCapture, save_tiny
from split_models import PAGE_BYTES, check_against_oracle, mixed_requests
from splitreason_engine import Engine, EngineBroken, SamplingParams
from splitreason_engine.loader import ModelSource, build_model, load_config
from splitreason_engine.parallel import TPGroup, check_divisible

TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def odd_vocab(tmp_path_factory) -> tuple:
    """(untied Llama, tied Qwen2) whose vocabularies 2 ranks do not divide: each rank holds 1000 and
    1001 rows, the last one padding."""
    root = tmp_path_factory.mktemp("odd_vocab")
    return (save_tiny(root / "untied", "llama", "gqa2-h80-bias", seed=5, vocab_size=1999),
            save_tiny(root / "tied", "qwen2", "mha-tied-1e4", seed=6, vocab_size=2001))


@pytest.fixture(autouse=True)
def one_thread_per_rank():
    """Two ranks on two cores: one intra-op thread each (workers take rank 0's count); more only
    oversubscribe the cores, and gloo's waits suffer most."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def engines():
    """Engines made by a test, closed after it, so no worker outlives its test."""
    made = []

    def make(*args, tp_timeout_s: float = TIMEOUT_S, **kwargs) -> Engine:
        made.append(Engine(*args, tensor_parallel_size=2, tp_timeout_s=tp_timeout_s, progress=False, **kwargs))
        return made[-1]

    yield make
    for engine in made:
        workers = engine.tp.workers
        engine.close()
        assert not any(p.is_alive() for p in workers)


def test_mixed_modes_match_the_oracle_across_handoffs(pair, oracle, engines):
    # Gathering big-model rows needs the step costs, timed at start-up on every rank at once.
    engine = engines(*pair, kv_cache_bytes=1 << 24, max_model_len=256, catch_up="lazy", coschedule="gather")
    assert engine.step_costs.source == "measured at start-up" and engine.stats.policy["policy"] == "gather"
    outs = check_against_oracle(engine, oracle, mixed_requests(oracle))
    split = [o for o in outs if o.metrics.mode == "split"]
    assert sum(o.metrics.handoffs for o in split) >= 10
    assert {o.metrics.mode for o in outs} == {"split", "random", "small", "big"}


def test_tokens_do_not_change_under_preemption(pair, oracle, engines):
    engine = engines(*pair, kv_cache_bytes=24 * PAGE_BYTES, max_model_len=256, catch_up="eager")
    assert engine.pool.num_pages == 24  # the pages of one process: the same scheduling
    check_against_oracle(engine, oracle, mixed_requests(oracle))
    assert engine.scheduler.num_view_drops > 0
    assert engine.scheduler.num_preemptions > 0


def test_drafting_matches_the_oracle(near_pair, near_oracle, engines):
    """Verify steps (a sampled tail of drafts) go to the other rank like any step."""
    engine = engines(*near_pair, kv_cache_bytes=1 << 24, max_model_len=256, speculate=4)
    outs = check_against_oracle(engine, near_oracle, mixed_requests(near_oracle))
    assert sum(o.metrics.accepted_draft_tokens for o in outs) > 0


def test_llama_and_qwen3_match_one_process(tmp_path, engines, monkeypatch):
    """Llama with q/k/v, o and MLP biases and an untied (vocabulary-split) LM head beside a tied
    Qwen3 with q/k norms, greedy, ragged prompts given as token ids. The start-up warm-up (CUDA's,
    made to run here) sends its steps to the workers too: rank 0 alone would wait on its first all-reduce."""
    import splitreason_engine.startup as startup_module

    reports = []
    warm_up = startup_module.warm_up_kernels
    monkeypatch.setattr(startup_module, "should_warm_up", lambda ops, device: True)
    monkeypatch.setattr(startup_module, "warm_up_kernels", lambda *a, **k: reports.append(warm_up(*a, **k)))
    small = save_tiny(tmp_path / "llama", "llama", "gqa2-h80-bias", seed=3)
    big = save_tiny(tmp_path / "qwen3", "qwen3", "gqa2-hd32-tied", seed=4)
    prompts = [[(7 * i + 3 * j) % 160 for j in range(5 + 9 * i)] for i in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=12, mode=mode) for mode in ("small", "big")] * 2
    kwargs = dict(kv_cache_bytes=1 << 22, max_model_len=128)
    one = Engine(small, big, progress=False, **kwargs)
    expected = [o.token_ids for o in one.generate(prompts, params, use_tqdm=False)]
    engine = engines(small, big, **kwargs)
    assert len(reports) == 4 and all(r.steps > 0 for r in reports)
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected


def test_odd_vocabularies_match_one_process(odd_vocab, engines):
    """Padded vocabulary splits, untied and tied: greedy and seeded-sampled tokens equal one
    process's, and the logits keep the one-process shape (the padded ids are cut off, never sampled)."""
    prompts = [[1998, 0, 1000, 999, 1997], [5, 1001, 2000, 1500, 7, 2, 1996]] * 2  # each row's last ids
    params = [SamplingParams(temperature=t, seed=s, max_tokens=10, mode=mode)
              for t, s in ((0, None), (1.0, 7)) for mode in ("small", "big")]
    kwargs = dict(kv_cache_bytes=1 << 22, max_model_len=64)

    def run(engine: Engine) -> tuple[list, list]:
        captures = [LogitCapture(m) for m in engine.models]
        outs = engine.generate(prompts, params, use_tqdm=False)
        return [o.token_ids for o in outs], [[x.shape for x in c.seen] for c in captures]

    expected, expected_shapes = run(Engine(*odd_vocab, progress=False, **kwargs))
    tokens, shapes = run(engines(*odd_vocab, **kwargs))
    assert tokens == expected
    assert shapes == expected_shapes
    assert [{shape[-1] for shape in model} for model in shapes] == [{1999}, {2001}]
    assert tokens[2:] != tokens[:2]  # the same prompts and models, sampled: not the greedy tokens


def test_logprobs_and_prompt_logprobs_match_one_process(odd_vocab, engines):
    """The scored prompt rows ride in the step message's gathered rows, so every rank computes
    their logits: prompt and token logprobs with alternatives equal one process's, padded ids
    never among them."""
    prompts = [[1998, 0, 1000, 999, 1997, 3, 4, 5], [5, 1001, 2000, 1500, 7, 2, 1996]]
    params = [SamplingParams(temperature=0, max_tokens=5, mode=mode, top_logprobs=4, prompt_logprobs=4)
              for mode in ("small", "big")]
    kwargs = dict(kv_cache_bytes=1 << 22, max_model_len=64, max_num_batched_tokens=6)
    expected = Engine(*odd_vocab, progress=False, **kwargs).generate(prompts, params, use_tqdm=False)
    outs = engines(*odd_vocab, **kwargs).generate(prompts, params, use_tqdm=False)
    for a, b, vocab in zip(expected, outs, (1999, 2001)):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(b.prompt_logprobs[1:]), torch.tensor(a.prompt_logprobs[1:]))
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs))
        tops = [t for top in b.top_logprobs + b.prompt_top_logprobs[1:] for t, _ in top]
        assert tops == [t for top in a.top_logprobs + a.prompt_top_logprobs[1:] for t, _ in top]
        assert max(tops) < vocab


def test_a_killed_worker_breaks_the_engine_with_its_rank_and_exit_code(pair, engines):
    engine = engines(*pair, kv_cache_bytes=1 << 22, max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=4, mode="small")
    assert engine.generate([[1, 2, 3]], params, use_tqdm=False)[0].error is None
    worker = engine.tp.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineBroken, match=rf"rank 1 \(pid {worker.pid}\) died with exit code -9"):
        engine.generate([[4, 5, 6]], params, use_tqdm=False)
    assert time.monotonic() - start < TIMEOUT_S
    with pytest.raises(EngineBroken):
        engine.step()


def test_a_stuck_worker_breaks_the_engine_after_the_collective_timeout(pair, engines):
    engine = engines(*pair, kv_cache_bytes=1 << 22, max_model_len=128, tp_timeout_s=2.0)
    params = SamplingParams(temperature=0, max_tokens=4, mode="big")
    assert engine.generate([[1, 2, 3]], params, use_tqdm=False)[0].error is None
    os.kill(engine.tp.workers[0].pid, signal.SIGSTOP)  # alive, never answers; close() kills it
    start = time.monotonic()
    with pytest.raises(EngineBroken, match="failed with every rank alive"):
        engine.generate([[4, 5, 6]], params, use_tqdm=False)
    assert time.monotonic() - start < 2.0 + 8.0  # the timeout, up to 2 s waiting for an exit to name, slack


def test_a_start_up_error_stops_the_workers(pair):
    with pytest.raises(ValueError, match="KV pool too small for one request"):
        Engine(*pair, kv_cache_bytes=PAGE_BYTES, max_model_len=128, tensor_parallel_size=2, progress=False)
    assert not multiprocessing.active_children() and not torch.distributed.is_initialized()


@pytest.mark.parametrize("size, named", [(4, "num_attention_heads 6 is not divisible by tensor_parallel_size 4"),
                                         (3, "num_attention_heads 4 is not divisible by tensor_parallel_size 3")])
def test_configs_the_ranks_cannot_split_are_refused_by_name(pair, size, named):
    with pytest.raises(ValueError, match=named):
        Engine(*pair, kv_cache_bytes=1 << 22, max_model_len=64, tensor_parallel_size=size, progress=False)


def test_only_the_vocabulary_is_padded_not_refused(pair):
    config = load_config(ModelSource(pair[1]))  # 6 heads, 1 KV head, intermediate 216
    check_divisible(dataclasses.replace(config, vocab_size=32001), 2, "odd vocabulary")
    with pytest.raises(ValueError, match="intermediate_size 217 is not divisible by tensor_parallel_size 2"):
        check_divisible(dataclasses.replace(config, intermediate_size=217), 2, "odd")


def test_cuda_graphs_are_refused_with_tensor_parallelism(pair):
    with pytest.raises(ValueError, match="cuda_graphs=True is not supported with tensor_parallel_size > 1"):
        Engine(*pair, tensor_parallel_size=2, cuda_graphs=True, progress=False)


@pytest.mark.parametrize("load_format", ["safetensors", "dummy"])
def test_each_rank_holds_the_slices_of_the_one_process_weights(pair, load_format):
    """Built in this process (no collective runs while loading): rank r's tensors are the
    one-process tensors cut by the column / row rules, for checkpoints and dummy weights alike."""
    source = ModelSource(pair[1], load_format)  # 6 q heads, 1 KV head (replicated), tied
    config = load_config(source)

    def build(tp):
        return dict(build_model(source, config, torch.float32, torch.device("cpu"), 64, seed=5, progress=False,
                                tp=tp).named_parameters())

    whole = build(None)
    ranks = [build(TPGroup(rank, 2, None)) for rank in range(2)]
    q, inter = 3 * config.head_dim, config.intermediate_size // 2
    for r, params in enumerate(ranks):
        full_qkv = whole["layers.1.self_attn.qkv_proj.weight"]
        own_q = full_qkv[r * q: (r + 1) * q]
        assert torch.equal(params["layers.1.self_attn.qkv_proj.weight"], torch.cat([own_q, full_qkv[2 * q:]]))
        assert torch.equal(params["layers.1.self_attn.qkv_proj.bias"][:q],
                           whole["layers.1.self_attn.qkv_proj.bias"][r * q: (r + 1) * q])
        assert torch.equal(params["layers.1.self_attn.o_proj.weight"],
                           whole["layers.1.self_attn.o_proj.weight"][:, r * q: (r + 1) * q])
        gate_up = whole["layers.0.mlp.gate_up_proj.weight"].chunk(2)
        assert torch.equal(params["layers.0.mlp.gate_up_proj.weight"],
                           torch.cat([g[r * inter: (r + 1) * inter] for g in gate_up]))
        assert torch.equal(params["layers.0.mlp.down_proj.weight"],
                           whole["layers.0.mlp.down_proj.weight"][:, r * inter: (r + 1) * inter])
        assert torch.equal(params["embed_tokens.weight"], whole["embed_tokens.weight"])  # replicated


@pytest.mark.parametrize("load_format", ["safetensors", "dummy"])
def test_each_rank_holds_its_padded_rows_of_the_vocabulary(odd_vocab, load_format):
    """Rank r's LM head is rows [n r, n r + n) of the one-process head (n = ceil(vocab / 2); tied: of
    the embedding), cut at the vocabulary and padded with zeros; the replicated embedding is padded too."""
    for folder in odd_vocab:
        source = ModelSource(folder, load_format)
        config = load_config(source)
        v, n = config.vocab_size, (config.vocab_size + 1) // 2
        models = [build_model(source, config, torch.float32, torch.device("cpu"), 64, seed=5, progress=False, tp=tp)
                  for tp in (None, TPGroup(0, 2, None), TPGroup(1, 2, None))]
        whole = models[0]
        for r, model in enumerate(models[1:]):
            embed = model.embed_tokens.weight
            assert embed.shape[0] == 2 * n and torch.equal(embed[:v], whole.embed_tokens.weight)
            assert not embed[v:].any()
            head = model.lm_head.weight[model.vocab_rows] if config.tie_word_embeddings else model.lm_head.weight
            real = min(n, v - r * n)
            assert head.shape[0] == n and torch.equal(head[:real], whole.lm_head.weight[r * n: r * n + real])
            assert not head[real:].any()


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc: no psutil needed)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return kids


def test_a_tensor_parallel_server_serves_and_stops_its_workers_on_sigterm(pair):
    import httpx

    from test_server import Server

    server = Server("--small", str(pair[0]), "--big", str(pair[1]), "--kv-cache-bytes", str(1 << 24),
                    "--max-model-len", "256", "--served-model-name", "pair", "--tensor-parallel-size", "2")
    try:
        body = {"model": "pair", "prompt": "What is 2+2?", "max_tokens": 24, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 24
        workers = [pid for pid in _children(server.proc.pid) if "spawn_main" in open(f"/proc/{pid}/cmdline").read()]
        assert len(workers) == 1
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        log = server.proc.stdout.read()
        assert "not delivered" not in log, log
        deadline = time.time() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
