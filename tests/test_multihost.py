"""Several processes: 2 processes x 4 CPU devices train, checkpoint, resume and export like 1 process x 8 devices;
a checkpoint saved on one mesh restores onto another; the MFT_JAX_* process settings are checked."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from mft_jax import checkpoint, config, convert, data, distributed, export, model, optim, sharding
from mft_jax.state import StateLayout
from mft_jax.trees import flatten, get_path
from run_fixtures import make_model_dir, make_run
from tolerances import assert_close, assert_same_adam_training, forward_length, rounding_bound, step_length

STEPS, SPLIT = 6, 3  # steps of each run; the resumed runs stop after SPLIT and resume from that checkpoint

# One training process: runs steps [0, split) from config FIRST, resumes from its checkpoint for the rest with
# config REST (same run directory; another mesh is allowed), then exports through the CLI (process 0 writes).
CHILD = textwrap.dedent("""
    import sys
    from mft_jax import cli, distributed
    distributed.initialize()
    import jax
    from mft_jax import config, train
    first, rest, split, out, processes = sys.argv[1:]
    assert (jax.process_count(), jax.device_count()) == (int(processes), 8), jax.devices()
    summary = train.train(config.load(first, verbose=False), max_steps_this_run=int(split))
    assert summary["stopped"] == "max_steps_this_run", summary
    run = config.load(rest, verbose=False)
    summary = train.train(run)
    assert summary["start_step"] == int(split) and summary["stopped"] is None, summary
    cli.main(["export", run.run_dir, "--out", out])
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _mesh(data, fsdp, tensor):
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


def _child_env(local_devices: int, process_id: int | None = None, port: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MFT_JAX_")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    # LLVM's optimizations are most of the compile time of these small programs; every run compared here uses
    # the same flags, so their numbers stay comparable.
    flags += [f"--xla_force_host_platform_device_count={local_devices}", "--xla_backend_optimization_level=0"]
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               PYTHONUNBUFFERED="1")
    if process_id is not None:
        env.update(MFT_JAX_COORDINATOR=f"localhost:{port}", MFT_JAX_NUM_PROCESSES="2",
                   MFT_JAX_PROCESS_ID=str(process_id))
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of the same MFT config, started together (they overlap on the CPUs), each stopped after SPLIT
    steps and resumed from that checkpoint for the rest, then exported:
      multi:   2 processes x 4 devices, mesh (1, 4, 2): fsdp spans both processes, so each process holds a part of
               every score matrix and its Adam moments;
      single:  1 process x 8 devices, mesh (2, 4, 1), resumed on mesh (8, 1, 1).
    Returns {name: (run config, export directory)}."""
    root = tmp_path_factory.mktemp("multihost")
    model_dir = make_model_dir(root / "model", num_layers=2)
    # Adam moves every score by about lr at first, so a moderate lr keeps reduction-order noise small.
    base = make_run(root, model_dir, optim={"lr": 0.01}, train={"max_steps": STEPS}, mask={"masked_layers": [1]})
    for split in ("train", "dev"):  # built once here, not by every process at once
        data.build_dataset(base.data, model_dir, split)
    configs = {}
    for name, mesh in [("multi", _mesh(1, 4, 2)), ("single", _mesh(2, 4, 1)), ("single_rest", _mesh(8, 1, 1))]:
        raw = {**base.to_dict(), "run_dir": str(root / name.split("_")[0] / "run"), "mesh": mesh}
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(raw))
    script = root / "child.py"
    script.write_text(CHILD)
    exports = {name: root / name / "export" for name in ("multi", "single")}
    port = _free_port()

    def start(name, args, env):
        log = open(root / f"{name}.log", "w")
        return name, log, subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, stdout=log,
                                           stderr=subprocess.STDOUT)

    procs = [start(f"multi_{i}", [configs["multi"], configs["multi"], SPLIT, exports["multi"], 2],
                   _child_env(4, process_id=i, port=port)) for i in range(2)]
    procs.append(start("single", [configs["single"], configs["single_rest"], SPLIT, exports["single"], 1],
                       _child_env(8)))
    deadline = time.time() + 300
    try:
        while time.time() < deadline and any(proc.poll() is None for _, _, proc in procs):
            if any(proc.poll() not in (None, 0) for _, _, proc in procs):
                break  # a failed process leaves its peer waiting in a collective: stop them all now
            time.sleep(0.2)
    finally:
        for _, log, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    failed = [name for name, _, proc in procs if proc.returncode != 0]
    assert not failed, "\n\n".join(f"== {name} (exit {proc.returncode}):\n" + (root / f"{name}.log").read_text()[-5000:]
                                   for name, _, proc in procs if name in failed)
    return {name: (config.load(configs[name], verbose=False), exports[name]) for name in exports}


def _metrics(run: config.RunConfig) -> list[dict]:
    """The step records of metrics.jsonl (those with a loss), not its events (a resume's recorded mesh change)."""
    rows = [json.loads(line) for line in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def _assert_same_training(run, ref_run, export_dir, ref_export_dir):
    """Two runs of one config on other meshes (so every reduction in other orders): per-step losses, the final
    dev loss, the final checkpointed state (restored in this process, whoever saved it) within their rounding
    bounds; exported masks identical but for swaps across the top-k cut of scores that close to it."""
    cfg = convert.load_config(run.model.path)
    seq_len, rows_per_step = run.data.max_seq_length, run.train.batch_size
    rows, ref_rows = _metrics(run), _metrics(ref_run)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, STEPS + 1))
    ref_losses = np.array([r["loss"] for r in ref_rows])
    step_n = step_length(cfg, seq_len, rows_per_step * seq_len)  # every reduction of a step, tokens included
    assert_close([r["loss"] for r in rows], ref_losses, rounding_bound(step_n, ref_losses), "losses")
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    dev_n = forward_length(cfg, seq_len) + cfg.vocab_size + 16 * seq_len  # the forward, log-softmax, 16 dev rows
    ref_dev = ref_rows[-1]["dev_loss"]
    assert_close(rows[-1]["dev_loss"], ref_dev, rounding_bound(dev_n, ref_dev), "dev loss")
    state, ref_state = _restore(run, STEPS, (8, 1, 1)), _restore(ref_run, STEPS, (8, 1, 1))
    assert int(state["step"]) == int(ref_state["step"]) == STEPS
    counts = [x for x in jax.tree.leaves((state["opt_state"], ref_state["opt_state"])) if x.dtype.kind in "iu"]
    assert len(counts) >= 2 and all(int(c) == STEPS for c in counts)  # Adam's and the schedule's step counts
    schedule = optim.lr_schedule(run.optim, STEPS)
    value_bounds = assert_same_adam_training(state, ref_state, run.optim, steps=STEPS, n=step_n,
                                             lr_sum=sum(float(schedule(t)) for t in range(STEPS)))
    result = json.loads((export_dir / "export.json").read_text())
    ref_result = json.loads((ref_export_dir / "export.json").read_text())
    assert result["step"] == ref_result["step"] == STEPS
    masks, _ = export.load_masks(result["masks"])
    ref_masks, _ = export.load_masks(ref_result["masks"])
    assert flatten(masks).keys() == flatten(ref_masks).keys()
    scores, ref_scores = flatten(state["trainable"]), flatten(ref_state["trainable"])
    bounds = {tuple(k.key for k in path): bound for path, bound in value_bounds.items()}
    for path, ref_m in flatten(ref_masks).items():
        _assert_same_mask(get_path(masks, path), ref_m, np.asarray(scores[path]), np.asarray(ref_scores[path]),
                          bounds[path], str(path))


