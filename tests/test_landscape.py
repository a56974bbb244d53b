"""Landscape and sharpness: Lanczos and Hutchinson against the dense Hessian (`jax.hessian`, eigendecomposition),
the line's ends against the two models' own losses, and `mft-jax landscape` on 8 simulated devices (a 2 x 2 x 2
data / fsdp / tensor mesh) against the same numbers on one device.

One tiny model (1 layer, hidden 8; its masked attention kernels hold 192 weights) serves every test, so the
second-order programs compile once per mesh."""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from jax.flatten_util import ravel_pytree

from mft_jax import convert, losses, masking, model, sharding, trees
from mft_jax.studies import hessian, landscape
from mft_jax.config import ConfigError, LlamaConfig, MaskConfig, MeshConfig
from mft_jax.data import train_bpe_tokenizer
from mft_jax.evaluate.loss import loss_sums
from run_fixtures import chat_rows, make_run
from tolerances import assert_close, rounding_bound, step_length

MASK = {"masked_layers": [0], "modules": "attn"}
MESH_8 = {"data": 2, "fsdp": 2, "tensor": 2}
BATCHES, BATCH_SIZE = 2, 4


def _model_dir(root):
    """A 1-layer, hidden-8 Llama whose matrices are N(0, 0.2) (the Hessian then is far from zero) with a BPE
    tokenizer, as a HF checkpoint; params drawn with numpy (no init program to compile)."""
    texts = [m["content"] for r in chat_rows(300, seed=99) for m in r["messages"]]
    tokenizer = train_bpe_tokenizer(texts, 128, root / "tokenizer")
    vocab = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"]) + 8
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape) if len(s.shape) == 2 else np.ones(s.shape))
                          .astype(np.float32), model.param_shapes(cfg))
    return cfg, params, tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Model A, model B (A with 10% of the masked kernels zeroed, as a mask does, and every param moved a little,
    as continued training does), the run config (its dev data, mask and 8-device mesh) and the dev batches."""
    root = tmp_path_factory.mktemp("landscape")
    cfg, params, tokenizer = _model_dir(root)
    a_dir = convert.save_hf(cfg, params, root / "a", tokenizer_dir=tokenizer)
    rng = np.random.default_rng(1)
    other = jax.tree.map(lambda w: w + 0.01 * rng.normal(size=w.shape).astype(np.float32), params)
    for path in masking.masked_paths(cfg, MaskConfig(**MASK)):
        w = trees.get_path(other, path)
        w[rng.random(w.shape) < 0.1] = 0.0
    b_dir = convert.save_hf(cfg, other, root / "b", tokenizer_dir=tokenizer)
    run = make_run(root, a_dir, mask=MASK, mesh=MESH_8, train={"batch_size": BATCH_SIZE, "micro_batch_size": None})
    config_file = root / "run.yaml"
    config_file.write_text(yaml.safe_dump(run.to_dict()))
    batches = landscape.dev_batches(run, str(a_dir), BATCHES, BATCH_SIZE)
    paths = masking.masked_paths(cfg, run.mask)
    return {"cfg": cfg, "a": params, "b": other, "a_dir": a_dir, "b_dir": b_dir, "config": config_file, "run": run,
            "batches": batches, "paths": paths, "root": root}


def _one_device():
    return sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])


def _dense_hessian(cfg, params, batches, paths) -> np.ndarray:
    """The Hessian of the loss over the masked kernels, flattened (ravel_pytree order), by `jax.hessian` of the
    loss written out directly: the model, the SFT sums of each batch, the sum of the weights."""
    flat, unravel = ravel_pytree({p: trees.get_path(params, p) for p in paths})
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}  # one batch: sum(w * nll) adds up

    def loss(z):
        logits = model.forward(cfg, hessian.merge(params, unravel(z)), rows["inputs"], rows["positions"],
                               rows["segment_ids"])
        return losses.sft(logits, rows["targets"], rows["loss_weights"])

    return np.asarray(jax.jit(jax.hessian(loss))(flat), np.float64)


def test_lanczos_and_hutchinson_match_the_dense_hessian(setup):
    cfg, params, batches, paths = setup["cfg"], setup["a"], setup["batches"], setup["paths"]
    h = _dense_hessian(cfg, params, batches, paths)
    h = (h + h.T) / 2  # symmetric up to rounding
    eigenvalues = np.linalg.eigvalsh(h)[::-1]
    dim, trace, spectral = h.shape[0], float(np.trace(h)), float(np.abs(eigenvalues).max())
    assert dim == 192 and abs(trace) > 0.1 * spectral  # a trace that a relative check can resolve

    objective = landscape.Objective(cfg, params, batches, paths, _one_device())
    with objective.context():
        # Lanczos: 30 steps (of 192 dimensions) converge the top 3; each Ritz value within its residual bound.
        result = hessian.lanczos(objective.matvec, objective.x, iters=30, eigs=3, key=jax.random.key(1),
                                 constrain=objective.op.constrain)
        top = np.asarray(result["top_eigenvalues"])
        assert_close(top, eigenvalues[:3], 1e-3 * np.abs(eigenvalues[:3]), "top eigenvalues vs dense")
        assert all(np.min(np.abs(eigenvalues - t)) <= r + 1e-5 * spectral for t, r in zip(top, result["residuals"]))
        assert_close(result["min_eigenvalue"], eigenvalues[-1], 1e-3 * spectral, "min eigenvalue vs dense")

        # Signed Hadamard rows, probes >= the next power of two: every off-diagonal term cancels, so the
        # estimator's own code returns tr(H) exactly, up to rounding.
        exact = hessian.hutchinson(objective.matvec, objective.x, probes=256, key=jax.random.key(2), kind="hadamard",
                                   constrain=objective.op.constrain)
        assert_close(exact["trace"], trace, 1e-3 * abs(trace), "Hadamard-probe trace vs dense")

        # Rademacher probes: each v^T H v is the dense quadratic form, and the mean lies within 5 standard
        # deviations, sigma^2 = 2 (|H|_F^2 - sum_i H_ii^2) / probes (Chebyshev: a correct estimator fails with
        # probability < 4% for an arbitrary key, ~1e-6 if the mean is normal); the reported standard error
        # estimates sigma.
        probes, key = 32, jax.random.key(3)
        estimate = hessian.hutchinson(objective.matvec, objective.x, probes=probes, key=key,
                                      constrain=objective.op.constrain)
        vectors = [np.asarray(ravel_pytree(hessian.probe(objective.x, key, p))[0], np.float64) for p in range(probes)]
        direction = landscape._filter_normalised(objective.x, jax.random.key(0))  # the surface's, on one device
    for p, w in objective.x.items():  # filter = output unit: a column of the [in, out] kernel, scaled to w's norm
        assert_close(np.linalg.norm(direction[p], axis=0), np.linalg.norm(w, axis=0), 1e-5 * np.abs(w).max(), str(p))
        assert not np.allclose(direction[p], w)
    dense_forms = [v @ h @ v for v in vectors]
    assert all(set(np.unique(v)) == {-1.0, 1.0} for v in vectors)
    assert_close(estimate["values"], dense_forms, 1e-4 * spectral * dim, "v^T H v vs dense")
    sigma = np.sqrt(2 * (np.sum(h * h) - np.sum(np.diag(h) ** 2)) / probes)
    assert abs(estimate["trace"] - trace) <= 5 * sigma
    assert 0.5 * sigma <= estimate["trace_stderr"] <= 2 * sigma


def test_lanczos_stops_on_an_invariant_subspace_with_exact_eigenvalues():
    """A 48-dimensional H (one [6, 8] leaf) with 10 distinct eigenvalues: the Krylov space has 10 dimensions, so
    Lanczos stops after 10 steps with exactly those eigenvalues (each distinct value once: a single start vector
    cannot see multiplicity), and signed Hadamard probes (64 >= 48) give the trace exactly."""
    rng = np.random.default_rng(0)
    values = np.repeat(np.linspace(-2.0, 3.0, 10), [5, 5, 5, 5, 5, 5, 5, 5, 4, 4])
    q, _ = np.linalg.qr(rng.normal(size=(48, 48)))
    h = (q * values) @ q.T
    matvec = jax.jit(lambda v: {"w": (jnp.asarray(h, jnp.float32) @ v["w"].reshape(-1)).reshape(6, 8)})
    x = {"w": jnp.zeros((6, 8), jnp.float32)}
    result = hessian.lanczos(matvec, x, iters=40, eigs=3, key=jax.random.key(0))
    assert result["iters"] == 10
    assert_close(result["top_eigenvalues"], [3.0, 3.0 - 5 / 9, 3.0 - 10 / 9], 1e-5, "top eigenvalues")
    assert_close(result["min_eigenvalue"], -2.0, 1e-5, "min eigenvalue")
    trace = hessian.hutchinson(matvec, x, probes=64, key=jax.random.key(1), kind="hadamard")["trace"]
    assert_close(trace, values.sum(), 1e-5 * np.abs(values).sum(), "trace")


def test_param_selection_and_run_config(setup, tmp_path):
    cfg, run = setup["cfg"], setup["run"]
    assert landscape.select_paths(cfg, "masked", run.mask) == setup["paths"]
    assert landscape.select_paths(cfg, "layers_0/mlp/*/kernel,norm/*") == [
        ("layers_0", "mlp", p, "kernel") for p in ("down_proj", "gate_proj", "up_proj")] + [("norm", "scale")]
    assert len(landscape.select_paths(cfg, "all")) == 12
    (tmp_path / "config.yaml").write_text(setup["config"].read_text())  # a run directory's saved config
    loaded, where = landscape._run_config(_parse([f"{tmp_path}:200", "--out", str(tmp_path / "o")]))
    assert loaded.to_dict() == run.to_dict() and where == str(tmp_path / "config.yaml")


def _parse(args):
    parser = argparse.ArgumentParser()
    landscape.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["landscape", *args])


def test_cli_on_8_devices_matches_one_device_and_line_ends_are_the_models(setup, capsys):
    out = setup["root"] / "out"
    args = _parse([str(setup["a_dir"]), "--config", str(setup["config"]), "--against", str(setup["b_dir"]),
                   "--out", str(out), "--batches", str(BATCHES), "--surface", "--surface-points", "3",
                   "--line-points", "3", "--eigs", "2", "--iters", "30", "--probes", "4", "--seed", "5"])
    assert landscape.run(args) == 0
    result = json.loads((out / "landscape.json").read_text())
    assert result["mesh"] == MESH_8 and result["param_count"] == 192 and result["batches"] == BATCHES
    assert sorted((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in
                  ("lines.png", "surface.png", "sharpness.png")) == [True] * 3
    a, b = str(setup["a_dir"]), str(setup["b_dir"])
    assert a in capsys.readouterr().out

    cfg, batches, paths, mesh = setup["cfg"], setup["batches"], setup["paths"], _one_device()
    tokens = int(sum((batch["segment_ids"] > 0).sum() for batch in batches))
    n = step_length(cfg, landscape.stack_batches(batches)["inputs"].shape[-1], tokens)
    key = jax.random.key(5)
    # Each model's loss, independently: the evaluator's sums over the same batches, on one device.
    own = {}
    for name, params in ((a, setup["a"]), (b, setup["b"])):
        sums = sum(np.asarray(loss_sums(cfg, params, batch), np.float64) for batch in batches)
        own[name] = sums[0] / sums[1]
        assert_close(result["models"][name]["loss"], own[name], rounding_bound(n, own[name]), f"loss of {name}")
    line = dict(map(tuple, result["lines"][b]["points"]))
    assert sorted(line) == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert_close([line[0.0], line[1.0]], [own[a], own[b]], rounding_bound(n, max(own.values())), "line ends")
    assert result["lines"][b]["loss_a"] == line[0.0] and result["lines"][b]["loss_b"] == line[1.0]

    # The same numbers on one device: the sums run in other orders (rows over 4 devices, kernels split over
    # fsdp x tensor); a second-order pass is about twice a training step's reductions long.
    single = landscape.interpolate(cfg, setup["a"], setup["b"], batches, None, sorted(line), mesh)
    assert_close([l for _, l in single], [line[alpha] for alpha, _ in single],
                 rounding_bound(n, max(l for _, l in single)), "line 1 vs 8 devices")
    surface = landscape.surface(cfg, setup["a"], batches, paths, mesh, points=3, key=key)
    assert_close(surface["loss"], result["surface"]["loss"], rounding_bound(n, np.max(surface["loss"])),
                 "surface 1 vs 8 devices")
    for name, params in ((a, setup["a"]), (b, setup["b"])):
        ours, theirs = landscape.sharpness(cfg, params, batches, paths, mesh, eigs=2, iters=30, probes=4, key=key), \
            result["models"][name]
        scale = max(abs(e) for e in ours["top_eigenvalues"])
        bound = rounding_bound(2 * n, scale) + np.asarray(ours["eigenvalue_residuals"]) + theirs["eigenvalue_residuals"]
        assert_close(theirs["top_eigenvalues"], ours["top_eigenvalues"], bound, f"eigenvalues 1 vs 8 of {name}")
        # each probe's v^T H v: a quadratic form of 192 unit entries, |v^T H v| <= scale * 192
        assert_close(theirs["probe_values"], ours["probe_values"], rounding_bound(2 * n, scale * 192),
                     f"probes 1 vs 8 of {name}")
        assert_close(theirs["trace"], ours["trace"], rounding_bound(2 * n, scale * 192), f"trace 1 vs 8 of {name}")


def test_cli_input_errors_are_one_line(setup, tmp_path):
    a = str(setup["a_dir"])
    cases = [([a, "--out", str(tmp_path / "o")], "not a run directory; give --config"),
             ([a, "--config", str(setup["config"]), "--out", str(tmp_path / "o"), "--eigs", "5", "--iters", "3"],
              "raise --iters"),
             ([a, "--config", str(setup["config"]), "--out", str(tmp_path / "o"), "--params", "layers_9/*"],
              "matches no param"),
             ([a, "--config", str(setup["config"]), "--out", a], "the input")]
    for argv, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
            landscape.run(_parse(argv))
        assert "\n" not in str(error.value)
    assert not (tmp_path / "o").exists()
