"""Engine behaviour beyond single-model parity: two models on one pool, streaming, metrics."""

import pytest

from hf_models import hf_greedy, ragged_prompts_for, save_tiny_qwen2
from splitreason_engine import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    # KV bytes per token: small 2 layers x 2 x 2 heads x 20 x 4 B = 640, big 3 x 2 x 2 x 32 x 4 B = 1536;
    # a 16-token big page holds 38 small tokens with 256 B left over.
    small = save_tiny_qwen2(root / "small", "gqa2-h80-untied", seed=1)
    big = save_tiny_qwen2(root / "big", "gqa2-untied-1e6", seed=2, num_layers=3)
    return small, big


def test_two_models_share_one_pool_with_their_own_geometry(pair):
    small, big = pair
    engine = Engine(small, big, kv_cache_bytes=1 << 22, page_tokens=16, progress=False)
    small_g, big_g = engine.pool.geometries
    assert big_g.page_tokens == 16 and big_g.waste_bytes_per_page == 0
    assert small_g.page_bytes == big_g.page_bytes == engine.pool.page_bytes
    assert small_g.page_tokens == engine.pool.page_bytes // small_g.kv_bytes_per_token == 38
    assert small_g.waste_bytes_per_page == 256
    assert small_g.page_tokens * small_g.kv_bytes_per_token + small_g.waste_bytes_per_page == engine.pool.page_bytes


def test_small_and_big_modes_in_one_batch_match_hf(pair):
    small, big = pair
    engine = Engine(small, big, kv_cache_bytes=1 << 22, progress=False)
    prompts = ragged_prompts_for(4, count=6)
    modes = ["small", "big", "big", "small", "big", "small"]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, mode=m) for m in modes]
    outputs = engine.generate(prompts, params, use_tqdm=False)
    for prompt, mode, out in zip(prompts, modes, outputs):
        assert out.token_ids == hf_greedy(small if mode == "small" else big, prompt, 24)
    assert engine.scheduler.num_free_pages == engine.pool.num_pages


def test_pages_flow_between_models(pair):
    """No static split: either model alone can fill the whole pool, one after the other."""
    small, big = pair
    probe = Engine(small, big, kv_cache_bytes=1 << 22, max_model_len=64, progress=False)
    num_pages = 12
    engine = Engine(small, big, kv_cache_bytes=probe.pool.page_bytes * num_pages, max_model_len=64, progress=False)
    for mode, model in (("big", 1), ("small", 0), ("big", 1)):
        tokens_per_page = engine.pool.geometries[model].page_tokens
        # Enough requests of 60 tokens to need every page of the pool.
        count = -(-num_pages * tokens_per_page // 60)
        prompts = ragged_prompts_for(count, count=count, lo=20, hi=21)
        peak = 0
        for _ in engine.generate_stream(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, mode=mode)):
            peak = max(peak, engine.scheduler.pages_held(model))
            assert engine.scheduler.pages_held(1 - model) == 0
        assert peak >= 0.95 * num_pages
        assert engine.scheduler.num_free_pages == num_pages


def test_stream_equals_generate_and_text_adds_up():
    engine = Engine(kv_cache_bytes=1 << 24, progress=False)
    prompts = ["Hello there", "A longer prompt about something", "x"]
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=20 + 5 * i, ignore_eos=True) for i in range(3)]
    final = engine.generate(prompts, params, use_tqdm=False)
    streamed_ids, streamed_text, finals = {0: [], 1: [], 2: []}, {0: "", 1: "", 2: ""}, {}
    for event in engine.generate_stream(prompts, params):
        streamed_ids[event.index] += event.token_ids
        streamed_text[event.index] += event.text
        if event.output is not None:
            finals[event.index] = event.output
    for i, out in enumerate(final):
        assert streamed_ids[i] == out.token_ids == finals[i].token_ids
        assert streamed_text[i] == out.text == finals[i].text
        assert finals[i].finish_reason == "length"