def _assert_same_mask(mask, ref_mask, score, ref_score, score_bound, what):
    """Equal masks, except for elements swapped across the top-k cut by scores that differ within `score_bound`:
    a swapped pair's |scores| are in opposite orders in the two runs, so both lie within the sum of their bounds
    of the cut (the smallest kept |score|) in each run. A real difference (a wrong count, a wrong score) moves
    masks far from the cut."""
    swapped = mask != ref_mask
    if not swapped.any():
        return
    assert mask.sum() == ref_mask.sum(), what
    near = 2 * score_bound[swapped].max()
    for m, s in ((mask, score), (ref_mask, ref_score)):
        cut = np.abs(s)[m].min()
        assert_close(np.abs(s[swapped]), cut, near, f"{what}: masks differ at {int(swapped.sum())} elements")


def _restore(run: config.RunConfig, step: int, mesh_shape: tuple):
    """The checkpointed state at `step`, restored onto a mesh of this process's 8 devices (no compiling)."""
    mesh = sharding.make_mesh(config.MeshConfig(*mesh_shape))
    cfg = convert.load_config(run.model.path)
    shapes = model.param_shapes(cfg, run.model.dtype)
    layout = StateLayout.for_run(run, cfg, mesh, sharding.param_shardings(cfg, mesh, shapes), total_steps=STEPS)
    checkpointer = checkpoint.Checkpointer(Path(run.run_dir) / "checkpoints")
    try:
        return checkpointer.restore(step, layout.checkpoint_target(shapes), data=False)[0]
    finally:
        checkpointer.close()


