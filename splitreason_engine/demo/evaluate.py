"""`splitreason eval-demo`: accuracy, offload fraction and wall time of the demo pair per mode.

Every mode answers the same held-out problems, greedy. `small` and `big` get the prompt each
model was trained on (the small one with the tag hint); `split` and `random` get the question,
templated by the engine. Random mode's switch_ratio is set from split's measured offload fraction,
so both hand the same share of tokens to the big model.
"""

import time
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from ..engine import Engine
from ..machine import machine, machine_line
from ..sampling import SamplingParams
from .task import Problem, evaluation_problems, is_correct

MODES = ("small", "big", "split", "random")


@dataclass
class ModeResult:
    mode: str
    accuracy: float
    offload_fraction: float
    wall_s: float
    generated_tokens: int
    big_tokens: int
    handoffs: int
    switch_ratio: "float | None" = None

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s


def prompt_for(engine: Engine, mode: str, problem: Problem) -> str:
    if mode == "small":
        return engine.template.small(problem.question)
    if mode == "big":
        return engine.template.big(problem.question)
    return problem.question


def run_mode(engine: Engine, mode: str, problems: list[Problem], batch_size: int, max_tokens: int,
             switch_ratio: float = 9.0, seed: int = 0, progress: bool = True) -> ModeResult:
    """Answers `problems` in batches of `batch_size` requests (1: one problem at a time)."""
    correct = generated = big = handoffs = 0
    start = time.perf_counter()
    with tqdm(total=len(problems), desc=mode, unit="problem", disable=not progress) as bar:
        for i in range(0, len(problems), batch_size):
            chunk = problems[i:i + batch_size]
            # Each problem its own seed: random mode's chunk draws differ from problem to problem.
            params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, mode=mode, switch_ratio=switch_ratio,
                                     seed=seed * 1_000_003 + i + j) for j in range(len(chunk))]
            outputs = engine.generate([prompt_for(engine, mode, p) for p in chunk], params, use_tqdm=False)
            for problem, out in zip(chunk, outputs):
                if out.error:
                    raise RuntimeError(f"{mode}: {out.error}")
                correct += is_correct(problem, out.text)
                generated += len(out.token_ids)
                big += out.metrics.big_tokens
                handoffs += out.metrics.handoffs
            bar.update(len(chunk))
    wall = time.perf_counter() - start
    return ModeResult(mode, correct / len(problems), big / max(generated, 1), wall, generated, big, handoffs,
                      switch_ratio if mode == "random" else None)


def evaluate(engine: Engine, num_problems: int, seed: int, batch_size: int = 1, max_tokens: int = 400,
             modes=MODES, progress: bool = True) -> dict[str, ModeResult]:
    """Split runs before random, whose switch_ratio comes from split's offload fraction.

    The modes answer the same problems one after another, so `engine` must run with the prefix
    cache off: with it on, a later mode would find an earlier one's prompts (split's small view is
    small mode's prompt) and its wall time would not compare."""
    if engine.scheduler.prefix_caching:
        raise ValueError("the demo evaluation compares wall times of modes that share prompts: "
                         "run its engine with prefix_caching=False")
    problems = evaluation_problems(num_problems, seed)
    order = sorted(modes, key=lambda m: m == "random")
    results: dict[str, ModeResult] = {}
    for mode in order:
        ratio = 9.0
        if mode == "random" and "split" in results and results["split"].offload_fraction > 0:
            ratio = 1.0 / results["split"].offload_fraction - 1.0
        results[mode] = run_mode(engine, mode, problems, batch_size, max_tokens, ratio, seed, progress)
    return {m: results[m] for m in modes}


def table(results: dict[str, ModeResult]) -> str:
    lines = [f"{'mode':<8}{'accuracy':>10}{'offload':>10}{'big tok':>9}{'tokens':>9}{'handoffs':>10}"
             f"{'wall s':>9}{'tok/s':>8}"]
    for r in results.values():
        lines.append(f"{r.mode:<8}{r.accuracy:>10.3f}{r.offload_fraction:>10.3f}{r.big_tokens:>9}"
                     f"{r.generated_tokens:>9}{r.handoffs:>10}{r.wall_s:>9.1f}{r.tokens_per_s:>8.0f}")
    return "\n".join(lines)


def targets(results: dict[str, ModeResult]) -> list[tuple[str, bool, str]]:
    """The demo pair's targets (issue 5) that these results can check: (name, met, figures)."""
    r = results
    checks = []
    if {"small", "big"} <= r.keys():
        gap = r["big"].accuracy - r["small"].accuracy
        checks.append(("big accuracy >= small + 0.30", gap >= 0.30, f"gap {gap:+.3f}"))
    if {"small", "split"} <= r.keys():
        gap = r["split"].accuracy - r["small"].accuracy
        checks.append(("split accuracy >= small + 0.20", gap >= 0.20, f"gap {gap:+.3f}"))
        off = r["split"].offload_fraction
        checks.append(("split offload <= 0.15", off <= 0.15, f"{off:.3f}"))
    if {"split", "random"} <= r.keys():
        gap = r["split"].accuracy - r["random"].accuracy
        checks.append(("split accuracy > random at the same offload", gap > 0,
                       f"gap {gap:+.3f} (offload {r['split'].offload_fraction:.3f} vs {r['random'].offload_fraction:.3f})"))
    if {"split", "big"} <= r.keys():
        ratio = r["split"].wall_s / r["big"].wall_s
        checks.append(("split wall <= 0.5 x big wall", ratio <= 0.5, f"{ratio:.3f}"))
    return checks


def report(results: dict[str, ModeResult], num_problems: int, seed: int, batch_size: int) -> tuple[str, dict]:
    """The printed report (machine, table, target checks) and its JSON: one object per mode."""
    host = machine()
    checks = targets(results)
    lines = [machine_line(host), f"{num_problems} held-out problems, seed {seed}, batch size {batch_size}, greedy, "
             "prefix cache off",
             table(results)] + [f"target {name}: {'meets' if met else 'MISSES'} ({figures})" for name, met, figures in checks]
    payload = {"machine": host, "problems": num_problems, "seed": seed, "batch_size": batch_size, "prefix_caching": False,
               "modes": {mode: {**asdict(r), "tokens_per_s": r.tokens_per_s} for mode, r in results.items()},
               "targets": [{"target": name, "met": met, "figures": figures} for name, met, figures in checks]}
    return "\n".join(lines), payload
