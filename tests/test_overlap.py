"""Overlapped steps (Engine(overlap=True)): each step is launched before the previous step's tokens
reach the host, its inputs patched from them, and the rows the host's decisions invalidate are
dropped. The tokens must be those of the plain loop, and of the protocol oracle, in every mode,
under stops, stop strings, page pressure, preemption, prefix caching and aborts; on the CPU the
same code runs with the device being the host, and the CUDA input layouts (staged inputs and the
static decode buffers of CUDA graphs) run eagerly.
"""

import random

import pytest

from split_models import PAGE_BYTES, QUESTIONS, check_against_oracle, mixed_requests, params_for
from splitreason_engine import Engine, SamplingParams, _C
from splitreason_engine import runner as runner_module
from splitreason_engine.decode_graphs import DecodeGraphs
from splitreason_engine.demo import pair_paths


class Outputs(list):
    """What generate returned, comparable: everything exact but the logprobs, which the CPU's
    reductions leave within float rounding from run to run (the plain loop's too)."""

    def __eq__(self, other):
        if [o[:-1] for o in self] != [o[:-1] for o in other]:
            return False
        return all(a == b or (a is not None and b is not None and all(
            (x is None and y is None) or abs(x - y) < 1e-4 for x, y in zip(a, b))) for a, b in
            ((o[-1], p[-1]) for o, p in zip(self, other)))


def outputs(engine: Engine, prompts, params) -> Outputs:
    outs = engine.generate(prompts, params, use_tqdm=False)
    return Outputs((o.token_ids, o.token_models, o.finish_reason, o.stop_reason, o.text, o.logprobs) for o in outs)


def assert_clean(engine: Engine) -> None:
    engine.scheduler.check_invariants()
    assert not engine.has_unfinished()
    assert engine.scheduler.num_free_pages == engine.pool.num_pages


@pytest.mark.parametrize("catch_up", ["lazy", "eager"])
def test_overlapped_modes_match_the_oracle(pair, oracle, catch_up):
    engine = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, catch_up=catch_up, overlap=True,
                    progress=False)
    outs = check_against_oracle(engine, oracle, mixed_requests(oracle))
    assert sum(o.metrics.handoffs for o in outs) >= 10
    # Steps really ran ahead, and some of their rows were dropped (a tag, a switch or a stop). A
    # row in a big segment needs the host's decision before the next step: with twelve requests
    # of every mode, few steps qualify.
    assert engine.stats.steps_ahead > 0 and engine.stats.rows_dropped > 0
    assert_clean(engine)


def test_overlapped_steps_under_page_pressure_match_the_oracle(pair, oracle):
    """Views dropped and requests preempted by the planning of a step launched ahead."""
    engine = Engine(*pair, kv_cache_bytes=24 * PAGE_BYTES, max_model_len=256, catch_up="eager", overlap=True,
                    progress=False)
    check_against_oracle(engine, oracle, mixed_requests(oracle))
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.num_view_drops > 0
    assert engine.stats.steps_ahead > 0
    assert_clean(engine)


def test_seeded_split_and_random_sampling_equal_the_plain_loop(pair, oracle):
    reqs = mixed_requests(oracle)
    params = [SamplingParams(temperature=0.8, top_p=0.95, top_k=40, seed=100 + i, max_tokens=r.max_tokens,
                             logit_bias=r.logit_bias, mode=r.mode, max_offload_tokens=r.max_offload_tokens,
                             switch_ratio=r.switch_ratio, switch_chunk=r.switch_chunk, logprobs=True)
              for i, r in enumerate(reqs)]
    prompts = [r.question for r in reqs]
    kwargs = dict(kv_cache_bytes=24 * PAGE_BYTES, max_model_len=256, progress=False)
    plain = outputs(Engine(*pair, overlap=False, **kwargs), prompts, params)
    engine = Engine(*pair, overlap=True, **kwargs)
    assert outputs(engine, prompts, params) == plain
    assert engine.stats.steps_ahead > 0 and engine.scheduler.num_preemptions > 0
    assert_clean(engine)