def test_two_processes_match_one(runs):
    (run, export_dir), (ref_run, ref_export_dir) = runs["multi"], runs["single"]
    # metrics.jsonl is written by process 0 alone (every step once), the losses as with one process.
    _assert_same_training(run, ref_run, export_dir, ref_export_dir)
    # Each process saved its own data position (and the resume read it back: else the losses would differ).
    # (The state the two processes saved, each its part of the scores, restored in one process above.)
    data_dir = Path(run.run_dir) / "checkpoints" / str(SPLIT) / "data"
    positions = [json.loads((data_dir / f"process_{i}.json").read_text()) for i in range(2)]
    assert [p["settings"]["process_index"] for p in positions] == [0, 1]
    assert [p["settings"]["batch_size"] for p in positions] == [run.train.batch_size // 2] * 2


def test_checkpoint_restores_onto_another_mesh(runs):
    (run, export_dir), (ref_run, ref_export_dir) = runs["single"], runs["multi"]
    # Saved on (2, 4, 1) (fsdp-sharded scores and Adam moments), restored onto (8, 1, 1): the same values bit for
    # bit, laid out on the new mesh.
    saved, moved = _restore(run, SPLIT, (2, 4, 1)), _restore(run, SPLIT, (8, 1, 1))
    score = flatten(saved["trainable"])[("layers_1", "mlp", "up_proj", "kernel")]
    assert score.addressable_shards[0].data.shape[0] == score.shape[0] // 4
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(moved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.mesh.shape == {"data": 8, "fsdp": 1, "tensor": 1}
    # Training went on from it on (8, 1, 1) (the run's second half) exactly as the run that kept its mesh.
    _assert_same_training(run, ref_run, export_dir, ref_export_dir)


# --------------------------------------------------------------------------------------------------------
# The process settings (no processes started)
# --------------------------------------------------------------------------------------------------------

EXPLICIT = {"MFT_JAX_COORDINATOR": "10.0.0.1:8476", "MFT_JAX_NUM_PROCESSES": "4", "MFT_JAX_PROCESS_ID": "3"}


def test_explicit_settings():
    assert distributed.explicit_settings({}) is None
    assert distributed.explicit_settings({**EXPLICIT, "MFT_JAX_LOCAL_DEVICE_IDS": "0,1"}) == {
        "coordinator_address": "10.0.0.1:8476", "num_processes": 4, "process_id": 3, "local_device_ids": [0, 1]}


@pytest.mark.parametrize("change, message", [
    ({"MFT_JAX_PROCESS_ID": None}, r"MFT_JAX_COORDINATOR, MFT_JAX_NUM_PROCESSES set but MFT_JAX_PROCESS_ID not"),
    ({"MFT_JAX_COORDINATOR": None, "MFT_JAX_NUM_PROCESSES": None}, r"but MFT_JAX_COORDINATOR, MFT_JAX_NUM_PROC"),
    ({"MFT_JAX_PROCESS_ID": "4"}, r"MFT_JAX_PROCESS_ID=4 is not in \[0, MFT_JAX_NUM_PROCESSES=4\)"),
    ({"MFT_JAX_NUM_PROCESSES": "two"}, r"MFT_JAX_NUM_PROCESSES='two' is not an integer"),
    ({"MFT_JAX_COORDINATOR": "10.0.0.1"}, r"MFT_JAX_COORDINATOR='10.0.0.1' is not host:port"),
    ({"MFT_JAX_LOCAL_DEVICE_IDS": "0;1"}, r"MFT_JAX_LOCAL_DEVICE_IDS='0;1' is not a comma-separated list"),
])
def test_half_given_settings_are_refused(change, message):
    environ = {k: v for k, v in {**EXPLICIT, **change}.items() if v is not None}
    with pytest.raises(config.ConfigError, match=message):
        distributed.initialize(environ)


@pytest.mark.parametrize("environ, detected", [
    ({}, False),
    ({"MFT_JAX_AUTO_DISTRIBUTED": "1"}, True),
    ({"MFT_JAX_AUTO_DISTRIBUTED": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, False),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "1"}, True),
    ({"SLURM_NTASKS": "4"}, False),  # an salloc shell running one python
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
])
def test_cluster_detection(environ, detected):
    assert (distributed.detected_cluster(environ) is not None) == detected


@pytest.mark.parametrize("environ, expected", [
    (EXPLICIT, {"coordinator_address": "10.0.0.1:8476", "num_processes": 4, "process_id": 3,
                "cluster_detection_method": "deactivate"}),  # no SLURM-style one-GPU-per-process guess
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, {}),  # JAX detects the rest
])
def test_initialize_arguments(monkeypatch, environ, expected):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    assert distributed.initialize(environ) is True
    assert calls == [expected]


def test_one_process_does_nothing():
    assert distributed.initialize({}) is False
    assert distributed.initialize({"MFT_JAX_COORDINATOR": "localhost:1234", "MFT_JAX_NUM_PROCESSES": "1",
                                   "MFT_JAX_PROCESS_ID": "0"}) is False
    assert not jax.distributed.is_initialized()


def test_cli_names_a_half_given_setting(tmp_path):
    env = {**os.environ, "MFT_JAX_COORDINATOR": "localhost:1234"}
    out = subprocess.run([sys.executable, "-m", "mft_jax", "train", "--config", str(tmp_path / "none.yaml")],
                         env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "MFT_JAX_NUM_PROCESSES, MFT_JAX_PROCESS_ID not" in out.stderr, out.stderr
