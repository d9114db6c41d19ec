"""Co-scheduling policies: they change when the big model runs, never what any request generates.

Every policy is checked token for token against the protocol oracle (greedy and seeded, mixed
modes, lazy and eager catch-up, a pool tight enough to drop views and preempt); a random workload
under `gather` checks that every request finishes, that no row waits past the bound and that no
page leaks; the simulated clock replays the same tokens as a real run, and under the H200's step
costs gathering beats running the big model in every step.
"""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from properties import examples
from split_models import PAGE_BYTES, QUESTIONS, check_against_oracle, mixed_requests
from splitreason_engine import Engine, SamplingParams
from splitreason_engine.coschedule import WAIT_BOUND_BIG_STEPS, EagerPolicy, GatherPolicy, gathering_pays, make_policy
from splitreason_engine.step_costs import SimulatedClock, StepCost, StepCosts

H200_COSTS = Path(__file__).parent.parent / "bench" / "costs" / "h200_1.5b_32b.json"
BIG = 1
POLICIES = {
    "eager": dict(coschedule="eager"),
    "gather-steps": dict(coschedule="gather", gather_min_share=1.0, max_big_wait_steps=4),
    "gather-share": dict(coschedule="gather", gather_min_share=0.6, max_big_wait_steps=50),
}


@pytest.mark.parametrize("catch_up", ["lazy", "eager"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_matches_the_oracle(pair, oracle, policy, catch_up):
    engine = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, catch_up=catch_up, progress=False,
                    **POLICIES[policy])
    outs = check_against_oracle(engine, oracle, mixed_requests(oracle))
    s = engine.stats.summary()
    assert sum(o.metrics.handoffs for o in outs) >= 10
    if policy == "eager":
        assert s["held_steps"] == 0 and s["coschedule"] == {"policy": "eager"}
    else:
        assert s["held_steps"] > 0, "the policy never held the big model: nothing was gathered"
        assert s["coschedule"]["policy"] == "gather"
    waits = [w for o in outs for w in o.metrics.big_waits]
    assert 0 < len(waits) <= sum(o.metrics.handoffs for o in outs) and min(waits) >= 0
    assert s["steps_big"] > 0 and s["mean_rows_per_big_step"] >= 1


@pytest.mark.parametrize("policy", ["gather-steps", "gather-share"])
def test_gathering_under_page_pressure_matches_the_oracle(pair, oracle, policy):
    """Held rows keep their pages; when the pool runs short, big views are dropped and requests
    preempted as under the eager policy, and the tokens still equal the oracle's."""
    engine = Engine(*pair, kv_cache_bytes=24 * PAGE_BYTES, max_model_len=256, catch_up="eager", progress=False,
                    **POLICIES[policy])
    check_against_oracle(engine, oracle, mixed_requests(oracle))
    assert engine.scheduler.num_view_drops > 0 and engine.scheduler.num_preemptions > 0
    assert engine.stats.held_steps > 0


def test_seeded_sampling_is_the_same_under_every_policy(pair, oracle):
    reqs = mixed_requests(oracle)
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=200 + i, max_tokens=r.max_tokens,
                             logit_bias=r.logit_bias, mode=r.mode, max_offload_tokens=r.max_offload_tokens,
                             switch_ratio=r.switch_ratio, switch_chunk=r.switch_chunk) for i, r in enumerate(reqs)]
    results = []
    for policy, pool in (("eager", 1 << 24), ("gather-steps", 24 * PAGE_BYTES), ("gather-share", 1 << 24)):
        engine = Engine(*pair, kv_cache_bytes=pool, max_model_len=256, progress=False, **POLICIES[policy])
        outs = engine.generate([r.question for r in reqs], params, use_tqdm=False)
        results.append([(o.token_ids, o.token_models) for o in outs])
        assert engine.scheduler.num_free_pages == engine.pool.num_pages
    assert results[0] == results[1] == results[2]
    assert any(1 in models for _, models in results[0])


@settings(max_examples=examples(5), deadline=None)
@given(modes=st.lists(st.sampled_from(["split", "random", "big", "small"]), min_size=3, max_size=12),
       abort_at=st.lists(st.integers(0, 60), min_size=12, max_size=12),
       bound=st.integers(0, 6), min_share=st.floats(0.05, 1.0), seed=st.integers(0, 1000),
       speculate=st.sampled_from([0, 3]))
