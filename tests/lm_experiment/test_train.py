"""Training end to end on tiny models: every variant, learning, resume, meshes, multi-process, SIGTERM,
divergence, bad configs.

Most tests shrink the `tiny` preset (d_model 32, 2 layers, seq_len 64-128, batch 4) so a step takes a few
milliseconds on CPU; compiling dominates. Multi-device and multi-process runs use virtual CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count) in subprocesses.
"""

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tensorboard.backend.event_processing import event_accumulator

from lm_experiment import checkpointing, data, training, workdir_lock
from lm_experiment.config import ExperimentConfig, MeshConfig
from lm_experiment.model import DecoderLM
from lm_experiment.run_log import read_metrics

REPO = Path(__file__).resolve().parents[2]
SMALL = {
    "model.d_model": 32, "model.num_layers": 2, "model.mlp_hidden": 64,
    "train.seq_len": 64, "train.global_batch": 4, "train.steps": 10, "train.warmup_steps": 1,
    "train.log_every": 1, "train.checkpoint_every": 0,
    "data.data_dir": str(data.DEFAULT_DATA_DIR),
}
# A constant learning rate, so runs of different train.steps follow the same schedule.
CONSTANT_LR = {"train__warmup_steps": 0, "train__end_lr_ratio": 1.0}


@pytest.fixture(scope="module", autouse=True)
def code_corpus():
    data.prepare("code")  # downloaded once into the repository's data/ (as tests/lm_experiment/test_data.py does)


def config_dict(argument: str, overrides: dict):
    """configs/FILE:ARG as ml_collections' config_flags loads it, with dotted-key overrides."""
    path, _, arg = argument.partition(":")
    spec = importlib.util.spec_from_file_location(f"config_{Path(path).stem}", REPO / "configs" / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cd = module.get_config(arg or None)
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (cd[section] if section else cd)[name] = value
    return cd


def small_config(argument: str = "repaired.py:tiny", **overrides) -> ExperimentConfig:
    """`argument`'s config shrunk by SMALL, then `overrides` (dotted keys with "." written as "__")."""
    merged = {**SMALL, **{key.replace("__", "."): value for key, value in overrides.items()}}
    return ExperimentConfig.from_config_dict(config_dict(argument, merged))


def flags_of(config: ExperimentConfig) -> list[str]:
    """train.py --config.* flags that reproduce config from its config file."""
    flags = []
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            flags += [f"--config.{section}.{key}={value}" for key, value in values.items()
                      if not isinstance(value, list)]
    return flags


def cli_env(devices: int = 1, **extra) -> dict:
    inherited = {key: value for key, value in os.environ.items()
                 if not key.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
    return {**inherited, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def train_cli(config_file: str, config: ExperimentConfig, workdir: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", f"--config=configs/{config_file}", f"--workdir={workdir}",
         *flags_of(config)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"train.py did not finish in {timeout} s:\n{output[-4000:]}")
    return process.returncode, output


def losses(workdir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(workdir)}


def params_of(workdir: Path, step: int | None = None):
    model, _, restored_step = checkpointing.restore_model(workdir, step)
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param))), restored_step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------


def test_learning_rate_schedule_and_fsdp_rule():
    train = small_config(train__steps=100, train__warmup_steps=10, train__learning_rate=1e-3,
                         train__end_lr_ratio=0.1).train
    schedule = training.learning_rate_schedule(train)
    lr = {t: float(schedule(t - 1)) for t in (1, 5, 10, 55, 100)}  # update t follows t - 1 updates
    assert lr[1] == pytest.approx(1e-4) and lr[5] == pytest.approx(5e-4) and lr[10] == pytest.approx(1e-3)
    assert lr[55] == pytest.approx(1e-4 + 0.9e-3 * 0.5) and lr[100] == pytest.approx(1e-4)

    P = jax.sharding.PartitionSpec
    assert training.fsdp_partition((260, 128), 1) == P()
    assert training.fsdp_partition((260, 128), 2) == P("fsdp", None)  # largest divisible dim
    assert training.fsdp_partition((128, 384), 4) == P(None, "fsdp")
    assert training.fsdp_partition((96, 96), 4) == P("fsdp", None)  # first on ties
    assert training.fsdp_partition((130, 7), 4) == P()  # no divisible dim
    assert training.fsdp_partition((128,), 2) == P()  # vectors stay replicated


