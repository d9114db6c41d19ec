"""Prefix caching in the engine: the same tokens as the protocol oracle (and as an engine without
the cache) while later requests take their leading pages from earlier ones, in every mode, across
handoffs and catch-ups, and with the pool so small that pages are evicted and requests preempted."""

import pytest

from split_models import PAGE_BYTES, check_against_oracle, mixed_requests, params_for
from splitreason_engine import Engine, SamplingParams


def two_waves(engine, oracle):
    """The mixed requests twice: the second wave repeats the first wave's prompts (and templates)."""
    reqs = mixed_requests(oracle)
    first = check_against_oracle(engine, oracle, reqs)
    second = check_against_oracle(engine, oracle, reqs)
    return first, second


@pytest.mark.parametrize("catch_up", ["lazy", "eager"])
def test_a_second_wave_hits_the_cache_in_both_models_and_matches_the_oracle(pair, oracle, catch_up):
    engine = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, catch_up=catch_up, progress=False)
    first, second = two_waves(engine, oracle)
    # The templated prompts are longer than a page in both models (16 and 42 tokens); the prompts of
    # small and big mode are shorter, and their questions differ within the first page.
    templated = [o for o in second if o.metrics.mode in ("split", "random")]
    assert all(o.metrics.cached_tokens[0] >= 128 for o in templated)
    assert all(o.metrics.cached_tokens[1] >= 42 for o in templated)
    processed = [sum(sum(o.metrics.tokens_processed) for o in wave) for wave in (first, second)]
    assert processed[1] < processed[0]
    stats = engine.stats.summary()
    assert stats["prefix_cache_hit_tokens_small"] == sum(o.metrics.cached_tokens[0] for o in first + second)
    assert stats["prefix_cache_hit_tokens_big"] == sum(o.metrics.cached_tokens[1] for o in first + second)
    assert 0 < stats["prefix_cache_hit_rate_small"] < 1
    assert engine.scheduler.num_cached_pages > 0
    engine.scheduler.check_invariants()


@pytest.mark.parametrize("catch_up", ["lazy", "eager"])
def test_cached_pages_are_evicted_under_page_pressure_and_tokens_do_not_change(pair, oracle, catch_up):
    engine = Engine(*pair, kv_cache_bytes=24 * PAGE_BYTES, max_model_len=256, catch_up=catch_up, progress=False)
    two_waves(engine, oracle)
    stats = engine.stats.summary()
    assert stats["prefix_cache_hit_tokens_small"] > 0 and stats["prefix_cache_hit_tokens_big"] > 0
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.num_view_drops > 0
    assert engine.scheduler.num_cached_pages <= engine.pool.num_pages
    engine.scheduler.check_invariants()


def test_seeded_sampling_gives_the_same_tokens_with_and_without_the_cache(pair, oracle):
    reqs = [r for r in mixed_requests(oracle) if r.mode in ("split", "random")]  # templated: they share pages
    params = [params_for(r) for r in reqs]
    for p, seed in zip(params, range(100, 200)):
        p.temperature, p.top_p, p.seed = 0.9, 0.9, seed
    questions = [r.question for r in reqs]

    def run(prefix_caching: bool) -> list:
        engine = Engine(*pair, kv_cache_bytes=24 * PAGE_BYTES, max_model_len=256, catch_up="eager",
                        prefix_caching=prefix_caching, progress=False)
        outs = [engine.generate(questions, params, use_tqdm=False) for _ in range(2)]
        hits = engine.stats.summary()["prefix_cache_hit_tokens_small"]
        return [(o.token_ids, o.token_models) for wave in outs for o in wave], hits

    (cached, hits), (plain, no_hits) = run(True), run(False)
    assert cached == plain
    assert hits > 0 and no_hits == 0


@pytest.mark.parametrize("mode, overlap", [("split", False), ("small", True), ("big", False)])
def test_samples_of_one_prompt_copy_it_once_computed(pair, mode, overlap):
    """Engine.add_request(sample_of=...): samples added once the first has its first token compute
    only their last prompt token (full pages from the cache, the partial page copied) and give the
    tokens an engine without the cache gives."""
    prompt = "What is 12 times 34?" if mode == "split" else [5, 9, 2, 7] * 9
    params = [SamplingParams(seed=s, temperature=1.0, max_tokens=24, mode=mode) for s in range(5)]
    plain = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, prefix_caching=False, progress=False)
    expected = [o.token_ids for o in plain.generate([prompt] * 5, params, use_tqdm=False)]
    engine = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, overlap=overlap, progress=False)
    first = engine.add_request(prompt, params[0])
    while not engine._requests[first].tokens:
        engine.step()
    reqs = [engine._requests[first]] + [engine._requests[engine.add_request(prompt, p, sample_of=first)]
                                        for p in params[1:]]
    while engine.has_unfinished():
        engine.step()
        engine.scheduler.check_invariants()
    assert [r.tokens for r in reqs] == expected
    model = 1 if mode == "big" else 0
    size = len(reqs[0].prompt)
    assert [size - r.metrics.cached_tokens[model] for r in reqs] == [size, 1, 1, 1, 1]
