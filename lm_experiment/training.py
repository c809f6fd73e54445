"""Training the decoder LM: train state, optimizer, one sharded train step, and the loop.

The same code runs on one CPU, one GPU, and many hosts. Devices form a mesh with axes ("data", "fsdp",
"seq") (`config.mesh`; -1 takes all remaining devices on data or fsdp):

  batch           sharded over data and fsdp on its batch dimension, replicated over seq; each process
                  builds only its own rows (`data.batch_for_step`) and
                  `jax.make_array_from_process_local_data` assembles them
  activations     with seq > 1, split along the sequence over "seq"; each layer's attention runs under
                  shard_map (`sequence_sharding.sharded_attention`, docs/sequence_sharding.md)
  params, Adam    replicated when fsdp = 1 (pure data parallelism). With fsdp > 1, every leaf with >= 2
  moments         dims is sharded over "fsdp" on its largest dimension divisible by the fsdp size (the
                  first such on ties); vectors, scalars and leaves without a divisible dimension stay
                  replicated. The rule looks only at shapes, so Adam's moments always follow their params.

The state is created sharded (`jax.eval_shape` -> shardings -> `jit(init, out_shardings=...)`), so no
device ever holds the whole model unless the mesh says so.

Optimizer: AdamW (b1 0.9, b2 0.95, eps 1e-8) with linear warmup to `learning_rate` over `warmup_steps`
then cosine decay to `end_lr_ratio * learning_rate` at `steps`; global-norm clipping at `grad_clip` (0:
off); weight decay on matrices only (not norm scales). Parameters and optimizer state are float32; the
model computes in `model.compute_dtype`.

Gradient accumulation: `grad_accum` microbatches run inside the one jitted step under `lax.scan`, and
the step makes one optimizer update. (optax.MultiSteps would instead call the step `grad_accum` times
per update: a step would no longer be an update, which the LR schedule, the checkpoint numbering, the
data position and the logs all count in.) Microbatch j takes rows j, j + grad_accum, ... of the global
batch, so every device keeps its share of rows in every microbatch and no rows move between devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lm_experiment import data, workdir_lock
from lm_experiment.checkpointing import CONFIG_FILE, Checkpoints, load_config, save_config
from lm_experiment.config import ExperimentConfig, MeshConfig, TrainConfig
from lm_experiment.model import DecoderLM, attention_impl_summary
from lm_experiment.run_log import RunLog
from sparse_attention import sequence_sharding
from sparse_attention.atomic_io import atomic_open, write_json

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "seq")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over these; the devices of a "seq" group share rows
SEQ_AXIS = "seq"  # activations are split over it along the sequence (`mesh.seq`)
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.95, 1e-8
SUMMARY_FILE = "train_summary.json"
DISTRIBUTED_MODES = ("auto", "on", "off")
# What a resume may change without --override_config: how long to train, and where (a checkpoint is
# resharded onto any mesh; the result differs only in the order of float reductions).
RESUME_MAY_CHANGE = ("train.steps:", "mesh.")


class WorkdirError(ValueError):
    """The workdir cannot take this run: missing parent, not a folder, or checkpoints of another config."""


class MeshError(ValueError):
    """The mesh or the batch does not fit the devices there are."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss, gradient or state; nothing after the last good checkpoint
    was saved."""


# --------------------------------------------------------------------------------------------------
# Multi-process start-up


def cluster_environment() -> str | None:
    """Which multi-process launcher the environment shows, or None for a single-process run."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    # srun sets SLURM_STEP_NUM_TASKS for the processes it starts; a batch script alone has no step.
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return f"SLURM step with {env['SLURM_STEP_NUM_TASKS']} tasks"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "multi-host TPU slice (TPU_WORKER_HOSTNAMES)"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return f"Open MPI job with {env['OMPI_COMM_WORLD_SIZE']} ranks"
    return None