VARIANTS = {
    "dense": ("dense.py:tiny", {}),
    "block": ("block.py:tiny", {}),
    "window": ("window.py:tiny", {}),
    "repaired-bridge": ("repaired.py:tiny", {}),
    "repaired-prefix": ("repaired.py:tiny,prefix", {}),
    "shifted": ("block.py:tiny", {"attention__pattern": "shifted(64)"}),
    "learned": ("learned.py:tiny", {"attention__pattern": "topk(32, 1) | repaired(32, 4, bridge)"}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_step_of_every_variant(variant, tmp_path):
    argument, overrides = VARIANTS[variant]
    # seq_len 128 spans two of tiny's 64-token blocks, so every pattern differs from dense.
    config = small_config(argument, train__steps=1, train__seq_len=128, **overrides)
    result = training.train(config, tmp_path / "run")
    assert result.final_step == 1 and not result.preempted

    # The logged loss is the initial model's loss on batch 0, recomputed here with the dense reference
    # attention: the pattern, the data feed and the loss all went in as configured.
    reference = small_config(argument, train__steps=1, train__seq_len=128, attention__impl="reference",
                             **overrides)
    model = DecoderLM(reference.model, reference.attention, rngs=nnx.Rngs(reference.seed))
    tokens = data.batch_for_step(data.load_tokens("code", "train"), seed=config.seed, step=0,
                                 process_index=0, process_count=1, global_batch=4, seq_len=128)
    logits = model(tokens[:, :-1])
    expected = -np.mean(np.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
    assert losses(tmp_path / "run") == {1: pytest.approx(float(expected), rel=1e-5)}

    # The update moved every parameter, and the checkpoint holds the moved ones.
    trained, step = params_of(tmp_path / "run")
    initial = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert step == 1
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(initial)))

    summary = json.loads((tmp_path / "run" / training.SUMMARY_FILE).read_text())
    expected_layers = [config.attention.layer_pattern(i).spec for i in range(2)]
    assert [layer["pattern"] for layer in summary["attention_layers"]] == expected_layers
    fraction = {"dense": 1.0, "block": 2 * 64 * 65 / (128 * 129)}.get(variant)
    if fraction is not None:
        assert summary["attention_layers"][0]["active_fraction"] == pytest.approx(fraction)
    if variant == "learned":
        assert summary["attention_layers"][0]["chosen_keys_per_query_at_most"] == 32
    assert "-> xla" in summary["attention_impl"] and summary["final_loss"] == pytest.approx(float(expected),
                                                                                          rel=1e-5)


def test_loss_falls_over_40_steps_of_tiny(tmp_path):
    # tiny reduced to d_model 64 x 2 layers on 128-token windows (the full preset takes ~0.4 s a step
    # on a 2-core CPU); same learning rate, warmup cut to 5 steps.
    config = small_config(model__d_model=64, model__mlp_hidden=192, train__seq_len=128,
                          train__global_batch=8, train__steps=40, train__warmup_steps=5)
    result = training.train(config, tmp_path)
    by_step = losses(tmp_path)
    assert sorted(by_step) == list(range(1, 41))
    first, last = np.mean([by_step[s] for s in range(1, 6)]), np.mean([by_step[s] for s in range(36, 41)])
    assert first > np.log(256) - 0.5  # starts near uniform over bytes
    assert last < first - 1.5, (first, last)
    assert result.final_loss == by_step[40]
    summary = json.loads((tmp_path / training.SUMMARY_FILE).read_text())
    assert summary["steps_this_run"] == 40 and summary["mean_tokens_per_sec"] > 0
    assert all(m["tokens_per_sec"] > 0 and m["learning_rate"] > 0 for m in read_metrics(tmp_path))


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    config = small_config(train__steps=40, train__checkpoint_every=20, train__keep_checkpoints=3)
    straight = training.train(config, tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    first = training.train(config, interrupted, until_step=25)
    assert (first.final_step, first.preempted) == (25, False)
    # As if the process died after logging step 25 but before its checkpoint was committed.
    checkpoint_25 = interrupted / checkpointing.CHECKPOINT_DIR / "25"
    for path in sorted(checkpoint_25.rglob("*"), key=lambda p: -len(p.parts)):
        path.rmdir() if path.is_dir() else path.unlink()
    checkpoint_25.rmdir()
    assert max(losses(interrupted)) == 25
    resumed = training.train(config, interrupted)
    assert (resumed.start_step, resumed.final_step) == (20, 40)

    assert losses(interrupted) == losses(tmp_path / "straight")  # every step once, bit for bit
    assert resumed.final_loss == straight.final_loss
    (a, _), (b, _) = params_of(tmp_path / "straight"), params_of(interrupted)
    jax.tree.map(np.testing.assert_array_equal, a, b)

    events = event_accumulator.EventAccumulator(str(interrupted / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 41))  # steps 21-25 purged once


MESH_SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys
    import jax, numpy as np
    from lm_experiment import training
    from lm_experiment.config import ExperimentConfig, MeshConfig

    config = ExperimentConfig.from_config_dict(json.loads(sys.argv[1]))
    batches = np.random.default_rng(0).integers(0, 256, (3, 16, 65), dtype=np.int32)

    def run(data, fsdp, grad_accum, devices):
        cfg = dataclasses.replace(config, mesh=MeshConfig(data, fsdp),
                                  train=dataclasses.replace(config.train, grad_accum=grad_accum))
        trainer = training.Trainer(cfg, training.make_mesh(cfg.mesh, devices))
        state = trainer.init_state()
        losses = []
        for rows in batches:
            state, metrics = trainer.step(state, trainer.make_batch(rows))
            losses.append(float(metrics["loss"]))
        specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves((state.params, state.opt_state))})
        return losses, jax.device_get(state.params), specs

    assert jax.device_count() == 8
    one_losses, one_params, _ = run(1, 1, 1, jax.devices()[:1])
    results = {}
    for name, (data, fsdp, accum) in {"data4_fsdp2_accum2": (4, 2, 2), "data8": (8, 1, 1)}.items():
        losses, params, specs = run(data, fsdp, accum, None)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params),
                                                                jax.tree.leaves(one_params)))
        results[name] = {"losses": losses, "max_param_diff": diff, "specs": specs}
    print("RESULT " + json.dumps({"single": one_losses, **results}))
