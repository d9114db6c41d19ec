"""The pybind boundary of the C++ core: junk in is a Python exception that names the problem.

Every bad argument (a wrong type, a wrong length, an unknown id, a model or page index out of
range, a negative count or token id, a token id outside int32) raises ValueError, IndexError,
TypeError or OverflowError, and a rejected call leaves the scheduler exactly as it was. The last
test throws random junk at a Scheduler and checks that it still keeps its invariants and still
schedules a good request. .ci/sanitize runs this file on an ASan + UBSan build of _C.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from properties import examples
from splitreason_engine import _C

IDLE, FG, BG = _C.RUN_IDLE, _C.RUN_FOREGROUND, _C.RUN_BACKGROUND
INT32_MAX = 2**31 - 1

# Two models; one request (id 0) with a model-0 prompt and an empty model-1 view.
CONFIG = dict(num_pages=16, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32, page_tokens=[4, 8])


def scheduler() -> _C.Scheduler:
    s = _C.Scheduler(**CONFIG)
    s.add_request(0, [[1, 2, 3, 4, 5], []], [FG, IDLE])
    return s


def snapshot(s: _C.Scheduler, ids) -> tuple:
    """Everything a call could change, as seen from Python."""
    views = {rid: [(s.request_tokens(rid, m), s.request_pages(rid, m), s.view_computed(rid, m), s.view_stats(rid, m))
                   for m in range(s.num_models)] for rid in ids if s.has_request(rid)}
    return (s.num_waiting, s.num_running, s.num_free_pages, s.num_preemptions, s.num_view_drops,
            s.counts().tolist(), views)


class BadIndex:
    def __index__(self):
        raise ZeroDivisionError("no index here")


# (what the call does wrong, the call, the exception, a regex its message must match)
SCHEDULER_CASES = [
    # wrong types in token lists
    ("float token ids", lambda s: s.add_request(1, [[1.0, 2.0], []], [FG, IDLE]), TypeError,
     r"views\[0\]\[0\] must be an int, got float"),
    ("numpy float64 prompt", lambda s: s.add_request(1, [np.array([1.0, 2.0]), []], [FG, IDLE]), TypeError,
     r"views\[0\]\[0\] must be an int, got numpy.float64"),
    ("numpy float32 prompt", lambda s: s.add_request(1, [np.ones(3, np.float32), []], [FG, IDLE]), TypeError,
     r"numpy.float32"),
    ("bool token id", lambda s: s.add_request(1, [[1, True], []], [FG, IDLE]), TypeError,
     r"views\[0\]\[1\] must be an int, got bool"),
    ("str as a view", lambda s: s.add_request(1, ["abc", []], [FG, IDLE]), TypeError,
     r"views\[0\] must be a sequence of ints, got str"),
    ("None as a view", lambda s: s.add_request(1, [None, []], [FG, IDLE]), TypeError,
     r"views\[0\] must be a sequence of ints, got NoneType"),
    ("int as views", lambda s: s.add_request(1, 5, [FG, IDLE]), TypeError, r"views must be a sequence"),
    ("2-D numpy prompt", lambda s: s.add_request(1, [np.ones((2, 2), np.int32), []], [FG, IDLE]), TypeError,
     r"views\[0\]\[0\] must be an int, got numpy.ndarray: only integer scalar arrays"),
    ("__index__ that raises", lambda s: s.append(0, 0, [1, BadIndex()]), ZeroDivisionError, r"no index here"),
    ("float run state", lambda s: s.add_request(1, [[1], []], [1.0, IDLE]), TypeError,
     r"runs\[0\] must be an int, got float"),
    ("float appended", lambda s: s.append(0, 0, [7.5]), TypeError, r"tokens\[0\] must be an int, got float"),
    ("numpy float array appended", lambda s: s.append(0, 0, np.array([7.0])), TypeError,
     r"tokens\[0\] must be an int, got numpy.float64"),
    ("int appended instead of a list", lambda s: s.append(0, 0, 7), TypeError,
     r"tokens must be a sequence of ints, got int"),
    ("str appended", lambda s: s.append(0, 0, "7"), TypeError, r"tokens must be a sequence of ints, got str"),
    ("bytes appended", lambda s: s.append(0, 0, b"\x07"), TypeError, r"got bytes"),
    # wrong lengths
    ("one view for two models", lambda s: s.add_request(1, [[1]], [FG, IDLE]), ValueError,
     r"1 views and 2 run states for 2 models"),
    ("three views for two models", lambda s: s.add_request(1, [[1], [], []], [FG, IDLE, IDLE]), ValueError,
     r"3 views and 3 run states for 2 models"),
    ("one run state for two models", lambda s: s.add_request(1, [[1], []], [FG]), ValueError,
     r"2 views and 1 run states"),
    ("prompt of max_model_len", lambda s: s.add_request(1, [[1] * 32, []], [FG, IDLE]), ValueError,
     r"max_model_len 32"),
    ("append past max_model_len", lambda s: s.append(0, 0, [1] * 28), ValueError, r"max_model_len 32"),
    ("truncate past the view's end", lambda s: s.truncate(0, 0, 6), ValueError,
     r"truncate: 6 is not within the view's 5 tokens"),
    # ids out of range
    ("duplicate request id", lambda s: s.add_request(0, [[1], []], [FG, IDLE]), ValueError, r"already exists"),
    ("negative request id", lambda s: s.add_request(-1, [[1], []], [FG, IDLE]), ValueError,
     r"negative request id -1"),
    ("request id beyond int64", lambda s: s.add_request(2**64, [[1], []], [FG, IDLE]), TypeError,
     r"incompatible function arguments"),
    ("append to an unknown request", lambda s: s.append(99, 0, [1]), IndexError, r"unknown request id 99"),
    ("truncate an unknown request", lambda s: s.truncate(99, 0, 0), IndexError, r"unknown request id 99"),
    ("set_run of an unknown request", lambda s: s.set_run(-5, 0, FG), IndexError, r"unknown request id -5"),
    ("view_size of an unknown request", lambda s: s.view_size(99, 0), IndexError, r"unknown request id 99"),
    ("view_computed of an unknown request", lambda s: s.view_computed(99, 0), IndexError, r"unknown request"),
    ("view_stats of an unknown request", lambda s: s.view_stats(99, 0), IndexError, r"unknown request"),
    ("request_pages of an unknown request", lambda s: s.request_pages(99, 0), IndexError, r"unknown request"),
    ("request_tokens of an unknown request", lambda s: s.request_tokens(99, 0), IndexError, r"unknown request"),
    *[(f"{name} of model {model}", call, IndexError, rf"model index {model} is out of range for 2 models")
      for model in (2, -1, INT32_MAX)
      for name, call in [
          ("append", lambda s, m=model: s.append(0, m, [1])),
          ("truncate", lambda s, m=model: s.truncate(0, m, 0)),
          ("set_run", lambda s, m=model: s.set_run(0, m, FG)),
          ("ready_rows", lambda s, m=model: s.ready_rows(m)),
          ("ready_requests", lambda s, m=model: s.ready_requests(m)),
          ("max_pages_per_seq", lambda s, m=model: s.max_pages_per_seq(m)),
          ("buffers", lambda s, m=model: s.buffers(m)),
          ("pages_held", lambda s, m=model: s.pages_held(m)),
          ("view_size", lambda s, m=model: s.view_size(0, m)),
          ("view_computed", lambda s, m=model: s.view_computed(0, m)),
          ("view_stats", lambda s, m=model: s.view_stats(0, m)),
          ("request_pages", lambda s, m=model: s.request_pages(0, m)),
          ("request_tokens", lambda s, m=model: s.request_tokens(0, m)),
      ]],
    ("model index beyond int32", lambda s: s.append(0, 2**31, [1]), TypeError, r"append\(\): incompatible"),
    # negative token ids and counts, bad run states
    ("negative token id in a prompt", lambda s: s.add_request(1, [[3, -1], []], [FG, IDLE]), ValueError,
     r"add_request: negative token id -1"),
    ("negative token id in a background view", lambda s: s.add_request(1, [[3], [-7]], [FG, BG]), ValueError,
     r"negative token id -7"),
    ("negative token id appended", lambda s: s.append(0, 1, [5, -2]), ValueError, r"append: negative token id -2"),
    ("negative numpy token id appended", lambda s: s.append(0, 0, np.array([-3], np.int64)), ValueError,
     r"negative token id -3"),
    ("truncate to a negative length", lambda s: s.truncate(0, 0, -1), ValueError, r"truncate: -1 is not within"),
    ("truncate to a length beyond int32", lambda s: s.truncate(0, 0, 2**31), TypeError, r"truncate\(\): incompatible"),
    ("run state 3", lambda s: s.set_run(0, 0, 3), ValueError, r"set_run: bad run state 3"),
    ("run state -1", lambda s: s.set_run(0, 0, -1), ValueError, r"set_run: bad run state -1"),
    ("run state 7 in add_request", lambda s: s.add_request(1, [[1], []], [7, IDLE]), ValueError,
     r"add_request: bad run state 7"),
    ("no foreground tokens", lambda s: s.add_request(1, [[], [1]], [FG, BG]), ValueError, r"no foreground view"),
    ("negative held_models", lambda s: s.schedule(-1), TypeError, r"schedule\(\): incompatible"),
    ("float held_models", lambda s: s.schedule(1.0), TypeError, r"schedule\(\): incompatible"),
    # token ids that do not fit in int32
    ("token id 2**31", lambda s: s.add_request(1, [[2**31], []], [FG, IDLE]), OverflowError,
     r"views\[0\]\[0\] = 2147483648 does not fit in int32"),
    ("token id -2**31 - 1", lambda s: s.add_request(1, [[1, -(2**31) - 1], []], [FG, IDLE]), OverflowError,
     r"views\[0\]\[1\] = -2147483649 does not fit in int32"),
    ("token id 2**80", lambda s: s.append(0, 0, [1, 2, 2**80]), OverflowError,
     r"tokens\[2\] = 1208925819614629174706176 does not fit in int32"),
    ("numpy int64 token id 2**40", lambda s: s.append(0, 0, np.array([2**40])), OverflowError,
     r"tokens\[0\] = 1099511627776 does not fit in int32"),
    ("numpy uint64 token id 2**63", lambda s: s.append(0, 0, np.array([2**63], np.uint64)), OverflowError,
     r"does not fit in int32"),
    ("run state 2**31", lambda s: s.add_request(1, [[1], []], [2**31, IDLE]), OverflowError,
     r"runs\[0\] = 2147483648 does not fit in int32"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in SCHEDULER_CASES],
                         ids=[c[0] for c in SCHEDULER_CASES])
def test_bad_scheduler_call_raises_and_changes_nothing(call, error, message):
    s = scheduler()
    s.schedule()
    before = snapshot(s, [0, 1])
    with pytest.raises(error, match=message):
        call(s)
    assert snapshot(s, [0, 1]) == before
    s.check_invariants()
    assert not s.has_request(1)


CONSTRUCTOR_CASES = [
    ("no pages", dict(num_pages=0), ValueError, r"num_pages must be positive, got 0"),
    ("negative pages", dict(num_pages=-1), ValueError, r"num_pages must be positive, got -1"),
    ("no seats", dict(max_num_seqs=0), ValueError, r"must be positive"),
    ("negative seats", dict(max_num_seqs=-3), ValueError, r"must be positive"),
    ("negative batch", dict(max_num_batched_tokens=-1), ValueError, r"must be positive"),
    ("negative max_model_len", dict(max_model_len=-16), ValueError, r"must be positive"),
    ("no models", dict(page_tokens=[]), ValueError, r"no models"),
    ("33 models", dict(num_pages=33 * 8, page_tokens=[4] * 33), ValueError, r"33 models, at most 32"),
    ("zero page_tokens", dict(page_tokens=[4, 0]), ValueError, r"page_tokens must be positive"),
    ("negative page_tokens", dict(page_tokens=[-4]), ValueError, r"page_tokens must be positive"),
    ("float page_tokens", dict(page_tokens=[4.0]), TypeError, r"page_tokens\[0\] must be an int, got float"),
    ("page_tokens beyond int32", dict(page_tokens=[2**31]), OverflowError, r"page_tokens\[0\] = 2147483648"),
    ("page_tokens not a list", dict(page_tokens=4), TypeError, r"page_tokens must be a sequence of ints"),
    ("num_pages beyond int32", dict(num_pages=2**31), TypeError, r"incompatible constructor arguments"),
    # ceil(max_model_len / page_tokens) once overflowed int32 on the way (UBSan found it).
    ("max_model_len INT32_MAX", dict(max_model_len=INT32_MAX, page_tokens=[16]), ValueError,
     r"cannot hold one request of max_model_len 2147483647 .*needs 134217728\)"),
    ("slots beyond int32", dict(num_pages=1 << 20, page_tokens=[1 << 12]), ValueError,
     r"1048576 pages of 4096 tokens have more slots than int32 can address"),
]


@pytest.mark.parametrize("overrides, error, message", [c[1:] for c in CONSTRUCTOR_CASES],
                         ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_bad_scheduler_config_raises(overrides, error, message):
    with pytest.raises(error, match=message):
        _C.Scheduler(**{**CONFIG, **overrides})


ALLOCATOR_CASES = [
    ("refcount of page -1", lambda a: a.refcount(-1), IndexError, r"page id -1 is out of range for 4 pages"),
    ("refcount of page 4", lambda a: a.refcount(4), IndexError, r"page id 4 is out of range for 4 pages"),
    ("retain of page 4", lambda a: a.retain(4), IndexError, r"page id 4 is out of range"),
    ("retain of page -2", lambda a: a.retain(-2), IndexError, r"page id -2 is out of range"),
    ("release of page 100", lambda a: a.release(100), IndexError, r"page id 100 is out of range"),
    ("release of page INT32_MAX", lambda a: a.release(INT32_MAX), IndexError, r"page id 2147483647 is out of range"),
    ("release of page -1", lambda a: a.release(-1), IndexError, r"page id -1 is out of range"),
    ("allocate(-1)", lambda a: a.allocate(-1), ValueError, r"allocate: negative page count -1"),
    ("allocate of -2**31 pages", lambda a: a.allocate(-(2**31)), ValueError, r"negative page count -2147483648"),
    ("allocate beyond int32", lambda a: a.allocate(2**31), TypeError, r"allocate\(\): incompatible"),
    ("allocate a float", lambda a: a.allocate(1.0), TypeError, r"allocate\(\): incompatible"),
    ("release of a free page", lambda a: a.release(3), RuntimeError, r"release of free page 3"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in ALLOCATOR_CASES],
                         ids=[c[0] for c in ALLOCATOR_CASES])
def test_bad_page_allocator_call_raises_and_changes_nothing(call, error, message):
    a = _C.PageAllocator(4)
    assert a.allocate(2) == [0, 1]
    with pytest.raises(error, match=message):
        call(a)
    assert a.num_free == 2 and [a.refcount(p) for p in range(4)] == [1, 1, 0, 0]


@pytest.mark.parametrize("num_pages, error", [(0, ValueError), (-1, ValueError), (-(2**31), ValueError),
                                              (2**31, TypeError), (1.5, TypeError)])
def test_bad_page_allocator_size_raises(num_pages, error):
    with pytest.raises(error, match="num_pages"):
        _C.PageAllocator(num_pages)


def test_integer_sequences_of_any_kind_are_token_lists():
    """Tuples, numpy integer arrays and numpy integer scalars are fine: only the values matter."""
    s = _C.Scheduler(**CONFIG)
    s.add_request(0, (np.array([1, 2], np.int32), np.array([], np.int64)), np.array([FG, IDLE], np.uint8))
    s.append(0, 0, (np.int64(3), np.uint16(4), 5))
    s.append(0, 1, np.arange(3, dtype=np.int16))
    s.append(0, 1, [])
    s.append(0, 0, [INT32_MAX, 0])
    assert s.request_tokens(0, 0) == [1, 2, 3, 4, 5, INT32_MAX, 0]
    assert s.request_tokens(0, 1) == [0, 1, 2]
    s.schedule(np.uint32(0))
    assert s.counts()[0] == 1
    assert not s.finish(12345) and not s.finish(-1)  # unknown ids are not an error for finish
    s.check_invariants()


def test_an_index_method_that_empties_the_list_under_conversion():
    """Conversion calls back into Python for non-int items; the list it reads may change then."""
    tokens = []

    class Shrinking:
        def __index__(self):
            tokens.clear()
            return 7

    tokens.extend([Shrinking(), 1, 2, 3])
    s = scheduler()
    s.append(0, 0, tokens)  # what was there when read: the list ends after the first item
    assert s.request_tokens(0, 0) == [1, 2, 3, 4, 5, 7]
    s.check_invariants()


# ---- random junk ---------------------------------------------------------------------------------

def junk_tokens():
    ints = st.integers(-3, 40)
    return st.one_of(
        st.lists(ints, max_size=12),
        st.lists(ints, max_size=6).map(lambda t: np.array(t, np.int64)),
        st.lists(st.floats(allow_nan=True), min_size=1, max_size=3),
        st.lists(st.integers(-(2**70), 2**70), min_size=1, max_size=3),
        st.lists(st.one_of(ints, st.booleans(), st.none(), st.text(max_size=2)), min_size=1, max_size=4),
        st.none(), st.integers(), st.text(max_size=4), st.just(np.zeros((2, 2), np.int32)),
    )


def junk_int(lo: int, hi: int):
    # [lo, hi] twice: mostly near the valid range, the rest any junk.
    return st.one_of(st.integers(lo, hi), st.integers(lo, hi), st.integers(), st.floats(allow_nan=False),
                     st.none(), st.sampled_from([2**31, -(2**31) - 1, 2**63, 2**64]))


REQUEST_IDS = st.one_of(st.integers(-2, 8), st.sampled_from([2**63 - 1, -(2**63), 2**64]), st.floats())
MODELS = junk_int(-2, 3)


def operations():
    per_model = [st.tuples(st.just(name), MODELS)
                 for name in ("ready_rows", "ready_requests", "pages_held", "buffers", "max_pages_per_seq")]
    per_view = [st.tuples(st.just(name), REQUEST_IDS, MODELS)
                for name in ("view_size", "view_computed", "view_stats", "request_pages", "request_tokens")]
    # Good calls too, so that the junk lands on a scheduler with requests, pages and plans.
    good_ids, good_models, good_tokens = st.integers(0, 3), st.integers(0, 1), st.lists(st.integers(0, 40), max_size=6)
    good = [
        st.tuples(st.just("add_request"), good_ids,
                  st.tuples(st.lists(st.integers(0, 40), min_size=1, max_size=15), good_tokens).map(list),
                  st.tuples(st.sampled_from([FG, FG, IDLE]), st.sampled_from([IDLE, FG, BG])).map(list)),
        st.tuples(st.just("append"), good_ids, good_models, good_tokens),
        st.tuples(st.just("truncate"), good_ids, good_models, st.integers(0, 12)),
        st.tuples(st.just("set_run"), good_ids, good_models, st.sampled_from([IDLE, FG, BG])),
        st.tuples(st.just("schedule"), st.integers(0, 3)),
    ]
    junk = [
        st.tuples(st.just("add_request"), REQUEST_IDS,
                  st.one_of(st.lists(junk_tokens(), max_size=3), junk_tokens()),
                  st.one_of(st.lists(junk_int(-1, 3), max_size=3), junk_tokens())),
        st.tuples(st.just("append"), REQUEST_IDS, MODELS, junk_tokens()),
        st.tuples(st.just("truncate"), REQUEST_IDS, MODELS, junk_int(-3, 40)),
        st.tuples(st.just("set_run"), REQUEST_IDS, MODELS, junk_int(-1, 3)),
        st.tuples(st.just("finish"), REQUEST_IDS),
        st.tuples(st.just("schedule"), junk_int(0, 3)),
        *per_model, *per_view,
    ]
    return st.one_of(st.one_of(*good), st.one_of(*junk))  # half good, half junk


def busy_scheduler() -> _C.Scheduler:
    """Three requests in both models, the pool short: the junk lands on requests with pages and
    plans, and good calls that follow preempt and drop views."""
    # 6 pages hold one request at max_model_len (4 + 2 pages), no more.
    s = _C.Scheduler(num_pages=6, max_num_seqs=3, max_num_batched_tokens=8, max_model_len=16, page_tokens=[4, 8])
    s.add_request(0, [list(range(12)), [1] * 5], [FG, BG])
    s.add_request(1, [[2] * 7, []], [FG, IDLE])
    s.add_request(2, [[], [3] * 9], [IDLE, FG])
    for _ in range(3):
        s.schedule()
    return s


REJECTED = (ValueError, IndexError, TypeError, OverflowError)
IDS = [*range(-2, 9), 2**63 - 1]  # every id an add_request above can accept


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operations(), min_size=30, max_size=80))
def test_random_junk_leaves_a_working_scheduler(ops):
    s = busy_scheduler()
    for name, *args in ops:
        before = snapshot(s, IDS)
        try:
            result = getattr(s, name)(*args)
        except REJECTED:
            assert snapshot(s, IDS) == before, f"a rejected {name}{tuple(args)} changed the scheduler"
        else:
            if name == "append":
                rid, m, tokens = args
                assert s.request_tokens(rid, m) == before[-1][rid][m][0] + [int(t) for t in tokens]
            elif name == "truncate":
                rid, m, n = args
                assert s.request_tokens(rid, m) == before[-1][rid][m][0][:n]
            elif name == "finish":
                assert result == (args[0] in before[-1]) and not s.has_request(args[0])
        s.check_invariants()

    # Whatever it was thrown, the scheduler lets every request go, gets every page back, and
    # schedules a good request as it should.
    for rid in IDS:
        s.finish(rid)
    s.check_invariants()
    assert (s.num_running, s.num_waiting, s.num_free_pages) == (0, 0, 6)
    s.add_request(100, [[5, 6, 7], [8]], [FG, BG])
    s.schedule()
    counts = s.counts().reshape(s.num_models, _C.NUM_COUNT_FIELDS)
    assert counts[:, :4].tolist() == [[1, 3, 0, 1], [1, 1, 1, 0]]  # seqs, tokens, decodes, samples
    small, big = s.buffers(0), s.buffers(1)
    assert small["input_ids"][:3].tolist() == [5, 6, 7] and small["positions"][:3].tolist() == [0, 1, 2]
    assert small["sample_request_ids"][0] == 100 and small["logits_indices"][0] == 2
    assert big["input_ids"][0] == 8 and big["seq_request_ids"][0] == 100
    assert s.view_computed(100, 0) == 3 and s.view_computed(100, 1) == 1
    s.check_invariants()
