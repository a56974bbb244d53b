"""The sharded MFT step: equal results across meshes, shardings, no score all-gather, resume, export."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mft_jax import config, convert, export, masking, model, optim, sharding, train
from mft_jax.trees import flatten, get_path
from run_fixtures import StepSetup, global_batch, make_model_dir, make_run
from tolerances import (FP32_EPS, assert_close, assert_same_adam_training, forward_length, rounding_bound,
                        step_length)

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model_dir = make_model_dir(root / "model")
    return root, model_dir


def _batches(cfg, steps, micro, rows, length, seed=0):
    """Synthetic [M, B, L] batches with padding and per-example loss weights; the same batch every step,
    so that the loss must fall."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(1):
        inputs = rng.integers(3, cfg.vocab_size, (micro, rows, length)).astype(np.int32)
        lengths = rng.integers(length // 2, length + 1, (micro, rows))
        idx = np.arange(length)
        real = idx[None, None, :] < lengths[..., None]
        weights = (real & (idx[None, None, :] >= 3) & (idx[None, None, :] < lengths[..., None] - 1)).astype(np.float32)
        weights /= np.maximum(weights.sum(-1, keepdims=True), 1)
        out.append({"inputs": np.where(real, inputs, 0), "targets": np.roll(inputs, -1, -1),
                    "loss_weights": weights, "positions": np.broadcast_to(idx, inputs.shape).astype(np.int32),
                    "segment_ids": real.astype(np.int32)})
    return out * steps


def _run_steps(tiny, mesh_shape, steps=5, param_dtype=None, devices=None, compute_dtype="float32"):
    root, model_dir = tiny
    # Adam's first steps move every score by about lr whatever its gradient's size, so reduction-order noise
    # in near-zero gradients shows up in proportion to lr: a moderate lr keeps the comparison meaningful.
    run = make_run(root, model_dir, mesh={"data": mesh_shape[0], "fsdp": mesh_shape[1], "tensor": mesh_shape[2]},
                   optim={"lr": 0.01}, model={"path": str(model_dir), "compute_dtype": compute_dtype})
    cfg = convert.load_config(model_dir)
    devices = devices if devices is not None else jax.devices()
    mesh = sharding.make_mesh(run.mesh, devices)
    shardings = sharding.param_shardings(cfg, mesh, model.param_shapes(cfg, param_dtype))
    _, params = convert.load_hf(model_dir, dtype=param_dtype, shardings=shardings)
    setup = StepSetup(run, cfg, mesh, shardings, steps)
    with sharding.axis_rules(), jax.set_mesh(mesh):
        state = setup.init_state(params, jax.random.key(0))
        step_fn = setup.jit_step(params)
        losses = []
        for batch in _batches(cfg, steps, 2, 8, 16):
            state, metrics = step_fn(params, state, global_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
    return setup, params, state, losses, step_fn


def _steps_one_device(run, model_dir, batches, micro):
    """(state, metrics per step) of `run` on one device, from fresh scores, over [M, B, L] batches."""
    cfg = convert.load_config(model_dir)
    mesh = sharding.make_mesh(run.mesh, jax.devices()[:1])
    shardings = sharding.param_shardings(cfg, mesh)
    _, params = convert.load_hf(model_dir, shardings=shardings)
    setup = StepSetup(run, cfg, mesh, shardings, len(batches))
    metrics = []
    with sharding.axis_rules(), jax.set_mesh(mesh):
        state = setup.init_state(params, jax.random.key(0))
        step = setup.jit_step(params)
        for batch in batches:
            state, m = step(params, state, global_batch(batch, mesh))
            metrics.append(m)
    return state, metrics


def _assert_same_training(state_a, state_b, run, cfg, steps, batch_shape):
    """Trained values and Adam's moments of two runs of the same `steps` steps on [M, B, L] batches whose
    reductions ran in other orders (same masks): within the gradients' rounding bound carried through Adam."""
    schedule = optim.lr_schedule(run.optim, steps)
    lr_sum = sum(float(schedule(t)) for t in range(steps))
    n = step_length(cfg, batch_shape[-1], int(np.prod(batch_shape)))  # every reduction of a step, tokens included
    assert_same_adam_training(state_a.saved(), state_b.saved(), run.optim, steps=steps, lr_sum=lr_sum, n=n)


def _same_step(a, b, run, cfg, batch_shape):
    """Two (state, metrics) results of one step on an [M, B, L] batch, its reductions in other orders: loss,
    grad norm, Adam's moments and every trained value agree within their rounding bounds."""
    (state_a, (metrics_a,)), (state_b, (metrics_b,)) = a, b
    n = step_length(cfg, batch_shape[-1], int(np.prod(batch_shape)))
    loss_b, norm_b = float(metrics_b["loss"]), float(metrics_b["grad_norm"])
    assert_close(metrics_a["loss"], loss_b, rounding_bound(n, loss_b), "loss")
    assert_close(metrics_a["grad_norm"], norm_b, rounding_bound(n, norm_b), "grad norm")  # normwise: relative
    _assert_same_training(state_a, state_b, run, cfg, 1, batch_shape)


@pytest.fixture(scope="module")
def single_device(tiny):
    return _run_steps(tiny, (1, 1, 1), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", MESHES, ids=[str(m) for m in MESHES])
def test_meshes_match_single_device(tiny, single_device, mesh_shape):
    _, _, ref_state, ref_losses, _ = single_device
    setup, params, state, losses, _ = _run_steps(tiny, mesh_shape)
    batch_shape = (2, 8, 16)  # as _run_steps: [M, B, L]
    # sharded matmuls, losses and gradients are summed over devices: other orders of every reduction of a step
    n = step_length(setup.cfg, batch_shape[-1], int(np.prod(batch_shape)))
    assert_close(losses, ref_losses, rounding_bound(n, np.abs(ref_losses)), "losses")
    assert losses[-1] < losses[0]  # it learns
    _assert_same_training(state, ref_state, setup.run, setup.cfg, len(losses), batch_shape)
    # Scores and both Adam moments carry exactly their weights' shardings.
    mu, nu = state.opt_state[0].mu, state.opt_state[0].nu
    for path, score in flatten(state.trainable).items():
        weight_sharding = get_path(setup.param_shardings, path)
        assert score.sharding.is_equivalent_to(weight_sharding, score.ndim), path
        assert get_path(mu, path).sharding.is_equivalent_to(weight_sharding, score.ndim)
        assert get_path(nu, path).sharding.is_equivalent_to(weight_sharding, score.ndim)
        assert get_path(state.derived["masks"], path).sharding.is_equivalent_to(weight_sharding, score.ndim)
    if mesh_shape[1] > 1:  # fsdp really shards: each device holds a slice
        score = flatten(state.trainable)[("layers_1", "mlp", "up_proj", "kernel")]
        assert score.addressable_shards[0].data.shape[0] == score.shape[0] // mesh_shape[1]
    for m in jax.tree.leaves(state.derived["masks"]):
        assert m.dtype == jnp.bool_


def test_fsdp_step_never_gathers_a_score_matrix(tiny):
    setup, params, state, _, step_fn = _run_steps(tiny, (2, 4, 1), steps=1, param_dtype=jnp.bfloat16,
                                                  compute_dtype="bfloat16")
    batch = global_batch(_batches(setup.cfg, 1, 2, 8, 16)[0], setup.mesh)
    with sharding.axis_rules(), jax.set_mesh(setup.mesh):
        hlo = step_fn.lower(params, state, batch).compile().as_text()
    score_shapes = {"[" + ",".join(map(str, s.shape)) + "]" for s in jax.tree.leaves(state.trainable)}
    gathers = [line for line in hlo.splitlines() if "all-gather(" in line or "all-gather-start(" in line]
    weight_gathers = 0
    for line in gathers:
        result_type = line.split("=", 1)[1].strip().split("{")[0]
        if any(result_type.endswith(shape) for shape in score_shapes):
            # FSDP gathers each (masked) weight for its matmul inside the model; nothing else of a score
            # matrix's shape (scores, masks, Adam moments, score gradients) may be gathered.
            op_name = line.split('op_name="', 1)[1].split('"', 1)[0]
            assert "/Llama/" in op_name and op_name.endswith("dot_general"), line
            weight_gathers += 1
    assert weight_gathers > 0, "expected fsdp to gather weights for the matmuls"


def test_fft_mode_trains_params(tiny):
    root, model_dir = tiny
    run = make_run(root, model_dir, train={"mode": "fft"})
    cfg = convert.load_config(model_dir)
    mesh = sharding.make_mesh(run.mesh)
    shardings = sharding.param_shardings(cfg, mesh)
    _, params = convert.load_hf(model_dir, shardings=shardings)
    setup = StepSetup(run, cfg, mesh, shardings, 3)
    with sharding.axis_rules(), jax.set_mesh(mesh):
        state = setup.init_state(params, jax.random.key(0))
        step_fn = setup.jit_step(params)
        losses = []
        for batch in _batches(cfg, 3, 2, 8, 16):
            state, metrics = step_fn(params, state, global_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    changed = [not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(params))]
    assert all(changed)


def test_gradient_accumulation_equals_one_big_batch(tiny):
    root, model_dir = tiny
    cfg = convert.load_config(model_dir)
    batch = _batches(cfg, 1, 4, 8, 16)[0]
    run = make_run(root, model_dir, optim={"lr": 1e-3})
    results = [_steps_one_device(run, model_dir, [{k: v.reshape(micro, -1, v.shape[-1]) for k, v in batch.items()}],
                                 micro) for micro in (4, 1)]
    _same_step(*results, run, cfg, batch["inputs"].shape)  # 4 micro-batches summed vs one: another order


@pytest.mark.parametrize("mode", ["mft", "fft"])
def test_loss_chunk_step_equals_full_logits_step(tiny, mode):
    """model.loss_chunk (head and cross-entropy 5 positions at a time, 16 per row) gives the same step."""
    root, model_dir = tiny
    cfg = convert.load_config(model_dir)
    batches = _batches(cfg, 1, 2, 8, 16)
    runs = [make_run(root, model_dir, optim={"lr": 1e-3}, train={"mode": mode, "batch_size": 16, "micro_batch_size": 8},
                     model={"path": str(model_dir), "compute_dtype": "float32", "loss_chunk": chunk})
            for chunk in (5, 0)]
    results = [_steps_one_device(run, model_dir, batches, 2) for run in runs]
    _same_step(*results, runs[1], cfg, batches[0]["inputs"].shape)  # the head's sums in chunks: another order


def test_global_mode_steps(tiny):
    """Global threshold mode through the real step: masks = score >= threshold on every layer's attention."""
    root, model_dir = tiny
    cfg = convert.load_config(model_dir)
    run = make_run(root, model_dir, optim={"lr": 1e-2},
                   mask={"mode": "global", "modules": "attn", "masked_layers": [], "threshold_attn": 0.01})
    state, (_, metrics) = _steps_one_device(run, model_dir, _batches(cfg, 2, 2, 8, 16), 2)
    assert bool(metrics["finite"]) and state.derived["mask_cuts"].shape == (0,)
    scores, masks = flatten(state.trainable), flatten(state.derived["masks"])
    assert len(scores) == 4 * cfg.num_hidden_layers and set(scores) == set(masks)
    for path, s in scores.items():
        np.testing.assert_array_equal(np.asarray(masks[path]), np.asarray(s) >= 0.01, err_msg=str(path))
    kept = sum(int(np.sum(m)) for m in masks.values()) / sum(m.size for m in masks.values())
    assert 0.2 < kept < 0.5  # N(0, 0.02) >= 0.01 at init: ~31%; a sanity range (Adam has moved the scores since)
    # a ratio of counts below 2^24, one or two float32 roundings in the step (x / total, or x * (1 / total))
    assert float(metrics["kept"]) == pytest.approx(kept, rel=2 * FP32_EPS, abs=0)


def test_nan_loss_leaves_state_untouched(tiny):
    root, model_dir = tiny
    run = make_run(root, model_dir, train={"max_steps": 3})
    cfg = convert.load_config(model_dir)
    mesh = sharding.make_mesh(run.mesh)
    shardings = sharding.param_shardings(cfg, mesh)
    _, params = convert.load_hf(model_dir, shardings=shardings)
    setup = StepSetup(run, cfg, mesh, shardings, 3)
    batch = _batches(cfg, 1, 2, 8, 16)[0]
    batch["loss_weights"] = batch["loss_weights"] * np.float32("nan")  # makes the loss NaN
    with sharding.axis_rules(), jax.set_mesh(mesh):
        state = setup.init_state(params, jax.random.key(0))
        before = jax.tree.map(np.asarray, state.trainable)
        state, metrics = setup.jit_step(params)(params, state, global_batch(batch, mesh))
    assert not bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("mode", ["mft", "fft", "lora"])
def test_state_shardings_cached_and_checkpoint_target(tiny, monkeypatch, mode):
    root, model_dir = tiny
    run = make_run(root, model_dir, train={"mode": mode}, mesh={"data": 2, "fsdp": 4, "tensor": 1},
                   lora={"rank": 4})
    cfg = convert.load_config(model_dir)
    mesh = sharding.make_mesh(run.mesh)
    shapes = model.param_shapes(cfg)
    shardings = sharding.param_shardings(cfg, mesh, shapes)
    _, params = convert.load_hf(model_dir, shardings=shardings)
    layout = StepSetup(run, cfg, mesh, shardings, 3).layout
    # The uncached reference: the whole state init traced once more.
    ref_shapes = jax.eval_shape(lambda p: layout._init(p, jax.random.key(0)), params)
    calls = []
    eval_shape = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: calls.append(1) or eval_shape(*a, **k))
    # Concrete arrays and ShapeDtypeStructs of the same shapes share one trace; the results are immutable.
    first = layout.shardings(params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.derived = {}
    again = layout.shardings(shapes)
    assert len(calls) == 1 and again is first
    assert ("masks" in again.derived) == (mode == "mft") == ("masks" in layout.shapes(params).derived)
    assert jax.tree.structure(layout.shapes(params)) == jax.tree.structure(ref_shapes)
    for a, b in zip(jax.tree.leaves(layout.shapes(params)), jax.tree.leaves(ref_shapes)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    # Another dtype is another state (fp32 master copy either way, but traced afresh).
    layout.shardings(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), shapes))
    assert len(calls) == 2
    # The restore target: the state's saved fields (derived ones are marked by the type), each leaf a
    # ShapeDtypeStruct with the state's sharding.
    target = layout.checkpoint_target(params)
    assert len(calls) == 2
    assert ("mask_cuts" in again.derived) == (mode == "mft")
    expected = ref_shapes.saved()
    assert set(target) == {"step", "trainable", "opt_state"}
    assert jax.tree.structure(target) == jax.tree.structure(expected)
    for t, e, s in zip(jax.tree.leaves(target), jax.tree.leaves(expected), jax.tree.leaves(again.saved())):
        assert isinstance(t, jax.ShapeDtypeStruct)
        assert (t.shape, t.dtype) == (e.shape, e.dtype)
        assert t.sharding == s
    for path, leaf in flatten(target["trainable"]).items():
        if mode == "lora":  # A splits the kernel's input axis, B its output axis
            kernel = get_path(shardings, path[:-1] + ("kernel",)).spec
            assert tuple(leaf.sharding.spec) == ((kernel[0], None) if path[-1] == "lora_a" else (None, kernel[1]))
        else:
            assert leaf.sharding == get_path(shardings, path)


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mft_jax", *args], capture_output=True, text=True, **kw)


def _write_config(run: config.RunConfig, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(run.to_dict()))
    return path


def test_kill_and_resume_exports_identical_masks(tiny, tmp_path):
    root, model_dir = tiny
    overrides = {"train": {"max_steps": 8}, "ckpt": {"save_every": 1, "keep": 3, "async_save": False}}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Uninterrupted.
    straight = make_run(tmp_path / "a", model_dir, **overrides)
    cfg_a = _write_config(straight, tmp_path / "a.yaml")
    assert _cli("train", "--config", str(cfg_a), env=env).returncode == 0
    # Interrupted by SIGTERM after a few steps, then restarted with the same command.
    killed = make_run(tmp_path / "b", model_dir, **overrides)
    cfg_b = _write_config(killed, tmp_path / "b.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "mft_jax", "train", "--config", str(cfg_b)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = Path(killed.run_dir) / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output
    assert "stopped (SIGTERM)" in output, output
    assert not (Path(killed.run_dir) / "DONE").exists()
    stopped_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert stopped_at < 8
    resumed = _cli("train", "--config", str(cfg_b), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert (Path(killed.run_dir) / "DONE").exists()
    # Same losses step by step, same exported masks bit for bit.
    def losses(run):
        rows = [json.loads(line) for line in (Path(run.run_dir) / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows}
    la, lb = losses(straight), losses(killed)
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    for step in la:  # exact: the resumed process replays the same compiled step on the restored (exact) state
        assert la[step] == lb[step], step
    ea = export.export_run(straight.run_dir, tmp_path / "export_a")
    eb = export.export_run(killed.run_dir, tmp_path / "export_b")
    assert ea["step"] == eb["step"] == 8
    ma, _ = export.load_masks(ea["masks"])
    mb, _ = export.load_masks(eb["masks"])
    for a, b in zip(jax.tree.leaves(ma), jax.tree.leaves(mb)):
        np.testing.assert_array_equal(a, b)


def test_export_matches_masked_forward_and_transformers(tiny, tmp_path):
    import torch

    root, model_dir = tiny
    run = make_run(tmp_path, model_dir, train={"max_steps": 3})
    train.train(run, verbose=False)
    result = export.export_run(run.run_dir, tmp_path / "export")
    # The masks file reproduces the training masks exactly.
    _, cfg, params, setup, state = export.restore_run(run.run_dir)
    masks, meta = export.load_masks(result["masks"])
    assert int(meta["step"]) == 3
    for path, m in flatten(state.derived["masks"]).items():
        np.testing.assert_array_equal(get_path(masks, path), np.asarray(m))
    # About one bit per masked weight.
    n_masked = sum(m.size for m in jax.tree.leaves(masks))
    size = Path(result["masks"]).stat().st_size
    assert n_masked / 8 <= size < n_masked / 8 + 8192
    # Exactly the configured number of zeros in each masked matrix; everything else bit-identical to the base.
    dense_cfg, dense = convert.load_hf(result["hf"])
    flat_masks = flatten(masks)
    for path, w in flatten(params).items():
        new = np.asarray(get_path(dense, path))
        if path in flat_masks:
            keep = masking.keep_fraction(path, run.mask)
            assert (new == 0).sum() - (np.asarray(w) == 0).sum() == int((1 - keep) * w.size), path
            np.testing.assert_array_equal(new, np.where(flat_masks[path], np.asarray(w), 0))
        else:
            np.testing.assert_array_equal(new, np.asarray(w))
    # transformers loads it and its logits equal our masked forward.
    hf = transformers.AutoModelForCausalLM.from_pretrained(result["hf"]).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(model.forward(cfg, masking.apply_masks(params, state.derived["masks"]), tokens))
    # torch and XLA sum every matmul, norm and softmax of the forward pass in their own orders
    assert_close(ours, ref, rounding_bound(forward_length(cfg, 20), np.abs(ref).max()), "logits vs transformers")
    # apply-masks rebuilds the same model from the base and the masks file.
    rebuilt = _cli("apply-masks", "--base", str(model_dir), "--masks", result["masks"], "--out", str(tmp_path / "re"))
    assert rebuilt.returncode == 0, rebuilt.stderr
    _, params_re = convert.load_hf(tmp_path / "re")
    for a, b in zip(jax.tree.leaves(params_re), jax.tree.leaves(dense)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("baseline", ["random", "magnitude"])
def test_baseline_exports(tiny, tmp_path, baseline):
    root, model_dir = tiny
    run = make_run(tmp_path, model_dir)
    cfg_file = _write_config(run, tmp_path / "run.yaml")
    out = _cli("export", str(cfg_file), "--baseline", baseline, "--out", str(tmp_path / baseline))
    assert out.returncode == 0, out.stderr
    masks, meta = export.load_masks(tmp_path / baseline / "masks.safetensors")
    assert meta["baseline"] == baseline
    assert len(flatten(masks)) == 14  # layers 1, 2 x 7 projections
    if baseline == "magnitude":
        _, params = convert.load_hf(model_dir)
        for path, m in flatten(masks).items():
            assert m.sum() == m.size - int((1 - masking.keep_fraction(path, run.mask)) * m.size)


@pytest.mark.parametrize("override, message", [
    ("mask.masked_layers=[2,9]", r"\[9\] out of range: the model has 4 decoder layers"),
    ("mask.keep_attn=1.5", r"mask.keep_attn must be in \(0, 1\]"),
    ("model.path=/nonexistent/model", "does not exist"),
    ("train.bogus=1", "unknown config key 'train.bogus'"),
])
def test_cli_train_refuses_bad_configs_before_compiling(tiny, tmp_path, override, message):
    root, model_dir = tiny
    cfg_file = _write_config(make_run(tmp_path, model_dir), tmp_path / "run.yaml")
    out = _cli("train", "--config", str(cfg_file), "--set", override)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    import re
    assert re.search(message, out.stderr), out.stderr
