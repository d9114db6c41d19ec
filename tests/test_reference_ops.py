"""The PyTorch reference ops in kernels/ against independent naive implementations.

Attention is checked against dense per-sequence attention computed in float64 from contiguous
K/V; the paged caches are built by scattering that K/V onto randomly permuted pages, with the
unused slots and block-table padding full of large garbage that must never be read.
RoPE and RMSNorm are checked against Hugging Face's Qwen2 modules.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, Qwen2RotaryEmbedding, apply_rotary_pos_emb

from splitreason_engine.kernels import (add_rms_norm_ref, paged_decode_attention_ref, paged_extend_attention_ref,
                                        rms_norm_ref, rope_cos_sin, rope_store_kv_ref, silu_and_mul_ref)

ATOL = RTOL = 1e-5

# (query heads, kv heads, head dim): GQA ratios 1, 5, 6, 8.
HEADS = [(4, 4, 32), (10, 2, 16), (6, 1, 24), (16, 2, 8)]
PAGE_TOKENS = [5, 16]


def boundary_lengths(page_tokens: int, batch: int, gen: torch.Generator, low: int = 1) -> list[int]:
    """Lengths exactly on and just past page boundaries (and a few random ones), at least `low`."""
    p = page_tokens
    base = [1, p - 1, p, p + 1, 2 * p, 2 * p + 1, 3 * p - 1, 3 * p, 4 * p + 3]
    base = [n for n in base if n >= low]
    if batch == 1:
        return [3 * p + 1]
    out = base[:batch]
    while len(out) < batch:
        out.append(int(torch.randint(low, 5 * p, (1,), generator=gen)))
    perm = torch.randperm(len(out), generator=gen).tolist()
    return [out[i] for i in perm]


def build_paged(keys: list[torch.Tensor], values: list[torch.Tensor], page_tokens: int, gen: torch.Generator,
                extra_pages: int = 3, extra_width: int = 2):
    """Scatters per-sequence K/V ([L_i, Hkv, D]) into paged caches on a random page permutation.

    Returns (k_cache, v_cache, block_tables): every slot not holding a sequence token, and every
    block-table entry past a sequence's last page, points at large garbage.
    """
    hkv, d = keys[0].shape[1], keys[0].shape[2]
    pages_per_seq = [math.ceil(k.shape[0] / page_tokens) for k in keys]
    total = sum(pages_per_seq) + extra_pages
    k_cache = 1e3 * torch.randn(total, page_tokens, hkv, d, generator=gen)
    v_cache = 1e3 * torch.randn(total, page_tokens, hkv, d, generator=gen)
    perm = torch.randperm(total, generator=gen)
    width = max(pages_per_seq) + extra_width
    # Padding entries point at random pages (some of them other sequences' pages).
    block_tables = torch.randint(0, total, (len(keys), width), generator=gen, dtype=torch.int32)
    cursor = 0
    for i, (k, v) in enumerate(zip(keys, values)):
        pages = perm[cursor:cursor + pages_per_seq[i]]
        cursor += pages_per_seq[i]
        block_tables[i, :len(pages)] = pages.to(torch.int32)
        for t in range(k.shape[0]):
            page, off = int(pages[t // page_tokens]), t % page_tokens
            k_cache[page, off] = k[t]
            v_cache[page, off] = v[t]
    return k_cache, v_cache, block_tables


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: list[int], scale: float):
    """q [n, Hq, D] at `positions` attending causally to k, v [L, Hkv, D]; float64, loop over heads."""
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    out = torch.empty(q.shape, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    for j, pos in enumerate(positions):
        for h in range(hq):
            kv = h // group  # query head h reads kv head h // group (HF repeat_kv layout)
            scores = (k[: pos + 1, kv] @ q[j, h]) * scale
            probs = torch.softmax(scores, dim=0)
            out[j, h] = probs @ v[: pos + 1, kv]
    return out


@pytest.mark.parametrize("page_tokens", PAGE_TOKENS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("batch", [1, 9])
def test_paged_decode_attention_matches_dense(page_tokens, heads, batch):
    torch.manual_seed(1000 * page_tokens + 10 * heads[0] + batch)
    gen = torch.Generator().manual_seed(1000 * page_tokens + 10 * heads[0] + batch)
    hq, hkv, d = heads
    lengths = boundary_lengths(page_tokens, batch, gen)
    keys = [torch.randn(n, hkv, d, generator=gen) for n in lengths]
    values = [torch.randn(n, hkv, d, generator=gen) for n in lengths]
    q = torch.randn(batch, hq, d, generator=gen)
    k_cache, v_cache, block_tables = build_paged(keys, values, page_tokens, gen)
    scale = d ** -0.5
    out = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, torch.tensor(lengths, dtype=torch.int32), scale)
    assert out.shape == q.shape and out.dtype == torch.float32
    for i, n in enumerate(lengths):
        expected = naive_attention(q[i:i + 1], keys[i], values[i], [n - 1], scale)
        torch.testing.assert_close(out[i:i + 1].double(), expected, atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"sequence {i} (length {n}): {m}")


@pytest.mark.parametrize("page_tokens", PAGE_TOKENS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("batch", [1, 8])
def test_paged_extend_attention_matches_dense(page_tokens, heads, batch):
    """Chunks of new tokens attending causally to a cached prefix (empty or not) and to themselves."""
    seed = 7000 + 1000 * page_tokens + 10 * heads[0] + batch
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d = heads
    p = page_tokens
    if batch == 1:
        prefixes, chunks = [2 * p], [p + 1]  # the prefix ends exactly on a page boundary
    else:
        # (cached prefix, new chunk): no prefix, prefix on / just past a boundary, a chunk that
        # crosses a boundary, single-token chunks, a chunk ending exactly on a boundary.
        pairs = [(0, 1), (0, 2 * p + 1), (p, 1), (p, p), (p + 1, p - 1), (2 * p - 1, 2), (3, 3 * p), (2 * p, 1)]
        perm = torch.randperm(len(pairs), generator=gen).tolist()
        prefixes, chunks = zip(*[pairs[i] for i in perm])
    lengths = [c + n for c, n in zip(prefixes, chunks)]
    keys = [torch.randn(n, hkv, d, generator=gen) for n in lengths]
    values = [torch.randn(n, hkv, d, generator=gen) for n in lengths]
    k_cache, v_cache, block_tables = build_paged(keys, values, page_tokens, gen)
    q = torch.randn(sum(chunks), hq, d, generator=gen)
    starts = [0]
    for n in chunks:
        starts.append(starts[-1] + n)
    scale = 0.7 * d ** -0.5
    out = paged_extend_attention_ref(q, k_cache, v_cache, block_tables, torch.tensor(starts, dtype=torch.int32),
                                     torch.tensor(lengths, dtype=torch.int32), scale)
    assert out.shape == q.shape and out.dtype == torch.float32
    for i, (c, n) in enumerate(zip(prefixes, chunks)):
        s, e = starts[i], starts[i + 1]
        expected = naive_attention(q[s:e], keys[i], values[i], list(range(c, c + n)), scale)
        torch.testing.assert_close(out[s:e].double(), expected, atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"sequence {i} (prefix {c}, chunk {n}): {m}")


@pytest.mark.parametrize("page_tokens", PAGE_TOKENS)
@pytest.mark.parametrize("heads", HEADS[:3], ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
def test_extend_of_single_tokens_equals_decode(page_tokens, heads):
    """A batch of one-token chunks through extend gives what decode gives."""
    gen = torch.Generator().manual_seed(31 + page_tokens + heads[0])
    torch.manual_seed(31 + page_tokens + heads[0])
    hq, hkv, d = heads
    lengths = boundary_lengths(page_tokens, 9, gen)
    keys = [torch.randn(n, hkv, d, generator=gen) for n in lengths]
    values = [torch.randn(n, hkv, d, generator=gen) for n in lengths]
    k_cache, v_cache, block_tables = build_paged(keys, values, page_tokens, gen)
    q = torch.randn(len(lengths), hq, d, generator=gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    dec = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, d ** -0.5)
    ext = paged_extend_attention_ref(q, k_cache, v_cache, block_tables,
                                     torch.arange(len(lengths) + 1, dtype=torch.int32), seq_lens, d ** -0.5)
    torch.testing.assert_close(ext, dec, atol=ATOL, rtol=RTOL)


# ---- rope + KV store ----------------------------------------------------------------------------

def hf_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, head_dim: int, theta: float,
            num_heads: int, num_kv_heads: int):
    """q [N, Hq, D], k [N, Hkv, D] rotated by Hugging Face's Qwen2 rotary embedding."""
    config = Qwen2Config(hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, head_dim=head_dim, rope_theta=theta,
                         max_position_embeddings=8192)
    rotary = Qwen2RotaryEmbedding(config)
    qh, kh = q.transpose(0, 1)[None], k.transpose(0, 1)[None]  # [1, H, N, D]
    cos, sin = rotary(qh, positions[None].long())
    qr, kr = apply_rotary_pos_emb(qh, kh, cos, sin)
    return qr[0].transpose(0, 1), kr[0].transpose(0, 1)


