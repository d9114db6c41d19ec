"""Drafting in big segments and in big mode (SamplingParams.speculate, Engine(speculate=...)).

Greedy: split, random (its big chunks) and big modes equal the protocol oracle token for token
with drafting on, on the random pair (most drafts rejected) and on the near pair (a noisy copy of
the small model as the big one: most kept), under lazy and eager catch-up, page pressure, the prefix cache, overlap and
tags made of several tokens (probes). Sampling: the verify rule keeps the big model's
distribution exactly (against the distribution itself, 2% shifts detectable), in the op and
through the engine, and seeded requests repeat.
"""

import math
from pathlib import Path

import pytest
import torch

from split_models import (PAGE_BYTES, QUESTIONS, Request, check_against_oracle, mixed_requests, save_near_pair)
from splitreason_engine import Engine, SamplingParams
from splitreason_engine.kernels.sample import CLOSE
from splitreason_engine.sampling import DetectTables
from splitreason_engine.speculation import DraftTuner, VerifyGroup, draft_distribution, verify
from splitreason_engine.step_costs import StepCosts
from splitreason_engine.tags import TagDetector, Tags

H200_COSTS = Path(__file__).resolve().parent.parent / "bench" / "costs" / "h200_1.5b_32b.json"


def _drafting_stats(outs, mode: str) -> tuple[int, int]:
    runs = [o for o in outs if o.metrics.mode == mode]
    return sum(o.metrics.draft_tokens for o in runs), sum(o.metrics.accepted_draft_tokens for o in runs)


# ---- the verify op ---------------------------------------------------------------------------


def test_greedy_verify_keeps_the_argmax_run_and_adds_the_big_token():
    vocab = 8
    logits = torch.full((7, vocab), -1.0)
    for row, best in enumerate([3, 5, 6, 2, 4, 4, 1]):  # group 1: rows 0-3, group 2: rows 4-6
        logits[row, best] = 2.0
    greedy = SamplingParams(temperature=0)
    groups = [VerifyGroup(greedy, [3, 5, 7], None, 0), VerifyGroup(greedy, [4, 4], None, 10)]
    out = verify(logits, groups, vocab, torch.Generator().manual_seed(0), 1).per_group(groups)
    assert [(tokens, accepted) for tokens, _, accepted, _ in out] == [([3, 5, 6], 2), ([4, 4, 1], 2)]
    log_z = math.log(math.exp(2.0) + (vocab - 1) * math.exp(-1.0))
    assert all(abs(lp - (2.0 - log_z)) < 1e-5 for _, lps, _, _ in out for lp in lps)
    assert all(finite for *_, finite in out)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8)],
                         ids=["plain", "top-k", "top-p"])
def test_rejection_rule_keeps_the_big_distribution(temperature, top_k, top_p):
    """60000 one-draft groups, each draft drawn from q: the committed token follows the big model's
    filtered distribution p (each cell within 4.5 standard errors, about 0.8 points: a 2% shift
    fails), and drafts are kept at rate sum(min(p, q))."""
    vocab, n = 6, 60000
    g = torch.Generator().manual_seed(1)
    big = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.0])
    small = torch.tensor([0.5, 1.0, -0.5, 1.5, -2.0, 0.3])
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=None)

    def filtered(x: torch.Tensor) -> torch.Tensor:  # by hand, not by the engine's helper
        z = x / temperature
        keep = torch.ones(vocab, dtype=torch.bool)
        if top_k:
            keep &= x >= x.topk(top_k).values[-1]
        probs = torch.softmax(z.masked_fill(~keep, -math.inf), -1)
        if top_p < 1:
            order = probs.argsort(descending=True)
            cum = probs[order].cumsum(0)
            cut = int((cum < top_p).sum()) + 1
            keep2 = torch.zeros(vocab, dtype=torch.bool)
            keep2[order[:cut]] = True
            probs = torch.softmax(z.masked_fill(~(keep & keep2), -math.inf), -1)
        return probs

    p, q = filtered(big), filtered(small)
    drafts = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    groups = [VerifyGroup(params, [d], [q], 0) for d in drafts]
    logits = big.repeat(2 * n, 1)
    out = verify(logits, groups, vocab, torch.Generator().manual_seed(2), 1).per_group(groups)
    first = torch.tensor([tokens[0] for tokens, *_ in out])
    freq = torch.bincount(first, minlength=vocab).double() / n
    se = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p).abs() <= 4.5 * se + 1e-9).all(), (freq, p)
    kept = sum(accepted for *_, accepted, _ in out) / n
    expected = float(torch.minimum(p, q).sum())
    assert abs(kept - expected) < 4.5 * math.sqrt(expected * (1 - expected) / n)


