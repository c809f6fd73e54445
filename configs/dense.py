"""Dense causal attention on every layer: the quality ceiling the sparse variants are measured against.

    --config configs/dense.py:tiny      (presets: tiny, small, base; see configs/base.py)
"""

from configs import base


def get_config(arg=None):
    config = base.get_config(arg)
    config.attention.pattern = "dense"
    return config
