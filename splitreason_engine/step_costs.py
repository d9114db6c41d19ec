"""What one forward step of each model costs, as a function of its rows and tokens.

The co-scheduling policy decides from these costs whether gathering big-model work pays, and the
simulated clock charges them, so a policy can be developed on a CPU against a GPU's figures. They
come from timing the engine's own models at start-up, or from a calibration file (JSON, below).

A step costs `base + per_row * rows + per_token * (tokens - rows)`: `base` is what the step pays
whatever its size (reading the weights, launching kernels), `per_row` what each decoding row
adds, and `per_token` what each further prefill token adds. A weight-bound model has a `base` far
above `per_row`: one row costs about as much as many.
"""

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepCost:
    """Seconds of one forward step (sampling included) of one model."""

    base: float
    per_row: float
    per_token: float

    def __call__(self, rows: int, tokens: int) -> float:
        return self.base + self.per_row * rows + self.per_token * max(0, tokens - rows)


@dataclass(frozen=True)
class StepCosts:
    """One StepCost per model (index 0 small, 1 big) and where the figures come from."""

    models: tuple[StepCost, ...]
    source: str

    def step(self, model: int, rows: int, tokens: int) -> float:
        return self.models[model](rows, tokens)

    @classmethod
    def load(cls, path: "str | Path") -> "StepCosts":
        """Reads a calibration file: {"models": [{"base_ms", "per_row_ms", "per_token_ms"}, ...], ...}."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            models = tuple(StepCost(m["base_ms"] / 1e3, m["per_row_ms"] / 1e3, m["per_token_ms"] / 1e3)
                           for m in raw["models"])
        except FileNotFoundError:
            raise ValueError(f"step-cost file {path} does not exist") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"step-cost file {path} is not a calibration file ({type(e).__name__}: {e}); expected "
                             '{"models": [{"base_ms": ..., "per_row_ms": ..., "per_token_ms": ...}, ...]}') from None
        if not models or any(min(asdict(m).values()) < 0 for m in models):
            raise ValueError(f"step-cost file {path}: needs one entry per model with non-negative costs")
        return cls(models, str(path))

    def to_json(self) -> dict:
        return {"source": self.source,
                "models": [{"base_ms": 1e3 * m.base, "per_row_ms": 1e3 * m.per_row, "per_token_ms": 1e3 * m.per_token}
                           for m in self.models]}


def _fit(rows: list[int], tokens: list[int], seconds: list[float]) -> StepCost:
    """Least squares for (base, per_row, per_token), clipped at zero."""
    a = np.array([[1.0, r, t - r] for r, t in zip(rows, tokens)])
    coef = np.linalg.lstsq(a, np.array(seconds), rcond=None)[0]
    return StepCost(*(max(0.0, float(c)) for c in coef))


@torch.inference_mode()
def measure(runners, max_rows: int, max_tokens: int, repeats: int = 3) -> StepCosts:
    """Times each model's steps over padding rows (they read page 0 and write nothing): decodes of
    1 and up to 64 rows, and one prefill chunk of up to 256 tokens (`max_tokens`: the most one step
    and one position table allow); fits a StepCost per model. Decode steps replay the CUDA graph of
    their bucket where the runner has one, as serving does."""
    rows = max(2, min(64, max_rows))
    shapes = [(1, 1), (rows, rows), (1, max(2, min(256, max_tokens)))]
    costs = []
    start = time.perf_counter()
    for runner in runners:
        seconds = [min(_time(runner, r, t) for _ in range(repeats)) for r, t in shapes]
        costs.append(_fit(*zip(*shapes), seconds))
    logger.info("step costs measured in %.2f s: %s", time.perf_counter() - start, costs)
    return StepCosts(tuple(costs), "measured at start-up")


def _time(runner, rows: int, tokens: int) -> float:
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    _padding_step(runner, rows, tokens)
    sync()
    return time.perf_counter() - t


def _padding_step(runner, rows: int, tokens: int) -> None:
    """A step of `rows` sequences and `tokens` new tokens (decodes when equal, else one chunk),
    with every slot -1, so nothing is stored; logits for every sequence, as a step samples them.
    It is planned into the runner's step arrays and run as any step is (CUDA graph, staging, the
    other tensor-parallel ranks), before any request uses those arrays."""
    b, page_tokens = runner.buffers, runner.kv_caches[0][0].shape[1]
    decode = rows == tokens
    lens = [1] * rows if decode else [tokens]
    width = -(-tokens // page_tokens)
    b["input_ids"][:tokens] = 0
    b["positions"][:tokens] = 0 if decode else np.arange(tokens)
    b["slot_mapping"][:tokens] = -1
    b["query_start_loc"][: len(lens) + 1] = np.cumsum([0] + lens)
    b["seq_lens"][: len(lens)] = 0 if decode else tokens
    b["block_tables"][: len(lens) * runner.stride] = 0
    b["logits_indices"][: len(lens)] = np.cumsum(lens) - 1
    runner.execute(len(lens), tokens, rows if decode else 0, len(lens), width)


class WallClock:
    """Real time; forward steps cost what they take."""

    simulated = False

    def now(self) -> float:
        return time.perf_counter()

    def charge(self, model: int, rows: int, tokens: int) -> None:
        pass


class SimulatedClock:
    """Time that moves only by the step costs charged to it: the engine's real scheduling and
    protocol, timed as if each forward step took what `costs` says."""

    simulated = True

    def __init__(self, costs: StepCosts):
        self.costs, self.t = costs, 0.0

    def now(self) -> float:
        return self.t

    def charge(self, model: int, rows: int, tokens: int) -> None:
        self.t += self.costs.step(model, rows, tokens)