def test_split_drafts_are_conditioned_not_to_close():
    """In a state where one token closes the tag and another starts a close spelling, a kept
    draft's q is the small distribution without them, renormalised; -1 leaves q as it is."""
    pieces = [bytes([b]) for b in b"abc<>/"] + [b"</x>", b"</"]
    detector = TagDetector(Tags(open=("<o>",), close=("</x>",)), pieces)
    tables = DetectTables.build(detector, torch.device("cpu"))
    logits = torch.zeros(2, len(pieces))
    params = [SamplingParams(temperature=1.0)] * 2
    q = draft_distribution(logits, params, len(pieces), [0, -1], tables)
    closes = [i for i in range(len(pieces)) if detector.flags[0, i] & CLOSE or detector.closing[detector.next_state[0, i]]]
    assert closes == [pieces.index(b"<"), pieces.index(b"</x>"), pieces.index(b"</")]
    assert torch.allclose(q[0], torch.tensor([0.0 if i in closes else 1 / (len(pieces) - 3) for i in range(len(pieces))]))
    assert torch.allclose(q[1], torch.full((len(pieces),), 1 / len(pieces)))


def test_auto_drafts_more_when_drafts_are_kept_and_none_when_they_are_not():
    costs = StepCosts.load(H200_COSTS)
    tuner = DraftTuner("auto", costs)
    for _ in range(20):
        tuner.observe(4, False)
    assert tuner.next_k() == 8
    for _ in range(60):
        tuner.observe(0, True)
    assert tuner.next_k() == 0
    assert DraftTuner(3, costs).next_k() == 3 and DraftTuner(8, costs, max_drafts=5).next_k() == 5


def test_auto_stops_drafting_once_the_drafts_so_far_are_unlikely_to_be_kept():
    """Per draft, auto drafts on while the estimated chance that every draft so far is kept (the
    small model's probabilities, calibrated by how often its drafts were kept) pays for a small
    step; a fixed k drafts on regardless."""
    costs = StepCosts.load(H200_COSTS)
    tuner = DraftTuner("auto", costs)
    for _ in range(20):
        tuner.observe(3, True, [0.9, 0.9, 0.9, 0.2])  # calibrated: confident drafts are kept
    assert tuner.next_k() == 8
    assert all(tuner.keep_drafting(0.95) for _ in range(3))
    assert not tuner.keep_drafting(0.05)
    tuner.next_k()  # a new cycle starts from certainty
    assert tuner.keep_drafting(0.9)
    overconfident = DraftTuner("auto", costs)
    for _ in range(20):
        overconfident.observe(0, True, [0.9])  # confident drafts rejected: the estimate scales down
    overconfident.accepted = overconfident.rejected = 1.0  # whatever next_k would say
    assert not overconfident.keep_drafting(0.9)
    assert all(DraftTuner(3, costs).keep_drafting(0.01) for _ in range(5))


# ---- greedy: the engine against the protocol oracle -------------------------------------------