def initialize_distributed(mode: str = "auto") -> bool:
    """Joins the processes of a multi-process job with `jax.distributed.initialize`; returns whether it
    did. Must run before any other JAX call.

    mode "on" always initializes (JAX detects SLURM, Open MPI and Cloud TPU by itself), "off" never,
    "auto" when `cluster_environment()` sees a launcher. With JAX_COORDINATOR_ADDRESS, the process
    count and index come from JAX_NUM_PROCESSES and JAX_PROCESS_ID when set.
    """
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed must be one of {', '.join(DISTRIBUTED_MODES)}; got {mode!r}")
    reason = cluster_environment()
    if mode == "off" or (mode == "auto" and reason is None):
        return False
    kwargs = {}
    for key, env_name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if os.environ.get(env_name):
            kwargs[key] = int(os.environ[env_name])
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed initialized (%s): process %d of %d, %d local of %d devices",
             reason or "--distributed=on", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


# --------------------------------------------------------------------------------------------------
# Mesh and shardings


def make_mesh(mesh: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ("data", "fsdp", "seq") mesh over `devices` (default: all devices of all processes); its size must
    equal the number of devices. "seq" is the innermost axis: a sequence's shards sit on neighbouring devices,
    which exchange halos."""
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "seq": mesh.seq}
    for name, other in (("data", "fsdp"), ("fsdp", "data")):
        if sizes[name] == -1:
            fixed = sizes[other] * sizes["seq"]
            if count % fixed:
                raise MeshError(f"mesh.{other}: {other} x seq = {sizes[other]} x {sizes['seq']} must divide the "
                                f"number of devices ({count})")
            sizes[name] = count // fixed
    if sizes["data"] * sizes["fsdp"] * sizes["seq"] != count:
        raise MeshError(f"mesh: data x fsdp x seq = {sizes['data']} x {sizes['fsdp']} x {sizes['seq']} must equal "
                        f"the number of devices ({count}); set data or fsdp to -1 to take all remaining devices")
    return jax.make_mesh(tuple(sizes[name] for name in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def sequence_plans(config: ExperimentConfig, shards: int) -> list[sequence_sharding.ShardPlan]:
    """How each layer's attention runs with the sequence split into `shards` (none for 1); MeshError naming
    mesh.seq when the shards do not divide the sequence, cut a layer's blocks, or are shorter than its halo."""
    if shards == 1:
        return []
    seq_len = config.train.seq_len
    if seq_len % shards:
        raise MeshError(f"mesh.seq: {shards} shards must divide train.seq_len={seq_len}")
    try:
        return [sequence_sharding.plan(config.attention.layer_pattern(layer), seq_len // shards, shards)
                for layer in range(config.model.num_layers)]
    except ValueError as error:
        raise MeshError(str(error)) from error


def fsdp_partition(shape: Sequence[int], fsdp_size: int) -> P:
    """PartitionSpec of a param or optimizer-state leaf: the largest dim divisible by fsdp_size goes
    over "fsdp" (first on ties) if the leaf has >= 2 dims; otherwise replicated."""
    if fsdp_size == 1 or len(shape) < 2:
        return P()
    divisible = [dim for dim, size in enumerate(shape) if size % fsdp_size == 0]
    if not divisible:
        return P()
    sharded = max(divisible, key=lambda dim: shape[dim])
    return P(*("fsdp" if dim == sharded else None for dim in range(len(shape))))


# --------------------------------------------------------------------------------------------------
# Optimizer


def learning_rate_schedule(train: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    """Learning rate of the update that follows `count` earlier updates: update t = count + 1 (of
    train.steps) gets peak * t / warmup_steps while t <= warmup_steps, then a cosine from peak down to
    end_lr_ratio * peak at t = steps."""
    peak, end = train.learning_rate, train.learning_rate * train.end_lr_ratio
    warmup, steps = train.warmup_steps, train.steps

    def schedule(count):
        t = jnp.asarray(count, jnp.float32) + 1
        warm = peak * t / max(warmup, 1)
        progress = jnp.clip((t - warmup) / max(steps - warmup, 1), 0.0, 1.0)
        decay = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(t <= warmup, warm, decay)

    return schedule


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """Clipping (if grad_clip > 0) then AdamW with the schedule; decay only on leaves with >= 2 dims."""
    adamw = optax.adamw(learning_rate_schedule(train), b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS,
                        weight_decay=train.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    if train.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw)
    return adamw


# --------------------------------------------------------------------------------------------------
# Train state and step


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], updates applied so far
    params: dict  # nested dict of float32 arrays, the keys of nnx.to_pure_dict(model params)
    opt_state: optax.OptState


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits float32 [batch, seq, vocab] predicting tokens[:, 1:] (tokens int32
    [batch, seq + 1])."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.stack(leaves).all()


class Trainer:
    """The model, optimizer, shardings and jitted step of one config on one mesh.

        trainer = Trainer(config, mesh)
        state = trainer.init_state()
        state, metrics = trainer.step(state, trainer.make_batch(rows))   # rows: this process's rows

    `metrics` holds device scalars: loss (before the update), grad_norm (before clipping),
    learning_rate, finite (loss, gradients and the new state all finite), stop (some process asked to
    stop, see `step`).
    """

    def __init__(self, config: ExperimentConfig, mesh: Mesh):
        self.config = config
        self.mesh = mesh
        train = config.train
        self.row_groups = mesh.shape["data"] * mesh.shape["fsdp"]  # devices holding different rows
        if train.global_batch % (self.row_groups * train.grad_accum):
            raise MeshError(
                f"train.global_batch: must be a multiple of train.grad_accum x data x fsdp = "
                f"{train.grad_accum} x {self.row_groups} = {train.grad_accum * self.row_groups} (every row group takes "
                f"equal rows of every microbatch), got {train.global_batch}")
        self.sequence_shards = mesh.shape[SEQ_AXIS]
        self.shard_plans = sequence_plans(config, self.sequence_shards)
        self.optimizer = make_optimizer(train)
        self.schedule = learning_rate_schedule(train)
        abstract_model = nnx.eval_shape(self._new_model)
        self.graphdef, _ = nnx.split(abstract_model, nnx.Param)
        self.fsdp_size = mesh.shape["fsdp"]
        abstract_state = jax.eval_shape(self._init)
        self.state_shardings = jax.tree.map(
            lambda x: NamedSharding(mesh, fsdp_partition(x.shape, self.fsdp_size)), abstract_state)
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
            self.state_shardings)
        self.batch_shape = (train.global_batch, train.seq_len + 1)
        self.batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
        self._replicated = NamedSharding(mesh, P())
        self._stop_sharding = NamedSharding(mesh, P(MESH_AXES))
        self._stop_votes = {flag: self._votes(flag) for flag in (False, True)}
        self._init_jit = jax.jit(self._init, out_shardings=self.state_shardings)
        self._step_jit = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.batch_sharding, self._stop_sharding),
            out_shardings=(self.state_shardings, self._replicated),
            donate_argnums=0,
        )
        self._step_compiled = None

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.global_batch * self.config.train.seq_len

    def _new_model(self) -> DecoderLM:
        return DecoderLM(self.config.model, self.config.attention, rngs=nnx.Rngs(self.config.seed),
                         sequence_axis=SEQ_AXIS if self.sequence_shards > 1 else None)

    @property
    def sent_bytes_per_step(self) -> int:
        """Bytes each device sends for the sequence-sharded attention of one step: every layer's forward
        plus as many in the backward (the halo's gradients, or the all-gather's reduce-scatter), per
        microbatch."""
        model, train = self.config.model, self.config.train
        rows = train.global_batch // (self.row_groups * train.grad_accum)
        itemsize = jnp.dtype(model.compute_jnp_dtype).itemsize
        per_pass = sum(plan.sent_bytes(rows, model.num_heads, model.num_kv_heads, model.head_dim, itemsize)
                       for plan in self.shard_plans)
        return 2 * per_pass * train.grad_accum

    def _init(self) -> TrainState:
        _, params = nnx.split(self._new_model(), nnx.Param)
        params = nnx.to_pure_dict(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.optimizer.init(params))

    def init_state(self) -> TrainState:
        """Fresh parameters (from config.seed) and optimizer state, created in place on the mesh."""
        return self._init_jit()

    def state_at(self, step: int, params, opt_state) -> TrainState:
        """A TrainState from restored params and optimizer state after `step` updates."""
        step_array = jax.make_array_from_process_local_data(self._replicated, np.int32(step))
        return TrainState(step=step_array, params=params, opt_state=opt_state)

    def loss(self, params, tokens) -> jax.Array:
        """Mean next-token loss of the model with `params` on tokens int32 [batch, seq_len + 1]."""
        model = nnx.merge(self.graphdef, params)
        x = model.embed_tokens(tokens[:, :-1])
        if self.sequence_shards > 1:  # the residual stream, and so every activation, split along the sequence
            x = jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(BATCH_AXES, SEQ_AXIS)))
        return next_token_loss(model.logits_from_embeddings(x), tokens)

    def _train_step(self, state: TrainState, batch, stop_votes):
        accum = self.config.train.grad_accum
        grad_fn = jax.value_and_grad(self.loss)
        if accum == 1:
            loss, grads = grad_fn(state.params, batch)
        else:
            rows, width = batch.shape
            # [accum, rows / accum, width]; microbatch j = rows j, j + accum, ...
            micro = batch.reshape(rows // accum, accum, width).swapaxes(0, 1)
            micro = jax.lax.with_sharding_constraint(micro, NamedSharding(self.mesh, P(None, BATCH_AXES)))

            def accumulate(carry, tokens):
                loss_sum, grad_sum = carry
                loss, grads = grad_fn(state.params, tokens)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), micro)
            loss = loss_sum / accum
            grads = jax.tree.map(lambda g: g / accum, grad_sum)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": self.schedule(state.step),
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite((params, opt_state)),
            "stop": stop_votes.any(),
        }
        return new_state, metrics

    def compile(self) -> float:
        """Compiles the step ahead of time (so timings of the first steps exclude it); returns seconds."""
        start = time.perf_counter()
        batch = jax.ShapeDtypeStruct(self.batch_shape, jnp.int32, sharding=self.batch_sharding)
        votes = self._stop_votes[False]
        votes = jax.ShapeDtypeStruct(votes.shape, votes.dtype, sharding=self._stop_sharding)
        # The mesh as context while tracing: kernels that cannot be partitioned automatically (Mosaic TPU)
        # shard themselves over it (see mosaic_tpu.py).
        with jax.set_mesh(self.mesh):
            self._step_compiled = self._step_jit.lower(self.abstract_state, batch, votes).compile()
        return time.perf_counter() - start

    @property
    def compiled_step(self) -> jax.stages.Compiled:
        """The ahead-of-time compiled step (compiling it first if needed), e.g. for its memory analysis."""
        if self._step_compiled is None:
            self.compile()
        return self._step_compiled

    def step(self, state: TrainState, batch: jax.Array, stop: bool = False):
        """One update: (new state, metrics). `state` is donated (its buffers are reused).

        `stop` is this process's vote to stop; the step ORs all votes into metrics["stop"], so every
        process learns the same answer at the same step without an extra host synchronization.
        """
        return self.compiled_step(state, batch, self._stop_votes[bool(stop)])

    def _votes(self, flag: bool) -> jax.Array:
        """bool [devices], this process's flag on each of its devices."""
        shape = (self.mesh.devices.size,)
        local = [jax.device_put(np.array([flag]), device)
                 for device in self._stop_sharding.addressable_devices_indices_map(shape)]
        return jax.make_array_from_single_device_arrays(shape, self._stop_sharding, local)

    def batch_block(self) -> tuple[int, int]:
        """(index, count): this process feeds block `index` of `count` equal, contiguous row blocks of
        the global batch (the rows its devices hold)."""
        indices = self.batch_sharding.addressable_devices_indices_map(self.batch_shape)
        starts = sorted({index[0].start or 0 for index in indices.values()})
        rows_per_device = self.batch_shape[0] // self.row_groups
        first, local_rows = starts[0], rows_per_device * len(starts)
        if starts != list(range(first, first + local_rows, rows_per_device)) or first % local_rows:
            raise MeshError("mesh: this process's devices must hold one contiguous block of the batch; "
                            "order the devices process by process")
        return first // local_rows, self.batch_shape[0] // local_rows

    def make_batch(self, local_rows: np.ndarray) -> jax.Array:
        """The global batch int32 [global_batch, seq_len + 1] from this process's block of rows."""
        return jax.make_array_from_process_local_data(self.batch_sharding, local_rows, self.batch_shape)


