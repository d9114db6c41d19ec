"""Log-probabilities against transformers on the same checkpoints (fp32, within 1e-4): the chosen
tokens', their top alternatives', and the prompt's, scored in the prefill, also when the prompt's
pages sit in the prefix cache, when its prefill is chunked, and after preemptions.

The engine's values are those of the distribution it samples from: the softmax over the
tokenizer's ids, without the embedding's padding rows (the demo pair's 104th), so the
reference is transformers' logits over the same ids."""

import pytest
import torch

from hf_models import hf_model, ragged_prompts_for, save_tiny
from splitreason_engine import Engine, SamplingParams
from splitreason_engine.demo import pair_paths
from splitreason_engine.demo.task import evaluation_problems

TOL = 1e-4
CASES = [("qwen2", "gqa2-untied-1e6"), ("llama", "gqa4-h96-llama3"), ("qwen3", "gqa4-h80-untied")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("logprob-checkpoints")
    return {family: save_tiny(root / family, family, name, seed=3) for family, name in CASES}


def hf_logprobs(model, ids: list[int], vocab: int) -> torch.Tensor:
    """[len(ids), vocab]: row i is the distribution of the token after ids[:i + 1]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :, :vocab].float(), dim=-1)


def assert_top_matches(top: list, row: torch.Tensor, n: int, chosen: int, chosen_lp: float) -> None:
    """A top list: n entries, sorted, each value the reference's for its id, the n largest, and the
    chosen token among them when its logprob reaches the n-th."""
    assert len(top) == n
    values = [v for _, v in top]
    assert values == sorted(values, reverse=True)
    for token, value in top:
        assert abs(value - row[token].item()) <= TOL
    assert abs(values[-1] - row.topk(n).values[-1].item()) <= TOL
    if chosen_lp > values[-1] + TOL:
        assert chosen in [t for t, _ in top]


def assert_output_matches_hf(model, prompt: list[int], out, n: int, prompt_n: "int | None", vocab: int) -> None:
    ref = hf_logprobs(model, prompt + out.token_ids, vocab)
    assert (out.logprobs is None) == (not out.token_ids and out.logprobs is None)
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs or [])):
        row = ref[len(prompt) - 1 + i]
        assert abs(lp - row[token].item()) <= TOL, f"token {i}: {lp} vs {row[token].item()}"
        if n:
            assert_top_matches(out.top_logprobs[i], row, n, token, lp)
    if prompt_n is None:
        assert out.prompt_logprobs is None
        return
    assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        row, lp = ref[pos - 1], out.prompt_logprobs[pos]
        assert abs(lp - row[prompt[pos]].item()) <= TOL, f"prompt position {pos}"
        assert_top_matches(out.prompt_top_logprobs[pos], row, prompt_n, prompt[pos], lp) if prompt_n else None


@pytest.mark.parametrize("family", [f for f, _ in CASES])
def test_logprobs_match_transformers_with_chunked_prefill_and_the_prefix_cache(checkpoints, family):
    """Greedy and seeded sampled requests; a budget of 16 tokens chunks the prompts; the same
    prompts run twice, so the second time their pages are in the prefix cache, which a scoring
    request does not read (and a plain one does)."""
    folder = checkpoints[family]
    engine = Engine(folder, kv_cache_bytes=1 << 22, max_num_batched_tokens=16, prefix_caching=True, progress=False)
    prompts = ragged_prompts_for(5, count=4, lo=20, hi=60)
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, top_logprobs=5, prompt_logprobs=3),
              SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True, logprobs=True, prompt_logprobs=0),
              SamplingParams(temperature=0.7, top_k=20, seed=1, max_tokens=5, ignore_eos=True, top_logprobs=20),
              SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=20)]
    model = hf_model(folder)
    for _ in range(2):
        outs = engine.generate(prompts, params, use_tqdm=False)
        for prompt, p, out in zip(prompts, params, outs):
            assert out.finish_reason == "length" and len(out.token_ids) == p.max_tokens
            assert_output_matches_hf(model, prompt, out, p.top_logprobs, p.prompt_logprobs, engine.real_vocab[0])
            if p.prompt_logprobs is not None:
                assert out.metrics.cached_tokens[0] == 0
    [plain] = engine.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    assert plain.metrics.cached_tokens[0] > 0  # the pages were there to read


def test_prompt_logprobs_survive_preemption(checkpoints):
    """A pool too small for the batch preempts and recomputes requests: the same values."""
    folder = checkpoints["qwen2"]
    prompts = ragged_prompts_for(9, count=6, lo=30, hi=60)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, top_logprobs=2, prompt_logprobs=2)
    alone = Engine(folder, kv_cache_bytes=1 << 22, max_model_len=128, progress=False).generate(
        prompts, params, use_tqdm=False)
    page_bytes = Engine(folder, kv_cache_bytes=1 << 20, max_model_len=128, page_tokens=16, progress=False).pool.page_bytes
    tight = Engine(folder, kv_cache_bytes=page_bytes * 14, max_model_len=128, page_tokens=16, progress=False)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.scheduler.num_preemptions > 0
    for a, b in zip(alone, outs):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.prompt_logprobs[1:]), torch.tensor(b.prompt_logprobs[1:]))
        assert [[t for t, _ in top] for top in a.top_logprobs] == [[t for t, _ in top] for top in b.top_logprobs]


def test_a_request_leaves_the_scoring_set_once_its_prompt_is_scored(checkpoints):
    """Each step scans the scoring requests' rows, so a request whose last prompt token is scored
    leaves the set while it goes on decoding; a one-token prompt never joins it."""
    engine = Engine(checkpoints["qwen2"], kv_cache_bytes=1 << 22, max_num_batched_tokens=16, progress=False)
    [prompt] = ragged_prompts_for(4, count=1, lo=40, hi=41)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=1)
    rid = engine.add_request(prompt, params)
    one = engine.add_request(prompt[:1], params)
    assert engine.book.scoring == {rid}
    seen_scoring, seen_decoding_after = False, False
    while engine.has_unfinished():
        engine.step()
        req = engine.book.live.get(rid)
        if req is None:
            continue
        scored = all(lp is not None for lp in req.prompt_logprobs[1:])
        assert (rid in engine.book.scoring) == (not scored)
        seen_scoring |= not scored
        seen_decoding_after |= scored and len(req.tokens) < params.max_tokens
        assert one not in engine.book.scoring
    assert seen_scoring and seen_decoding_after


def test_overlapped_steps_and_the_cuda_input_layout_give_the_same_values(checkpoints, monkeypatch):
    """Overlapped steps launch ahead of the host, and CUDA's staged input layout packs the step's
    gathered rows, prompt rows included: the same tokens and values as the plain loop."""
    from splitreason_engine import runner as runner_module

    folder = checkpoints["llama"]
    prompts = ragged_prompts_for(12, count=3, lo=10, hi=40)
    params = SamplingParams(temperature=0.9, seed=2, max_tokens=9, ignore_eos=True, top_logprobs=3, prompt_logprobs=3)
    kwargs = dict(kv_cache_bytes=1 << 22, max_num_batched_tokens=12, progress=False)
    plain = Engine(folder, overlap=False, **kwargs).generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(runner_module, "stages", lambda device: True)
    engine = Engine(folder, overlap=True, **kwargs)
    staged = engine.generate(prompts, params, use_tqdm=False)
    assert engine.stats.steps_ahead > 0
    for a, b in zip(plain, staged):
        assert a.token_ids == b.token_ids
        assert a.prompt_logprobs == b.prompt_logprobs and a.logprobs == b.logprobs
        assert a.top_logprobs == b.top_logprobs and a.prompt_top_logprobs == b.prompt_top_logprobs


@pytest.fixture(scope="module")
def demo_engine():
    return Engine(*pair_paths(), kv_cache_bytes=1 << 24, progress=False)


@pytest.mark.parametrize("mode", ["small", "big"])
def test_demo_pair_logprobs_match_transformers_in_both_single_modes(demo_engine, mode):
    folder = pair_paths()[0 if mode == "small" else 1]
    question = evaluation_problems(1, seed=4)[0].question
    prompt = demo_engine.tokenizer.encode(question)
    params = SamplingParams(temperature=0, max_tokens=12, mode=mode, top_logprobs=4, prompt_logprobs=4)
    [out] = demo_engine.generate([prompt], params, use_tqdm=False)
    assert demo_engine.real_vocab[0] < 104  # the padding rows are left out on both sides
    assert_output_matches_hf(hf_model(folder), prompt, out, 4, 4, demo_engine.real_vocab[0])


def test_split_mode_reports_each_tokens_values_from_the_model_that_wrote_it(demo_engine):
    """Greedy split requests: each token is the first of its own top list, with the same value,
    so the list comes from the model that chose it (the other model disagrees on some tokens).
    With drafting the big tokens' values come from verify steps: the same as without."""
    questions = [p.question for p in evaluation_problems(4, seed=2)]
    runs = {k: demo_engine.generate(questions, SamplingParams(temperature=0, max_tokens=120, mode="split",
                                                              top_logprobs=3, speculate=k), use_tqdm=False)
            for k in (0, 3)}
    assert sum(o.metrics.big_tokens for o in runs[0]) > 0
    assert sum(o.metrics.accepted_draft_tokens for o in runs[3]) > 0
    for plain, drafted in zip(*runs.values()):
        for token, lp, top in zip(plain.token_ids, plain.logprobs, plain.top_logprobs):
            assert top[0][0] == token and abs(top[0][1] - lp) <= 1e-6
        assert drafted.token_ids == plain.token_ids and drafted.token_models == plain.token_models
        assert max(abs(a - b) for a, b in zip(drafted.logprobs, plain.logprobs)) <= TOL
        for a, b in zip(drafted.top_logprobs, plain.top_logprobs):
            assert [t for t, _ in a] == [t for t, _ in b]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) <= TOL


@pytest.mark.parametrize("bad, named", [(dict(top_logprobs=-1), "top_logprobs"),
                                        (dict(prompt_logprobs=1.5), "prompt_logprobs"),
                                        (dict(max_tokens=0), "max_tokens")])
def test_bad_logprob_settings_are_refused_by_name(bad, named):
    with pytest.raises(ValueError, match=named):
        SamplingParams(**bad)


@pytest.mark.parametrize("mode", ["split", "random"])
def test_prompt_logprobs_are_refused_in_templated_modes(demo_engine, mode):
    [out] = demo_engine.generate(["What is 2 times 3?"], SamplingParams(mode=mode, prompt_logprobs=1), use_tqdm=False)
    assert out.finish_reason == "error" and "prompt_logprobs" in out.error and mode in out.error
