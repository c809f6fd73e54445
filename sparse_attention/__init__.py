"""Block-sparse causal attention for JAX: patterns, layouts, kernels, reachability."""

from sparse_attention.attention import attention, resolve_impl
from sparse_attention.layout import BlockLayout, block_layout
from sparse_attention.patterns import Pattern, Schedule, parse

__all__ = ["attention", "resolve_impl", "BlockLayout", "block_layout", "Pattern", "Schedule", "parse"]