@pytest.mark.parametrize("catch_up", ["lazy", "eager"])
@pytest.mark.parametrize("which", ["random-pair", "near-pair"])
def test_drafting_matches_the_oracle(pair, oracle, near_pair, near_oracle, which, catch_up):
    models, reference = (pair, oracle) if which == "random-pair" else (near_pair, near_oracle)
    engine = Engine(*models, kv_cache_bytes=1 << 24, max_model_len=256, catch_up=catch_up, speculate=4,
                    progress=False)
    outs = check_against_oracle(engine, reference, mixed_requests(reference))
    for mode in ("split", "big", "random"):
        drafted, kept = _drafting_stats(outs, mode)
        assert drafted > 5 and kept < drafted
        if which == "near-pair":
            assert kept > drafted / (3 if mode != "random" else 5)
    split = [o for o in outs if o.metrics.mode == "split"]
    assert sum(o.metrics.handoffs for o in split) >= 10
    assert all(o.metrics.draft_tokens == 0 for o in outs if o.metrics.mode == "small")
    stats = engine.stats.summary()
    assert stats["draft_tokens"] == sum(o.metrics.draft_tokens for o in outs)
    assert stats["accepted_draft_tokens"] == sum(o.metrics.accepted_draft_tokens for o in outs)
    if which == "near-pair":  # fewer big steps than big tokens
        big = sum(o.metrics.big_tokens for o in outs)
        assert sum(o.metrics.big_steps for o in outs) < 0.75 * big


def test_drafting_under_page_pressure_prefix_cache_and_overlap(near_pair, near_oracle):
    """33 pages (one request at max_model_len needs 32): big views dropped and requests preempted
    while drafting; then a roomy engine with the prefix cache and overlapped steps, run twice."""
    reqs = mixed_requests(near_oracle)
    tight = Engine(*near_pair, kv_cache_bytes=33 * PAGE_BYTES, max_model_len=256, catch_up="eager", speculate=3,
                   progress=False)
    check_against_oracle(tight, near_oracle, reqs)
    assert tight.scheduler.num_view_drops > 0 and tight.scheduler.num_preemptions > 0
    cached = Engine(*near_pair, kv_cache_bytes=1 << 24, max_model_len=256, speculate=5, prefix_caching=True,
                    overlap=True, progress=False)
    check_against_oracle(cached, near_oracle, reqs)
    outs = check_against_oracle(cached, near_oracle, reqs)
    assert sum(sum(o.metrics.cached_tokens) for o in outs) > 0 and cached.stats.steps_ahead > 0


def test_drafting_with_tags_spanning_tokens_matches_the_oracle(text_pair, tmp_path):
    """Text tags: decisions that start a close tag (probes) end a cycle's drafting; a probe that
    fails commits the big token held after it and drafting goes on."""
    from split_models import Oracle

    models = save_near_pair(tmp_path, text_pair[0], noise=0.1)
    reference = Oracle(*models)
    tid = reference.tok.token_to_id
    biases = [(3, 3, 1, 1), (4, 4, 2, 2), (2, 3, 1, 2), (3, 3, 2, 0), (4, 3, 3, 2), (4, 4, 2, 2)]
    reqs = [Request(QUESTIONS[i], "split", 64, {tid("<"): a, tid("Ġ<"): b, tid("</"): c, tid("Ġ</"): d,
                                                tid("<|endoftext|>"): -5.0})
            for i, (a, b, c, d) in enumerate(biases)]
    engine = Engine(*models, kv_cache_bytes=1 << 24, max_model_len=320, speculate=4, progress=False)
    outs = check_against_oracle(engine, reference, reqs)
    assert sum(o.metrics.handoffs for o in outs) >= 6
    drafted, kept = _drafting_stats(outs, "split")
    assert drafted > 0 and kept > 0


@pytest.mark.interpreter
def test_drafting_with_the_triton_sampler_and_verify_kernels_matches_the_oracle(near_pair, near_oracle):
    """The fused sampler and verify kernels (interpreted) in the step loop, the model on the PyTorch
    ops (the Triton forward is covered by test_cuda_path): greedy split, random and big requests with
    drafting equal the oracle."""
    from splitreason_engine.kernels.sample_triton import sample_and_detect
    from splitreason_engine.kernels.verify_triton import verify_rows

    engine = Engine(*near_pair, kv_cache_bytes=1 << 24, max_model_len=256, speculate=3, progress=False)
    engine.loop.sample_op, engine.loop.verify_op = sample_and_detect, verify_rows
    outs = check_against_oracle(engine, near_oracle, [r for r in mixed_requests(near_oracle) if r.mode != "small"])
    drafted, kept = _drafting_stats(outs, "split")
    assert kept > 0 and sum(o.metrics.draft_tokens for o in outs) > drafted