def test_abandoned_stream_frees_its_pages():
    engine = Engine(kv_cache_bytes=1 << 24, progress=False)
    stream = engine.generate_stream(["one", "two"], SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    assert engine.scheduler.num_free_pages < engine.pool.num_pages
    stream.close()
    assert engine.scheduler.num_free_pages == engine.pool.num_pages
    assert not engine.has_unfinished()


def test_metrics_and_logprobs():
    engine = Engine(kv_cache_bytes=1 << 24, progress=False)
    [out] = engine.generate(["metrics"], SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True), use_tqdm=False)
    m = out.metrics
    assert m.num_prompt_tokens == len(out.prompt_token_ids) == len("metrics")
    assert m.num_generated_tokens == 12
    assert 0 < m.time_to_first_token <= m.latency
    assert m.decode_tokens_per_s > 0
    assert len(out.logprobs) == 12 and all(lp <= 0 for lp in out.logprobs)


def test_big_mode_without_big_model_is_rejected_per_prompt():
    engine = Engine(kv_cache_bytes=1 << 24, progress=False)
    outs = engine.generate(["a", "b"], [SamplingParams(max_tokens=3, mode="big"), SamplingParams(max_tokens=3)],
                           use_tqdm=False)
    assert outs[0].finish_reason == "error" and "big model" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 3


def test_pool_sized_from_a_fraction_of_free_memory():
    from splitreason_engine.kv_pool import available_bytes

    free = available_bytes(__import__("torch").device("cpu"))
    engine = Engine(kv_cache_memory_fraction=0.002, max_model_len=256, progress=False)
    size = engine.pool.num_pages * engine.pool.page_bytes
    assert 0.5 * 0.002 * free <= size <= 0.002 * free
    assert engine.pool.capacity_tokens(0) == engine.pool.num_pages * 16
    assert "waste 0 B/page" in engine.pool.describe()


def test_stream_with_stop_strings_never_shows_the_stop_text():
    engine = Engine(kv_cache_bytes=1 << 24, progress=False)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    [plain] = engine.generate(["stop strings"], params, use_tqdm=False)
    stop = plain.text[len(plain.text) // 2: len(plain.text) // 2 + 3]
    assert len(stop) == 3
    stopping = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    streamed, final = "", None
    for event in engine.generate_stream(["stop strings"], stopping):
        streamed += event.text
        final = event.output or final
    assert final.finish_reason == "stop"
    assert streamed == final.text == plain.text[: plain.text.index(stop)]


def test_interleaved_callers_all_finish():
    """A generate() call that steps another caller's stream must not lose that stream's tokens."""
    engine = Engine(kv_cache_bytes=1 << 24, progress=False)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    [alone] = engine.generate(["stream A"], params, use_tqdm=False)
    stream = engine.generate_stream(["stream A"], params)
    tokens = list(next(stream).token_ids)
    others = engine.generate(["call B", "call C"], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
                             use_tqdm=False)
    assert all(len(o.token_ids) == 60 for o in others)
    for event in stream:
        tokens += event.token_ids
    assert tokens == alone.token_ids
    assert not engine.has_unfinished() and engine.scheduler.num_free_pages == engine.pool.num_pages


def test_unexpected_errors_leave_nothing_queued():
    engine = Engine(kv_cache_bytes=1 << 24, progress=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate(["a", "b"], [SamplingParams(), {"max_tokens": 3}], use_tqdm=False)
    assert not engine.has_unfinished() and engine.scheduler.num_waiting == 0


def test_eos_from_config_when_the_tokenizer_has_none(tmp_path):
    import shutil

    from splitreason_engine.engine import default_model_path

    folder = tmp_path / "no-eos-in-tokenizer"
    shutil.copytree(default_model_path(), folder)
    (folder / "tokenizer_config.json").unlink()
    engine = Engine(folder, load_format="dummy", kv_cache_bytes=1 << 24, progress=False)
    assert engine.eos_token_ids == [256]


def test_long_generate_shows_a_token_progress_bar_that_completes(capsys):
    engine = Engine(kv_cache_bytes=1 << 24, progress=False)
    engine.generate(["bar one", "bar two"], [SamplingParams(max_tokens=200, ignore_eos=True),
                                             SamplingParams(max_tokens=200, ignore_eos=True, stop_token_ids=[5, 7, 9])])
    err = capsys.readouterr().err
    assert "generate" in err and "tok" in err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in final