""")


def test_eight_device_meshes_match_one_device():
    config = small_config(train__global_batch=16)
    process = subprocess.run([sys.executable, "-c", MESH_SCRIPT, json.dumps(config.to_dict())],
                             cwd=REPO, env=cli_env(devices=8), capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads(process.stdout.split("RESULT ", 1)[1])
    for name in ("data4_fsdp2_accum2", "data8"):
        np.testing.assert_allclose(result[name]["losses"], result["single"], rtol=2e-6)
        # Adam's first updates are about lr * g / (|g| + eps) per entry (lr = 3e-3 here): reduction-order
        # noise in near-zero gradient entries moves those by a fraction of a percent of lr; a wrong
        # sharding or accumulation would move parameters by ~lr.
        assert result[name]["max_param_diff"] < 5e-5, name
    assert {"P('fsdp', None)", "P(None, 'fsdp')", "P()"} == set(result["data4_fsdp2_accum2"]["specs"])
    assert result["data8"]["specs"] == ["P()"]


SEQUENCE_SCRIPT = textwrap.dedent("""
    import dataclasses, json, re, sys
    import jax, numpy as np
    from lm_experiment import training
    from lm_experiment.config import ExperimentConfig, MeshConfig

    config = ExperimentConfig.from_config_dict(json.loads(sys.argv[1]))
    rows = np.random.default_rng(0).integers(0, 256, (4, config.train.seq_len + 1), dtype=np.int32)

    def sent_by_collectives(hlo, shards):
        # Bytes one device sends in the compiled step's float collectives: a collective-permute sends its
        # result, an all-gather (shards - 1) / shards of its result, a reduce-scatter (shards - 1) results.
        factor = {"collective-permute": 1, "all-gather": (shards - 1) / shards, "reduce-scatter": shards - 1}
        sent = 0.0
        for dims, op in re.findall(r"= f32\\[([0-9,]*)\\][^\\n]*? (collective-permute|all-gather|reduce-scatter)\\(",
                                   hlo):
            sent += 4 * np.prod([int(d) for d in dims.split(",")]) * factor[op]
        return sent

    def loss_and_grads(data, seq, devices):
        trainer = training.Trainer(dataclasses.replace(config, mesh=MeshConfig(data, 1, seq)),
                                   training.make_mesh(MeshConfig(data, 1, seq), devices))
        state, batch = trainer.init_state(), trainer.make_batch(rows)
        with jax.set_mesh(trainer.mesh):
            lowered = jax.jit(jax.value_and_grad(trainer.loss)).lower(state.params, batch)
        compiled = lowered.compile()
        loss, grads = compiled(state.params, batch)
        return (float(loss), jax.device_get(grads), trainer.sent_bytes_per_step,
                [dataclasses.asdict(plan) for plan in trainer.shard_plans],
                {"hlo_sent": sent_by_collectives(compiled.as_text(), seq)})

    one_loss, one_grads, _, _, _ = loss_and_grads(1, 1, jax.devices()[:1])
    results = {}
    for data, seq in [(1, 2), (1, 4), (1, 8), (2, 4)]:
        loss, grads, sent, plans, collectives = loss_and_grads(data, seq, jax.devices()[:data * seq])
        scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(one_grads))
        diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(one_grads)))
        results[f"{data}x{seq}"] = dict(loss=loss, grad_diff=diff / scale, sent=sent, plans=plans, **collectives)
    print("RESULT " + json.dumps({"single": one_loss, **results}))
