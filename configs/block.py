"""Fixed-block attention on every layer: block(B) with B the preset's block size (64 tiny, 512 small/base).

A query sees only its own block, so the edge from each block's first token to the previous token is
cut on every layer: this is the variant that boundary repair fixes.

    --config configs/block.py:tiny      (presets: tiny, small, base; see configs/base.py)
"""

from configs import base


def get_config(arg=None):
    config = base.get_config(arg)
    config.attention.pattern = f"block({base.BLOCK_SIZE[base.parse_preset(arg)]})"
    return config
