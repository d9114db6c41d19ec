"""The decoder the engine runs; which family a checkpoint is comes from config.FAMILIES."""

from .decoder import AttentionBatch, CausalLM

__all__ = ["AttentionBatch", "CausalLM"]