""")


def test_sequence_shards_give_the_loss_and_gradients_of_one_device():
    # Four layers of four kinds: a repair and a window (halos), a block-local union (halo), dense (all-gather).
    schedule = ["repaired(16, 2, prefix)", "window(8)", "dense", "sinks(2) | block(16)"]
    config = small_config(model__num_layers=4, model__compute_dtype="float32", train__seq_len=256,
                          attention__schedule=schedule)
    process = subprocess.run([sys.executable, "-c", SEQUENCE_SCRIPT, json.dumps(config.to_dict())],
                             cwd=REPO, env=cli_env(devices=8), capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads(process.stdout.split("RESULT ", 1)[1])
    for name in ("1x2", "1x4", "1x8", "2x4"):
        assert result[name]["loss"] == pytest.approx(result["single"], rel=1e-5), name
        assert result[name]["grad_diff"] < 1e-4, name
        # What the compiled step's collectives send is what the plans say (XLA's own int32 token shifts aside).
        assert result[name]["hlo_sent"] == result[name]["sent"], name
    # The plans and the bytes each device sends per step: at 8 shards of 32, prefix needs the previous
    # block's last R = 2 keys, window(8) the last 7, and dense and sinks(2) | block(16) are unbounded
    # (all-gather). Per pass and device: the halos' k and v, and each all-gather's shard of q, k and v sent
    # to the 7 other devices; the backward sends as much again. float32, 4 rows per device.
    model = config.model
    plans = {plan["pattern"]: plan for plan in result["1x8"]["plans"]}
    assert {spec: (plan["method"], plan["halo"]) for spec, plan in plans.items()} == {
        "repaired(16, 2, prefix)": ("halo", 2), "window(8)": ("halo", 7), "dense": ("all_gather", 0),
        "sinks(2) | block(16)": ("all_gather", 0)}
    rows, itemsize = 4, 4
    halo_bytes = 2 * (2 + 7) * rows * model.num_kv_heads * model.head_dim * itemsize
    gather_bytes = 2 * 7 * 32 * rows * (model.num_heads + 2 * model.num_kv_heads) * model.head_dim * itemsize
    assert result["1x8"]["sent"] == 2 * (halo_bytes + gather_bytes)


def test_sequence_shards_that_cut_a_block_or_a_halo_are_refused():
    for seq, pattern, message in [(8, "repaired(64, 4, bridge)", "must be a multiple of 64"),
                                  (8, "window(40)", "halo of 39 keys, longer than a shard of 16"),
                                  (3, "window(8)", "3 shards must divide train.seq_len=128")]:
        config = small_config(train__seq_len=128, attention__pattern=pattern)
        with pytest.raises(training.MeshError, match=f"mesh.seq: .*{message}"):
            training.sequence_plans(config, seq)
    # make_mesh asks for every device: data x fsdp x seq.
    with pytest.raises(training.MeshError, match="data x fsdp x seq = 1 x 1 x 2 must equal the number of devices"):
        training.make_mesh(MeshConfig(1, 1, 2), jax.devices()[:1])


def train_in_two_processes(config_file: str, config: ExperimentConfig, workdir: Path) -> str:
    """train.py in two processes of 2 virtual CPU devices each, joined through jax.distributed on
    localhost; returns process 0's output after asserting that both exited with 0."""
    address = f"localhost:{free_port()}"
    workers = [train_cli(config_file, config, workdir,
                         env=cli_env(devices=2, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                                     JAX_PROCESS_ID=str(i)))
               for i in range(2)]
    outputs = [finish(worker) for worker in workers]
    for code, output in outputs:
        assert code == 0, output[-4000:]
    return outputs[0][1]