@pytest.mark.parametrize("theta", [1e4, 1e6])
@pytest.mark.parametrize("heads", [(4, 4, 64), (6, 1, 20), (8, 2, 128)], ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("page_tokens", PAGE_TOKENS)
def test_rope_store_kv_matches_hf_and_writes_slots(theta, heads, page_tokens):
    seed = int(math.log10(theta)) * 100 + heads[0] + page_tokens
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d = heads
    max_positions, num_pages, n = 4096, 12, 23
    q = torch.randn(n, hq, d, generator=gen)
    k = torch.randn(n, hkv, d, generator=gen)
    v = torch.randn(n, hkv, d, generator=gen)
    positions = torch.cat([torch.tensor([0, 1, max_positions - 1]),
                           torch.randint(0, max_positions, (n - 3,), generator=gen)]).to(torch.int32)
    slots = torch.randperm(num_pages * page_tokens, generator=gen)[:n].to(torch.int32)
    slots[[2, 5, 11]] = -1  # padding rows: not stored
    k_cache = torch.randn(num_pages, page_tokens, hkv, d, generator=gen)
    v_cache = torch.randn(num_pages, page_tokens, hkv, d, generator=gen)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q_in, k_in, v_in = q.clone(), k.clone(), v.clone()

    cos_sin = rope_cos_sin(d, max_positions, theta, torch.float32, "cpu")
    q_rot, k_rot = rope_store_kv_ref(torch.cat([q, k], dim=1), v, cos_sin[positions], k_cache, v_cache, slots)

    q_hf, k_hf = hf_rope(q_in, k_in, positions, d, theta, hq, hkv)
    torch.testing.assert_close(q_rot, q_hf, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(k_rot, k_hf, atol=ATOL, rtol=RTOL)

    # The cache holds the rotated K and the unrotated V at each valid slot, nothing anywhere else.
    exp_k, exp_v = k_before.clone().view(-1, hkv, d), v_before.clone().view(-1, hkv, d)
    valid = slots >= 0
    exp_k[slots[valid].long()] = k_hf[valid]
    exp_v[slots[valid].long()] = v_in[valid]
    torch.testing.assert_close(k_cache.view(-1, hkv, d), exp_k, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(v_cache.view(-1, hkv, d), exp_v, atol=0, rtol=0)
    untouched = torch.ones(num_pages * page_tokens, dtype=torch.bool)
    untouched[slots[valid].long()] = False
    assert torch.equal(k_cache.view(-1, hkv, d)[untouched], k_before.view(-1, hkv, d)[untouched])
    assert torch.equal(v_cache.view(-1, hkv, d)[untouched], v_before.view(-1, hkv, d)[untouched])


@pytest.mark.parametrize("all_valid", [True, False])
def test_rope_store_kv_all_valid_or_all_padding(all_valid):
    torch.manual_seed(5)
    hq, hkv, d, page_tokens, num_pages, n = 4, 2, 16, 5, 4, 7
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    positions = torch.randint(0, 100, (n,), dtype=torch.int32)
    slots = (torch.randperm(num_pages * page_tokens)[:n] if all_valid else torch.full((n,), -1)).to(torch.int32)
    k_cache, v_cache = torch.randn(num_pages, page_tokens, hkv, d), torch.randn(num_pages, page_tokens, hkv, d)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    rope = rope_cos_sin(d, 128, 1e4, torch.float32, "cpu")[positions]
    q_rot, k_rot = rope_store_kv_ref(torch.cat([q, k], dim=1), v.clone(), rope, k_cache, v_cache, slots)
    q_hf, k_hf = hf_rope(q, k, positions, d, 1e4, hq, hkv)
    torch.testing.assert_close(q_rot, q_hf, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(k_rot, k_hf, atol=ATOL, rtol=RTOL)
    if all_valid:
        torch.testing.assert_close(k_cache.view(-1, hkv, d)[slots.long()], k_hf, atol=ATOL, rtol=RTOL)
        assert torch.equal(v_cache.view(-1, hkv, d)[slots.long()], v)
    else:
        assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


def test_rope_cos_sin_table_matches_hf():
    d, theta, max_positions = 64, 1e6, 4096
    table = rope_cos_sin(d, max_positions, theta, torch.float32, "cpu")
    config = Qwen2Config(hidden_size=4 * d, num_attention_heads=4, num_key_value_heads=4, head_dim=d,
                         rope_theta=theta, max_position_embeddings=max_positions)
    cos, sin = Qwen2RotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), torch.arange(max_positions)[None])
    assert table.shape == (max_positions, 2, d)
    half = d // 2
    torch.testing.assert_close(table[:, 0], cos[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(table[:, 1, :half], -sin[0, :, :half], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(table[:, 1, half:], sin[0, :, half:], atol=ATOL, rtol=RTOL)


# ---- norms and activation -------------------------------------------------------------------------

@pytest.mark.parametrize("hidden", [64, 96, 1536])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_rms_norm_matches_hf(hidden, eps):
    torch.manual_seed(hidden)
    x = 3 * torch.randn(2, 7, hidden) + 0.5
    weight = 1 + 0.2 * torch.randn(hidden)
    hf = Qwen2RMSNorm(hidden, eps=eps)
    with torch.no_grad():
        hf.weight.copy_(weight)
        expected = hf(x)
    torch.testing.assert_close(rms_norm_ref(x, weight, eps), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("hidden", [64, 96, 1536])
def test_add_rms_norm_matches_hf(hidden):
    torch.manual_seed(hidden + 1)
    eps = 1e-6
    x = torch.randn(5, hidden)
    residual = 4 * torch.randn(5, hidden)
    weight = 1 + 0.2 * torch.randn(hidden)
    x_in, res_in = x.clone(), residual.clone()
    hf = Qwen2RMSNorm(hidden, eps=eps)
    with torch.no_grad():
        hf.weight.copy_(weight)
        expected = hf(x_in + res_in)
    normed, new_residual = add_rms_norm_ref(x, residual, weight, eps)
    torch.testing.assert_close(new_residual, x_in + res_in, atol=0, rtol=0)
    torch.testing.assert_close(normed, expected, atol=ATOL, rtol=RTOL)


def test_rms_norm_bf16_matches_hf():
    torch.manual_seed(3)
    x = torch.randn(4, 96).to(torch.bfloat16)
    weight = (1 + 0.2 * torch.randn(96)).to(torch.bfloat16)
    hf = Qwen2RMSNorm(96, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(weight)
        expected = hf(x)
    out = rms_norm_ref(x, weight, 1e-6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)  # bf16 tolerances: at most a rounding step apart


@pytest.mark.parametrize("shape", [(7, 24), (2, 3, 704), (1, 1)])
def test_silu_and_mul_matches_naive(shape):
    torch.manual_seed(sum(shape))
    gate = 3 * torch.randn(*shape)
    up = torch.randn(*shape)
    out = silu_and_mul_ref(torch.cat([gate, up], dim=-1))
    expected = gate.double() * torch.sigmoid(gate.double()) * up.double()
    assert out.shape == gate.shape
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out, F.silu(gate) * up, atol=ATOL, rtol=RTOL)