# --------------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass(frozen=True)
class TrainResult:
    start_step: int  # the step this invocation resumed from (0 if fresh)
    final_step: int
    final_loss: float | None  # None if this invocation ran no step
    preempted: bool  # stopped early on SIGTERM after saving a checkpoint
    summary: dict  # what train_summary.json holds


class _StopRequest:
    requested = False


@contextlib.contextmanager
def _sigterm_requests_stop() -> Iterator[_StopRequest]:
    """While active, SIGTERM only sets `.requested`; the loop saves and stops at the next step (the first
    step, if the signal came before the loop: every process must take part in that stop)."""
    request = _StopRequest()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield request
        return

    def handler(signum, frame):
        request.requested = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, previous)


def _record_divergence(workdir: Path, error: NonFiniteLossError, start_step: int, latest: int | None,
                       previous_config: str | None, wall_start: float) -> None:
    """After a divergence, leaves the workdir describing its checkpoints: config.json goes back to the
    previous config if this run saved none, and train_summary.json says what happened (not the last
    successful run's summary)."""
    restore_config = latest == start_step and previous_config is not None
    if restore_config:
        with atomic_open(workdir / CONFIG_FILE, "w") as file:
            file.write(previous_config)
    write_json(workdir / SUMMARY_FILE, {
        "final_step": latest, "start_step": start_step, "diverged": str(error).splitlines()[0],
        "config_json": "restored to the previous run's" if restore_config else "this run's",
        "preempted": False, "wall_time_s": time.perf_counter() - wall_start,
    })


