"""Triton RoPE fused with the paged KV-cache store: the GPU twin of `rope.rope_store_kv_ref`.

One program rotates a block of heads of one token in place and, unless the token's slot is
padding, writes the rotated keys and the values into the paged caches. The rotation is done on
the two halves of each head, so every thread stores only the elements it loaded itself: the
in-place update needs no barrier. No host syncs, so it can be captured in a CUDA graph.
"""

import torch
import triton
import triton.language as tl

# Elements of one half-head block per program: keeps registers bounded at D = 128 and many heads.
_MAX_BLOCK_ELEMS = 2048


# The slot mapping is a view at a step-dependent offset of the step's inputs; one scalar load per
# token, so its alignment is not specialized on (one compiled variant per model and dtype).
@triton.jit(do_not_specialize=["slot_ptr"])
def _rope_store_kv_kernel(
    qk_ptr, v_ptr, rope_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    num_q_heads, num_kv_heads, head_dim, page_tokens,
    qk_s0, qk_s1, qk_s2, v_s0, v_s1, v_s2, rope_s0, rope_s1, rope_s2,
    kc_s0, kc_s1, kc_s2, kc_s3, vc_s0, vc_s1, vc_s2, vc_s3,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    half = head_dim // 2
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < half

    # rope row 0 is (cos, cos), row 1 is (-sin, sin); rotate-half pairs element i with i + D/2.
    rope_row = rope_ptr + n * rope_s0
    c1 = tl.load(rope_row + d * rope_s2, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(rope_row + (d + half) * rope_s2, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(rope_row + rope_s1 + d * rope_s2, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(rope_row + rope_s1 + (d + half) * rope_s2, mask=d_mask, other=0.0).to(tl.float32)[None, :]

    mask = (heads < num_q_heads + num_kv_heads)[:, None] & d_mask[None, :]
    p1 = qk_ptr + n * qk_s0 + heads[:, None] * qk_s1 + d[None, :] * qk_s2
    p2 = p1 + half * qk_s2
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c1 + x2 * s1
    o2 = x2 * c2 + x1 * s2
    tl.store(p1, o1.to(qk_ptr.dtype.element_ty), mask=mask)
    tl.store(p2, o2.to(qk_ptr.dtype.element_ty), mask=mask)

    slot = tl.load(slot_ptr + n).to(tl.int64)
    if slot >= 0:
        page = slot // page_tokens
        offset = slot % page_tokens
        kv_heads = heads - num_q_heads
        k_mask = mask & (kv_heads >= 0)[:, None]
        kc = k_cache_ptr + page * kc_s0 + offset * kc_s1 + kv_heads[:, None] * kc_s2 + d[None, :] * kc_s3
        tl.store(kc, o1.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
        tl.store(kc + half * kc_s3, o2.to(k_cache_ptr.dtype.element_ty), mask=k_mask)

        # The values ride along on the programs whose head block overlaps [0, Hkv).
        v_mask = (heads < num_kv_heads)[:, None] & d_mask[None, :]
        vp = v_ptr + n * v_s0 + heads[:, None] * v_s1 + d[None, :] * v_s2
        vc = v_cache_ptr + page * vc_s0 + offset * vc_s1 + heads[:, None] * vc_s2 + d[None, :] * vc_s3
        v1 = tl.load(vp, mask=v_mask)
        v2 = tl.load(vp + half * v_s2, mask=v_mask)
        tl.store(vc, v1.to(v_cache_ptr.dtype.element_ty), mask=v_mask)
        tl.store(vc + half * vc_s3, v2.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def rope_store_kv(
    qk: torch.Tensor,
    v: torch.Tensor,
    rope: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_store_kv_ref`, but rotating qk [N, Hq + Hkv, D] IN PLACE (any strides, e.g. a view of
    the fused qkv output); returns views (q, k) of it. Keys and v [N, Hkv, D] go to the strided
    cache views [pages, page_tokens, Hkv, D] at `slot_mapping` (int32 or int64; < 0 skipped)."""
    n, heads, head_dim = qk.shape
    num_kv_heads = v.shape[1]
    num_q_heads = heads - num_kv_heads
    if head_dim % 2:
        raise ValueError(f"rotate-half RoPE needs an even head_dim, got {head_dim}")
    if n:
        block_half = triton.next_power_of_2(head_dim // 2)
        block_h = min(triton.next_power_of_2(heads), max(1, _MAX_BLOCK_ELEMS // block_half))
        grid = (n, triton.cdiv(heads, block_h))
        _rope_store_kv_kernel[grid](
            qk, v, rope, k_cache, v_cache, slot_mapping,
            num_q_heads, num_kv_heads, head_dim, k_cache.shape[1],
            *qk.stride(), *v.stride(), *rope.stride(), *k_cache.stride(), *v_cache.stride(),
            BLOCK_H=block_h, BLOCK_HALF=block_half,
        )
    return qk[:, :num_q_heads], qk[:, num_q_heads:]
