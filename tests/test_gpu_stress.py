"""Stress checks of the kernels whose programs communicate (decode attention merges its splits, the
sampler its vocabulary chunks, both through atomic counters), as the GPU runs them: in any order,
concurrently, back to back and replayed from CUDA graphs.

  - decode attention on random batches (1-64), contexts (0-16k) and split counts (2-128), a fresh q
    every time, against the fp32 reference; no NaN, zero rows for empty contexts, counters back at 0;
  - launches back to back with no sync in between, each into its own output, checked afterwards;
  - four layers captured in one CUDA graph, replayed 100 times with new lengths and queries;
  - the sampler at 64 x 152k: greedy equals torch.argmax exactly; sampled rows (temperature,
    top-k, top-p) equal the reference except where the reference's own margin is within fp32
    rounding (two race scores, or the top-p cumulative mass at its crossing).

Marked gpu: bench/device_check.sh runs them first, with the other GPU tests (about a minute). The
same checks also run on the CPU at small sizes in Triton's interpreter (not the CUDA graph), so
CI tests the checks themselves.
"""

import random
from dataclasses import dataclass

import pytest
import torch

from properties import test_seed
from splitreason_engine.kernels import paged_attention_triton as pa
from splitreason_engine.kernels.paged_attention import paged_decode_attention_ref
from splitreason_engine.kernels.sample import GREEDY_BELOW, noise_uniform, sample_and_detect_ref
from splitreason_engine.kernels.sample_triton import sample_and_detect


@dataclass(frozen=True)
class Scale:
    device: str
    dtype: torch.dtype
    shapes: tuple  # (query heads, KV heads, head dim, page tokens)
    iterations: int
    max_batch: int
    max_len: int
    max_splits: int
    pages: int  # in the arena; sequences draw their pages from it at random (sharing is fine: reads only)
    tolerance: float  # relative error against the fp32 reference
    vocab: int
    rows: int


GPU = Scale("cuda", torch.bfloat16, ((12, 2, 128, 16), (40, 8, 128, 16), (28, 4, 128, 16)), iterations=60,
            max_batch=64, max_len=16384, max_splits=128, pages=4096, tolerance=1e-2, vocab=151936, rows=64)
CPU = Scale("cpu", torch.float32, ((4, 2, 16, 4), (6, 1, 32, 5)), iterations=3, max_batch=5, max_len=70,
            max_splits=9, pages=64, tolerance=1e-4, vocab=3000, rows=6)


@dataclass
class Layer:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k32: torch.Tensor  # fp32 copies for the reference
    v32: torch.Tensor


def make_layers(scale: Scale, shape: tuple, count: int, gen: torch.Generator) -> list[Layer]:
    """`count` layers' K/V views of one random arena laid out as KVPool's (pages of every layer)."""
    _, hkv, d, p = shape
    per_layer = 2 * p * hkv * d
    arena = torch.randn(scale.pages, count * per_layer + 8, generator=gen, device=scale.device).to(scale.dtype)
    view = arena[:, :count * per_layer].view(scale.pages, count, 2, p, hkv, d)
    return [Layer(view[:, i, 0], view[:, i, 1], view[:, i, 0].float(), view[:, i, 1].float()) for i in range(count)]