def _check_workdir(workdir: str | os.PathLike) -> Path:
    workdir = Path(workdir).absolute()
    if not workdir.parent.is_dir():
        raise WorkdirError(f"workdir: parent folder {workdir.parent} does not exist; create it first "
                           f"(the workdir itself, {workdir.name}, is created if missing)")
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"workdir: {workdir} exists and is not a folder")
    if jax.process_index() == 0:
        workdir.mkdir(exist_ok=True)
    return workdir


def _check_resumable(workdir: Path, config: ExperimentConfig, has_checkpoints: bool,
                     override_config: bool) -> None:
    """A workdir's checkpoints must belong to the same model and attention patterns, and a resume must keep
    the saved config but for RESUME_MAY_CHANGE, unless override_config."""
    saved = load_config(workdir)
    if saved is None:
        return
    before, now = saved.to_dict(), config.to_dict()
    changed = [f"{section}.{key}: {before[section][key]!r} -> {now[section][key]!r}"
               for section in ("model", "attention", "data", "train", "mesh")
               for key in now[section] if before[section][key] != now[section][key]]
    changed += [f"seed: {before['seed']} -> {now['seed']}"] if before["seed"] != now["seed"] else []
    fixed = [c for c in changed if c.startswith(("model.", "attention.pattern", "attention.schedule"))]
    if has_checkpoints and fixed:
        raise WorkdirError(f"workdir: {workdir} holds checkpoints of another model or attention pattern "
                           f"({'; '.join(fixed)}); use a new workdir")
    refused = [c for c in changed if not c.startswith(RESUME_MAY_CHANGE)]
    if has_checkpoints and refused and not override_config:
        raise WorkdirError(f"workdir: {workdir} holds checkpoints trained with another config "
                           f"({'; '.join(refused)}); rerun with --override_config to resume with this one, or "
                           f"use a new workdir")
    if changed:
        log.warning("config differs from the one saved in %s: %s", workdir, "; ".join(changed))


