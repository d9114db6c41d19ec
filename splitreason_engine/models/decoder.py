"""The one decoder every supported family runs (Qwen2, Llama, Qwen3) over the shared paged KV pool.

The families differ only in switches read from config.json (ModelConfig): q/k/v and o biases, MLP
biases, Qwen3's RMSNorm on each q and k head, and Llama-3's RoPE scaling (in the rotary table).
q/k/v and gate/up projections are fused into one matmul each; the loader splits checkpoint
tensors into them. Attention reads and writes the model's own view of the pool. Norms, RoPE + KV
store, attention, the activation and the projections come from the engine's op set (kernels.ops):
the PyTorch references or the Triton kernels. The nn.Linear modules only hold the projections'
parameters (the loader and tensor parallelism address them by name); the op set's linear runs them
(exactly nn.Linear on the PyTorch set; a decode GEMV for a few rows on the Triton set), and its
silu_mul_linear runs SwiGLU and the down projection as one op.

With tensor parallelism (`tp`, parallel.py) each rank holds its share: its q heads and the KV
heads they read, its part of the MLP's intermediate size and of the vocabulary (LM head,
padded to ceil(vocab / ranks) rows a rank: parallel.vocab_per_rank); o_proj and down_proj end in
one all-reduce each, the logits in one all-gather, cut back to the vocabulary: they keep their own
forward (RowParallelLinear) and the unfused activation. The embedding (padded with zero rows like
the LM head, so a tied head's rows are a view of it), norms and rotary table are replicated.
Without `tp` no distributed call is made.
"""

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..kernels import rope_cos_sin
from ..kernels.ops import TORCH_OPS, Ops
from ..parallel import TPGroup, local_heads, vocab_per_rank


@dataclass
class AttentionBatch:
    """One model's step, as tensors on the model's device (see the scheduler's BatchBuffers)."""

    positions: torch.Tensor  # [N]
    slot_mapping: torch.Tensor  # [N]
    query_start_loc: torch.Tensor  # [B + 1]
    seq_lens: torch.Tensor  # [B]
    block_tables: torch.Tensor  # [B, W]
    num_decodes: int  # the first num_decodes sequences have one new token each
    max_query_len: int = 1  # the longest chunk of new tokens of one sequence (host-side, for extend's grid)

    def __post_init__(self):
        # The extend part's offsets, rebased to its first token: computed once, used by every layer.
        self.extend_query_start_loc = self.query_start_loc[self.num_decodes:] - self.num_decodes


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops: Ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps, self.ops = eps, ops

    def forward(self, x: torch.Tensor, residual: "torch.Tensor | None" = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class RowParallelLinear(nn.Linear):
    """A Linear whose input features are split across ranks: partial products summed by one
    all-reduce, the bias added once, after it. Without `tp`, a plain Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: "TPGroup | None"):
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x):
        if self.tp is None:
            return super().forward(x)
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, ops: Ops, tp: "TPGroup | None" = None):
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads = local_heads(c, tp.world_size if tp else 1)
        self.head_dim = c.head_dim
        self.q_size, self.kv_size = self.num_heads * c.head_dim, self.num_kv_heads * c.head_dim
        self.qkv_proj = nn.Linear(c.hidden_size, self.q_size + 2 * self.kv_size, bias=c.qkv_bias)
        self.o_proj = RowParallelLinear(self.q_size, c.hidden_size, c.o_bias, tp)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, ops) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, ops) if c.qk_norm else None
        self.scale = c.head_dim ** -0.5

    def forward(self, x, batch: AttentionBatch, rope, k_cache, v_cache):
        n = x.shape[0]
        qkv = self.ops.linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(n, self.num_heads + self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # each head over head_dim, before RoPE (Qwen3)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        ops = self.ops
        q, _ = ops.rope_store_kv(qk, v, rope, k_cache, v_cache, batch.slot_mapping)
        d = batch.num_decodes
        if d == batch.seq_lens.shape[0]:
            out = ops.decode_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, self.scale)
        else:
            out = torch.empty_like(q)
            if d:
                out[:d] = ops.decode_attention(q[:d], k_cache, v_cache, batch.block_tables[:d], batch.seq_lens[:d],
                                               self.scale)
            out[d:] = ops.extend_attention(q[d:], k_cache, v_cache, batch.block_tables[d:],
                                           batch.extend_query_start_loc, batch.seq_lens[d:], self.scale,
                                           batch.max_query_len)
        out = out.reshape(n, self.q_size)
        if self.o_proj.tp is not None:
            return self.o_proj(out)
        return ops.linear(out, self.o_proj.weight, self.o_proj.bias)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig, ops: Ops, tp: "TPGroup | None" = None):
        super().__init__()
        inter = c.intermediate_size // (tp.world_size if tp else 1)
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * inter, bias=c.mlp_bias)
        self.down_proj = RowParallelLinear(inter, c.hidden_size, c.mlp_bias, tp)
        self.ops = ops

    def forward(self, x):
        gate_up = self.ops.linear(x, self.gate_up_proj.weight, self.gate_up_proj.bias)
        if self.down_proj.tp is not None:
            return self.down_proj(self.ops.silu_and_mul(gate_up))
        return self.ops.silu_mul_linear(gate_up, self.down_proj.weight, self.down_proj.bias)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, ops: Ops, tp: "TPGroup | None" = None):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, ops)
        self.self_attn = Attention(c, ops, tp)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, ops)
        self.mlp = MLP(c, ops, tp)

    def forward(self, x, residual, batch, rope, k_cache, v_cache):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, batch, rope, k_cache, v_cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class CausalLM(nn.Module):
    """Parameter names are the checkpoint's without "model." (q/k/v and gate/up fused)."""

    def __init__(self, c: ModelConfig, max_positions: int, ops: Ops = TORCH_OPS, tp: "TPGroup | None" = None):
        super().__init__()
        self.config, self.tp, self.ops = c, tp, ops
        # Each rank's rows of the (padded) vocabulary; tied, they are a view of the replicated embedding.
        vocab = vocab_per_rank(c, tp.world_size) if tp else c.vocab_size
        self.embed_tokens = nn.Embedding(vocab * tp.world_size if tp else vocab, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, ops, tp) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, ops)
        self.vocab_rows = slice(tp.rank * vocab, (tp.rank + 1) * vocab) if tp else slice(None)
        self.lm_head = nn.Linear(c.hidden_size, vocab, bias=False)
        self.tie_weights()
        self.max_positions = max_positions
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_rope(self) -> None:
        """Builds the rotary table once the model is on its device and dtype."""
        w, c = self.embed_tokens.weight, self.config
        self.cos_sin = rope_cos_sin(c.head_dim, self.max_positions, c.rope_theta, w.dtype, w.device, c.rope_scaling)

    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Hidden states [N, hidden] of every new token, before the final norm (applied in compute_logits)."""
        self.ops.begin_forward(input_ids.device)
        x, residual = self.embed_tokens(input_ids), None
        rope = self.cos_sin[batch.positions]  # once per step, shared by every layer
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, batch, rope, k_cache, v_cache)
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the selected rows of forward()'s output, in fp32 (with `tp`: on every rank, all of
        them, the padded ids' cut off: [rows, vocab_size] at any rank count)."""
        weight = self.lm_head.weight[self.vocab_rows] if self.config.tie_word_embeddings else self.lm_head.weight
        logits = F.linear(self.norm(hidden), weight).float()
        return logits if self.tp is None else self.tp.all_gather_last(logits, self.config.vocab_size)
