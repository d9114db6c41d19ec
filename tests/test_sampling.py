"""Sampling: per-request seeds, greedy equivalences, distributions of the sampler, logprobs, stops."""

import math

import pytest
import torch
from transformers import Qwen2ForCausalLM

from hf_models import save_tiny_qwen2
from splitreason_engine import Engine, SamplingParams
from splitreason_engine.kernels.sample import sample_and_detect_ref
from splitreason_engine.sampling import DetectTables, sample_and_detect

SEEDED = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=123, max_tokens=32, ignore_eos=True)
TARGET = "Hello world"
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def sample(logits: torch.Tensor, params: list[SamplingParams], indices: list[int], generator: torch.Generator,
           real_vocab: int) -> tuple[torch.Tensor, "torch.Tensor | None"]:
    """The engine's sampler for rows without tags or stop ids: (token ids, logprobs or None)."""
    n = len(params)
    tokens, _, logprobs = sample_and_detect(logits, params, indices, generator, real_vocab, sample_and_detect_ref,
                                            [-1] * n, DetectTables.build(None, logits.device), [()] * n)
    return tokens, logprobs


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(kv_cache_bytes=1 << 24, progress=False)


def run(engine: Engine, prompts, params) -> list:
    outputs = engine.generate(prompts, params, use_tqdm=False)
    assert not engine.has_unfinished()
    s = engine.scheduler
    assert s.num_running == 0 and s.num_waiting == 0 and s.num_free_pages == engine.pool.num_pages
    return outputs


# ---- (a) per-request seeds ----------------------------------------------------------------------

def test_seeded_request_is_batch_invariant(engine):
    alone = run(engine, [TARGET], SEEDED)[0]
    assert alone.finish_reason == "length" and len(alone.token_ids) == 32
    greedy = run(engine, [TARGET], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert alone.token_ids != greedy.token_ids, "the seeded request should actually sample"
    other_seed = run(engine, [TARGET], SamplingParams(**{**SEEDED.__dict__, "seed": 124}))[0]
    assert other_seed.token_ids != alone.token_ids, "another seed should give other tokens"
    assert run(engine, [TARGET], SEEDED)[0].token_ids == alone.token_ids  # repeatable

    unseeded = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batches = [
        # (prompts, params): the target at different positions, among seeded, unseeded, greedy
        # and logprob requests of other lengths that finish at other times.
        ([TARGET, "The quick brown fox"], [SEEDED, unseeded]),
        (["abc", "Once upon a time", TARGET],
         [SamplingParams(temperature=0.7, seed=7, max_tokens=5), unseeded, SEEDED]),
        (["x" * 50, TARGET, "zebra", "1234567890", "What is 2+2?", TARGET],
         [SamplingParams(temperature=1.3, top_k=5, max_tokens=36, ignore_eos=True), SEEDED,
          SamplingParams(temperature=0, max_tokens=3), SamplingParams(temperature=1.0, seed=123, max_tokens=32),
          SamplingParams(temperature=0.5, logprobs=True, max_tokens=40, ignore_eos=True), SEEDED]),
        ([f"prompt number {i} " * (i + 1) for i in range(9)] + [TARGET],
         [SamplingParams(temperature=1.0, seed=i if i % 2 else None, max_tokens=8 + 3 * i, ignore_eos=True)
          for i in range(9)] + [SEEDED]),
    ]
    for prompts, params in batches:
        outputs = run(engine, prompts, params)
        for prompt, p, out in zip(prompts, params, outputs):
            if p is SEEDED:
                assert out.token_ids == alone.token_ids, f"seeded output changed in a batch of {len(prompts)}"


def test_seeded_request_survives_chunked_prefill_and_preemption(engine):
    """Same weights (same engine seed), but 16-token batches and a pool of 8 pages (128 tokens)
    that six running requests overflow, so they preempt each other and recompute."""
    alone = run(engine, [TARGET], SEEDED)[0]
    small = Engine(kv_cache_bytes=engine.pool.page_bytes * 8, max_model_len=64, max_num_batched_tokens=16,
                   progress=False)
    prompts = ["a prompt that needs two chunks"] + [f"other {i}" for i in range(4)] + [TARGET]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=24, ignore_eos=True) for i in range(5)] + [SEEDED]
    outputs = run(small, prompts, params)
    assert small.scheduler.num_preemptions > 0
    assert outputs[-1].token_ids == alone.token_ids
    # The other seeded requests equal their solo runs on the roomy engine too.
    solo = run(engine, prompts[:2], params[:2])
    assert [o.token_ids for o in outputs[:2]] == [o.token_ids for o in solo]
    assert small.scheduler.num_free_pages == small.pool.num_pages