def test_auto_with_h200_costs_drafts_and_matches_the_oracle(near_pair, near_oracle):
    engine = Engine(*near_pair, kv_cache_bytes=1 << 24, max_model_len=256, speculate="auto",
                    step_costs=str(H200_COSTS), progress=False)
    outs = check_against_oracle(engine, near_oracle, mixed_requests(near_oracle))
    drafted, kept = _drafting_stats(outs, "split")
    assert drafted > 0 and kept > drafted / 2


def test_a_request_turns_drafting_off_or_on_itself(near_pair, near_oracle):
    engine = Engine(*near_pair, kv_cache_bytes=1 << 24, max_model_len=256, speculate=4, progress=False)
    off, on = engine.generate(["Sum 17 and 25"] * 2, [SamplingParams(temperature=0, max_tokens=30, mode="big",
                                                                      speculate=k) for k in (0, 2)], use_tqdm=False)
    assert off.token_ids == on.token_ids
    assert off.metrics.draft_tokens == 0 < on.metrics.draft_tokens
    assert on.metrics.big_steps < off.metrics.big_steps == off.metrics.big_tokens


def test_seeded_sampling_with_drafting_repeats_under_page_pressure(near_pair, near_oracle):
    """Sampled split, random and big requests with drafting: the same seeds give the same tokens in
    a roomy pool and in one that drops big views and preempts."""
    reqs = [r for r in mixed_requests(near_oracle) if r.mode != "small"]
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=100 + i, max_tokens=r.max_tokens, speculate=3,
                             logit_bias=r.logit_bias, mode=r.mode, max_offload_tokens=r.max_offload_tokens,
                             switch_ratio=r.switch_ratio, switch_chunk=r.switch_chunk) for i, r in enumerate(reqs)]
    roomy = Engine(*near_pair, kv_cache_bytes=1 << 24, max_model_len=256, progress=False)
    tight = Engine(*near_pair, kv_cache_bytes=33 * PAGE_BYTES, max_model_len=256, catch_up="eager", progress=False)
    a, b = (e.generate([r.question for r in reqs], params, use_tqdm=False) for e in (roomy, tight))
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_models for o in a] == [o.token_models for o in b]
    assert sum(o.metrics.accepted_draft_tokens for o in a) > 0 and all(o.error is None for o in a + b)


# ---- errors -----------------------------------------------------------------------------------


def test_bad_speculate_settings_are_refused_by_name(pair):
    for bad in (-1, 9, 2.5, "fast"):
        with pytest.raises(ValueError, match="speculate must be"):
            SamplingParams(speculate=bad)
    with pytest.raises(ValueError, match="speculate must be 'auto' or an integer in 0..8"):
        Engine(*pair, speculate=12, progress=False)
    with pytest.raises(ValueError, match="speculate=3 needs two models"):
        Engine(pair[0], speculate=3, progress=False)
    single = Engine(pair[0], kv_cache_bytes=1 << 22, max_model_len=64, progress=False)
    out = single.generate(["a b"], SamplingParams(max_tokens=2, speculate=2), use_tqdm=False)[0]
    assert out.finish_reason == "error" and "speculate=2 needs a big model" in out.error


# ---- sampling through the engine ---------------------------------------------------------------


def _exact_joint(hf_big, prompt: list[int], top_k: int, length: int) -> dict[tuple, float]:
    """The big model's exact joint distribution of its first `length` tokens under top-k at T=1."""
    def step(ids: list[int]) -> dict[int, float]:
        with torch.no_grad():
            x = hf_big(torch.tensor([ids])).logits[0, -1].double()
        top = x.topk(top_k)
        return dict(zip(top.indices.tolist(), torch.softmax(top.values, -1).tolist()))

    joint = {(): 1.0}
    for _ in range(length):
        joint = {seq + (t,): p * q for seq, p in joint.items() for t, q in step(prompt + list(seq)).items()}
    return joint