def test_two_processes_train_and_a_single_process_resumes(tmp_path):
    # Two processes with 2 virtual CPU devices each, joined through jax.distributed on localhost: a 2 x 2
    # (data x fsdp) mesh. They train 4 steps and checkpoint; one process on one device then resumes to
    # step 6. Every loss must match a single-process run of 6 steps (float tolerance: the reductions
    # are ordered differently).
    config = small_config("dense.py:tiny", train__steps=4, train__global_batch=8, mesh__data=2,
                          mesh__fsdp=2, **CONSTANT_LR)
    output = train_in_two_processes("dense.py:tiny", config, tmp_path / "multi")
    assert "process 0 of 2, 2 local of 4 devices" in output
    summary = json.loads((tmp_path / "multi" / training.SUMMARY_FILE).read_text())
    assert (summary["processes"], summary["devices"], summary["mesh"]) == (2, 4, {"data": 2, "fsdp": 2, "seq": 1})

    single = small_config("dense.py:tiny", train__steps=6, train__global_batch=8,
                          **CONSTANT_LR)
    resumed = training.train(single, tmp_path / "multi")
    assert (resumed.start_step, resumed.final_step) == (4, 6)
    training.train(single, tmp_path / "single")
    multi, reference = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert sorted(multi) == sorted(reference) == list(range(1, 7))
    np.testing.assert_allclose([multi[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)],
                               rtol=1e-5)


