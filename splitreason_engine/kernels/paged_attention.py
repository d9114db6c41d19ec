"""Attention over the paged KV pool: decode (one new token per sequence) and extend (a chunk of
new tokens per sequence attending causally to its cached prefix and itself).

Caches are [pages, page_tokens, Hkv, D] views of the shared arena; `block_tables[i, j]` is the
j-th page of sequence i. Query heads that share a KV head are computed together (GQA). The
arithmetic is PyTorch's scaled_dot_product_attention (fp32 accumulation), after gathering each
sequence's pages into a contiguous context.
"""

import torch
import torch.nn.functional as F


def _gather(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """The cached tokens on `pages` ([B, P]) laid end to end: [B, Hkv, P * page_tokens, D]."""
    batch, num_pages = pages.shape
    g = cache.index_select(0, pages.reshape(-1))
    return g.view(batch, num_pages * cache.shape[1], *cache.shape[2:]).transpose(1, 2)


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
    k = _gather(k_cache, block_tables)
    v = _gather(v_cache, block_tables)
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < seq_lens[:, None]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=valid[:, None, None, :], scale=scale,
                                         enable_gqa=True)
    return out.squeeze(2)


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
    page_tokens = k_cache.shape[1]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        s, e = starts[i], starts[i + 1]
        pages = block_tables[i: i + 1, : (seq_len + page_tokens - 1) // page_tokens]
        k = _gather(k_cache, pages)[:, :, :seq_len]
        v = _gather(v_cache, pages)[:, :, :seq_len]
        query_pos = torch.arange(seq_len - (e - s), seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1).unsqueeze(0), k, v, attn_mask=visible, scale=scale,
                                           enable_gqa=True)
        out[s:e] = o[0].transpose(0, 1)
    return out
