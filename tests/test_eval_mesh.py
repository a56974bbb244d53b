"""`eval` over the whole mesh (8 simulated CPU devices): params sharded by the fsdp and tensor axes (no device
holds a whole weight matrix), each generation batch's prompts split over the data axes, the KV cache sharded to
match; the greedy texts and the generation metrics equal a one-device run exactly, the held-out loss within the
rounding of a sum in another order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mft_jax import cli, generate
from mft_jax.evaluate import commands
from run_fixtures import make_model_dir, make_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_mesh")
    model_dir = make_model_dir(root / "model", num_layers=2, seed=3)
    make_run(root / "data", model_dir)  # writes data/dev.jsonl
    return root, model_dir


def _eval_args(model_dir, root, out, mesh=None):
    argv = ["eval", "--model", str(model_dir), "--tasks", "gsm8k,loss", "--limit", "6", "--max-new-tokens", "8",
            "--loss-data", str(root / "data" / "dev.jsonl"), "--max-seq-length", "32",
            "--data-cache-dir", str(root / "cache"), "--batch-size", "1", "--out", str(out)]
    return argv + (["--mesh", mesh] if mesh else [])


def test_params_are_sharded_and_prompts_split(world, monkeypatch):
    root, model_dir = world
    assert jax.device_count() == 8
    args = cli.build_parser().parse_args(_eval_args(model_dir, root, root / "x.json", mesh="2,2,2"))
    model = commands.eval_model(args)
    assert dict(model.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    matrices = [(path, x) for path, x in jax.tree_util.tree_leaves_with_path(model.params) if x.ndim == 2]
    assert len(matrices) == 2 * 7 + 2  # seven projections per layer, embeddings and the LM head
    for path, x in matrices:
        assert x.sharding.shard_shape(x.shape) != x.shape, f"{jax.tree_util.keystr(path)} is whole on a device"
        assert x.sharding.mesh.shape == model.mesh.shape
    seen = []
    run_batch = generate._run_batch

    def record(cfg, params, prompt_BxLp, *rest, **kwargs):
        seen.append((prompt_BxLp.shape, prompt_BxLp.sharding.spec))
        return run_batch(cfg, params, prompt_BxLp, *rest, **kwargs)

    monkeypatch.setattr(generate, "_run_batch", record)
    texts = model.complete(["Question: 1 + 1 = ?\nAnswer:", "Question: 2 + 3 = ?\nAnswer:", "Hello"],
                           max_new_tokens=4)
    assert len(texts) == 3
    # --batch-size 1 per data shard: 4 rows (2 data x 2 fsdp shards), split over both data axes
    assert seen == [((4, seen[0][0][1]), jax.sharding.PartitionSpec(("data", "fsdp")))]


def _run(argv, devices: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mft_jax", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def test_sharded_eval_equals_one_device(world):
    root, model_dir = world
    results = {}
    for name, devices, mesh in (("one", 1, None), ("mesh", 8, "2,2,2")):
        out = root / f"{name}.json"
        done = _run(_eval_args(model_dir, root, out, mesh), devices)
        assert done.returncode == 0, done.stderr[-2000:]
        samples = root / f"{name}_samples" / "gsm8k.jsonl"
        texts = [json.loads(line)["completion"] for line in samples.read_text().splitlines()]
        results[name] = (json.loads(out.read_text())["results"], texts)
    (one, texts_one), (mesh, texts_mesh) = results["one"], results["mesh"]
    assert texts_mesh == texts_one and any(t.strip() for t in texts_one)  # greedy texts, exactly
    drop = {"seconds"}
    assert {k: v for k, v in mesh["gsm8k"].items() if k not in drop} == \
        {k: v for k, v in one["gsm8k"].items() if k not in drop}
    # the same examples (exactly --limit of them, whatever the batch); the sharded matmuls sum the same products in
    # another order (fsdp partial sums, then an all-reduce): fp32 rounding of a mean over 50 tokens (seen: 6e-9)
    assert mesh["loss"]["tokens"] == one["loss"]["tokens"]
    for key in ("loss", "token_loss"):
        np.testing.assert_allclose(mesh["loss"][key], one["loss"][key], rtol=1e-6)


def test_bad_mesh_is_one_line(world):
    from fault_harness import TRACEBACK, run_cli

    root, model_dir = world
    for mesh, expected in (("2,2", "--mesh '2,2': give D,F,T (data, fsdp, tensor sizes; one may be -1)"),
                           ("3,3,3", "--mesh 3,3,3: mesh: data*fsdp*tensor = 27 but 8 devices are present")):
        result = run_cli(*_eval_args(model_dir, root, root / "bad.json", mesh))
        assert result.code == 2 and TRACEBACK not in result.stderr, result.stderr
        assert expected in result.error_line(), result.stderr
    assert not (root / "bad.json").exists()


def test_generation_shows_prompts_tokens_per_second_and_eta(world, capsys):
    root, model_dir = world
    args = cli.build_parser().parse_args(_eval_args(model_dir, root, root / "x.json", mesh="2,2,2"))
    model = commands.eval_model(args)
    assert model.progress  # eval and generate show it
    capsys.readouterr()
    model.complete(["one", "two", "three", "four", "five"], max_new_tokens=3)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    # 5 prompts in batches of 4 (1 per data shard): the final state of the bar, with its rate and time left
    assert bar.startswith("generate: 100%") and "5/5" in bar and "tok/s=" in bar and "<00:00" in bar, bar
