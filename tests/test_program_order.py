"""tests/program_order.py really reorders an interpreted launch's programs."""

import pytest
import torch

from program_order import grid_order

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = pytest.mark.interpreter


@triton.jit
def _record_visit(order_ptr, counter_ptr):
    slot = tl.atomic_add(counter_ptr, 1)
    tl.store(order_ptr + slot, tl.program_id(0) * 4 + tl.program_id(1))


def visits(order: "str | None") -> list[int]:
    out, counter = torch.full((12,), -1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    if order is None:
        _record_visit[(3, 4)](out, counter)
    else:
        with grid_order(order, seed=5):
            _record_visit[(3, 4)](out, counter)
    return out.tolist()


def test_programs_run_in_the_order_asked_for():
    assert visits(None) == visits("forward") == list(range(12))
    assert visits("reversed") == list(range(11, -1, -1))
    shuffled = visits("shuffled")
    assert sorted(shuffled) == list(range(12)) and shuffled != list(range(12))
    assert visits(None) == list(range(12))  # the interpreter is itself again afterwards
    with pytest.raises(ValueError, match="order must be one of"):
        with grid_order("sideways"):
            pass