def test_two_processes_train_with_sequence_shards(tmp_path):
    # Two processes with 2 virtual CPU devices each: a data 2 x seq 2 mesh, seq innermost, so each process
    # holds both shards of its rows' sequences and feeds its own block of rows. The losses must match one
    # device's run of the same steps.
    overrides = dict(train__steps=3, train__global_batch=8, train__seq_len=128, **CONSTANT_LR)
    config = small_config(mesh__data=2, mesh__seq=2, **overrides)
    output = train_in_two_processes("repaired.py:tiny", config, tmp_path / "multi")
    assert "sequence sharding over 2 shards of 64 positions (repaired(64, 8, bridge): halo of 8)" in output
    summary = json.loads((tmp_path / "multi" / training.SUMMARY_FILE).read_text())
    assert (summary["processes"], summary["mesh"]) == (2, {"data": 2, "fsdp": 1, "seq": 2})
    training.train(small_config(**overrides), tmp_path / "single")
    multi, reference = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert sorted(multi) == sorted(reference) == [1, 2, 3]
    np.testing.assert_allclose([multi[s] for s in (1, 2, 3)], [reference[s] for s in (1, 2, 3)], rtol=1e-5)


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
    config = small_config(train__steps=100_000, **CONSTANT_LR)
    worker = train_cli("repaired.py:tiny", config, tmp_path, env=cli_env())
    deadline = time.monotonic() + 180
    while len(read_metrics(tmp_path)) < 3:
        if worker.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            pytest.fail(f"no training progress:\n{worker.communicate()[0][-4000:]}")
        time.sleep(0.2)
    worker.send_signal(signal.SIGTERM)
    code, output = finish(worker, timeout=120)
    assert code == 75, output[-4000:]
    summary = json.loads((tmp_path / training.SUMMARY_FILE).read_text())
    stopped = summary["final_step"]
    assert summary["preempted"] and 3 <= stopped < 100_000
    assert checkpointing.Checkpoints(tmp_path, keep=1, async_save=False).all_steps() == [stopped]
    assert max(losses(tmp_path)) == stopped

    rerun = small_config(train__steps=stopped + 3, **CONSTANT_LR)
    result = training.train(rerun, tmp_path)
    assert (result.start_step, result.final_step, result.preempted) == (stopped, stopped + 3, False)
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, stopped + 4))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    good = small_config(train__steps=6, train__checkpoint_every=3, train__keep_checkpoints=5)
    training.train(good, tmp_path)
    before, _ = params_of(tmp_path, 6)

    absurd = small_config(train__steps=12, train__checkpoint_every=1, train__keep_checkpoints=5,
                          train__learning_rate=1e30, train__warmup_steps=0)
    with pytest.raises(training.NonFiniteLossError,
                       match=r"training diverged at step (7|8): loss=.*last good checkpoint is step [67] "):
        training.train(absurd, tmp_path, override_config=True)
    steps = checkpointing.Checkpoints(tmp_path, keep=5, async_save=False).all_steps()
    assert steps[:2] == [3, 6] and max(steps) <= 7
    after, _ = params_of(tmp_path, 6)
    jax.tree.map(np.testing.assert_array_equal, before, after)
    for step in steps:
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params_of(tmp_path, step)[0]))
    # The workdir describes its checkpoints: the diverged settings only if a checkpoint was saved with them.
    summary = json.loads((tmp_path / training.SUMMARY_FILE).read_text())
    assert summary["final_step"] == max(steps) and summary["diverged"].startswith("training diverged at step")
    saved_rate = checkpointing.load_config(tmp_path).train.learning_rate
    assert saved_rate == (1e30 if max(steps) == 7 else good.train.learning_rate)