def random_step(scale: Scale, shape: tuple, rng: random.Random, gen: torch.Generator, batch: int):
    """(q, block_tables, seq_lens) of a random decode batch: some empty rows, some long ones."""
    hq, hkv, d, p = shape
    lengths = [rng.choice([0, rng.randint(1, scale.max_len), rng.randint(1, 4 * p), scale.max_len])
               for _ in range(batch)]
    width = max(1, -(-max(lengths) // p))
    tables = torch.randint(0, scale.pages, (batch, width), generator=gen, device=scale.device, dtype=torch.int32)
    q = torch.randn(batch, hq + hkv, d, generator=gen, device=scale.device).to(scale.dtype)[:, :hq]  # strided, as qkv
    return q, tables, torch.tensor(lengths, dtype=torch.int32, device=scale.device)


def reference(q: torch.Tensor, layer: Layer, tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    ref = paged_decode_attention_ref(q.float(), layer.k32, layer.v32, tables, seq_lens, q.shape[-1] ** -0.5)
    return torch.where((seq_lens > 0)[:, None, None], ref, 0.0)


def check(out: torch.Tensor, ref: torch.Tensor, seq_lens: torch.Tensor, scale: Scale, what: str) -> None:
    assert not out.isnan().any(), f"{what}: NaN"
    assert (out[seq_lens == 0] == 0).all(), f"{what}: an empty context's row is not zero"
    live = seq_lens > 0
    if live.any():
        err = float((out[live].float() - ref[live]).norm() / ref[live].norm().clamp_min(1e-30))
        assert err <= scale.tolerance, f"{what}: relative error {err:.2e}"


def counters_clear(device: str) -> None:
    assert (pa.decode_counters(1, torch.device(device)) == 0).all(), "a launch left its counters set"


def decode_random(scale: Scale, seed: int) -> None:
    rng, gen = random.Random(seed), torch.Generator(scale.device).manual_seed(seed)
    for shape in scale.shapes:
        (layer,) = make_layers(scale, shape, 1, gen)
        for i in range(scale.iterations):
            q, tables, seq_lens = random_step(scale, shape, rng, gen, rng.randint(1, scale.max_batch))
            splits = rng.randint(2, scale.max_splits)
            out = pa.paged_decode_attention(q, layer.k_cache, layer.v_cache, tables, seq_lens, q.shape[-1] ** -0.5,
                                            max_splits=splits, out=torch.full_like(q, float("nan")))
            check(out, reference(q, layer, tables, seq_lens), seq_lens, scale,
                  f"seed {seed}, shape {shape}, iteration {i}, splits {splits}, lengths {seq_lens.tolist()[:8]}")
        counters_clear(scale.device)


def back_to_back(scale: Scale, seed: int, launches: int = 12) -> None:
    rng, gen = random.Random(seed), torch.Generator(scale.device).manual_seed(seed)
    shape = scale.shapes[-1]
    (layer,) = make_layers(scale, shape, 1, gen)
    steps = [random_step(scale, shape, rng, gen, rng.randint(1, scale.max_batch)) for _ in range(launches)]
    outs = [pa.paged_decode_attention(q, layer.k_cache, layer.v_cache, tables, seq_lens, q.shape[-1] ** -0.5,
                                      max_splits=rng.randint(2, scale.max_splits))
            for q, tables, seq_lens in steps]  # queued without a sync
    for i, ((q, tables, seq_lens), out) in enumerate(zip(steps, outs)):
        check(out, reference(q, layer, tables, seq_lens), seq_lens, scale, f"seed {seed}, launch {i} of {launches}")
    counters_clear(scale.device)


def sampler(scale: Scale, seed: int) -> None:
    rng, gen = random.Random(seed), torch.Generator(scale.device).manual_seed(seed)
    n, vocab = scale.rows, scale.vocab
    real = vocab - 7
    logits = torch.randn(n, vocab, generator=gen, device=scale.device) * (1 + 3 * torch.rand(n, 1, generator=gen,
                                                                                          device=scale.device))
    kinds = [(0.0, 0, 1.0), (0.8, 0, 1.0), (1.0, 50, 1.0), (0.7, 0, 0.9), (1.2, 40, 0.8)]
    chosen = [kinds[i % len(kinds)] for i in range(n)]
    rng.shuffle(chosen)
    on = dict(device=scale.device)
    args = dict(logits=logits, temperature=torch.tensor([k[0] for k in chosen], **on),
                top_k=torch.tensor([k[1] for k in chosen], dtype=torch.int32, **on),
                top_p=torch.tensor([k[2] for k in chosen], **on),
                keys=torch.randint(0, 2**62, (n,), generator=gen, **on), real_vocab=real,
                det_states=torch.full((n,), -1, dtype=torch.int32, **on),
                next_state=torch.zeros(1, 1, dtype=torch.int32, **on),
                tag_flags=torch.zeros(1, 1, dtype=torch.uint8, **on),
                closing=torch.zeros(1, dtype=torch.bool, **on), stop_ids=torch.empty(n, 0, dtype=torch.int32, **on))
    ref_tokens = sample_and_detect_ref(**args)[0]
    tokens = sample_and_detect(**args)[0]
    greedy = args["temperature"] < GREEDY_BELOW
    argmax = logits[:, :real].argmax(dim=-1).to(torch.int32)
    assert torch.equal(tokens[greedy], argmax[greedy]), f"seed {seed}: greedy rows differ from torch.argmax"
    for row in (~greedy).nonzero().flatten().tolist():
        if tokens[row] != ref_tokens[row]:
            assert within_rounding(args, row, int(tokens[row])), (
                f"seed {seed}, row {row} {chosen[row]}: token {int(tokens[row])}, reference {int(ref_tokens[row])}, "
                "and the reference's margin is not within rounding")


def within_rounding(args: dict, row: int, token: int, eps: float = 1e-5) -> bool:
    """Whether `token` wins row's Gumbel race under some top-p threshold the reference's cumulative
    mass cannot tell apart from its own (the crossing within eps of top_p), up to eps in the scores."""
    x = args["logits"][row, :args["real_vocab"]].double()
    t, k, p = float(args["temperature"][row]), int(args["top_k"][row]), float(args["top_p"][row])
    values = x.sort(descending=True).values
    floor_k = values[k - 1] if 0 < k < len(values) else values.new_tensor(float("-inf"))
    floors = [floor_k]
    if p < 1:
        w = torch.where(values >= floor_k, torch.exp((values - values[0]) / t), 0.0)
        cum = w.cumsum(0)
        target = p * cum[-1]
        close = ((cum - target).abs() <= eps * cum[-1]).nonzero().flatten().tolist()
        crossings = {int((cum < target).sum()), *close, *(c + 1 for c in close)}
        floors = [torch.maximum(floor_k, values[min(c, len(values) - 1)]) for c in crossings]
    gumbel = -torch.log(-torch.log(noise_uniform(args["keys"][row:row + 1], len(x))[0].double()))
    for floor in floors:
        score = torch.where(x >= floor, x / t + gumbel, float("-inf"))
        best = score.max()
        if score[token] >= best - eps * (1 + best.abs()):
            return True
    return False


@pytest.mark.gpu
def test_decode_attention_random_batches_on_gpu():
    decode_random(GPU, test_seed())


@pytest.mark.gpu
def test_decode_attention_back_to_back_launches_on_gpu():
    back_to_back(GPU, test_seed(), launches=24)


@pytest.mark.gpu
def test_four_layers_in_one_cuda_graph_replayed_with_new_lengths():
    seed = test_seed()
    scale, rng, gen = GPU, random.Random(seed), torch.Generator("cuda").manual_seed(seed)
    shape, batch = scale.shapes[0], 32
    layers = make_layers(scale, shape, 4, gen)
    q, tables, seq_lens = random_step(scale, shape, rng, gen, batch)
    q = q.contiguous()
    tables = torch.randint(0, scale.pages, (batch, scale.max_len // shape[3]), generator=gen, device="cuda",
                           dtype=torch.int32)
    outs = [torch.empty_like(q) for _ in layers]

    def step():
        for layer, out in zip(layers, outs):
            pa.paged_decode_attention(q, layer.k_cache, layer.v_cache, tables, seq_lens, shape[2] ** -0.5, out=out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles and sizes the counters outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay in range(100):
        lengths = [rng.choice([0, rng.randint(1, scale.max_len), rng.randint(1, 64)]) for _ in range(batch)]
        seq_lens.copy_(torch.tensor(lengths, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen, device="cuda").to(q.dtype))
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        for i, (layer, out) in enumerate(zip(layers, outs)):
            check(out, reference(q, layer, tables, seq_lens), seq_lens, scale,
                  f"seed {seed}, replay {replay}, layer {i}")
    counters_clear("cuda")


@pytest.mark.gpu
def test_sampler_at_64_rows_of_152k():
    sampler(GPU, test_seed())


@pytest.mark.interpreter
def test_the_stress_checks_run_in_the_interpreter():
    """The same checks at small sizes on the CPU (the CUDA graph aside)."""
    seed = test_seed()
    decode_random(CPU, seed)
    back_to_back(CPU, seed, launches=3)
    sampler(CPU, seed)


def test_rounding_margin_accepts_the_winner_and_near_ties_only():
    g = torch.Generator().manual_seed(test_seed())
    n, vocab = 3, 500
    args = dict(logits=torch.randn(n, vocab, generator=g) * 2, temperature=torch.tensor([0.8, 0.9, 1.0]),
                top_k=torch.tensor([0, 20, 0], dtype=torch.int32), top_p=torch.tensor([1.0, 1.0, 0.6]),
                keys=torch.randint(0, 2**62, (n,), generator=g), real_vocab=vocab,
                det_states=torch.full((n,), -1, dtype=torch.int32), next_state=torch.zeros(1, 1, dtype=torch.int32),
                tag_flags=torch.zeros(1, 1, dtype=torch.uint8), closing=torch.zeros(1, dtype=torch.bool),
                stop_ids=torch.empty(n, 0, dtype=torch.int32))
    tokens = sample_and_detect_ref(**args)[0].tolist()
    for row, token in enumerate(tokens):
        assert within_rounding(args, row, token)
        others = [t for t in range(vocab) if t != token]
        assert not any(within_rounding(args, row, t) for t in others[:50])
    # A second token given the winner's exact race score (same logit, same noise) is a tie.
    row, token = 0, tokens[0]
    twin = next(t for t in range(vocab) if t != token)
    gumbel = -torch.log(-torch.log(noise_uniform(args["keys"][:1], vocab)[0].double()))
    t = float(args["temperature"][0])
    args["logits"][0, twin] = float((args["logits"][0, token] / t + gumbel[token] - gumbel[twin]) * t)
    assert within_rounding(args, row, twin)
