"""The LoRA baseline: adapters only in the optimizer, the same training on any mesh, a merged export that
transformers loads with the adapted model's logits."""

import jax
import numpy as np
import pytest
import torch
import transformers

from mft_jax import convert, export, methods, model, optim, sharding, train
from mft_jax.trees import flatten, get_path, merge
from run_fixtures import StepSetup, global_batch, make_model_dir, make_run
from tolerances import adam_moments, assert_close, assert_same_adam_training, rounding_bound, step_length

RANK = 4
LORA = {"rank": RANK, "alpha": 8.0, "dropout": 0.1}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return root, make_model_dir(root / "model")


def _batch(cfg, micro=2, rows=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, cfg.vocab_size, (micro, rows, length)).astype(np.int32)
    weights = np.ones(inputs.shape, np.float32) / length
    return {"inputs": inputs, "targets": np.roll(inputs, -1, -1), "loss_weights": weights,
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), inputs.shape),
            "segment_ids": np.ones(inputs.shape, np.int32)}


def _train(tiny, mesh_cfg, steps=3, devices=None):
    root, model_dir = tiny
    run = make_run(root, model_dir, train={"mode": "lora"}, lora=LORA, mesh=mesh_cfg, optim={"lr": 1e-2})
    cfg = convert.load_config(model_dir)
    mesh = sharding.make_mesh(run.mesh, devices if devices is not None else jax.devices())
    shardings = sharding.param_shardings(cfg, mesh)
    _, params = convert.load_hf(model_dir, shardings=shardings)
    setup = StepSetup(run, cfg, mesh, shardings, steps)
    losses = []
    with sharding.axis_rules(), jax.set_mesh(mesh):
        state = setup.init_state(params, jax.random.key(0))
        step_fn = setup.jit_step(params)
        for _ in range(steps):
            state, metrics = step_fn(params, state, global_batch(_batch(cfg), mesh))
            losses.append(float(metrics["loss"]))
    return run, cfg, params, setup, state, losses


def test_only_adapters_are_trained_and_start_from_the_base_model(tiny):
    run, cfg, params, setup, state, losses = _train(tiny, {"data": -1}, steps=2, devices=jax.devices()[:1])
    paths = setup.layout.method.paths
    assert len(paths) == 7 * cfg.num_hidden_layers
    expected = {p + (name,) for p in paths for name in ("lora_a", "lora_b")}
    assert set(flatten(state.trainable)) == expected
    mu = adam_moments(state.opt_state).mu
    assert set(flatten(mu)) == expected  # Adam's moments exist for the adapters and nothing else
    n_adapter = sum(RANK * sum(get_path(params, p + ("kernel",)).shape) for p in paths)
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * n_adapter
    # B starts at zero, so the adapted model is the base model exactly (x @ a @ 0 adds exact zeros).
    fresh = setup.layout.method.init(params, jax.random.key(0))
    batch = jax.tree.map(lambda x: x[0], _batch(cfg))
    adapted = setup.loss(setup.layout.method.to_model(params, fresh), batch)
    base = setup.loss(params, batch)
    assert float(adapted[0]) == float(base[0])
    assert losses[-1] < losses[0]


def test_dropout_only_in_training(tiny):
    """The adapters' input dropout runs when the forward gets an rng (the step) and never in evaluation."""
    root, model_dir = tiny
    cfg, params = convert.load_hf(model_dir)
    run = make_run(root, model_dir, train={"mode": "lora"}, lora=LORA)
    method = methods.make(run, cfg)
    adapters = jax.tree.map(lambda x: x + 0.05, method.init(params, jax.random.key(1)))  # B != 0
    adapted = method.to_model(params, adapters)
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 12))
    fwd = lambda rng=None, adapters=method.adapters: np.asarray(  # noqa: E731
        model.forward(cfg, adapted, tokens, options=model.Options(adapters=adapters), dropout_rng=rng))
    key = jax.random.key(3)
    assert not np.array_equal(fwd(key), fwd())  # dropout on
    np.testing.assert_array_equal(fwd(key), fwd(key))  # deterministic in its key
    assert np.array_equal(fwd(key, model.Adapters(method.adapters.scale, 0.0)), fwd())  # rate 0: no dropout


MESHES = [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 2}]


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=["d2f2t2", "f4t2"])
def test_lora_on_a_mesh_matches_one_device(tiny, mesh_cfg):
    """8 simulated devices with fsdp and tensor axes train as one device does (dropout included: JAX's
    random bits do not depend on the sharding), within the rounding of their other reduction orders."""
    ref = _train(tiny, {"data": -1}, devices=jax.devices()[:1])
    run, cfg, params, setup, state, losses = _train(tiny, mesh_cfg)
    n = step_length(cfg, 16, 2 * 8 * 16)
    assert_close(losses, ref[5], rounding_bound(n, np.abs(ref[5])), "losses")
    schedule = optim.lr_schedule(run.optim, 3)
    assert_same_adam_training(state.saved(), ref[4].saved(), run.optim, steps=3, n=n,
                              lr_sum=sum(float(schedule(t)) for t in range(3)))
    a = flatten(state.trainable)[("layers_0", "mlp", "up_proj", "lora_b")]
    assert a.addressable_shards[0].data.shape[1] == a.shape[1] // mesh_cfg["tensor"]  # sharded like the kernel


def test_merged_export_loads_in_transformers(tiny, tmp_path):
    root, model_dir = tiny
    run = make_run(tmp_path, model_dir, train={"mode": "lora", "max_steps": 4}, lora=LORA, optim={"lr": 1e-2})
    train.train(run, verbose=False)
    result = export.export_run(run.run_dir, tmp_path / "export")
    assert "masks" not in result and result["method"] == "lora"
    _, cfg, params, layout, state = export.restore_run(run.run_dir)
    adapted = merge(params, state.trainable)  # the adapted model, unmerged: W x + s (x A) B
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    ours = np.asarray(model.forward(cfg, adapted, tokens, options=model.Options(adapters=layout.method.adapters)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(result["hf"]).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())  # the fp32 bound
    # The merge changed every adapted kernel (training moved B off zero) and nothing else.
    _, dense = convert.load_hf(result["hf"])
    adapted_kernels = {p + ("kernel",) for p in layout.method.paths}
    for path, w in flatten(params).items():
        changed = not np.array_equal(np.asarray(get_path(dense, path)), np.asarray(w))
        assert changed == (path in adapted_kernels), path
    # And the merge is W + s A B, computed in fp32.
    path = ("layers_1", "self_attn", "q_proj")
    a, b = (np.asarray(get_path(state.trainable, path + (k,)), np.float64) for k in ("lora_a", "lora_b"))
    expected = np.asarray(get_path(params, path + ("kernel",)), np.float64) + a @ b * (LORA["alpha"] / RANK)
    got = np.asarray(get_path(dense, path + ("kernel",)), np.float64)
    assert_close(got, expected, rounding_bound(RANK, np.abs(expected).max()), "merged kernel")
