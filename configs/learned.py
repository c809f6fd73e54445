"""Learned block selection (MoBA style) on top of a fixed pattern: topk(B, K) | repaired(B, B / 8, bridge).

Each query block of B attends its own block, the bridge repair's R = B / 8 keys across its edge, and the K
earlier blocks whose mean-pooled keys score highest against its mean-pooled queries, chosen per KV head on
the device at every step (sparse_attention.selection). B is the preset's block size; K is 2 for tiny (4
blocks of 64 in a 256-token sequence) and 4 otherwise. The argument is "PRESET" or "PRESET,alone":

    --config configs/learned.py:tiny          topk(64, 2) | repaired(64, 8, bridge)
    --config configs/learned.py:small,alone   topk(512, 4): the choice and the own block only

The union keeps at least the fixed part's reach whatever is chosen (docs/reachability.md). Of the Pallas
kernels only `triton` takes the choice so far (docs/triton.md), so on a GPU `impl=auto` runs triton, and on a
CPU the `xla` path; the log says which ran and why.
"""

from configs import base

FORMS = ("repaired", "alone")
CHOSEN_BLOCKS = {"tiny": 2, "compare": 4, "small": 4, "base": 4}


def get_config(arg=None):
    preset, form = base.parse_preset_and(arg, "learned", "form", FORMS)
    config = base.get_config(preset)
    block = base.BLOCK_SIZE[preset]
    topk = f"topk({block}, {CHOSEN_BLOCKS[preset]})"
    config.attention.pattern = topk if form == "alone" else f"{topk} | repaired({block}, {block // 8}, bridge)"
    return config
