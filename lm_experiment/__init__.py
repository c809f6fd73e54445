"""The LM experiment built on the `sparse_attention` library: a byte-level decoder LM whose layers attend
through it (model), its configs, data, training and checkpoints, evaluation and diagnostics, reports, the
boundary tasks trained from scratch, the README's main job, and the kernel benchmark with its peers.

The library (`sparse_attention`: patterns, layouts, the attention dispatch, the kernels, reachability)
imports nothing from here.
"""
