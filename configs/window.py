"""Sliding-window attention on every layer, sized to cost what block(B) costs.

window(W) attends W keys per query (fewer at the sequence start); block(B) attends (B + 1) / 2 on
average. So window(B / 2) attends about as many (query, key) pairs as block(B): window(32) for tiny's
block(64), window(256) for small's and base's block(512). Unlike block(B) it has no boundaries.

    --config configs/window.py:tiny     (presets: tiny, small, base; see configs/base.py)
"""

from configs import base


def get_config(arg=None):
    config = base.get_config(arg)
    config.attention.pattern = f"window({base.BLOCK_SIZE[base.parse_preset(arg)] // 2})"
    return config
