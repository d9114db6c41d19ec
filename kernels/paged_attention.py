"""Attention over the paged KV pool: decode (one new token per sequence) and extend (a chunk of
new tokens per sequence attending causally to its cached prefix and itself).

Caches are [pages, page_tokens, Hkv, D] views of the shared arena; `block_tables[i, j]` is the
j-th page of sequence i. Query heads that share a KV head are computed together (GQA).
"""

import torch


def _gather(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """The cached tokens on `pages` ([..., P]) laid end to end: [..., P * page_tokens, Hkv, D]."""
    g = cache[pages]
    return g.reshape(*pages.shape[:-1], -1, *cache.shape[2:])


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B, Hq, D], block_tables [B, W], seq_lens [B] (context including the new token) -> [B, Hq, D].

    Batched over sequences by padding every context to W pages and masking past seq_lens.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    k = _gather(k_cache, block_tables).transpose(1, 2)  # [B, Hkv, L, D]
    v = _gather(v_cache, block_tables).transpose(1, 2)
    qg = q.view(batch, num_kv_heads, group, head_dim).float()
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [B, Hkv, g, L]
    pad = torch.arange(k.shape[2], device=q.device)[None, :] >= seq_lens[:, None]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.float())  # [B, Hkv, g, D]
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def paged_extend_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [N, Hq, D] holds each sequence's new tokens back to back (query_start_loc [B + 1]); the
    last new token of sequence i sits at position seq_lens[i] - 1. Returns [N, Hq, D]."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, page_tokens = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        s, e = starts[i], starts[i + 1]
        n = e - s
        pages = block_tables[i, : (seq_len + page_tokens - 1) // page_tokens]
        k = _gather(k_cache, pages)[:seq_len].transpose(0, 1).float()  # [Hkv, L, D]
        v = _gather(v_cache, pages)[:seq_len].transpose(0, 1).float()
        qi = q[s:e].view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).float()  # [Hkv, g, n, D]
        scores = torch.matmul(qi, k.unsqueeze(1).transpose(-1, -2)) * scale  # [Hkv, g, n, L]
        query_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        future = torch.arange(seq_len, device=q.device)[None, :] > query_pos[:, None]
        scores.masked_fill_(future, float("-inf"))
        o = torch.matmul(torch.softmax(scores, dim=-1), v.unsqueeze(1))  # [Hkv, g, n, D]
        out[s:e] = o.permute(2, 0, 1, 3).reshape(n, num_heads, head_dim).to(q.dtype)
    return out
