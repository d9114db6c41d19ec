"""Random engine workloads against the protocol oracle, with everything that touches KV at once.

Each example runs requests of all four modes (split ones biased to hand off often and to probe a
close tag and be rolled back), with or without drafting in big segments and big mode, some of them twice so the prefix cache serves them, arriving over
the first steps, in a pool from roomy to one that drops big views and preempts, with or without
overlapped steps, under injected faults: non-finite logits for one request, a forward pass that
raises (its whole batch fails), and aborts. After every step the scheduler's invariants hold; at
the end every page is back, each request that was not hit by a fault equals the oracle token for
token, and each one that was hit ended with an error or abort, with a prefix of the oracle's tokens.
A page of a failed request that another request still reads, or a cached page written while
shared, shows up here as wrong tokens for a request that never failed.
"""

from dataclasses import dataclass

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from properties import examples
from split_models import PAGE_BYTES, mixed_requests, params_for
from splitreason_engine import Engine


@dataclass
class Fault:
    kind: str  # "nan": one request's logits; "raise": a forward pass; "abort": the client
    model: int  # nan, raise: which model's runner
    target: int  # nan, abort: index of the request hit; raise: which call of that runner fails
    when: int  # nan: once the request has this many tokens; abort: at this step


@dataclass
class EngineWorkload:
    picks: list[int]  # indices into mixed_requests, repeats welcome (prefix-cache hits)
    arrivals: list[int]  # step each pick is added at
    pool_pages: int
    max_num_batched_tokens: int
    overlap: bool
    catch_up: str
    speculate: int  # drafts per big step in split and big mode (0: off)
    faults: list[Fault]


@st.composite
def engine_workloads(draw: st.DrawFn) -> EngineWorkload:
    # Few distinct requests, several copies each: copies of one greedy request write the same text,
    # so a later copy reads the earlier one's pages of generated text from the cache, and can roll
    # back (a probe) into a page that others hold.
    distinct = draw(st.lists(st.integers(0, 11), min_size=1, max_size=4, unique=True))
    picks = draw(st.lists(st.sampled_from(distinct), min_size=3, max_size=10))
    fault = st.builds(Fault, kind=st.sampled_from(["nan", "raise", "abort"]), model=st.integers(0, 1),
                      target=st.integers(0, 30), when=st.integers(0, 40))
    return EngineWorkload(
        picks=picks,
        arrivals=draw(st.lists(st.integers(0, 12), min_size=len(picks), max_size=len(picks))),
        # 24 pages hold one request at max_model_len in both views: drops and preemption are common.
        pool_pages=draw(st.sampled_from([24, 32, 64, 400])),
        max_num_batched_tokens=draw(st.sampled_from([24, 96, 2048])),
        overlap=draw(st.booleans()),
        catch_up=draw(st.sampled_from(["lazy", "eager"])),
        speculate=draw(st.sampled_from([0, 2, 5])),
        faults=draw(st.lists(fault, max_size=3)),
    )


def inject(engine: Engine, w: EngineWorkload, rids: list[int], hit: set[int]) -> None:
    """Wraps the runners: NaN logits for a chosen request, a chosen call that raises. Requests the
    faults reach go into `hit` (engine request ids)."""
    for m, runner in enumerate(engine.runners):
        execute, calls = runner.execute, [0]
        poison = {rids[f.target % len(rids)]: f.when for f in w.faults if f.kind == "nan" and f.model == m}
        raise_at = {f.target for f in w.faults if f.kind == "raise" and f.model == m}

        def faulty(num_seqs, *args, runner=runner, execute=execute, calls=calls, poison=poison, raise_at=raise_at):
            calls[0] += 1
            if calls[0] in raise_at:
                hit.update(runner.buffers["seq_request_ids"][:num_seqs].tolist())
                raise RuntimeError("injected forward fault")
            logits = execute(num_seqs, *args)
            sampled = runner.buffers["sample_request_ids"][:logits.shape[0]].tolist()
            for rid, when in poison.items():
                req = engine._requests.get(rid)
                if rid in sampled and req is not None and len(req.tokens) >= when:
                    logits[sampled.index(rid), 5] = float("nan")
                    hit.add(rid)
            return logits

        runner.execute = faulty


@settings(max_examples=examples(8), deadline=None)
@given(w=engine_workloads())
# Found by tests/fuzz.py: five copies of one greedy split request, drafting, preempted in a small pool;
# their big views recomputed together shared pages into a verify step's sampled tail.
@example(w=EngineWorkload(picks=[0] * 5, arrivals=[0] * 5, pool_pages=24, max_num_batched_tokens=96,
                          overlap=False, catch_up="lazy", speculate=2, faults=[]))
def test_random_workloads_with_faults_rollbacks_preemption_and_caching_match_the_oracle(pair, oracle, w):
    pool = mixed_requests(oracle)
    reqs = [pool[i] for i in w.picks]
    engine = Engine(*pair, kv_cache_bytes=w.pool_pages * PAGE_BYTES, max_model_len=256, catch_up=w.catch_up,
                    max_num_batched_tokens=w.max_num_batched_tokens, overlap=w.overlap, prefix_caching=True,
                    speculate=w.speculate, progress=False)
    live = {}  # request id -> the engine's Request, kept after it finishes
    hit: set[int] = set()
    aborts = {}
    for f in w.faults:
        if f.kind == "abort":
            aborts.setdefault(f.when, []).append(f.target % len(reqs))
    # Request ids are handed out in order of add_request; the faults name requests by index.
    order = sorted(range(len(reqs)), key=lambda i: (w.arrivals[i], i))
    rids = [engine.intake.next_id + order.index(i) for i in range(len(reqs))]
    inject(engine, w, rids, hit)
    step = 0
    while step <= max(w.arrivals) or engine.has_unfinished():
        for i in order:
            if w.arrivals[i] == step:
                assert engine.add_request(reqs[i].question, params_for(reqs[i])) == rids[i]
                live[rids[i]] = engine._requests[rids[i]]
        for i in aborts.get(step, []):
            if rids[i] in engine._requests:
                hit.add(rids[i])
                engine.abort(rids[i])
        engine.step()
        engine.scheduler.check_invariants()
        step += 1
        assert step < 3000, "the workload did not finish"

    # What this example reached (hypothesis --hypothesis-show-statistics lists the shares).
    stats = engine.stats.summary()
    for name, reached in (("preemption", engine.scheduler.num_preemptions), ("view drop", engine.scheduler.num_view_drops),
                          ("cache hit", stats["prefix_cache_hit_tokens_small"] + stats["prefix_cache_hit_tokens_big"]),
                          ("rollback", sum(r.metrics.rolled_back_tokens for r in live.values())),
                          ("step ahead", engine.stats.steps_ahead), ("fault hit", len(hit)),
                          ("draft", stats["draft_tokens"])):
        event(f"{name}: {'yes' if reached else 'no'}")
    assert engine.broken is None
    assert engine.scheduler.num_free_pages == engine.pool.num_pages
    assert engine.scheduler.num_running == engine.scheduler.num_waiting == 0
    for i, r in enumerate(reqs):
        out = live[rids[i]]
        tokens, writers = oracle.run(r)
        if out.finish_reason in ("error", "abort"):
            assert rids[i] in hit, f"request {i} ({r.mode}) ended with {out.finish_reason}: {out.error}"
            assert out.tokens == tokens[:len(out.tokens)], f"request {i} ({r.mode}) left the oracle before it failed"
        else:
            assert out.error is None and out.finish_reason in ("stop", "length")
            assert out.tokens == tokens, f"request {i} ({r.mode}) differs from the oracle"
            assert out.token_models == writers
