"""Synthetic boundary diagnostics, each drawn beside the reachability prediction of the model's pattern.

  edge-pair recall    one value byte (an uppercase letter among lowercase filler) sits at offset o of a block;
                      a query byte "?" at offset `query_offset` of the block k blocks later must be answered
                      with that value. Accuracy over (o, k) is a heat-map; the prediction is whether the
                      value's position is in R_L(query), the set the query can draw on after L layers
                      (sparse_attention.reachability). With query_offset 0 and o = B - 1, k = 1 is the
                      adjacent pair that block(B) cuts.
  variable tracking   a chain of h assignments, one per block ("c=V;" then "f=c;" then ...; a decoy chain with
                      another value shares the blocks; filler is digits), then "f?" in the next block must be
                      answered with V. Accuracy against h and the number of layers (the model cut to its first
                      d layers); the prediction is the fraction of samples whose value is in R_d(query), and the
                      longest chain reachable at each depth. Picking one of the two values blindly scores 1/2.

Neither format appears in the training data (Python source), so a zero-shot score would measure the format,
not the boundary: every (model, task, depth) is fine-tuned for `steps` steps (Adam, constant learning rate,
loss on the answers only, the model's own pattern) from its checkpoint, then scored on held-out samples
that are the same for every model. Targets are decoupled from the inputs: the answer is never written after
a "?", so several queries in one sequence cannot copy from each other. A tiny byte model after tens of steps
may well stay near chance; the machinery and the reachability overlay are the point, and the sizes are
options (DiagnosticsOptions).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from lm_experiment.config import ExperimentConfig
from lm_experiment.model import DecoderLM
from sparse_attention import reachability

LOWERCASE = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8).astype(np.int32)
UPPERCASE = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8).astype(np.int32)
DIGITS = np.frombuffer(b"0123456789", np.uint8).astype(np.int32)
QUERY, EQUALS, SEMICOLON = ord("?"), ord("="), ord(";")
STATEMENT_BYTES = 4  # "x=y;"
MIN_TRACKING_BLOCK = 2 * STATEMENT_BYTES  # two statements side by side in one block
MAX_CHAIN = len(LOWERCASE) // 2  # two chains of distinct one-letter names


@dataclasses.dataclass(frozen=True)
class DiagnosticsOptions:
    """Sizes of the diagnostics; None picks the default described on each field.

    seq_len:        sequence length of both tasks; None: the run's training length
    steps:          fine-tuning steps of edge-pair recall
    tracking_steps: fine-tuning steps of variable tracking, per depth; None: `steps`
    batch_size:     sequences per fine-tuning step (and per scoring batch)
    learning_rate:  Adam's constant learning rate
    eval_samples:   scored sequences per key offset (edge-pair) and per chain length (tracking)
    edge_offsets:   key offsets o of the heat-map; None: 0, 1, B/4, B/2, 3B/4, B-2, B-1 (distinct)
    query_offset:   offset of the edge-pair query within its block
    chain_lengths:  chain lengths h scored; None: 1 .. (full blocks - 1), at most 13
    depths:         model depths d of the tracking task; None: every depth 1..L
    seed:           fine-tuning data and held-out samples
    """

    seq_len: int | None = None
    steps: int = 200
    tracking_steps: int | None = None
    batch_size: int = 8
    learning_rate: float = 3e-3
    eval_samples: int = 16
    edge_offsets: tuple[int, ...] | None = None
    query_offset: int = 0
    chain_lengths: tuple[int, ...] | None = None
    depths: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        if self.tracking_steps is None:
            object.__setattr__(self, "tracking_steps", self.steps)
        for name in ("steps", "tracking_steps", "batch_size", "eval_samples"):
            _check_int(f"diagnostics.{name}", getattr(self, name), minimum=1)
        _check_int("diagnostics.query_offset", self.query_offset, minimum=0)
        _check_int("diagnostics.seed", self.seed, minimum=0)
        if self.seq_len is not None:
            _check_int("diagnostics.seq_len", self.seq_len, minimum=2)
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise ValueError(f"diagnostics.learning_rate: must be > 0, got {self.learning_rate!r}")
        for name, minimum in (("edge_offsets", 0), ("chain_lengths", 1), ("depths", 1)):
            values = getattr(self, name)
            if values is not None:
                if not values:
                    raise ValueError(f"diagnostics.{name}: give at least one value or None for the default")
                for value in values:
                    _check_int(f"diagnostics.{name}", value, minimum=minimum)


def _check_int(field: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field}: must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TaskBatch:
    """Sequences with scored queries; targets are separate from the inputs."""

    tokens: np.ndarray  # int32 [batch, seq_len], the inputs
    queries: np.ndarray  # int32 [batch, queries], positions whose next-token prediction is scored
    answers: np.ndarray  # int32 [batch, queries], the byte each query must predict
    keys: np.ndarray  # int64 [batch, queries], the position holding the answer


def _first_block_start(size: int, offset: int) -> int:
    """The first position that starts a block of size `size` on the grid of block(size, offset)."""
    return (size - offset) % size


class EdgePairTask:
    """Value at offset o of the first whole block; queries at `query_offset` of each of the k = 1..K later
    blocks that fit in seq_len."""

    def __init__(self, seq_len: int, block: int, grid_offset: int, query_offset: int):
        if query_offset >= block:
            raise ValueError(f"diagnostics.query_offset: must be < the block size {block}, got {query_offset}")
        self.seq_len, self.block = seq_len, block
        self.key_block_start = _first_block_start(block, grid_offset)
        self.max_blocks_later = (seq_len - 1 - self.key_block_start - query_offset) // block
        if self.max_blocks_later < 1:
            raise ValueError(f"diagnostics.seq_len: {seq_len} holds no query a block after the key; it needs at "
                             f"least {self.key_block_start + block + query_offset + 1} (block {block})")
        self.blocks_later = np.arange(1, self.max_blocks_later + 1)
        self.query_positions = self.key_block_start + self.blocks_later * block + query_offset  # [K]
        # Fine-tuning asks every B/8 positions after the key's block (the scored positions among them): eight
        # times the signal per step for the same compute.
        stride = max(1, block // 8)
        self.training_query_positions = np.arange(self.key_block_start + block + query_offset % stride, seq_len,
                                                  stride)

    def batch(self, rng: np.random.Generator, offsets: np.ndarray, *, training: bool = False) -> TaskBatch:
        """One sequence per key offset in offsets int [batch]; queries at `query_positions`, or at
        `training_query_positions` for fine-tuning."""
        count = len(offsets)
        tokens = rng.choice(LOWERCASE, (count, self.seq_len))
        keys = self.key_block_start + np.asarray(offsets, np.int64)
        values = rng.choice(UPPERCASE, count)
        tokens[np.arange(count), keys] = values
        queries = self.training_query_positions if training else self.query_positions
        tokens[:, queries] = QUERY
        shape = (count, len(queries))
        return TaskBatch(tokens.astype(np.int32), np.broadcast_to(queries, shape).astype(np.int32),
                         np.broadcast_to(values[:, None], shape).astype(np.int32),
                         np.broadcast_to(keys[:, None], shape).astype(np.int64))


class VariableTrackingTask:
    """Chains of h assignments in the blocks just before the last whole block, which holds the query."""

    def __init__(self, seq_len: int, block: int, grid_offset: int):
        if block < MIN_TRACKING_BLOCK:
            raise ValueError(f"variable tracking needs blocks of >= {MIN_TRACKING_BLOCK} bytes (two statements), "
                             f"got {block}")
        self.seq_len, self.block = seq_len, block
        self.first = _first_block_start(block, grid_offset)
        self.blocks = (seq_len - self.first) // block
        self.max_chain = min(self.blocks - 1, MAX_CHAIN)
        if self.max_chain < 1:
            raise ValueError(f"diagnostics.seq_len: {seq_len} holds fewer than two whole blocks of {block}; "
                             f"variable tracking needs at least {self.first + 2 * block}")

    def batch(self, rng: np.random.Generator, chain_lengths: np.ndarray) -> TaskBatch:
        """One sequence per chain length in chain_lengths int [batch]."""
        count = len(chain_lengths)
        tokens = rng.choice(DIGITS, (count, self.seq_len))
        queries, answers, keys = (np.zeros((count, 1), dtype) for dtype in (np.int32, np.int32, np.int64))
        half = self.block // 2
        query_block = self.first + (self.blocks - 1) * self.block
        for row, length in enumerate(np.asarray(chain_lengths, np.int64)):
            names = rng.choice(LOWERCASE, 2 * length, replace=False)
            values = rng.choice(UPPERCASE, 2, replace=False)
            for step in range(length):
                start = query_block - (length - step) * self.block
                swap = rng.integers(2)  # the two chains take the two halves of the block in a random order
                for chain in range(2):
                    own = names[chain * length:(chain + 1) * length]
                    slot = (chain ^ swap) * half + rng.integers(0, half - STATEMENT_BYTES + 1)
                    source = values[chain] if step == 0 else own[step - 1]
                    tokens[row, start + slot:start + slot + STATEMENT_BYTES] = (own[step], EQUALS, source, SEMICOLON)
                    if chain == 0 and step == 0:
                        keys[row, 0] = start + slot + 2
            at = query_block + rng.integers(0, self.block - 1)
            tokens[row, at:at + 2] = (names[length - 1], QUERY)
            queries[row, 0], answers[row, 0] = at + 1, values[0]
        return TaskBatch(tokens.astype(np.int32), queries, answers, keys)


# --------------------------------------------------------------------------------------------------
# Fine-tuning and scoring


def truncated(model: DecoderLM, config: ExperimentConfig, depth: int) -> DecoderLM:
    """The model's first `depth` layers, with its final norm and head."""
    if depth == config.model.num_layers:
        return model
    shallow = dataclasses.replace(config.model, num_layers=depth)
    abstract = nnx.eval_shape(lambda: DecoderLM(shallow, config.attention, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract, nnx.Param)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["blocks"] = {index: params["blocks"][index] for index in range(depth)}
    return nnx.merge(graphdef, params)


def _answer_logits(graphdef, params, tokens, queries):
    """Logits float32 [batch, queries, vocab] at the query positions."""
    logits = nnx.merge(graphdef, params)(tokens)
    return jnp.take_along_axis(logits, queries[:, :, None], axis=1)


def fine_tune(model: DecoderLM, sample: Callable[[np.random.Generator], TaskBatch], *, steps: int,
              learning_rate: float, seed: int, description: str) -> tuple[DecoderLM, list[float]]:
    """(the fine-tuned model, the loss of every step): Adam on the cross-entropy of the answers only,
    gradients clipped at global norm 1; batches from sample(rng) with rng seeded by `seed`."""
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))
    opt_state = optimizer.init(params)

    def loss_fn(params, tokens, queries, answers):
        logits = _answer_logits(graphdef, params, tokens, queries)
        return optax.softmax_cross_entropy_with_integer_labels(logits, answers).mean()

    @jax.jit
    def step(params, opt_state, tokens, queries, answers):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, queries, answers)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in tqdm(range(steps), desc=description, unit="step", leave=False, dynamic_ncols=True,
                  mininterval=0.1 if sys.stderr.isatty() else 30.0):
        batch = sample(rng)
        params, opt_state, loss = step(params, opt_state, batch.tokens, batch.queries, batch.answers)
        losses.append(float(loss))
    return nnx.merge(graphdef, params), losses


