"""Block-sparse causal attention for JAX: patterns, layouts, the attention dispatch, kernels, reachability,
and decoding caches bounded by each pattern's reach.

What a user imports; it depends on jax and numpy only (torch only when a pattern's mask is evaluated on
torch tensors). The LM experiment built on it (model, training, data, evaluation, reports, benchmark) is
the `lm_experiment` package beside it.
"""

from sparse_attention.attention import attention, resolve_impl
from sparse_attention.decoding import CacheLayout, KVCache, decode_attention
from sparse_attention.layout import BlockLayout, block_layout
from sparse_attention.patterns import Pattern, Schedule, parse

__all__ = ["attention", "resolve_impl", "BlockLayout", "block_layout", "Pattern", "Schedule", "parse", "CacheLayout",
           "KVCache", "decode_attention"]