def test_stops_stop_strings_and_lengths_equal_the_plain_loop():
    """The demo pair's small model (real text): EOS, stop ids, stop strings (cut from the text),
    max_tokens and max_model_len each end requests while the step after them is already running."""
    small, _ = pair_paths()
    kwargs = dict(kv_cache_bytes=1 << 22, max_model_len=96, page_tokens=5, progress=False)
    questions = [f"Start at {n}; multiply by {a} and {b}, keeping three digits." for n, a, b in
                 ((347, 6, 2), (12, 3, 5), (905, 7, 7), (4, 4, 4), (77, 2, 9), (100, 8, 3))]
    probe = Engine(small, overlap=False, **kwargs).generate(
        questions[:2], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    stop_id = probe[0].token_ids[5]  # sampled mid-way through the first request
    stop_text = probe[1].text[6:9]
    params = [SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id], ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, stop=[stop_text], ignore_eos=True),
              SamplingParams(temperature=0.9, seed=7, max_tokens=30),
              SamplingParams(temperature=0.7, top_p=0.8, seed=8, max_tokens=3, logprobs=True),
              SamplingParams(temperature=0, max_tokens=1),
              SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)]  # reaches max_model_len
    plain = outputs(Engine(small, overlap=False, **kwargs), questions, params)
    engine = Engine(small, overlap=True, **kwargs)
    got = outputs(engine, questions, params)
    assert got == plain
    assert [g[2] for g in got[:2]] == ["stop", "stop"] and got[1][3] == stop_text and got[5][2] == "length"
    assert engine.stats.rows_dropped > 0
    assert_clean(engine)


def test_prefix_cache_keys_of_pages_completed_ahead(tiny_checkpoints):
    """A decode step launched ahead completes pages whose last token is a placeholder: they must
    end up keyed by the real token, so that later prompts continuing those tokens hit the cache."""
    folder = tiny_checkpoints["gqa2-untied-1e6"]
    kwargs = dict(kv_cache_bytes=1 << 22, page_tokens=4, progress=False)
    params = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)
    first = Engine(folder, overlap=False, **kwargs).generate([[5, 6, 7]], params, use_tqdm=False)[0].token_ids
    engine = Engine(folder, overlap=True, **kwargs)
    assert engine.generate([[5, 6, 7]], params, use_tqdm=False)[0].token_ids == first
    # 3 + 13 tokens, of which the first 15 were computed: 3 full pages. A prompt that repeats
    # them and goes on finds all 12 tokens in the cache.
    [again] = engine.generate([[5, 6, 7] + first + [9]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert again.metrics.cached_tokens[0] == 12
    assert_clean(engine)


def test_scheduler_rekeys_a_page_completed_by_a_placeholder():
    s = _C.Scheduler(64, 4, 64, 64, [4], prefix_caching=True)
    s.add_request(0, [[1, 2, 3, 4, 5, 6, 7]], [_C.RUN_FOREGROUND])
    s.schedule()  # computes 7 tokens: page 0 keyed
    s.append_placeholder(0, 0)
    s.schedule()  # computes the placeholder: page 1 keyed with it in
    with pytest.raises(ValueError, match="negative token id"):
        s.set_last_token(0, 0, -3)
    s.set_last_token(0, 0, 8)
    assert s.request_tokens(0, 0)[-1] == 8
    with pytest.raises(ValueError, match="does not end with a placeholder"):
        s.set_last_token(0, 0, 9)
    s.check_invariants()
    s.finish(0)
    s.add_request(1, [[1, 2, 3, 4, 5, 6, 7, 8, 9]], [_C.RUN_FOREGROUND])
    s.schedule()
    assert s.view_stats(1, 0)[2] == 8  # both pages found under their real tokens
    s.check_invariants()


def test_cuda_layouts_on_the_cpu_equal_the_plain_loop(tiny_checkpoints, monkeypatch):
    """Staged inputs (one packed copy) and the static decode buffers CUDA graphs replay, with the
    placeholders patched on the device: the same tokens as the plain loop's in-place inputs."""
    folder = tiny_checkpoints["gqa2-untied-1e6"]
    prompts = [[3, 4, 5], [9] * 11, [7, 8], [1, 2, 3, 4, 5, 6]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 4, 14, 7)]
    kwargs = dict(kv_cache_bytes=1 << 22, page_tokens=5, progress=False)
    plain = outputs(Engine(folder, overlap=False, **kwargs), prompts, params)
    monkeypatch.setattr(runner_module, "stages", lambda device: True)
    engine = Engine(folder, overlap=True, **kwargs)
    replays = []
    for runner, model in zip(engine.runners, engine.models):
        graphs = DecodeGraphs(model, runner.kv_caches, 8, runner.stride, engine.device, capture=False)
        run = graphs.run

        def logged(buffers, num_seqs, width, feed=None, run=run):
            replays.append(feed is not None)
            return run(buffers, num_seqs, width, feed)

        graphs.run = logged
        runner.graphs = graphs
    assert outputs(engine, prompts, params) == plain
    assert any(replays) and engine.stats.steps_ahead > 0
    assert_clean(engine)


def test_random_workload_with_aborts_keeps_the_scheduler_sound(pair):
    """Requests of every mode arrive, and some are aborted 7 steps later, between steps, while a
    step runs ahead: after every step the scheduler's invariants hold; at the end every page is
    back, and the requests that were not aborted got the plain loop's tokens."""
    def run(overlap: bool, seed: int) -> tuple[Engine, dict]:
        rng = random.Random(seed)
        engine = Engine(*pair, kv_cache_bytes=30 * PAGE_BYTES, max_model_len=200, overlap=overlap, progress=False)
        reqs, abort_at = {}, {}
        for step in range(150):
            if step < 60 and rng.random() < 0.3:
                params = SamplingParams(temperature=rng.choice([0, 0.8]), seed=step, max_tokens=rng.randint(1, 30),
                                        mode=rng.choice(["small", "big", "split", "random"]),
                                        stop_token_ids=[rng.randrange(200)])
                rid = engine.add_request(rng.choice(QUESTIONS), params)
                reqs[rid] = engine.book.live[rid]
                if rng.random() < 0.2:
                    abort_at[step + 7] = rid
            if step in abort_at:
                engine.abort(abort_at[step])
            engine.step()
            engine.scheduler.check_invariants()
        while engine.has_unfinished():
            engine.step()
        assert_clean(engine)
        return engine, reqs

    for seed in range(3):
        (_, plain), (engine, overlapped) = run(False, seed), run(True, seed)
        assert engine.stats.steps_ahead > 0
        kept = [rid for rid in plain if "abort" not in (plain[rid].finish_reason, overlapped[rid].finish_reason)]
        assert len(kept) > len(plain) // 2
        assert [plain[rid].tokens for rid in kept] == [overlapped[rid].tokens for rid in kept]


def test_overlap_with_tensor_parallelism_is_refused(tiny_checkpoints):
    with pytest.raises(ValueError, match="overlap=True is not supported with tensor_parallel_size"):
        Engine(tiny_checkpoints["gqa2-untied-1e6"], tensor_parallel_size=2, overlap=True, progress=False)


def test_params_are_those_of_the_plain_loop(pair, oracle):
    """params_for's greedy requests through the stream API: events carry the same tokens."""
    reqs = mixed_requests(oracle)[:6]
    engine = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, overlap=True, progress=False)
    prompts, params = [r.question for r in reqs], [params_for(r) for r in reqs]
    whole = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, overlap=False,
                   progress=False).generate(prompts, params, use_tqdm=False)
    tokens = [[] for _ in reqs]
    for event in engine.generate_stream(prompts, params):
        tokens[event.index] += event.token_ids
    assert tokens == [o.token_ids for o in whole]
    assert_clean(engine)