def test_bad_configs_give_clear_errors(tmp_path):
    config = small_config()
    unknown_pattern = subprocess.Popen(
        [sys.executable, "train.py", "--config=configs/repaired.py:tiny", f"--workdir={tmp_path / 'a'}",
         "--config.attention.pattern=blocky(64)"],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    missing_parent = train_cli("repaired.py:tiny", config, tmp_path / "missing" / "run", env=cli_env())
    code, output = finish(unknown_pattern)
    assert code != 0 and "bad config: attention.pattern:" in output and "unknown pattern 'blocky'" in output
    code, output = finish(missing_parent)
    assert code != 0 and f"workdir: parent folder {tmp_path / 'missing'} does not exist" in output
    assert not (tmp_path / "missing").exists()

    with pytest.raises(ValueError, match=r"train.seq_len: 2000000 cannot be used with attention pattern "
                                         r"'random_blocks\(1, 2, 0\)'"):
        small_config(attention__pattern="random_blocks(1, 2, 0)", train__seq_len=2_000_000)
    with pytest.raises(ValueError, match=r"mesh: data x fsdp x seq = 3 x 1 x 1 must equal the number of devices"):
        training.train(small_config(mesh__data=3), tmp_path / "b")
    training.train(small_config(train__steps=1), tmp_path / "c")
    with pytest.raises(ValueError, match="holds checkpoints of another model or attention pattern "
                                         r"\(attention.pattern: 'repaired\(64, 8, bridge\)' -> 'dense'\)"):
        training.train(small_config(train__steps=2, attention__pattern="dense"), tmp_path / "c")


LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lm_experiment import workdir_lock
    with workdir_lock.hold(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_second_run_on_a_busy_workdir_is_refused_before_it_writes(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(workdir)], cwd=REPO, env=cli_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = f"workdir: {workdir} is in use by another training run (pid {holder.pid} on host {socket.gethostname()})"
        with pytest.raises(workdir_lock.WorkdirBusyError, match=re.escape(busy)):
            training.train(small_config(train__steps=1), workdir)
        code, output = finish(train_cli("repaired.py:tiny", small_config(train__steps=1), workdir, env=cli_env()))
        assert code == 1 and output.strip().splitlines()[-1].startswith(f"train.py: {busy}"), output
        assert [path.name for path in workdir.iterdir()] == [workdir_lock.LOCK_FILE]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    training.train(small_config(train__steps=1), workdir)  # the lock died with its holder
    assert (workdir / workdir_lock.LOCK_FILE).read_text() == ""


def test_a_resume_with_another_config_needs_override(tmp_path):
    training.train(small_config(train__steps=1), tmp_path)
    changed = small_config(train__steps=2, train__learning_rate=1e-4)
    with pytest.raises(training.WorkdirError, match=r"holds checkpoints trained with another config "
                                                    r"\(train.learning_rate: 0.003 -> 0.0001\); rerun with "
                                                    r"--override_config"):
        training.train(changed, tmp_path)
    assert checkpointing.Checkpoints(tmp_path, keep=1, async_save=False).all_steps() == [1]
    result = training.train(changed, tmp_path, override_config=True)
    assert (result.start_step, result.final_step) == (1, 2)
    assert checkpointing.load_config(tmp_path).train.learning_rate == 1e-4
    longer = training.train(small_config(train__steps=3, train__learning_rate=1e-4), tmp_path)  # steps may change
    assert longer.final_step == 3


def damage(checkpoint: Path) -> Path:
    """Overwrites 8 bytes in the middle of the largest parameter file of a checkpoint folder."""
    target = max((path for path in (checkpoint / "params").rglob("*") if path.is_file()),
                 key=lambda path: path.stat().st_size)
    with open(target, "r+b") as handle:
        handle.seek(target.stat().st_size // 2)
        handle.write(b"\xff" * 8)
    return target


def test_array_sums_see_any_change_and_any_swap():
    tree = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones(5, jnp.bfloat16),
            "count": jnp.int32(7)}
    sums = checkpointing.array_sums(tree)
    assert set(sums) == {"['w']", "['b']", "['count']"} and sums == checkpointing.array_sums(dict(tree))
    changed = dict(tree, w=tree["w"].at[1, 2].add(1e-6))
    swapped = dict(tree, w=tree["w"].at[0, :2].set(jnp.array([1.0, 0.0])))
    for other in (changed, swapped):
        assert checkpointing.array_sums(other)["['w']"] != sums["['w']"]


def test_damaged_checkpoints_are_refused_and_a_resume_falls_back(tmp_path, caplog):
    config = small_config(train__steps=2, train__checkpoint_every=1, train__keep_checkpoints=5)
    training.train(config, tmp_path)
    directory = tmp_path / checkpointing.CHECKPOINT_DIR
    damage(directory / "2")
    with pytest.raises(checkpointing.CorruptCheckpointError,
                       match=rf"checkpoint of step 2 in {re.escape(str(directory))}.*; evaluate an earlier step "
                             rf"with --checkpoint {re.escape(str(directory / '1'))}"):
        checkpointing.restore_model(tmp_path)
    # Sums that disagree with readable arrays: the saved record of step 1 altered by one unit.
    record = directory / "1" / checkpointing.INTEGRITY_ITEM / "metadata"  # orbax's JSON item file
    saved = json.loads(record.read_text())
    key = sorted(saved["params"])[0]
    saved["params"][key][0] += 1
    record.write_text(json.dumps(saved))
    with pytest.raises(checkpointing.CorruptCheckpointError,
                       match=rf"step 1 .*: params{re.escape(key)} differs from the array that was saved"):
        checkpointing.restore_model(tmp_path, 1)
    saved["params"][key][0] -= 1
    record.write_text(json.dumps(saved))

    with caplog.at_level("WARNING"):
        resumed = training.train(small_config(train__steps=3, train__checkpoint_every=1,
                                              train__keep_checkpoints=5), tmp_path)
    assert (resumed.start_step, resumed.final_step) == (1, 3)
    assert "skipped the checkpoint of step 2" in caplog.text
    assert (directory / f"2{checkpointing.CORRUPT_SUFFIX}").is_dir()
    assert checkpointing.Checkpoints(tmp_path, keep=5, async_save=False).all_steps() == [1, 2, 3]
    checkpointing.restore_model(tmp_path)  # the new step 3 verifies


SIGTERM_IN_COMPILE = textwrap.dedent("""
    import json, os, signal, sys
    from lm_experiment import training
    from lm_experiment.config import ExperimentConfig

    compile_step = training.Trainer.compile

    def compile_under_sigterm(self):
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would, while XLA compiles
        return compile_step(self)

    training.Trainer.compile = compile_under_sigterm
    result = training.train(ExperimentConfig.from_config_dict(json.loads(sys.argv[1])), sys.argv[2])
    sys.exit(75 if result.preempted else 0)
""")


def test_sigterm_during_compilation_saves_and_exits_75(tmp_path):
    config = small_config(train__steps=50)
    worker = subprocess.run([sys.executable, "-c", SIGTERM_IN_COMPILE, json.dumps(config.to_dict()), str(tmp_path)],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert worker.returncode == 75, worker.stderr[-4000:]
    steps = checkpointing.Checkpoints(tmp_path, keep=1, async_save=False).all_steps()
    assert len(steps) == 1 and 1 <= steps[0] <= 2  # stopped at the first steps, with a checkpoint


def test_an_interpreter_that_could_deadlock_is_refused_in_one_line(tmp_path):
    # mosaic_gpu in Pallas' GPU interpreter with 2 CPU threads: a training step used to hang for good.
    config = small_config(attention__impl="mosaic_gpu", attention__interpret=True, model__compute_dtype="bfloat16",
                          model__d_model=128, model__num_heads=2, model__num_kv_heads=1, train__steps=1)
    code, output = finish(train_cli("repaired.py:tiny", config, tmp_path / "run", env=cli_env(PJRT_NPROC="2")),
                          timeout=120)
    assert code == 1, output[-4000:]
    assert output.strip().splitlines()[-1].startswith("train.py: impl='mosaic_gpu' cannot run here: interpret=True "
                                                      "needs XLA's CPU thread pool to have >= 16 threads, it has 2")


@pytest.mark.parametrize("override, message", [
    ("--config.foo=1", "train.py: a --config.* override names a key the config does not have: 'foo'"),
    ("--config.train.stepz=3", """train.py: a --config.* override names a key the config does not have: 'stepz'; """
                               """Did you mean "steps" instead of "stepz"?"""),
    ("--config.nosection.x=1",
     "train.py: a --config.* override names a key the config does not have: 'nosection'"),
    ("--config.mesh.data=3", "train.py: mesh: data x fsdp x seq = 3 x 1 x 1 must equal the number of devices"),
    ("--config.data.corpus=files --config.data.path=/no/such/folder",
     "train.py: data (corpus 'files', data_dir 'data'): source /no/such/folder does not exist"),
])
def test_user_errors_are_one_line_and_leave_no_workdir(tmp_path, override, message):
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "train.py", "--config=configs/repaired.py:tiny", f"--workdir={workdir}",
                             *override.split()], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and last_line.startswith(message), result.stderr
    assert not workdir.exists()


def test_a_damaged_config_json_is_named(tmp_path):
    (tmp_path / checkpointing.CONFIG_FILE).write_text('{"seed": 0, "model": {"d_model"')
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / checkpointing.CONFIG_FILE))} is not valid JSON"):
        checkpointing.load_config(tmp_path)


def test_divergence_is_one_line_from_train_py(tmp_path):
    config = small_config(train__learning_rate=1e30, train__warmup_steps=0, train__steps=3)
    code, output = finish(train_cli("repaired.py:tiny", config, tmp_path / "run", env=cli_env()), timeout=120)
    assert code == 1 and "Traceback" not in output, output[-4000:]
    assert output.strip().splitlines()[-1].startswith("train.py: training diverged at step ")
    summary = json.loads((tmp_path / "run" / training.SUMMARY_FILE).read_text())
    assert summary["diverged"].startswith("training diverged")
