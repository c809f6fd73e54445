"""Block attention with boundary repair on every layer: repaired(B, R, mode) with R = B / 8.

B is the preset's block size: repaired(64, 8, bridge) for tiny, repaired(512, 64, bridge) for small and
base. The argument is "PRESET" or "PRESET,MODE":

    --config configs/repaired.py:tiny           bridge repair (the default): block(B) or q - k <= R
    --config configs/repaired.py:tiny,prefix    prefix repair: block(B) or the previous block's last R keys

Bridge repair adds at most R keys to each of the first R queries of a block (repaired(512, 64, bridge)
attends 1.5 % more (query, key) pairs than block(512) at 8192 tokens); prefix repair adds R keys to
every query after the first block (23 % more).
"""

from configs import base

MODES = ("bridge", "prefix")


def get_config(arg=None):
    preset, mode = base.parse_preset_and(arg, "repaired", "mode", MODES)
    config = base.get_config(preset)
    block = base.BLOCK_SIZE[preset]
    config.attention.pattern = f"repaired({block}, {block // 8}, {mode})"
    return config
