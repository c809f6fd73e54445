"""Boundary tasks trained from scratch: does a model learn exactly what reachability allows?

    python -m lm_experiment.boundary_tasks --config configs/boundary_tasks.py:full --out results/boundary_tasks

For every task, depth L and pattern, a small decoder (`model.DecoderLM`) is trained from scratch on
synthetic sequences, then scored on held-out probes grouped into cells. Each probe asks one query position
for a value that sits at one key position. If the key is not in R_L(query), the set of positions that can
inform the query after L layers (`reachability.reachable`, exact), nothing the query can see depends on the
value, which is drawn uniformly from K symbols: top-1 accuracy there is exactly 1/K in expectation, whatever
was learned. Where the key is reachable, a trained model should answer.

  copy   one value token sits among filler; every later position must output it. Probes put the query
         at phase p of its block (offset within the block) and the value d positions before it; a
         cell is one (d, p), so its prediction is one yes/no.
  hops   interleaved chains of h two-token statements, "a <value>", "b <a>", "c <b>", ..., and a
         query "? <last name>" that must be answered with its chain's value; consecutive links of the
         chain sit e block edges apart. A cell is one (h, e); the key is the queried chain's value token,
         and since every pattern here has interval reachable sets, a reachable key means a reachable
         chain. Resolving h links takes depth as well as reachability, so reachable cells test how many
         hops depth L carries; each probe's route (key, statements, query) says whether the links fit in
         L layers one after another (`reachability.layers_in_order`).

One compiled program trains every pattern of a (task, depth) at once: the patterns enter as per-layer masks
(data, `DecoderLM(tokens, masks)`), the models are vmapped, start from the same initialisation and see the
same batches, so the patterns are compared paired. docs/boundary_tasks.md says how the cells, intervals and
agreement figures are defined.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm_experiment.config import COMPUTE_DTYPES, AttentionConfig, ModelConfig
from lm_experiment.model import DecoderLM
from sparse_attention import reachability
from sparse_attention.patterns import as_schedule

log = logging.getLogger(__name__)

TASKS = ("copy", "hops")
# Token ids (the model keeps the byte vocabulary's 256 entries; the tasks use the first few).
FILLER, FILLER_SYMBOLS = 0, 16
VALUE = FILLER + FILLER_SYMBOLS  # values 0..K-1 are tokens VALUE..VALUE+K-1
NAME_SYMBOLS = 16
VOCAB_SIZE = 256
MAX_SYMBOLS = 64  # values; names and references follow them
STATEMENT = 2  # tokens per statement: name, then a value or a reference


def _fail(field: str, problem: str):
    raise ValueError(f"{field}: {problem}")


def _check_ints(field: str, values, *, minimum: int) -> None:
    """ValueError naming `field` unless `values` (an int or a sequence of them) are all ints >= minimum."""
    values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
    if not values:
        _fail(field, "give at least one value")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            _fail(field, f"must be integers >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class BoundaryTaskConfig:
    """The validated form of configs/boundary_tasks.py (docs/boundary_tasks.md lists every key)."""

    seed: int
    tasks: tuple[str, ...]
    patterns: tuple[str, ...]
    depths: tuple[int, ...]
    seq_len: int
    block_size: int
    symbols: int
    distances: tuple[int, ...]
    phases: tuple[int, ...]
    copy_steps: int
    hops: tuple[int, ...]
    crossings: tuple[int, ...]
    chains: int
    hops_steps: int
    hops_curriculum: bool
    d_model: int
    num_heads: int
    mlp_hidden: int
    compute_dtype: str
    shared_layers: bool
    batch: int
    seeds: int
    learning_rate: float
    warmup_steps: int
    log_every: int
    samples_per_cell: int
    accuracy_bar: float
    confidence: float
    eval_batch: int

    @classmethod
    def from_config_dict(cls, config) -> "BoundaryTaskConfig":
        c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        expected = {"seed", "tasks", "patterns", "depths", "sequence", "copy", "hops", "model", "train", "eval"}
        unknown, missing = sorted(set(c) - expected), sorted(expected - set(c))
        if unknown or missing:
            _fail((unknown or missing)[0], f"{'unknown' if unknown else 'missing'} key; the config needs exactly "
                                           f"{', '.join(sorted(expected))}")
        sections = {
            "sequence": ("seq_len", "block_size", "symbols"),
            "copy": ("distances", "phases", "steps"),
            "hops": ("hops", "crossings", "chains", "steps", "curriculum"),
            "model": ("d_model", "num_heads", "mlp_hidden", "compute_dtype", "shared_layers"),
            "train": ("batch", "seeds", "learning_rate", "warmup_steps", "log_every"),
            "eval": ("samples_per_cell", "accuracy_bar", "confidence", "batch"),
        }
        for name, keys in sections.items():
            section = dict(c.get(name) or {})
            if set(section) != set(keys):
                extra = sorted(set(section) - set(keys)) or sorted(set(keys) - set(section))
                _fail(f"{name}.{extra[0]}", f"unknown or missing key; {name} needs exactly {', '.join(keys)}")
        return cls(
            seed=c["seed"], tasks=tuple(c["tasks"]), patterns=tuple(c["patterns"]), depths=tuple(c["depths"]),
            seq_len=c["sequence"]["seq_len"], block_size=c["sequence"]["block_size"],
            symbols=c["sequence"]["symbols"], distances=tuple(c["copy"]["distances"]),
            phases=tuple(c["copy"]["phases"]), copy_steps=c["copy"]["steps"], hops=tuple(c["hops"]["hops"]),
            crossings=tuple(c["hops"]["crossings"]), chains=c["hops"]["chains"], hops_steps=c["hops"]["steps"],
            hops_curriculum=c["hops"]["curriculum"],
            d_model=c["model"]["d_model"], num_heads=c["model"]["num_heads"],
            mlp_hidden=c["model"]["mlp_hidden"], compute_dtype=c["model"]["compute_dtype"],
            shared_layers=c["model"]["shared_layers"], batch=c["train"]["batch"], seeds=c["train"]["seeds"],
            learning_rate=c["train"]["learning_rate"], warmup_steps=c["train"]["warmup_steps"],
            log_every=c["train"]["log_every"], samples_per_cell=c["eval"]["samples_per_cell"],
            accuracy_bar=c["eval"]["accuracy_bar"], confidence=c["eval"]["confidence"],
            eval_batch=c["eval"]["batch"],
        )

    def __post_init__(self):
        _check_ints("seed", self.seed, minimum=0)
        if not self.tasks or any(task not in TASKS for task in self.tasks) or len(set(self.tasks)) != len(self.tasks):
            _fail("tasks", f"must be distinct names from {', '.join(TASKS)}, got {self.tasks!r}")
        if not self.patterns or len(set(self.patterns)) != len(self.patterns):
            _fail("patterns", f"give distinct pattern specs, got {self.patterns!r}")
        for spec in self.patterns:
            try:
                as_schedule(spec)
            except ValueError as error:
                _fail("patterns", f"{spec!r}: {error}")
        if len({topk.spec for topk in self.selections.values()}) > 1:
            _fail("patterns", f"the topk parts of one run must be one topk(B, K), got "
                              f"{', '.join(sorted({topk.spec for topk in self.selections.values()}))}")
        _check_ints("depths", self.depths, minimum=1)
        for name, key in (("seq_len", "sequence.seq_len"), ("block_size", "sequence.block_size"),
                          ("copy_steps", "copy.steps"), ("hops_steps", "hops.steps"), ("d_model", "model.d_model"),
                          ("num_heads", "model.num_heads"), ("mlp_hidden", "model.mlp_hidden"),
                          ("batch", "train.batch"), ("seeds", "train.seeds"), ("log_every", "train.log_every"),
                          ("samples_per_cell", "eval.samples_per_cell"), ("eval_batch", "eval.batch")):
            _check_ints(key, getattr(self, name), minimum=1)
        _check_ints("train.warmup_steps", self.warmup_steps, minimum=0)
        if isinstance(self.symbols, bool) or not isinstance(self.symbols, int) or not 2 <= self.symbols <= MAX_SYMBOLS:
            _fail("sequence.symbols", f"must be an integer in [2, {MAX_SYMBOLS}], got {self.symbols!r}")
        if self.seq_len < 2 * self.block_size:
            _fail("sequence.seq_len", f"must hold at least two blocks of {self.block_size}, got {self.seq_len}")
        _check_ints("copy.distances", self.distances, minimum=1)
        _check_ints("copy.phases", self.phases, minimum=0)
        _check_ints("hops.hops", self.hops, minimum=1)
        _check_ints("hops.crossings", self.crossings, minimum=0)
        _check_ints("hops.chains", self.chains, minimum=2)
        if not isinstance(self.hops_curriculum, bool):
            _fail("hops.curriculum", f"must be True or False, got {self.hops_curriculum!r}")
        if not isinstance(self.shared_layers, bool):
            _fail("model.shared_layers", f"must be True or False, got {self.shared_layers!r}")
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            _fail("model.num_heads", f"must divide d_model={self.d_model} into an even head_dim, got {self.num_heads}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            _fail("model.compute_dtype", f"must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            _fail("train.learning_rate", f"must be > 0, got {self.learning_rate!r}")
        if not 0 < self.accuracy_bar <= 1:
            _fail("eval.accuracy_bar", f"must be in (0, 1], got {self.accuracy_bar!r}")
        if not 0 < self.confidence < 1:
            _fail("eval.confidence", f"must be in (0, 1), got {self.confidence!r}")

    @functools.cached_property
    def selections(self) -> dict:
        """{spec: its topk part} for the patterns some of whose layers choose blocks by content."""
        chosen = {}
        for spec in self.patterns:
            schedule = as_schedule(spec)
            parts = [schedule.layer(i).block_selection() for i in range(schedule.period)]
            if any(part is not None for part in parts):
                chosen[spec] = next(part for part in parts if part is not None)
        return chosen

    def steps(self, task: str) -> int:
        return self.copy_steps if task == "copy" else self.hops_steps

    def model_config(self, depth: int) -> ModelConfig:
        """The decoder of one model at `depth`; with shared_layers it has one block, applied depth times."""
        return ModelConfig(vocab_size=VOCAB_SIZE, d_model=self.d_model, num_layers=1 if self.shared_layers else depth,
                           num_heads=self.num_heads, num_kv_heads=self.num_heads, mlp_hidden=self.mlp_hidden,
                           tie_embeddings=False, remat=False, rope_base=10000.0, compute_dtype=self.compute_dtype,
                           param_dtype="float32")

    def make_task(self, task: str) -> "CopyTask | HopTask":
        if task == "copy":
            return CopyTask(self.seq_len, self.block_size, self.symbols, self.distances, self.phases)
        return HopTask(self.seq_len, self.block_size, self.symbols, self.hops, self.crossings, self.chains,
                       curriculum=self.hops_curriculum)


# --------------------------------------------------------------------------------------------------
# Tasks


@dataclasses.dataclass(frozen=True)
class TrainingBatch:
    tokens: np.ndarray  # int32 [batch, seq]
    targets: np.ndarray  # int32 [batch, seq], value index (0..K-1) where weights > 0
    weights: np.ndarray  # float32 [batch, seq], 1 at the scored positions


@dataclasses.dataclass(frozen=True)
class Probes:
    """Held-out sequences, one scored query each."""

    tokens: np.ndarray  # int32 [n, seq]
    queries: np.ndarray  # int64 [n], the scored position
    keys: np.ndarray  # int64 [n], the position of the answer's value token
    answers: np.ndarray  # int32 [n], value index
    cells: np.ndarray  # int64 [n], index into the task's `cells`
    # int64 [n, stops]: the positions the answer is worked out at, in order, key first and query last; -1 pads
    routes: np.ndarray


class CopyTask:
    """One value among filler; cell (distance d, phase p): query at offset p of its block, value d before it."""

    name = "copy"
    # The value token is found by what it is, so it can move from layer 1 on (`reachability.layers_in_order`).
    route_start_layer = 0

    def __init__(self, seq_len: int, block: int, symbols: int, distances: Sequence[int], phases: Sequence[int]):
        self.seq_len, self.block, self.symbols = seq_len, block, symbols
        for phase in phases:
            if phase >= block:
                _fail("copy.phases", f"must be < the block size {block}, got {phase}")
        for distance in distances:
            latest = min(p + (seq_len - 1 - p) // block * block for p in phases)
            if distance > latest:
                _fail("copy.distances", f"{distance} does not fit before a query at every phase in a sequence of "
                                        f"{seq_len} (at most {latest})")
        self.distances, self.phases = tuple(distances), tuple(phases)
        self.cells = [{"distance": d, "phase": p} for d in self.distances for p in self.phases]

    def training_batch(self, rng: np.random.Generator, batch: int, progress: float = 0.0) -> TrainingBatch:
        """The value at a uniform position; every later position is scored. The same at every `progress`."""
        tokens = rng.integers(FILLER, FILLER + FILLER_SYMBOLS, (batch, self.seq_len))
        key = rng.integers(0, self.seq_len - 1, batch)
        value = rng.integers(0, self.symbols, batch)
        tokens[np.arange(batch), key] = VALUE + value
        weights = (np.arange(self.seq_len)[None, :] > key[:, None]).astype(np.float32)
        targets = np.broadcast_to(value[:, None], (batch, self.seq_len))
        return TrainingBatch(tokens.astype(np.int32), targets.astype(np.int32), weights)

    def probes(self, rng: np.random.Generator, per_cell: int) -> Probes:
        """per_cell sequences per cell; the query's block is uniform among those that fit."""
        cell = np.repeat(np.arange(len(self.cells)), per_cell)
        distance = np.array([self.cells[c]["distance"] for c in cell])
        phase = np.array([self.cells[c]["phase"] for c in cell])
        first_block = -((phase - distance) // self.block)  # ceil((d - p) / B): the query's earliest block
        last_block = (self.seq_len - 1 - phase) // self.block
        query = (first_block + (rng.random(len(cell)) * (last_block - first_block + 1)).astype(np.int64)) * self.block
        query += phase
        key = query - distance
        tokens = rng.integers(FILLER, FILLER + FILLER_SYMBOLS, (len(cell), self.seq_len))
        answers = rng.integers(0, self.symbols, len(cell))
        tokens[np.arange(len(cell)), key] = VALUE + answers
        return Probes(tokens.astype(np.int32), query, key, answers.astype(np.int32), cell, np.stack([key, query], 1))


class HopTask:
    """`chains` chains of h statements, every chain queried at the end; cell (hops h, crossings e): the links
    of a chain sit e block edges apart (e = 0: all in one block). Probes score chain 0's query.

    curriculum: training moves through the hop counts in stages of equal length, stage k drawing only cells
    with h <= the k-th smallest hop count, so that longer chains come after the one-hop lookup they build on.
    """

    name = "hops"
    # A statement is found by its name but holds its source in the next token: layer 1 binds the two.
    route_start_layer = 1

    def __init__(self, seq_len: int, block: int, symbols: int, hops: Sequence[int], crossings: Sequence[int],
                 chains: int, curriculum: bool = False):
        self.seq_len, self.block, self.symbols, self.chains = seq_len, block, symbols, chains
        self.curriculum = curriculum
        self.blocks = seq_len // block
        self.name_token = VALUE + symbols
        self.query_token = self.name_token + NAME_SYMBOLS
        for h in hops:
            if chains * h > NAME_SYMBOLS:
                _fail("hops.hops", f"{chains} chains of {h} need {chains * h} names, there are {NAME_SYMBOLS}")
            for e in crossings:
                if e == 0 and chains * (h + 1) * STATEMENT > block:
                    _fail("hops.hops", f"{chains} chains of {h} hops in one block need {chains * (h + 1) * STATEMENT} "
                                       f"tokens, the block has {block}")
                if e and h * e + 1 > self.blocks:
                    _fail("hops.crossings", f"{h} links {e} blocks apart need {h * e + 1} blocks, a sequence of "
                                            f"{seq_len} holds {self.blocks}")
        if chains * STATEMENT > block:
            _fail("hops.chains", f"{chains} statements side by side need {chains * STATEMENT} tokens, the block has "
                                 f"{block}")
        self.cells = [{"hops": h, "crossings": e} for h in hops for e in crossings]

    def _slots(self, rng: np.random.Generator, count: int, block_index: int) -> np.ndarray:
        """Start positions of `count` statements in random non-overlapping places of one block, in order."""
        gaps = np.sort(rng.integers(0, self.block - STATEMENT * count + 1, count))
        return block_index * self.block + gaps + STATEMENT * np.arange(count)

    def sequence(self, rng: np.random.Generator, hops: int, crossings: int):
        """(tokens int64 [S], targets, weights, route, answer) of one sequence; the route (key, the sources of
        statements 1 to h - 1, query: int64 [h + 1]) and the answer are chain 0's.

        Statement i of chain c is "name_i source": it binds name i of the chain to the value (i = 0) or to
        name i - 1, so following the names from the query back to statement 0 gives the value, and every
        chain looks alike. Scored in training: every query, and the source of every statement after the
        first with its chain's value (the value of the name it binds): the training signal of each hop.
        """
        tokens = rng.integers(FILLER, FILLER + FILLER_SYMBOLS, self.seq_len)
        targets = np.zeros(self.seq_len, np.int64)
        weights = np.zeros(self.seq_len, np.float32)
        names = rng.choice(NAME_SYMBOLS, self.chains * hops, replace=False).reshape(self.chains, hops)
        values = rng.integers(0, self.symbols, self.chains)  # independent: other chains say nothing of chain 0's
        # (chain, statement index) in sequence order, one group per block; index `hops` is the chain's query.
        groups = [[(chain, index) for chain in rng.permutation(self.chains)] for index in range(hops + 1)]
        if crossings == 0:
            items = [item for group in groups for item in group]
            placed = zip(items, self._slots(rng, len(items), rng.integers(0, self.blocks)))
        else:
            first = rng.integers(0, self.blocks - hops * crossings)
            placed = [(item, start) for index, group in enumerate(groups)
                      for item, start in zip(group, self._slots(rng, len(group), first + index * crossings))]
        route = np.zeros(hops + 1, np.int64)
        for (chain, index), start in placed:
            if chain == 0:
                route[index] = start + 1
            if index == hops:
                tokens[start] = self.query_token
                tokens[start + 1] = self.name_token + names[chain, hops - 1]
            else:
                tokens[start] = self.name_token + names[chain, index]
                if index == 0:
                    tokens[start + 1] = VALUE + values[chain]
                    continue
                tokens[start + 1] = self.name_token + names[chain, index - 1]
            targets[start + 1], weights[start + 1] = values[chain], 1.0
        return tokens, targets, weights, route, values[0]

    def training_cells(self, progress: float) -> list[dict]:
        """The cells training draws from once a share `progress` in [0, 1) of the steps is done."""
        if not self.curriculum:
            return self.cells
        levels = sorted({cell["hops"] for cell in self.cells})
        top = levels[min(int(progress * len(levels)), len(levels) - 1)]
        return [cell for cell in self.cells if cell["hops"] <= top]

    def training_batch(self, rng: np.random.Generator, batch: int, progress: float = 0.0) -> TrainingBatch:
        """Sequences of cells drawn uniformly from `training_cells(progress)`."""
        cells = self.training_cells(progress)
        rows = [self.sequence(rng, **cells[c]) for c in rng.integers(0, len(cells), batch)]
        return TrainingBatch(np.stack([r[0] for r in rows]).astype(np.int32),
                             np.stack([r[1] for r in rows]).astype(np.int32), np.stack([r[2] for r in rows]))

    def probes(self, rng: np.random.Generator, per_cell: int) -> Probes:
        cell = np.repeat(np.arange(len(self.cells)), per_cell)
        rows = [self.sequence(rng, **self.cells[c]) for c in cell]
        routes = np.full((len(rows), max(len(r[3]) for r in rows)), -1, np.int64)
        for row, (*_, route, _) in zip(routes, rows):
            row[:len(route)] = route
        return Probes(np.stack([r[0] for r in rows]).astype(np.int32), np.array([r[3][-1] for r in rows], np.int64),
                      routes[:, 0], np.array([r[4] for r in rows], np.int32), cell, routes)


# --------------------------------------------------------------------------------------------------
# Training every pattern of one (task, depth) at once


def pattern_masks(specs: Sequence[str], seq_len: int, depth: int) -> np.ndarray:
    """bool [patterns, depth, seq, seq]: layer l of pattern i attends where masks[i, l]."""
    positions = np.arange(seq_len)
    return np.stack([
        np.stack([np.broadcast_to(as_schedule(spec).layer(layer).mask(positions[:, None], positions[None, :]),
                                  (seq_len, seq_len)) for layer in range(depth)])
        for spec in specs])


class PatternModels:
    """One DecoderLM per (pattern, seed), stacked on a leading axis (patterns outer, seeds inner) and trained
    by one vmapped step. Seed s of every pattern starts from the initialisation of config.seed + s.

    Logits are read at the value tokens only: a K-way choice, so chance is exactly 1/K.
    """

    def __init__(self, config: BoundaryTaskConfig, specs: Sequence[str], depth: int, steps: int):
        self.config = config
        # (pattern, seed index) of each model, and the label its loss is logged under.
        self.models = [(spec, seed) for spec in specs for seed in range(config.seeds)]
        self.labels = [spec if config.seeds == 1 else f"{spec} seed {config.seed + seed}"
                       for spec, seed in self.models]
        model_config = config.model_config(depth)
        self.repeats = depth // model_config.num_layers
        # Masks carry the static part of every pattern; a run with topk patterns builds its models with that
        # topk(B, K) and lets the models of those patterns (`choose`) add the blocks it chooses.
        selections = config.selections
        topk = next(iter(selections.values())).spec if selections else "dense"
        self.choose = jnp.asarray([spec in selections for spec, _ in self.models])
        self.chooses = bool(selections)
        attention = AttentionConfig(pattern=topk, schedule=(), impl="reference", interpret=False)
        abstract = nnx.eval_shape(lambda: DecoderLM(model_config, attention, rngs=nnx.Rngs(0)))
        self.graphdef, _ = nnx.split(abstract, nnx.Param)
        self.masks = jnp.asarray(np.repeat(pattern_masks(specs, config.seq_len, depth), config.seeds, axis=0))

        def init(seed):
            model = DecoderLM(model_config, attention, rngs=nnx.Rngs(jax.random.key(seed)))
            return nnx.to_pure_dict(nnx.state(model, nnx.Param))

        schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps,
                                                      max(steps, config.warmup_steps + 1),
                                                      config.learning_rate / 10)
        self.optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
        # The same initialisations for every pattern: the comparison is paired from the first step.
        seeds = config.seed + np.array([seed for _, seed in self.models])
        self.params = jax.jit(jax.vmap(init))(jnp.asarray(seeds, jnp.int32))
        self.opt_state = jax.jit(jax.vmap(self.optimizer.init))(self.params)
        self._train = jax.jit(self._train_steps, donate_argnums=(0, 1))
        self._predict = jax.jit(self._predictions)
        self.parameters = int(sum(x[0].size for x in jax.tree.leaves(self.params)))

    def _value_logits(self, params, masks, choose, tokens):
        logits = nnx.merge(self.graphdef, params)(tokens, masks, self.repeats,
                                                  choose if self.chooses else None)  # [batch, seq, vocab]
        return logits[..., VALUE:VALUE + self.config.symbols]

    def _loss(self, params, masks, choose, tokens, targets, weights):
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
            self._value_logits(params, masks, choose, tokens), targets)
        return (cross_entropy * weights).sum() / jnp.maximum(weights.sum(), 1.0)

    def _train_steps(self, params, opt_state, masks, choose, tokens, targets, weights):
        """lax.scan over the leading [steps] axis of the batches; returns the new state and the mean loss
        of each model over those steps."""

        def one_model(params, opt_state, masks, choose):
            def step(carry, batch):
                params, opt_state = carry
                loss, grads = jax.value_and_grad(self._loss)(params, masks, choose, *batch)
                updates, opt_state = self.optimizer.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), loss

            (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (tokens, targets, weights))
            return params, opt_state, losses.mean()

        return jax.vmap(one_model)(params, opt_state, masks, choose)

    def _predictions(self, params, masks, choose, tokens, queries):
        def one_model(params, masks, choose):
            logits = self._value_logits(params, masks, choose, tokens)
            return jnp.take_along_axis(logits, queries[:, None, None], axis=1)[:, 0].argmax(-1)

        return jax.vmap(one_model)(params, masks, choose)

    def train(self, task, steps: int, rng: np.random.Generator, label: str) -> list[dict]:
        """`steps` updates on fresh batches; returns the loss curve (mean of each pattern over log_every steps)."""

        def batches(first: int, count: int) -> list[np.ndarray]:
            drawn = [task.training_batch(rng, self.config.batch, (first + i) / steps) for i in range(count)]
            return [np.stack([getattr(b, field) for b in drawn]) for field in ("tokens", "targets", "weights")]

        curve, done, started = [], 0, time.perf_counter()
        upcoming = batches(0, min(self.config.log_every, steps))
        while done < steps:
            chunk = len(upcoming[0])
            self.params, self.opt_state, losses = self._train(self.params, self.opt_state, self.masks, self.choose,
                                                              *upcoming)
            done += chunk
            # Drawn while the device runs the chunk just dispatched (in the same order as before).
            upcoming = batches(done, min(self.config.log_every, steps - done)) if done < steps else None
            losses = np.asarray(losses).tolist()
            curve.append({"step": done, "loss": dict(zip(self.labels, losses))})
            log.info("%s step %d/%d (%.0f s): loss %s", label, done, steps, time.perf_counter() - started,
                     " ".join(f"{x:.3f}" for x in losses))
        return curve

    def predict(self, probes: Probes) -> np.ndarray:
        """int [models, n]: each model's top-1 value index at every probe's query (`models` order)."""
        size = self.config.eval_batch
        out = []
        for start in range(0, len(probes.tokens), size):
            tokens = probes.tokens[start:start + size]
            queries = probes.queries[start:start + size].astype(np.int32)
            pad = size - len(tokens)
            if pad:  # one compiled shape
                tokens = np.concatenate([tokens, np.repeat(tokens[:1], pad, axis=0)])
                queries = np.concatenate([queries, np.repeat(queries[:1], pad)])
            out.append(np.asarray(self._predict(self.params, self.masks, self.choose, tokens, queries))[:, :size - pad])
        return np.concatenate(out, axis=1)