def training_tokens(config: ExperimentConfig) -> np.ndarray:
    """The train split of the configured corpus (memory-mapped), preparing a "files" corpus from
    data.path on first use (process 0 prepares, the others wait). Any problem with the data is a DataError
    that names the config field."""
    try:
        return _training_tokens(config)
    except ValueError as error:  # the data module's checks of names, splits and sources
        raise data.DataError(f"data (corpus {config.data.corpus!r}, data_dir {config.data.data_dir!r}): "
                             f"{str(error).splitlines()[0]}") from error


def _training_tokens(config: ExperimentConfig) -> np.ndarray:
    data_dir = Path(config.data.data_dir)
    corpus = config.data.corpus
    if corpus == "files":
        source = str(Path(config.data.path).resolve())
        manifest = data_dir / corpus / "manifest.json"
        prepared_from = (json.loads(manifest.read_text()).get("sources") if manifest.exists() else None)
        if prepared_from != [{"split": "auto", "path": source}] and jax.process_index() == 0:
            log.info("preparing data.path %s as corpus 'files' under %s", source, data_dir.absolute())
            data.prepare_files(source, name=corpus, data_dir=data_dir)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("files corpus prepared")
    return data.load_tokens(corpus, "train", data_dir=data_dir)


def _active_fractions(config: ExperimentConfig) -> list[dict]:
    seq_len = config.train.seq_len
    causal_pairs = seq_len * (seq_len + 1) / 2
    layers = []
    for index in range(config.model.num_layers):
        pattern = config.attention.layer_pattern(index)
        layer = {"layer": index, "pattern": pattern.spec,
                 "active_fraction": pattern.count_active(seq_len) / causal_pairs}
        topk = pattern.block_selection()
        if topk is not None:
            # The chosen blocks depend on the content: the fraction above is the static part's, and each query
            # sees up to this many keys more (fewer where the static part holds some of them already).
            layer["chosen_keys_per_query_at_most"] = topk.count * topk.size
        layers.append(layer)
    return layers