def predictions(model: DecoderLM, batch: TaskBatch, batch_size: int) -> np.ndarray:
    """The model's most likely byte at every query: int32 [batch, queries], batch_size sequences at a time."""
    graphdef, params = nnx.split(model, nnx.Param)
    predict = jax.jit(lambda params, tokens, queries: _answer_logits(graphdef, params, tokens, queries).argmax(-1))
    count = len(batch.tokens)
    pad = (-count) % batch_size
    tokens = np.concatenate([batch.tokens, np.repeat(batch.tokens[:1], pad, axis=0)])
    queries = np.concatenate([batch.queries, np.repeat(batch.queries[:1], pad, axis=0)])
    out = [np.asarray(predict(params, tokens[i:i + batch_size], queries[i:i + batch_size]))
           for i in range(0, len(tokens), batch_size)]
    return np.concatenate(out)[:count]


@dataclasses.dataclass(frozen=True)
class FineTune:
    steps: int
    first_loss: float  # mean of the first few steps' losses (nats)
    last_loss: float


@dataclasses.dataclass(frozen=True)
class DepthFineTune:
    depth: int
    steps: int
    first_loss: float
    last_loss: float


@dataclasses.dataclass(frozen=True)
class EdgePairRecall:
    """Accuracy [offsets][blocks_later] of recalling the value at offset o of a block k blocks later, beside
    whether its position is reachable at the model's depth."""

    query_offset: int
    offsets: list[int]
    blocks_later: list[int]
    key_positions: list[int]
    query_positions: list[int]
    samples_per_cell: int
    accuracy: list[list[float]]
    reachable: list[list[bool]]
    accuracy_where_reachable: float | None
    accuracy_where_unreachable: float | None
    chance: float
    fine_tune: FineTune

    @classmethod
    def from_json(cls, value: dict) -> EdgePairRecall:
        return cls(**{**value, "fine_tune": FineTune(**value["fine_tune"])})