def test_gather_workload_finishes_with_bounded_waits_and_no_leaks(pair, modes, abort_at, bound, min_share, seed,
                                                                  speculate):
    """Random modes and aborts under `gather`, drafting or not: after every step the scheduler's
    invariants hold; a row that needs the big model waits at most `bound` held steps in a row
    (rounds waiting for drafting members included); every request ends."""
    engine = _gather_engine(pair)
    engine.use_policy("gather", min_share=min_share, max_wait_steps=bound)
    ids = []
    for i, mode in enumerate(modes):
        params = SamplingParams(temperature=0.8, seed=seed + i, max_tokens=40, mode=mode, switch_chunk=4,
                                speculate=speculate,
                                logit_bias={269: 2.0, 270: 2.0})  # <bigmodel>, </bigmodel>: frequent handoffs
        ids.append(engine.add_request(QUESTIONS[i % len(QUESTIONS)], params))
    waited: dict[int, int] = {}
    step = 0
    while engine.has_unfinished():
        for rid, when in zip(ids, abort_at):
            if when == step:
                engine.abort(rid)
        ready = engine.scheduler.ready_requests(BIG)
        engine.step()
        engine.scheduler.check_invariants()
        counts = engine.scheduler.counts()
        ran = set(engine.runners[BIG].buffers["seq_request_ids"][:counts[5]].tolist())
        waited = {rid: waited.get(rid, 0) + 1 for rid in ready if rid not in ran and engine.scheduler.has_request(rid)}
        assert max(waited.values(), default=0) <= bound, f"a row waited {max(waited.values())} steps, bound {bound}"
        step += 1
        assert step < 3000, "the workload did not finish"
    assert engine.scheduler.num_free_pages == engine.pool.num_pages
    assert engine.scheduler.num_running == engine.scheduler.num_waiting == 0


_ENGINES = {}


def _gather_engine(pair) -> Engine:
    key = tuple(pair)
    if key not in _ENGINES:
        _ENGINES[key] = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, coschedule="gather",
                               gather_min_share=1.0, max_big_wait_steps=0, progress=False)
    return _ENGINES[key]


def _random_batch(oracle, n: int, tokens: int) -> tuple[list[str], list[SamplingParams]]:
    eos = oracle.tok.token_to_id("<|endoftext|>")
    params = [SamplingParams(temperature=0, mode="random", max_tokens=tokens, switch_ratio=4.0, switch_chunk=8,
                             seed=i, logit_bias={eos: -100.0}) for i in range(n)]
    return [QUESTIONS[i % len(QUESTIONS)] + f" #{i}" for i in range(n)], params


def test_simulated_clock_replays_the_real_run(pair, oracle):
    """The same workload and policy under the real clock and under step costs charged from the
    H200 file: the same tokens, and simulated time that is exactly the sum of the charged costs."""
    costs = StepCosts.load(H200_COSTS)
    prompts, params = _random_batch(oracle, 12, 48)
    real = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, progress=False, coschedule="gather",
                  step_costs=costs)
    clock = SimulatedClock(costs)
    sim = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, progress=False, coschedule="gather",
                 step_costs=costs, clock=clock)
    assert real.policy.describe() == sim.policy.describe()
    a = real.generate(prompts, params, use_tqdm=False)
    b = sim.generate(prompts, params, use_tqdm=False)
    assert [(o.token_ids, o.token_models) for o in a] == [(o.token_ids, o.token_models) for o in b]
    assert clock.now() == pytest.approx(sum(sim.stats.model_time))
    assert max(o.metrics.finished_time for o in b) == pytest.approx(clock.now())
    assert sim.stats.held_steps > 0


def test_gathering_beats_eager_under_the_h200_step_costs(pair, oracle):
    """Simulated time, so deterministic: with a weight-bound big model, gathering its work takes
    less time than running it whenever a row needs it, and every wait stays within the bound."""
    costs = StepCosts.load(H200_COSTS)
    prompts, params = _random_batch(oracle, 16, 64)
    walls, tokens = {}, {}
    for policy in ("eager", "gather"):
        clock = SimulatedClock(costs)
        engine = Engine(*pair, kv_cache_bytes=1 << 24, max_model_len=256, progress=False, coschedule=policy,
                        step_costs=costs, clock=clock)
        outs = engine.generate(prompts, params, use_tqdm=False)
        walls[policy], tokens[policy] = clock.now(), [(o.token_ids, o.token_models) for o in outs]
        if policy == "gather":
            bound = engine.policy.max_wait_s
            longest_step = costs.step(BIG, 16, 2048) + costs.step(0, 16, 2048)
            assert max(w for o in outs for w in o.metrics.big_waits) <= bound + longest_step
            assert engine.stats.summary()["mean_rows_per_big_step"] > 2
    assert tokens["eager"] == tokens["gather"]
    assert walls["gather"] < 0.9 * walls["eager"], walls