def _counts(outs) -> dict[tuple, int]:
    counts: dict = {}
    for o in outs:
        key = tuple(zip(o.token_ids, o.token_models))
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_big_mode_sampling_keeps_the_joint_distribution(near_pair, near_oracle):
    """12000 seeds, big mode at T=1 with top-k 2, three tokens (the second and third drafted and
    verified): each of the 8 cells of the joint is within 4 standard errors of the exact
    distribution. A standard error is at most 0.0046 here, so a 2-point shift of any cell fails."""
    n, prompt = 12000, [5, 17, 33, 61, 2]
    engine = Engine(*near_pair, kv_cache_bytes=1 << 26, max_model_len=64, max_num_seqs=1024, speculate=3,
                    progress=False)
    params = [SamplingParams(temperature=1.0, top_k=2, seed=s, max_tokens=3, ignore_eos=True, mode="big")
              for s in range(n)]
    outs = engine.generate([prompt] * n, params, use_tqdm=False)
    exact = _exact_joint(near_oracle.models[1], prompt, 2, 3)
    counts = {tuple(t for t, _ in key): c for key, c in _counts(outs).items()}
    assert set(counts) <= set(exact)
    for cell, prob in exact.items():
        se = math.sqrt(prob * (1 - prob) / n)
        assert abs(counts.get(cell, 0) / n - prob) <= 4 * se, (cell, counts.get(cell, 0) / n, prob)
    drafted, kept = _drafting_stats(outs, "big")
    assert drafted >= n and 0 < kept < drafted


def test_split_sampling_is_distributed_as_without_drafting(near_pair, near_oracle):
    """Split mode at T=1, top-k 3, handoffs pushed by a bias on the open tag and closes by a bias on
    the close tag: the joint of the first six (token, writer) pairs with drafting on and off, two
    samples of 4000 seeds (different seeds in each, so the runs are independent), agree cell by
    cell within 4.5 standard errors of the difference, over the cells that hold 1% or more. (A
    two-sample test: it finds a 2-point shift of a cell below p = 0.04 or so, a coarser net than
    the big-mode test against the exact distribution; the rule itself is exact, see above.)"""
    t = {name: near_oracle.tok.token_to_id(name) for name in ("<bigmodel>", "</bigmodel>")}
    n = 4000
    bias = {t["<bigmodel>"]: 4.0, t["</bigmodel>"]: 2.0}
    engine = Engine(*near_pair, kv_cache_bytes=1 << 26, max_model_len=160, max_num_seqs=1024, prefix_caching=True,
                    progress=False)  # the templated prompt's full pages are computed once
    runs = []
    for speculate, first_seed in ((0, 0), (4, n)):
        params = [SamplingParams(temperature=1.0, top_k=3, seed=first_seed + s, max_tokens=6, ignore_eos=True,
                                 logit_bias=bias, max_offload_tokens=4, speculate=speculate) for s in range(n)]
        runs.append(engine.generate(["Sum 17 and 25"] * n, params, use_tqdm=False))
    off, on = (_counts(r) for r in runs)
    assert sum(o.metrics.handoffs for o in runs[1]) > n and _drafting_stats(runs[1], "split")[1] > 0
    cells = [c for c in set(off) | set(on) if (off.get(c, 0) + on.get(c, 0)) / (2 * n) >= 0.01]
    assert len(cells) >= 10 and sum(off.get(c, 0) for c in cells) > 0.5 * n
    for cell in cells:
        a, b = off.get(cell, 0) / n, on.get(cell, 0) / n
        pooled = (a + b) / 2
        assert abs(a - b) <= 4.5 * math.sqrt(2 * pooled * (1 - pooled) / n), (cell, a, b)