class _Progress:
    """Host-side bookkeeping of fetched metrics: log lines, throughput, the summary's numbers."""

    def __init__(self, run_log: RunLog, *, start_step: int, end_step: int, log_every: int,
                 tokens_per_step: int):
        self.run_log = run_log
        self.start_step = start_step
        self.end_step = end_step
        self.log_every = log_every
        self.tokens_per_step = tokens_per_step
        self.start_time = time.perf_counter()
        self.last_log = (start_step, self.start_time)
        self.last_step = start_step
        self.last_time = self.start_time
        self.recent_losses: list[float] = []

    def record(self, step: int, metrics: dict) -> None:
        now = time.perf_counter()
        loss = float(metrics["loss"])
        self.recent_losses = (self.recent_losses + [loss])[-self.log_every:]
        elapsed = now - self.start_time
        self.last_step, self.last_time = step, now
        tokens_per_sec = (step - self.start_step) * self.tokens_per_step / max(elapsed, 1e-9)
        self.run_log.progress(step, loss, tokens_per_sec)
        if step % self.log_every == 0 or step == self.end_step:
            logged_step, logged_time = self.last_log
            window = now - logged_time
            self.run_log.log({
                "step": step,
                "loss": loss,
                "loss_avg": float(np.mean(self.recent_losses[-(step - logged_step):])),
                "grad_norm": float(metrics["grad_norm"]),
                "learning_rate": float(metrics["learning_rate"]),
                "tokens_per_sec": (step - logged_step) * self.tokens_per_step / max(window, 1e-9),
                "step_time_s": window / (step - logged_step),
            })
            self.last_log = (step, now)

    @property
    def final_loss(self) -> float | None:
        return self.recent_losses[-1] if self.recent_losses else None

    def mean_tokens_per_sec(self) -> float | None:
        steps = self.last_step - self.start_step
        return steps * self.tokens_per_step / (self.last_time - self.start_time) if steps else None