def test_auto_follows_the_step_costs():
    weight_bound = StepCosts((StepCost(0.002, 1e-5, 2e-5), StepCost(0.0185, 7e-5, 9e-5)), "test")
    compute_bound = StepCosts((StepCost(0.002, 1e-5, 2e-5), StepCost(0.001, 0.004, 0.004)), "test")
    assert gathering_pays(weight_bound) and not gathering_pays(compute_bound)
    policy = make_policy("auto", weight_bound)
    assert isinstance(policy, GatherPolicy)
    t_small, t_big = 0.002 + 1e-5, 0.0185 + 7e-5
    assert policy.min_share == pytest.approx(t_big / (t_small + t_big))
    assert policy.max_wait_s == pytest.approx(WAIT_BOUND_BIG_STEPS * t_big)
    assert isinstance(make_policy("auto", compute_bound), EagerPolicy)
    assert make_policy("gather", None, min_share=0.5, max_wait_steps=3).describe() == {
        "policy": "gather", "min_share": 0.5, "max_wait_steps": 3, "max_wait_s": None}


class _Ready:
    """The two questions a policy asks the scheduler."""

    def __init__(self, waiting: list[int], small_rows: int):
        self.waiting, self.small_rows = waiting, small_rows

    def ready_requests(self, model):
        return list(self.waiting)

    def ready_rows(self, model):
        return self.small_rows


def test_a_round_waits_for_its_drafting_members_within_the_bound():
    """Members drafting for a verify keep the round and hold its big step until they wait too, so
    they verify together; at most max_wait_steps held steps; a member that neither waits nor drafts
    leaves, and a round of members that only wait runs every step."""
    policy = GatherPolicy(min_share=0.5, max_wait_steps=2)
    assert not policy.hold_big(_Ready([1, 2], 2), 0.0, set())  # half the rows wait: a round of {1, 2}
    policy.observe(True)
    assert policy.hold_big(_Ready([2], 3), 1.0, {1})  # 1 drafts: 2 waits for it
    policy.observe(False)
    assert not policy.hold_big(_Ready([1, 2], 2), 2.0, set())  # both wait: one verify step for both
    policy.observe(True)
    held = 0
    while policy.hold_big(_Ready([1], 3), 3.0 + held, {2}):  # 2 keeps drafting: the bound ends the wait
        policy.observe(False)
        held += 1
    assert held == 2
    policy.observe(True)
    assert not policy.hold_big(_Ready([2], 3), 9.0, set())  # 1 left the round; 2 still waits: it runs
    policy.observe(True)
    assert policy.hold_big(_Ready([3], 9), 10.0, set())  # the round is over: a lone waiter is held again


def test_a_calibration_file_chooses_the_policy_without_timing(pair):
    engine = Engine(*pair, kv_cache_bytes=1 << 22, max_model_len=64, progress=False, step_costs=H200_COSTS)
    assert engine.step_costs.source == str(H200_COSTS)
    assert engine.policy.describe()["policy"] == "gather"
    assert engine.policy.max_wait_s == pytest.approx(WAIT_BOUND_BIG_STEPS * engine.step_costs.step(BIG, 1, 1))


def test_bad_coscheduling_settings_are_refused_by_name(pair, tmp_path):
    with pytest.raises(ValueError, match="without step costs"):
        make_policy("gather", None)
    with pytest.raises(ValueError, match="coschedule must be one of"):
        Engine(*pair, kv_cache_bytes=1 << 22, max_model_len=64, progress=False, coschedule="sometimes")
    with pytest.raises(ValueError, match="does not exist"):
        Engine(*pair, kv_cache_bytes=1 << 22, max_model_len=64, progress=False, step_costs=tmp_path / "none.json")
    corrupt = tmp_path / "costs.json"
    corrupt.write_text('{"models": [{"base_ms": 1}]}')
    with pytest.raises(ValueError, match="not a calibration file"):
        StepCosts.load(corrupt)
    with pytest.raises(ValueError, match="min_share"):
        GatherPolicy(0.0, max_wait_steps=3)
    with pytest.raises(ValueError, match="max_wait_s"):
        GatherPolicy(0.5, max_wait_s=-1.0)
    with pytest.raises(ValueError, match="wait bound"):
        GatherPolicy(0.5)
