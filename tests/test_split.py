"""Split, random, small and big modes in one engine, token for token against the protocol oracle
(tests/split_models.py: Hugging Face models, every view recomputed from scratch at every token).

Handoffs are made frequent with logit_bias on the tag tokens and on `<` (which may start a close
tag, so the small model probes and is rolled back, or completes `<` + `</bigmodel>`).
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from properties import examples
from split_models import (PAGE_BYTES, QUESTIONS, Request, check_against_oracle, mixed_requests, params_for,
                          write_tokenizer)
from splitreason_engine import Engine, SamplingParams


@pytest.mark.parametrize("catch_up", ["lazy", "eager"])
def test_mixed_modes_match_the_oracle(pair, oracle, catch_up):
    engine = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, catch_up=catch_up, progress=False)
    outs = check_against_oracle(engine, oracle, mixed_requests(oracle))
    split = [o for o in outs if o.metrics.mode == "split"]
    # The biases did their job: handoffs, forced closes, probes rolled back, both models writing.
    assert sum(o.metrics.handoffs for o in split) >= 10
    assert sum(o.metrics.rolled_back_tokens for o in split) > 0
    assert all(0 < o.metrics.offload_fraction < 1 for o in split)
    assert sum(o.metrics.catch_up_tokens[1] for o in split) > 0
    stats = engine.stats.summary()
    assert stats["requests"] == len(outs) and stats["handoffs"] == sum(o.metrics.handoffs for o in outs)
    assert stats["big_tokens"] == sum(o.metrics.big_tokens for o in outs)


@pytest.mark.parametrize("catch_up", ["lazy", "eager"])
def test_text_tags_spanning_tokens_match_the_oracle(text_pair, text_oracle, catch_up):
    """Tags as text, 4 tokens each, tokenized differently after a space (`Ġ<` vs `<`): the small
    model opens and closes them token by token, probes on `<` and is rolled back at `big`."""
    tid = text_oracle.tok.token_to_id
    biases = [(3, 3, 1, 1), (4, 4, 2, 2), (2, 3, 1, 2), (3, 3, 2, 0), (4, 3, 3, 2), (4, 4, 2, 2)]
    reqs = [Request(QUESTIONS[i], "split", 64, {tid("<"): a, tid("Ġ<"): b, tid("</"): c, tid("Ġ</"): d,
                                                tid("<|endoftext|>"): -5.0})
            for i, (a, b, c, d) in enumerate(biases)]
    reqs += [Request(QUESTIONS[6], "random", 40, switch_ratio=1.0, switch_chunk=6, seed=1),
             Request(QUESTIONS[7], "small", 20), Request(QUESTIONS[0], "big", 20)]
    engine = Engine(*text_pair, kv_cache_bytes=1 << 24, max_model_len=320, catch_up=catch_up, progress=False)
    outs = check_against_oracle(engine, text_oracle, reqs)
    split = outs[:len(biases)]
    assert sum(o.metrics.handoffs for o in split) >= 6
    assert sum(o.metrics.rolled_back_tokens for o in split) > 0
    texts = [o.text for o in split]
    assert any("</bigmodel>" in t for t in texts) and any(" <bigmodel>" in t for t in texts)
    # A close tag the small model wrote (not forced) right after a big segment: the probe path.
    closes = [o.segments(engine.tokenizer.decode) for o in split]
    assert any(model == 0 and text.lstrip().startswith("</big") and k > 0
               for segs in closes for k, (model, text) in enumerate(segs))


@pytest.mark.parametrize("catch_up", ["lazy", "eager"])
def test_page_pressure_drops_big_views_then_preempts_and_outputs_do_not_change(pair, oracle, catch_up):
    # Pages of 16 KiB hold 16 small-model or 42 big-model tokens; 24 pages are just above one
    # request at max_model_len 256 in both views (16 + 7 pages), far below twelve requests' needs.
    engine = Engine(*pair, kv_cache_bytes=24 * PAGE_BYTES, max_model_len=256, catch_up=catch_up, progress=False)
    assert engine.pool.num_pages == 24
    check_against_oracle(engine, oracle, mixed_requests(oracle))
    assert engine.scheduler.num_view_drops > 0
    assert engine.scheduler.num_preemptions > 0


def test_seeded_sampling_is_unchanged_by_page_pressure_and_catch_up_policy(pair, oracle):
    """Sampled (not greedy) split and random requests: the same seeds give the same tokens in a
    roomy pool with lazy catch-up and in a pool that forces drops and preemptions with eager."""
    reqs = mixed_requests(oracle)
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=100 + i, max_tokens=r.max_tokens,
                             logit_bias=r.logit_bias, mode=r.mode, max_offload_tokens=r.max_offload_tokens,
                             switch_ratio=r.switch_ratio, switch_chunk=r.switch_chunk) for i, r in enumerate(reqs)]
    roomy = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, catch_up="lazy", progress=False)
    tight = Engine(*pair, kv_cache_bytes=24 * PAGE_BYTES, max_model_len=256, catch_up="eager", progress=False)
    a = roomy.generate([r.question for r in reqs], params, use_tqdm=False)
    b = tight.generate([r.question for r in reqs], params, use_tqdm=False)
    assert tight.scheduler.num_preemptions > 0 and tight.scheduler.num_view_drops > 0
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_models for o in a] == [o.token_models for o in b]
    assert sum(o.metrics.handoffs for o in a) > 0


def test_split_streams_equal_generate(pair, oracle):
    reqs = mixed_requests(oracle)[:8]
    engine = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, progress=False)
    prompts, params = [r.question for r in reqs], [params_for(r) for r in reqs]
    whole = engine.generate(prompts, params, use_tqdm=False)
    tokens, models, texts, finals = ([[] for _ in reqs] for _ in range(4))
    for event in engine.generate_stream(prompts, params):
        tokens[event.index] += event.token_ids
        models[event.index] += event.token_models
        texts[event.index].append(event.text)
        if event.output is not None:
            finals[event.index] = event.output
    for i, out in enumerate(whole):
        assert tokens[i] == out.token_ids and models[i] == out.token_models
        assert "".join(texts[i]) == out.text == finals[i].text
    assert engine.scheduler.num_free_pages == engine.pool.num_pages


def test_each_model_can_fill_the_pool(pair):
    """No static split between the models: either one alone uses at least 95% of the pages."""
    engine = Engine(*pair, kv_cache_bytes=30 * PAGE_BYTES, max_model_len=160, progress=False)
    for mode in ("small", "big"):
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, mode=mode)
        for q in QUESTIONS * 4:
            engine.add_request(q, params)
        peak = 0
        while engine.has_unfinished():
            engine.step()
            peak = max(peak, engine.scheduler.pages_held(int(mode == "big")))
            assert engine.scheduler.pages_held(int(mode == "small")) == 0
        assert peak >= 0.95 * engine.pool.num_pages, (mode, peak)


@settings(max_examples=examples(6), deadline=None)
@given(modes=st.lists(st.sampled_from(["split", "small", "big", "random"]), min_size=2, max_size=10),
       abort_at=st.lists(st.integers(0, 30), min_size=10, max_size=10), seed=st.integers(0, 1000))
def test_page_accounting_under_mixed_modes_handoffs_and_aborts(pair, modes, abort_at, seed):
    engine = _shared_small_pool_engine(pair)
    t = {"<bigmodel>": 269, "</bigmodel>": 270}
    ids_ = []
    for i, mode in enumerate(modes):
        params = SamplingParams(temperature=0.8, seed=seed + i, max_tokens=40, mode=mode, switch_chunk=4,
                                logit_bias={t["<bigmodel>"]: 2.0, t["</bigmodel>"]: 2.0})
        ids_.append(engine.add_request(QUESTIONS[i % len(QUESTIONS)], params))
    step = 0
    while engine.has_unfinished():
        for rid, when in zip(ids_, abort_at):
            if when == step:
                engine.abort(rid)
        engine.step()
        engine.scheduler.check_invariants()
        step += 1
        assert step < 2000
    assert engine.scheduler.num_free_pages == engine.pool.num_pages
    assert engine.scheduler.num_running == engine.scheduler.num_waiting == 0


_ENGINES = {}


def _shared_small_pool_engine(pair) -> Engine:
    key = tuple(pair)
    if key not in _ENGINES:
        _ENGINES[key] = Engine(*pair, kv_cache_bytes=24 * PAGE_BYTES, max_model_len=256, catch_up="eager",
                               max_num_batched_tokens=64, progress=False)
    return _ENGINES[key]


# ---- bad input ------------------------------------------------------------------------------------


def test_big_model_with_another_tokenizer_is_refused(pair, tmp_path):
    import shutil

    other = tmp_path / "big"
    shutil.copytree(pair[1], other)
    write_tokenizer(other, special_tags=False)  # no tag tokens: a different vocabulary
    with pytest.raises(ValueError, match="tokenizer.*differs from the small model's"):
        Engine(pair[0], other, kv_cache_bytes=1 << 22, max_model_len=64, progress=False)


@pytest.mark.parametrize("field,value,message", [
    ("mode", "medium", "mode must be one of"),
    ("switch_ratio", -0.5, "switch_ratio"),
    ("max_offload_tokens", 0, "max_offload_tokens"),
    ("switch_chunk", 0, "switch_chunk"),
    ("logit_bias", {10_000: 1.0}, "logit_bias token id 10000"),
])
def test_bad_split_parameters_get_an_error_and_the_others_go_on(pair, oracle, field, value, message):
    engine = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, progress=False)
    good = mixed_requests(oracle)[:3]
    bad = params_for(good[0])
    setattr(bad, field, value)  # set after construction: the engine checks again when queueing
    outs = engine.generate([r.question for r in good] + [good[0].question],
                           [params_for(r) for r in good] + [bad], use_tqdm=False)
    assert outs[3].finish_reason == "error" and message in outs[3].error
    for r, out in zip(good, outs):
        assert out.token_ids == oracle.run(r)[0]


def test_split_needs_two_models_and_a_text_prompt(pair):
    one = Engine(pair[0], kv_cache_bytes=1 << 22, max_model_len=64, progress=False)
    out = one.generate(["hi"], SamplingParams(mode="split"), use_tqdm=False)[0]
    assert out.finish_reason == "error" and "needs a big model" in out.error
    two = Engine(*pair, kv_cache_bytes=1 << 22, max_model_len=256, progress=False)
    outs = two.generate([[1, 2, 3], "hi"], SamplingParams(max_tokens=3), use_tqdm=False)  # mode None: split
    assert outs[0].finish_reason == "error" and "question as a string" in outs[0].error
    assert outs[1].metrics.mode == "split" and len(outs[1].token_ids) == 3


@pytest.mark.interpreter
def test_split_on_the_triton_kernels_matches_the_oracle(text_pair, text_oracle):
    """Every op a Triton kernel (interpreted on CPU), the sampler's detection words driving the
    protocol: tags spanning tokens open, close and probe as on the PyTorch path."""
    tid = text_oracle.tok.token_to_id
    biases = [(4, 4, 2, 2), (4, 3, 3, 2)]
    reqs = [Request(QUESTIONS[i], "split", 32, {tid("<"): a, tid("Ġ<"): b, tid("</"): c, tid("Ġ</"): d,
                                                tid("<|endoftext|>"): -5.0})
            for i, (a, b, c, d) in enumerate(biases)]
    engine = Engine(*text_pair, kernels="triton", kv_cache_bytes=1 << 24, max_model_len=320, page_tokens=7,
                    progress=False)
    outs = check_against_oracle(engine, text_oracle, reqs)
    assert sum(o.metrics.handoffs for o in outs) >= 3
    assert sum(o.metrics.rolled_back_tokens for o in outs) > 0