@pytest.mark.parametrize("policy,kept", [(dict(coschedule="eager"), 3),
                                         (dict(coschedule="gather", gather_min_share=1.0, max_big_wait_steps=50), 4)])
def test_non_finite_logits_fail_only_their_request_when_overlapped(pair, oracle, monkeypatch, policy, kept):
    """The sampler flags a row with a NaN logit (NONFINITE); the token it still picks may already
    feed the step launched ahead, whose row for that request is then dropped with the request.
    The poison goes into the victim's first step once the host has 3 of its tokens. Under `eager`
    that step samples its 4th token; under a `gather` that holds the big model, steps launch ahead
    where eager's do not, and that step samples the 5th (the 4th, computed before, is kept). The
    policy is pinned: `auto` picks one from step costs timed at start-up."""
    reqs = mixed_requests(oracle)
    prompts, params = [r.question for r in reqs], [params_for(r) for r in reqs]
    kwargs = dict(kv_cache_bytes=1 << 24, max_model_len=256, progress=False, **policy)
    plain = Engine(*pair, overlap=False, **kwargs).generate(prompts, params, use_tqdm=False)
    engine = Engine(*pair, overlap=True, **kwargs)
    runner, victim = engine.runners[0], 8  # the first small-mode request (mixed_requests order)
    assert reqs[victim].mode == "small"
    execute = runner.execute

    def poisoned(*args):
        logits = execute(*args)
        ids = runner.buffers["sample_request_ids"][:logits.shape[0]].tolist()
        req = engine.book.live.get(victim)
        if victim in ids and len(req.tokens) >= 3:
            logits[ids.index(victim), 7] = float("nan")
        return logits

    monkeypatch.setattr(runner, "execute", poisoned)
    outs = engine.generate(prompts, params, use_tqdm=False)
    for i, (a, b) in enumerate(zip(plain, outs)):
        if i == victim:
            assert b.finish_reason == "error" and "not finite" in b.error and b.token_ids == a.token_ids[:kept]
        else:
            assert (b.token_ids, b.token_models, b.finish_reason) == (a.token_ids, a.token_models, a.finish_reason)
    assert_clean(engine)
