"""block_choice: the distances of the blocks a topk layer chose, counted by brute force on hand-made choices,
and on a real topk model's choices."""

import jax
import numpy as np
from flax import nnx

from lm_experiment import scoring
from lm_experiment.config import AttentionConfig, ModelConfig
from lm_experiment.measures import block_choice
from lm_experiment.model import DecoderLM
from sparse_attention.selection import select_blocks


def test_distances_by_brute_force(hand_made):
    """Windows of 32 predicted tokens hold query blocks 0-3 of 8; each chose b - 1 and b - 3 where they exist."""
    entry, _ = hand_made(doc_lengths=(100, 45), length=32)
    [layer] = block_choice.BlockChoice.from_json(entry).layers
    expected = []
    for predicted in (32, 32, 32, 3, 32, 12):  # the windows' predicted tokens: 99 = 3 * 32 + 3, 44 = 32 + 12
        for query in range(-(-predicted // 8)):
            expected += [d for d in (1, 3) if query - d >= 0] * 2  # two KV heads
    assert layer.layer == 1 and layer.size == 8 and layer.choices == len(expected)
    assert layer.mean_distance == np.mean(expected)
    assert layer.previous_block_share == np.mean(np.array(expected) == 1)
    assert layer.distance_counts == np.bincount(expected, minlength=4).tolist()


def test_a_topk_model_reports_what_select_blocks_chooses():
    config = ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_hidden=64,
                         tie_embeddings=True, remat=False, rope_base=10000.0, compute_dtype="float32",
                         param_dtype="float32")
    attention = AttentionConfig(pattern="topk(8, 2) | window(4)", schedule=("block(8)", "topk(8, 2) | window(4)"),
                                impl="reference", interpret=False)
    model = DecoderLM(config, attention, rngs=nnx.Rngs(0))
    rows = np.asarray(jax.random.randint(jax.random.key(1), (3, 41), 0, 256), np.int32)
    scorer = scoring.Scorer(model)
    assert scorer.choice_sizes == {1: 8}
    [(layer, (size, chosen))] = scorer.choices(rows, 2).items()
    # Layer 1's input is layer 0's output; its choice is select_blocks on that layer's q and k.
    x = model.blocks[0](model.embed_tokens(rows[:, :-1]))
    q, k, _ = model.blocks[1].attention._project(model.blocks[1].attention_norm(x), np.arange(40))
    assert layer == 1 and size == 8
    np.testing.assert_array_equal(chosen, select_blocks(q, k, 8, 2))


def test_report_lists_each_choosing_layer_and_nothing_for_static_runs(hand_made):
    entry, _ = hand_made(doc_lengths=(100, 45), length=32)
    static = {**entry, "block_choice": None}
    results = {"settings": {"eval_sets": ["code:long"]},
               "models": [{"label": "learned", "language_model": {"code:long": {"lengths": [entry]}}},
                          {"label": "block", "language_model": {"code:long": {"lengths": [static]}}}]}
    lines = block_choice.report(results)
    rows = [line for line in lines if line.startswith("| learned")]
    assert rows == ["| learned | code:long | 32 | 1 | 34 | 1.47 | 0.76 |"]  # (26 * 1 + 8 * 3) / 34; 26 / 34
    assert not any(line.startswith("| block") for line in lines)
    assert block_choice.report({**results, "models": results["models"][1:]}) == []