def train(config: ExperimentConfig, workdir: str | os.PathLike, *, until_step: int | None = None,
          devices: Sequence[jax.Device] | None = None, override_config: bool = False) -> TrainResult:
    """Trains (or resumes training) in `workdir` until config.train.steps; returns what happened.

    Resumes from the newest checkpoint in workdir/checkpoints that verifies; a resume whose config differs
    from the saved one in anything but train.steps and the mesh raises WorkdirError unless
    `override_config`. `until_step` stops earlier, after saving a checkpoint there, as a preemption would
    (the schedule still runs to train.steps); rerunning continues. SIGTERM makes the loop save a checkpoint
    at the next step and return with `preempted=True`. A non-finite loss, gradient or state raises
    NonFiniteLossError before anything from that step is saved. `devices` defaults to all devices of all
    processes. Process 0 holds the workdir's lock throughout (`workdir_lock`): a second run on the same
    workdir raises WorkdirBusyError before touching anything.
    """
    wall_start = time.perf_counter()
    created = not Path(workdir).exists()
    workdir = _check_workdir(workdir)
    # SIGTERM is caught from here on, so that one arriving during start-up, restore or compilation also
    # ends in a saved checkpoint and a preempted result (exit 75), not a killed process.
    with (workdir_lock.hold(workdir) if jax.process_index() == 0 else contextlib.nullcontext(),
          _sigterm_requests_stop() as sigterm):
        try:
            return _train(config, workdir, until_step, devices, override_config, wall_start, sigterm)
        except BaseException:
            if created and jax.process_index() == 0:  # under the lock: no other run is using the workdir
                _remove_if_unused(workdir)
            raise


def _remove_if_unused(workdir: Path) -> None:
    """Removes a workdir this run created if the run failed before writing anything but its lock file."""
    if {path.name for path in workdir.iterdir()} <= {workdir_lock.LOCK_FILE}:
        (workdir / workdir_lock.LOCK_FILE).unlink(missing_ok=True)
        workdir.rmdir()