# ---- (b) top_k = 1 is greedy ----------------------------------------------------------------------

def test_top_k_one_equals_greedy(engine):
    prompts = ["Hello world", "The quick brown fox", "abc", "Paris is the capital of"]
    greedy = run(engine, prompts, GREEDY)
    for params in (SamplingParams(temperature=1.0, top_k=1, max_tokens=40, ignore_eos=True),
                   SamplingParams(temperature=1.7, top_k=1, top_p=0.5, seed=3, max_tokens=40, ignore_eos=True)):
        outs = run(engine, prompts, params)
        assert [o.token_ids for o in outs] == [g.token_ids for g in greedy]
    # Also when the batch holds sampled rows (the sampler then takes its non-greedy path).
    mixed = [SamplingParams(temperature=1.0, top_k=1, max_tokens=40, ignore_eos=True),
             SamplingParams(temperature=1.5, max_tokens=40, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
             SamplingParams(temperature=1.0, top_p=0.95, max_tokens=40, ignore_eos=True)]
    outs = run(engine, prompts, mixed)
    assert outs[0].token_ids == greedy[0].token_ids
    assert outs[2].token_ids == greedy[2].token_ids


# ---- (c) distributions of `sample` ----------------------------------------------------------------

N = 20000
LOGITS = torch.tensor([2.0, 1.1, 0.3, -0.5, 1.7, -1.2, 0.9, 0.0, -2.5, 1.4, 0.6, -0.1])


def draw(logits: torch.Tensor, params: SamplingParams, n: int = N, seed: int = 0, real_vocab=None) -> torch.Tensor:
    """Token counts over `n` unseeded draws from one logits row (rows batched)."""
    g = torch.Generator().manual_seed(seed)
    rows = logits[None].repeat(n, 1)
    tokens, _ = sample(rows, [params] * n, [0] * n, g, real_vocab or logits.shape[-1])
    assert tokens.dtype == torch.int32 and tokens.shape == (n,)
    return torch.bincount(tokens.long(), minlength=logits.shape[-1]).double()


def assert_matches(counts: torch.Tensor, expected: torch.Tensor, n: int = N) -> None:
    """Per-bin bound of 5 standard errors, zero counts exactly where the probability is 0, and a
    chi-square statistic within mean + 6 standard deviations."""
    expected = expected.double()
    assert math.isclose(float(expected.sum()), 1.0, abs_tol=1e-9)
    assert counts.sum() == n
    zero = expected == 0
    assert torch.all(counts[zero] == 0), f"sampled outside the support: {counts[zero]}"
    freq, p = counts[~zero] / n, expected[~zero]
    se = torch.sqrt(p * (1 - p) / n)
    assert torch.all((freq - p).abs() <= 5 * se + 1e-12), f"frequencies {freq} vs probabilities {p}"
    dof = int((~zero).sum()) - 1
    if dof > 0:
        chi2 = float(((counts[~zero] - n * p) ** 2 / (n * p)).sum())
        assert chi2 <= dof + 6 * math.sqrt(2 * dof), f"chi-square {chi2:.1f} with {dof} degrees of freedom"


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_temperature_sampling_matches_softmax(temperature):
    counts = draw(LOGITS, SamplingParams(temperature=temperature))
    assert_matches(counts, torch.softmax(LOGITS.double() / temperature, dim=0))


def expected_filtered(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The usual order (HF generate, vLLM): temperature, then top-k, then top-p over the renormalised
    top-k distribution; top-p keeps the smallest prefix by probability whose mass reaches top_p."""
    probs = torch.softmax(logits.double() / temperature, dim=0)
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    keep = order[:top_k] if top_k > 0 else order
    mass = sum(float(probs[i]) for i in keep)
    kept, acc = [], 0.0
    for i in keep:
        kept.append(i)
        acc += float(probs[i]) / mass
        if acc >= top_p:
            break
    out = torch.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_k,top_p,support", [
    (1.0, 4, 1.0, 4),
    (0.7, 3, 1.0, 3),
    # top_p midway between two cumulative masses, so the kept prefix is unambiguous.
    (1.0, 0, 0.52, 3),  # cumulative .26/.45/.59
    (1.5, 0, 0.73, 6),  # cumulative ... .69/.77
    (0.7, 0, 0.45, 2),  # cumulative .34/.56 (top_p sees the temperature-scaled distribution)
    (1.0, 100, 1.0, 12),  # top_k above the vocabulary keeps everything
])
def test_top_k_and_top_p_restrict_support_and_renormalise(temperature, top_k, top_p, support):
    expected = expected_filtered(LOGITS, temperature, top_k, top_p)
    if support is not None:
        assert int((expected > 0).sum()) == support
    assert 1 < int((expected > 0).sum()) < 12 or top_k == 100
    counts = draw(LOGITS, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), seed=top_k + 17)
    assert set(torch.nonzero(counts).flatten().tolist()) == set(torch.nonzero(expected).flatten().tolist())
    assert_matches(counts, expected)


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    """top_k=4 then top_p=0.7. Renormalised over the top 4, the masses are ~.37/.27/.20/.15
    (cumulative .37/.65/.85), so top-p keeps 3 tokens, as HF generate and vLLM do; measured on the
    full distribution (cumulative .26/.45/.59/.70) the 4th token would stay too."""
    expected = expected_filtered(LOGITS, 1.0, 4, 0.7)
    assert int((expected > 0).sum()) == 3
    counts = draw(LOGITS, SamplingParams(temperature=1.0, top_k=4, top_p=0.7), seed=5)
    assert set(torch.nonzero(counts).flatten().tolist()) == set(torch.nonzero(expected).flatten().tolist())
    assert_matches(counts, expected)


def test_seeded_rows_follow_the_distribution_across_seeds():
    """Different seeds at one index are independent draws from the same distribution."""
    n = 4000
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(n)]
    tokens, _ = sample(LOGITS[None].repeat(n, 1), params, [3] * n, torch.Generator().manual_seed(0), 12)
    counts = torch.bincount(tokens.long(), minlength=12).double()
    assert_matches(counts, torch.softmax(LOGITS.double(), dim=0), n=n)
    again, _ = sample(LOGITS[None].repeat(n, 1), params, [3] * n, torch.Generator().manual_seed(99), 12)
    assert torch.equal(tokens, again), "seeded rows must not depend on the shared generator"


# ---- (d) padding ids ------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=2.0, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.99),
    SamplingParams(temperature=1.0, seed=4, logprobs=True),
], ids=["greedy", "t1", "topk", "topp", "seeded"])
def test_padding_ids_are_never_sampled(params):
    real = 12
    logits = torch.cat([LOGITS, torch.full((20,), 1e4)])  # padding rows of the embedding win by far
    counts = draw(logits, params, n=4000, real_vocab=real)
    assert counts[real:].sum() == 0
    assert counts.sum() == 4000


def test_engine_never_samples_padding_ids(engine):
    assert engine.real_vocab == [engine.tokenizer.vocab_size] and engine.real_vocab[0] < engine.models[0].config.vocab_size
    prompts = [f"prompt {i}" for i in range(8)]
    outs = run(engine, prompts, SamplingParams(temperature=3.0, max_tokens=64, ignore_eos=True))
    tokens = [t for o in outs for t in o.token_ids]
    assert len(tokens) == 8 * 64
    assert max(tokens) < engine.real_vocab[0]


# ---- (e) logprobs ---------------------------------------------------------------------------------

def test_sample_logprobs_are_raw_log_softmax():
    g = torch.Generator().manual_seed(1)
    real, padded = 40, 48
    logits = 3 * torch.randn(6, padded, generator=g)
    params = [SamplingParams(temperature=0, logprobs=True), SamplingParams(temperature=0.5, seed=3, logprobs=True),
              SamplingParams(temperature=1.8, top_k=3, logprobs=True), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=0.3, logprobs=True), SamplingParams(temperature=1.0, logprobs=True)]
    tokens, logprobs = sample(logits, params, [0, 1, 2, 3, 4, 5], g, real)
    assert logprobs is not None and logprobs.shape == (6,)
    expected = torch.log_softmax(logits[:, :real].double(), dim=-1).gather(-1, tokens.long()[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-5, rtol=1e-5)
    _, none = sample(logits, [SamplingParams(temperature=0.5)] * 6, [0] * 6, g, real)
    assert none is None


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("sampling") / "ckpt", "gqa2-untied-1e6", seed=11)


def test_engine_logprobs_match_hf_log_softmax(hf_checkpoint):
    """The logprob of each chosen token under the model's unmodified distribution, by HF's forward."""
    engine = Engine(hf_checkpoint, kv_cache_bytes=1 << 22, progress=False)
    prompts = [[5, 17, 33, 2, 99], [7] * 20, [150, 3]]
    params = [SamplingParams(temperature=0.6, top_k=20, seed=1, max_tokens=12, logprobs=True),
              SamplingParams(temperature=0, max_tokens=9, logprobs=True),
              SamplingParams(temperature=1.4, seed=2, max_tokens=10, logprobs=False)]
    outs = run(engine, prompts, params)
    assert outs[2].logprobs is None
    hf = Qwen2ForCausalLM.from_pretrained(hf_checkpoint, dtype=torch.float32).eval()
    for prompt, out in zip(prompts[:2], outs[:2]):
        assert len(out.logprobs) == len(out.token_ids) > 0
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            logits = hf(ids).logits[0].double()
        lp = torch.log_softmax(logits, dim=-1)
        expected = [float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(out.token_ids)]
        assert out.logprobs == pytest.approx(expected, abs=1e-4)
        assert all(x <= 0 for x in out.logprobs)


# ---- (f) validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.2), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=2.0), "max_tokens"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k="5"), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(seed=1.5), "seed"),
    (dict(seed="7"), "seed"),
    (dict(seed=True), "seed"),
    (dict(mode="medium"), "mode"),
    (dict(stop=[""]), "stop"),
    (dict(stop=[3]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=["a"]), "stop_token_ids"),
])
def test_sampling_params_validation_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_edges():
    SamplingParams(temperature=0, top_p=1, top_k=-1, max_tokens=1, seed=0)
    SamplingParams(top_p=1e-6, top_k=0, seed=2 ** 62)
    assert SamplingParams(stop="abc").stop == ["abc"]
    assert SamplingParams(top_k=1).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=0.5).greedy


# ---- (g) stops ------------------------------------------------------------------------------------

CANDIDATES = [f"{w} {i}" for i in range(4) for w in ("Hello", "The quick brown fox", "Once upon a time", "abc")]


def usable(sub: str) -> bool:
    return bool(sub) and sub.isprintable() and "\ufffd" not in sub


def latest_first_occurrence(text: str, max_len: int = 3) -> tuple[str, int]:
    """A printable substring of `text` whose first occurrence starts as late as possible."""
    best = ("", -1)
    for length in range(max_len, 0, -1):
        for i in range(len(text) - length, -1, -1):
            sub = text[i:i + length]
            if usable(sub) and text.find(sub) == i:
                if i > best[1]:
                    best = (sub, i)
                break
    return best


def greedy_with_stop_candidate(engine):
    """(prompt, greedy output, stop substring, where it first occurs) for the candidate prompt whose
    greedy text has the latest-starting printable substring (the random model's greedy text is
    repetitive, so the first occurrence may be near the start)."""
    outs = run(engine, CANDIDATES, GREEDY)
    scored = [(latest_first_occurrence(o.text), p, o) for p, o in zip(CANDIDATES, outs)]
    (sub, i), prompt, out = max(scored, key=lambda x: (x[0][1], len(x[0][0])))
    assert i >= 0, f"no printable text in any greedy output: {[o.text for o in outs]}"
    return prompt, out, sub, i


def check_stopped(engine, out, full, sub, i):
    assert out.finish_reason == "stop"
    assert out.text == full.text[:i]
    # Generation stopped at the token that completed the first occurrence of the stop string.
    assert out.token_ids == full.token_ids[:len(out.token_ids)]
    decode = engine.tokenizer.decode
    assert sub in decode(out.token_ids) and sub not in decode(out.token_ids[:-1])


def test_stop_string_cuts_text_before_it(engine):
    prompt, full, sub, i = greedy_with_stop_candidate(engine)
    assert full.finish_reason == "length"
    out = run(engine, [prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[sub]))[0]
    check_stopped(engine, out, full, sub, i)
    # A longer stop string made of the same text stops later (at its own first occurrence).
    longer = full.text[i:i + 6]
    if usable(longer) and len(longer) == 6:
        j = full.text.find(longer)
        out = run(engine, [prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[longer]))[0]
        check_stopped(engine, out, full, longer, j)


def test_earliest_stop_string_wins_and_absent_stop_runs_to_length(engine):
    prompt, full, late, i = greedy_with_stop_candidate(engine)
    early = next(c for c in full.text if usable(c))  # the first printable character
    j = full.text.find(early)
    assert j <= i
    base = dict(temperature=0, max_tokens=40, ignore_eos=True)
    outs = run(engine, [prompt, prompt], [SamplingParams(**base, stop=[late, early]),
                                          SamplingParams(**base, stop=["never there \u2603"])])
    check_stopped(engine, outs[0], full, early, j)
    assert outs[1].finish_reason == "length" and outs[1].text == full.text
    assert outs[1].token_ids == full.token_ids


def test_stop_string_on_sampled_text(engine):
    """A seeded sampled request (varied text) stopped by a substring of its own text."""
    params = SamplingParams(temperature=1.0, top_k=50, seed=5, max_tokens=40, ignore_eos=True)
    prompts = ["Once upon a time", "Hello world", "abc"]
    fulls = run(engine, prompts, params)
    (sub, i), prompt, full = max(((latest_first_occurrence(o.text, 2), p, o) for p, o in zip(prompts, fulls)),
                                 key=lambda x: x[0][1])
    assert i > 0, [o.text for o in fulls]
    out = run(engine, [prompt], SamplingParams(**{**params.__dict__, "stop": [sub]}))[0]
    check_stopped(engine, out, full, sub, i)


def test_stop_token_ids_end_at_first_occurrence(engine):
    # The greedy candidate whose output switches to a new token id latest (greedy text repeats).
    greedy = run(engine, CANDIDATES, GREEDY)

    def switch(out):
        return next((j for j, t in enumerate(out.token_ids) if t != out.token_ids[0]), -1)

    prompt, full = max(zip(CANDIDATES, greedy), key=lambda x: switch(x[1]))
    assert switch(full) > 0, "every greedy output repeats a single token"
    seeded = SamplingParams(temperature=1.0, seed=9, max_tokens=40, ignore_eos=True)
    full_sampled = run(engine, [prompt], seeded)[0]
    cases = [(GREEDY, full, full.token_ids[4]),  # the 5th generated token
             (GREEDY, full, full.token_ids[switch(full)]),  # first seen later in the output
             (seeded, full_sampled, full_sampled.token_ids[4])]
    for params, reference, stop_id in cases:
        out = run(engine, [prompt], SamplingParams(**{**params.__dict__, "stop_token_ids": [stop_id]}))[0]
        first = reference.token_ids.index(stop_id)
        assert out.finish_reason == "stop"
        assert out.token_ids == reference.token_ids[: first + 1]  # the stop token is kept
    # Several stop ids: the first one sampled ends it.
    ids = [full_sampled.token_ids[7], full_sampled.token_ids[3]]
    out = run(engine, [prompt], SamplingParams(**{**seeded.__dict__, "stop_token_ids": ids}))[0]
    first = min(full_sampled.token_ids.index(t) for t in ids)
    assert out.finish_reason == "stop" and out.token_ids == full_sampled.token_ids[: first + 1]


def test_max_tokens_gives_length(engine):
    for n in (1, 7, 33):
        out = run(engine, ["Hello world"], SamplingParams(temperature=0.8, seed=1, max_tokens=n, ignore_eos=True))[0]
        assert out.finish_reason == "length" and len(out.token_ids) == n


def test_ignore_eos(engine):
    eos = engine.tokenizer.eos_token_ids
    assert eos == (256,)
    # Find seeded requests that sample EOS somewhere (deterministic: seeds are batch invariant).
    prompts = [f"p{i}" for i in range(24)]
    params = [SamplingParams(temperature=1.5, seed=1000 + i, max_tokens=64, ignore_eos=True) for i in range(24)]
    outs = run(engine, prompts, params)
    hits = [(i, o) for i, o in enumerate(outs) if eos[0] in o.token_ids]
    assert hits, "no seeded request sampled EOS; widen the search"
    assert all(o.finish_reason == "length" and len(o.token_ids) == 64 for o in outs)
    for i, o in hits[:3]:
        stopped = run(engine, [prompts[i]], SamplingParams(**{**params[i].__dict__, "ignore_eos": False}))[0]
        first = o.token_ids.index(eos[0])
        assert stopped.finish_reason == "stop"
        assert stopped.token_ids == o.token_ids[: first + 1]
        assert stopped.text == engine.tokenizer.decode(o.token_ids[:first])  # EOS is special: not in the text


def test_tiny_positive_temperature_is_greedy():
    engine = Engine(kv_cache_bytes=1 << 24, progress=False)
    prompts = ["tiny temperature", "another"]
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    tiny = engine.generate(prompts, [SamplingParams(temperature=1e-40, max_tokens=16, ignore_eos=True),
                                     SamplingParams(temperature=1e-6, max_tokens=16, ignore_eos=True, seed=3)],
                           use_tqdm=False)
    assert [o.token_ids for o in tiny] == [o.token_ids for o in greedy]


def test_generation_defaults_follow_generation_config(tmp_path):
    from splitreason_engine.sampling import generation_defaults

    assert generation_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 2, "temperature": 0.6, "top_p": 0.95}')
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95}
    (tmp_path / "generation_config.json").write_text('{"do_sample": false, "temperature": 0.6, "top_k": 20}')
    assert generation_defaults(tmp_path) == {"temperature": 0.0, "top_k": 20}
    (tmp_path / "generation_config.json").write_text('{"do_sample": ')
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        generation_defaults(tmp_path)