@dataclasses.dataclass(frozen=True)
class TrackingChance:
    any_value: float
    one_of_two_values: float


@dataclasses.dataclass(frozen=True)
class VariableTracking:
    """Accuracy [depths][chain_lengths] of the truncated models, beside the share of samples whose value is
    reachable at each depth 1..L ([predicted_depths][chain_lengths])."""

    chain_lengths: list[int]
    depths: list[int]
    samples_per_length: int
    accuracy: list[list[float]]
    predicted_depths: list[int]
    value_reachable_fraction: list[list[float]]
    reachable_chain_length: dict[str, int | None]  # depth -> longest chain with every value reachable
    chance: TrackingChance
    fine_tune: list[DepthFineTune]

    @classmethod
    def from_json(cls, value: dict) -> VariableTracking:
        return cls(**{**value, "chance": TrackingChance(**value["chance"]),
                      "fine_tune": [DepthFineTune(**entry) for entry in value["fine_tune"]]})


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """Both tasks' results for one run, as results.json holds them under the run's "diagnostics"."""

    seq_len: int
    grid: dict  # {"size", "offset"}: the block grid the tasks were laid on
    learning_rate: float
    batch_size: int
    edge_pair: EdgePairRecall
    variable_tracking: VariableTracking

    @classmethod
    def from_json(cls, value: dict) -> Diagnostics:
        return cls(**{**value, "edge_pair": EdgePairRecall.from_json(value["edge_pair"]),
                      "variable_tracking": VariableTracking.from_json(value["variable_tracking"])})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _loss_summary(losses: Sequence[float]) -> tuple[float, float]:
    """(first, last): the mean loss of the first and of the last few steps."""
    head = max(1, min(5, len(losses) // 4))
    return float(np.mean(losses[:head])), float(np.mean(losses[-head:]))


def default_edge_offsets(block: int) -> tuple[int, ...]:
    return tuple(sorted({0, min(1, block - 1), block // 4, block // 2, 3 * block // 4, max(block - 2, 0), block - 1}))


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def edge_pair_recall(model: DecoderLM, config: ExperimentConfig, seq_len: int, block: int, grid_offset: int,
                     options: DiagnosticsOptions, label: str) -> EdgePairRecall:
    task = EdgePairTask(seq_len, block, grid_offset, options.query_offset)
    offsets = options.edge_offsets or default_edge_offsets(block)
    if max(offsets) >= block:
        raise ValueError(f"diagnostics.edge_offsets: must be < the block size {block}, got {max(offsets)}")
    tuned, losses = fine_tune(
        model, lambda rng: task.batch(rng, rng.integers(0, block, options.batch_size), training=True),
        steps=options.steps,
        learning_rate=options.learning_rate, seed=options.seed, description=f"{label} edge-pair fine-tune")
    held_out = task.batch(np.random.default_rng([options.seed, 1]), np.repeat(offsets, options.eval_samples))
    correct = predictions(tuned, held_out, options.batch_size) == held_out.answers  # [offsets * samples, K]
    accuracy = correct.reshape(len(offsets), options.eval_samples, -1).mean(axis=1)
    layers = config.model.num_layers
    predicted = reachability.reachable(config.attention.layers, seq_len, layers, task.query_positions[None, :],
                          task.key_block_start + np.asarray(offsets)[:, None])  # [offsets, K]
    return EdgePairRecall(
        query_offset=options.query_offset, offsets=list(offsets), blocks_later=task.blocks_later.tolist(),
        key_positions=[task.key_block_start + o for o in offsets], query_positions=task.query_positions.tolist(),
        samples_per_cell=options.eval_samples, accuracy=accuracy.tolist(), reachable=predicted.tolist(),
        accuracy_where_reachable=_mean_or_none(accuracy[predicted]),
        accuracy_where_unreachable=_mean_or_none(accuracy[~predicted]), chance=1 / len(UPPERCASE),
        fine_tune=FineTune(options.steps, *_loss_summary(losses)))


def variable_tracking(model: DecoderLM, config: ExperimentConfig, seq_len: int, block: int, grid_offset: int,
                      options: DiagnosticsOptions, label: str) -> VariableTracking:
    task = VariableTrackingTask(seq_len, block, grid_offset)
    lengths = options.chain_lengths or tuple(range(1, task.max_chain + 1))
    if max(lengths) > task.max_chain:
        raise ValueError(f"diagnostics.chain_lengths: at most {task.max_chain} fit ({task.blocks} whole blocks of "
                         f"{block} in {seq_len}, and {MAX_CHAIN} names per chain), got {max(lengths)}")
    layers = config.model.num_layers
    depths = options.depths or tuple(range(1, layers + 1))
    if max(depths) > layers:
        raise ValueError(f"diagnostics.depths: at most the model's {layers} layers, got {max(depths)}")
    held_out = task.batch(np.random.default_rng([options.seed, 2]), np.repeat(lengths, options.eval_samples))
    accuracy, tuning = [], []
    for depth in depths:
        tuned, losses = fine_tune(
            truncated(model, config, depth),
            lambda rng: task.batch(rng, rng.integers(1, task.max_chain + 1, options.batch_size)),
            steps=options.tracking_steps, learning_rate=options.learning_rate, seed=options.seed + depth,
            description=f"{label} tracking fine-tune, depth {depth}")
        correct = predictions(tuned, held_out, options.batch_size)[:, 0] == held_out.answers[:, 0]
        accuracy.append(correct.reshape(len(lengths), options.eval_samples).mean(axis=1).tolist())
        tuning.append(DepthFineTune(depth, options.tracking_steps, *_loss_summary(losses)))
    fraction, longest = [], {}
    for depth in range(1, layers + 1):
        hit = reachability.reachable(config.attention.layers, seq_len, depth, held_out.queries[:, 0],
                                     held_out.keys[:, 0])
        per_length = hit.reshape(len(lengths), options.eval_samples).mean(axis=1)
        fraction.append(per_length.tolist())
        always = [h for h, f in zip(lengths, per_length) if f == 1.0]
        longest[str(depth)] = max(always) if always else None
    return VariableTracking(
        chain_lengths=list(lengths), depths=list(depths), samples_per_length=options.eval_samples,
        accuracy=accuracy, predicted_depths=list(range(1, layers + 1)), value_reachable_fraction=fraction,
        reachable_chain_length=longest, chance=TrackingChance(any_value=1 / len(UPPERCASE), one_of_two_values=0.5),
        fine_tune=tuning)


def run_diagnostics(model: DecoderLM, config: ExperimentConfig, block: int, grid_offset: int,
                    options: DiagnosticsOptions, *, label: str, train_seq_len: int) -> Diagnostics:
    """Both tasks on one model, on the block grid (block, grid_offset); see the module docstring."""
    seq_len = options.seq_len or train_seq_len
    config.attention.check_seq_len(seq_len, field="diagnostics.seq_len")
    return Diagnostics(
        seq_len=seq_len, grid={"size": block, "offset": grid_offset}, learning_rate=options.learning_rate,
        batch_size=options.batch_size,
        edge_pair=edge_pair_recall(model, config, seq_len, block, grid_offset, options, label),
        variable_tracking=variable_tracking(model, config, seq_len, block, grid_offset, options, label))