def _train(config: ExperimentConfig, workdir: Path, until_step: int | None, devices: Sequence[jax.Device] | None,
           override_config: bool, wall_start: float, sigterm: _StopRequest) -> TrainResult:
    train_config = config.train
    end_step = train_config.steps if until_step is None else min(until_step, train_config.steps)
    mesh = make_mesh(config.mesh, devices)
    is_main = jax.process_index() == 0
    impl_line = attention_impl_summary(config, train_config.seq_len)
    log.info("%s", impl_line)
    log.info("devices: %d x %s over %d process(es); mesh data=%d fsdp=%d seq=%d",
             mesh.devices.size, jax.default_backend(), jax.process_count(), mesh.shape["data"],
             mesh.shape["fsdp"], mesh.shape[SEQ_AXIS])
    trainer = Trainer(config, mesh)
    if trainer.shard_plans:
        methods = ", ".join(f"{plan.pattern}: " + (f"halo of {plan.halo}" if plan.method == "halo" else plan.method)
                            for plan in dict.fromkeys(trainer.shard_plans))
        log.info("sequence sharding over %d shards of %d positions (%s); each device sends %d bytes per step",
                 trainer.sequence_shards, train_config.seq_len // trainer.sequence_shards, methods,
                 trainer.sent_bytes_per_step)
    tokens = training_tokens(config)
    block, blocks = trainer.batch_block()

    checkpoints = Checkpoints(workdir, keep=train_config.keep_checkpoints,
                              async_save=train_config.async_checkpoint)
    run_log = None
    try:
        has_checkpoints = checkpoints.latest_step() is not None
        _check_resumable(workdir, config, has_checkpoints, override_config)
        saved_config = workdir / CONFIG_FILE
        previous_config = saved_config.read_text() if has_checkpoints and saved_config.exists() else None
        restored = (checkpoints.restore_newest_valid(trainer.abstract_state.params, trainer.abstract_state.opt_state)
                    if has_checkpoints else None)
        save_config(workdir, config)
        if restored is None:
            start_step = 0
            state = trainer.init_state()
        else:
            start_step, params, opt_state = restored
            state = trainer.state_at(start_step, params, opt_state)
            log.info("resumed from the checkpoint at step %d in %s", start_step, checkpoints.directory)
        compile_seconds = trainer.compile() if start_step < end_step else 0.0
        log.info("train step compiled in %.1f s", compile_seconds)

        run_log = RunLog(workdir, start_step=start_step, total_steps=train_config.steps, enabled=is_main)
        progress = _Progress(run_log, start_step=start_step, end_step=end_step,
                             log_every=train_config.log_every, tokens_per_step=trainer.tokens_per_step)

        def fetch(step: int, metrics) -> bool:
            """Checks and records step's metrics; returns whether the processes agreed to stop."""
            values = jax.device_get(metrics)
            if not values["finite"]:
                latest = checkpoints.latest_step()
                raise NonFiniteLossError(
                    f"training diverged at step {step}: loss={float(values['loss'])}, "
                    f"grad_norm={float(values['grad_norm'])}, learning_rate="
                    f"{float(values['learning_rate']):.3g} (loss, gradients or the updated state are not "
                    f"finite); nothing from this step was saved, the last good checkpoint is "
                    + (f"step {latest} in {checkpoints.directory}" if latest is not None else "none"))
            progress.record(step, values)
            return bool(values["stop"])

        step, pending, stop = start_step, None, False
        while step < end_step and not stop:
            rows = data.batch_for_step(tokens, seed=config.seed, step=step, process_index=block,
                                       process_count=blocks, global_batch=train_config.global_batch,
                                       seq_len=train_config.seq_len)
            state, metrics = trainer.step(state, trainer.make_batch(rows), stop=sigterm.requested)
            step += 1
            # The previous step's metrics arrive while this step runs: the host never waits idle.
            if pending is not None:
                stop = fetch(*pending)
            pending = (step, metrics)
            every = train_config.checkpoint_every
            if stop or step == end_step or (every and step % every == 0):
                stop = fetch(*pending) or stop  # a state is saved only once known finite
                pending = None
                checkpoints.save(step, state.params, state.opt_state)
        if pending is not None:
            fetch(*pending)
        checkpoints.wait()
    except NonFiniteLossError as error:
        if is_main:
            _record_divergence(workdir, error, start_step, checkpoints.latest_step(), previous_config, wall_start)
        raise
    finally:
        checkpoints.close()
        if run_log is not None:
            run_log.close()

    preempted = stop and step < end_step
    if preempted:
        log.warning("SIGTERM: saved the checkpoint at step %d; rerun the same command to resume", step)
    summary = {
        "final_step": step,
        "final_loss": progress.final_loss,
        "final_loss_avg": float(np.mean(progress.recent_losses)) if progress.recent_losses else None,
        "start_step": start_step,
        "steps_this_run": step - start_step,
        "mean_tokens_per_sec": progress.mean_tokens_per_sec(),
        "tokens_per_step": trainer.tokens_per_step,
        "wall_time_s": time.perf_counter() - wall_start,
        "compile_time_s": compile_seconds,
        "preempted": preempted,
        "attention_impl": impl_line,
        "attention_layers": _active_fractions(config),
        "seq_len": train_config.seq_len,
        "backend": jax.default_backend(),
        "devices": mesh.devices.size,
        "processes": jax.process_count(),
        "mesh": {name: mesh.shape[name] for name in MESH_AXES},
        "sequence_sharding": [dataclasses.asdict(plan) for plan in trainer.shard_plans],
        "sent_bytes_per_step": trainer.sent_bytes_per_step,
    }
    if is_main:
        write_json(workdir / SUMMARY_FILE, summary)
    return TrainResult(start_step=start_step, final_step=step, final_loss=progress.final_loss,
                       preempted=preempted, summary=summary)