# --------------------------------------------------------------------------------------------------
# Statistics


def wilson_interval(successes, trials, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion, elementwise; NaN where trials is 0."""
    successes, trials = np.asarray(successes, np.float64), np.asarray(trials, np.float64)
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    safe = np.where(trials > 0, trials, 1.0)
    p = successes / safe
    centre = (p + z * z / (2 * safe)) / (1 + z * z / safe)
    half = z * np.sqrt(p * (1 - p) / safe + z * z / (4 * safe * safe)) / (1 + z * z / safe)
    low, high = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
    return np.where(trials > 0, low, np.nan), np.where(trials > 0, high, np.nan)


def part_interval(successes: int, trials: int, confidence: float) -> dict:
    low, high = wilson_interval(successes, trials, confidence)
    return {"correct": int(successes), "n": int(trials),
            "accuracy": successes / trials if trials else None,
            "low": None if trials == 0 else float(low), "high": None if trials == 0 else float(high)}


def score_cells(task, probes: Probes, correct: np.ndarray, reachable: np.ndarray, in_order: np.ndarray,
                config: BoundaryTaskConfig) -> dict:
    """Per cell, the probes whose key is reachable and those whose key is not, and among the reachable those
    whose route fits in the layers in order (`reachability.layers_in_order`), each with its accuracy and
    interval; and the share of reachable and in-order parts at the accuracy bar. `check_chance` adds the
    unreachable side once every row of the task is scored."""
    cells = []
    for index, cell in enumerate(task.cells):
        mine = probes.cells == index
        parts = {}
        for name, chosen in (("reachable", mine & reachable), ("unreachable", mine & ~reachable),
                             ("in_order", mine & in_order)):
            parts[name] = part_interval(int(correct[chosen].sum()), int(chosen.sum()), config.confidence)
        cells.append({**cell, "reachable_fraction": float(reachable[mine].mean()),
                      "in_order_fraction": float(in_order[mine].mean()), **parts})
    reached = [c["reachable"] for c in cells if c["reachable"]["n"]]
    unreached = [c["unreachable"] for c in cells if c["unreachable"]["n"]]
    ordered = [c["in_order"] for c in cells if c["in_order"]["n"]]
    return {
        "cells": cells,
        "chance": 1.0 / config.symbols,
        "reachable_parts": len(reached),
        "unreachable_parts": len(unreached),
        "in_order_parts": len(ordered),
        "agreement_reachable": (float(np.mean([p["accuracy"] >= config.accuracy_bar for p in reached]))
                                if reached else None),
        "agreement_in_order": (float(np.mean([p["accuracy"] >= config.accuracy_bar for p in ordered]))
                               if ordered else None),
        "min_accuracy_reachable": min(p["accuracy"] for p in reached) if reached else None,
        "min_accuracy": min(p["accuracy"] for c in cells for p in (c["reachable"], c["unreachable"]) if p["n"]),
        "pooled_unreachable": part_interval(sum(p["correct"] for p in unreached), sum(p["n"] for p in unreached),
                                        config.confidence),
    }


def check_chance(rows: list[dict], confidence: float) -> None:
    """Marks every unreachable part of these rows (one task, all patterns and depths) "at_chance" when its
    family-wise interval holds 1/K, and sets each row's agreement_unreachable.

    The claim under test is that every unreachable cell is at chance, so the intervals are simultaneous over
    all m unreachable parts of the task: Wilson at confidence 1 - alpha / m (Bonferroni). Per-cell 95 %
    intervals would put about 5 % of cells off chance by luck alone. Rows of patterns that choose blocks by
    content ("chooses") are left out: their reachability is the static part's, and the choice may reach
    beyond it.
    """
    held = [row for row in rows if not row.get("chooses")]
    parts = [cell["unreachable"] for row in held for cell in row["cells"] if cell["unreachable"]["n"]]
    family = 1 - (1 - confidence) / max(len(parts), 1)
    for row in rows:
        if row.get("chooses"):  # beyond the static part's reach the chosen blocks may reach: not held to chance
            row["family_confidence"], row["agreement_unreachable"] = None, None
            continue
        checked = []
        for cell in row["cells"]:
            part = cell["unreachable"]
            if part["n"]:
                low, high = wilson_interval(part["correct"], part["n"], family)
                part["family_low"], part["family_high"] = float(low), float(high)
                part["at_chance"] = bool(low <= row["chance"] <= high)
                checked.append(part["at_chance"])
        row["family_confidence"] = family
        row["agreement_unreachable"] = float(np.mean(checked)) if checked else None


# --------------------------------------------------------------------------------------------------
# The whole experiment


def run(config: BoundaryTaskConfig, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Trains and scores every (task, depth, pattern); returns what `boundary_report.write` writes.

    `on_progress(results)` is called after each (task, depth) with the results so far ("complete": False,
    the chance check over the rows so far), so a long run that is cut short still leaves its finished parts.
    """
    started = time.perf_counter()
    finished: list[dict] = []

    def results(rows: list[dict], complete: bool) -> dict:
        return {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "complete": complete,
            "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind,
            "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
            "config": dataclasses.asdict(config),
            "results": finished + rows,
            "wall_time_s": time.perf_counter() - started,
        }

    for task_name in config.tasks:
        rows: list[dict] = []
        task = config.make_task(task_name)
        probes = task.probes(np.random.default_rng([config.seed, 1, TASKS.index(task_name)]), config.samples_per_cell)
        for depth in config.depths:
            label = f"{task_name} depth {depth}"
            models = PatternModels(config, config.patterns, depth, config.steps(task_name))
            train_started = time.perf_counter()
            curve = models.train(task, config.steps(task_name),
                                 np.random.default_rng([config.seed, 2, TASKS.index(task_name), depth]), label)
            train_seconds = time.perf_counter() - train_started
            predictions = models.predict(probes)
            for spec in config.patterns:
                reachable = reachability.reachable(spec, config.seq_len, depth, probes.queries, probes.keys)
                in_order = reachability.layers_in_order(spec, config.seq_len, depth, probes.routes,
                                                        task.route_start_layer) > 0
                for index, (model_spec, seed) in enumerate(models.models):
                    if model_spec != spec:
                        continue
                    scored = score_cells(task, probes, predictions[index] == probes.answers, reachable, in_order,
                                         config)
                    name = models.labels[index]
                    rows.append({"task": task_name, "pattern": spec, "depth": depth, "seed": config.seed + seed,
                                 "chooses": spec in config.selections, **scored, "final_loss": curve[-1]["loss"][name],
                                 "train_seconds_all_patterns": train_seconds, "parameters": models.parameters,
                                 "loss_curve": [{"step": point["step"], "loss": point["loss"][name]}
                                                for point in curve]})
            log.info("%s: %d models trained in %.0f s (%d parameters each)", label, len(models.models),
                     train_seconds, models.parameters)
            check_chance(rows, config.confidence)
            if on_progress is not None:
                on_progress(results(rows, complete=False))
        finished += rows
    return results([], complete=True)


def within_depth(task: str, cell: dict, depth: int) -> bool:
    """Whether a model of this depth has the layers to answer the cell where its key is reachable: always for
    copy; a chain of h links needs h + 1 layers (docs/boundary_tasks.md, "Depth a chain needs")."""
    return task != "hops" or cell["hops"] + 1 <= depth


def agreement_within_depth(row: dict, accuracy_bar: float) -> float | None:
    """The share of a row's reachable cells within depth at accuracy >= accuracy_bar (None: there are none)."""
    parts = [cell["reachable"] for cell in row["cells"]
             if cell["reachable"]["n"] and within_depth(row["task"], cell, row["depth"])]
    return float(np.mean([part["accuracy"] >= accuracy_bar for part in parts])) if parts else None


def summary_rows(results: dict) -> list[dict]:
    """summary.json: one row per (task, pattern, depth)."""
    keys = ("task", "pattern", "depth", "seed", "agreement_reachable", "agreement_unreachable", "agreement_in_order",
            "reachable_parts", "unreachable_parts", "in_order_parts", "min_accuracy_reachable", "pooled_unreachable",
            "final_loss")
    bar = results["config"]["accuracy_bar"]
    return [{**{key: row[key] for key in keys}, "agreement_reachable_within_depth": agreement_within_depth(row, bar)}
            for row in results["results"]]


def row_label(config: dict, row: dict) -> str:
    """The row's pattern, and its seed where the run trained several (results from before seeds have one)."""
    return row["pattern"] if config.get("seeds", 1) == 1 else f"{row['pattern']} seed {row['seed']}"


def _cell_name(task: str, cell: dict) -> str:
    return f"d={cell['distance']} p={cell['phase']}" if task == "copy" else f"h={cell['hops']} e={cell['crossings']}"


def bar_checks(results: dict) -> list[dict]:
    """Each task's bars (docs/boundary_tasks.md), each with whether it holds and what fails it. The dense bar
    counts the cells' in-order parts; the chance bar every unreachable part; the reachable bar is checked twice,
    over the reachable parts of the cells within depth and over the in-order parts."""
    config = results["config"]
    checks = []
    for task in TASKS:
        rows = [row for row in results["results"] if row["task"] == task]
        if not rows:
            continue

        def parts_of(part: str, chosen=lambda row, cell: True):
            """(row, cell) of every non-empty `part` of a cell that `chosen` keeps."""
            return [(row, cell) for row in rows for cell in row["cells"] if cell[part]["n"] and chosen(row, cell)]

        dense = {}
        for row, cell in parts_of("in_order"):
            if row["pattern"] == "dense":
                dense[row["depth"]] = min(dense.get(row["depth"], 1.0), cell["in_order"]["accuracy"])
        unreached = [(r, c) for r, c in parts_of("unreachable") if c["unreachable"].get("at_chance") is False]

        def where(items):
            return "; ".join(f"{row_label(config, r)} depth {r['depth']} {_cell_name(task, c)}" for r, c in items[:8])

        def reach_bar(part: str, parts: list, which: str) -> dict:
            low = [(r, c) for r, c in parts if c[part]["accuracy"] < config["accuracy_bar"]]
            share = 1 - len(low) / len(parts) if parts else None
            return {"task": task, "bar": f">= 90 % of {which} reach >= {config['accuracy_bar']}",
                    "holds": share is not None and share >= 0.9,
                    "detail": (f"{share:.3f} of {len(parts)}" if share is not None else "none")
                              + (f"; below the bar: {where(low)}" if low else "")}

        checks += [
            {"task": task, "bar": "dense reaches >= 0.95 on every cell",
             "holds": bool(dense) and all(a >= 0.95 for a in dense.values()),
             "detail": ", ".join(f"depth {d}: min {a:.3f}" for d, a in sorted(dense.items())) or "dense not run"},
            {"task": task, "bar": "every unreachable cell stays at chance (family-wise interval holds 1/K)",
             "holds": not unreached,
             "detail": f"{len(unreached)} cells off chance" + (f": {where(unreached)}" if unreached else "")},
            reach_bar("reachable", parts_of("reachable", lambda row, cell: within_depth(task, cell, row["depth"])),
                      "reachable cells within depth"),
            reach_bar("in_order", parts_of("in_order"), "in-order parts"),
        ]
    return checks


def main() -> None:
    """The command line (absl flags, like train.py): --config FILE.py:PRESET [--config.x.y=z ...] --out DIR."""
    from absl import app, flags
    from ml_collections import config_flags

    from lm_experiment import boundary_report

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "configs/boundary_tasks.py:PRESET (tiny or full); override keys with --config.x.y=z")
    out_flag = flags.DEFINE_string("out", None, "output folder: summary.json, results.json, report.md, plots "
                                                "(created if missing; its parent must exist)")
    flags.mark_flags_as_required(["config", "out"])

    def run_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        logging.getLogger("absl").setLevel(logging.WARNING)
        try:
            config = BoundaryTaskConfig.from_config_dict(config_flag.value)
            for task in config.tasks:
                config.make_task(task)
            out = boundary_report.check_out_dir(out_flag.value)
        except ValueError as error:
            raise app.UsageError(str(error)) from error
        for path in boundary_report.write(run(config, on_progress=lambda partial: boundary_report.write(partial, out)),
                                          out):
            print(path)

    app.run(run_main)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
