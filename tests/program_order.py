"""Runs the programs of an interpreted Triton launch in another order than the grid's.

Triton's interpreter runs a launch's programs one after another in grid order (x, then y, then z),
so a kernel whose programs communicate (the last split of decode attention merges the others'
partials; the last vocabulary chunk of the sampler merges the rows' statistics) always finds every
partial written before the merging program runs, whatever the kernel's counter logic does. On a GPU
the programs run in any order and concurrently. `grid_order` makes the interpreter visit them in
reversed or shuffled order instead: the program whose counter reaches the end is then some other
one, and a merge that assumes an order shows up as a wrong result on the CPU.
"""

import contextlib
import random

ORDERS = ("forward", "reversed", "shuffled")


@contextlib.contextmanager
def grid_order(order: str, seed: int = 0):
    """Within the block, every interpreted launch runs its programs in `order`."""
    from triton.runtime import interpreter

    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    builder = interpreter.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    rng = random.Random(seed)
    state = {"programs": [], "next": 0}

    def set_grid_dim(x, y, z):
        programs = [(i, j, k) for i in range(x) for j in range(y) for k in range(z)]
        if order == "reversed":
            programs.reverse()
        elif order == "shuffled":
            rng.shuffle(programs)
        state["programs"], state["next"] = programs, 0
        return set_dim(x, y, z)

    def set_grid_idx(x, y, z):  # called once per program, in grid order: hand out the permuted one
        program = state["programs"][state["next"]]
        state["next"] += 1
        return set_idx(*program)

    builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx
    try:
        yield
    finally:
        builder.set_grid_dim, builder.set_grid_idx = set_dim, set_idx
