"""gs:// end to end on a Cloud Storage API server on localhost (tests/gcs_emulator.py): the run directory's lease
(one writer, generation preconditions enforced by the server), metrics appends by compose, output directories on
a bucket, safetensors read by ranges, and (slow) convert -> train -> kill -9 in the middle of a checkpoint write
-> resume -> export -> eval loss -> apply-masks, all on gs:// paths. Skipped, with the reason printed, only when
the server cannot start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from gcs_emulator import Emulator, HoldingProxy
from mft_jax import convert, export, outputs, rundir, storage
from mft_jax.trees import flatten
from run_fixtures import make_model_dir, make_run


@pytest.fixture(scope="module")
def gcs():
    try:
        server = Emulator().__enter__()
    except RuntimeError as e:
        print(f"SKIPPED gs:// tests: {e}")
        pytest.skip(f"the Cloud Storage emulator cannot start: {e}")
    try:
        with pytest.MonkeyPatch.context() as env:
            for k, v in server.env().items():
                env.setenv(k, v)
            storage.client.cache_clear()
            yield server
    finally:
        storage.client.cache_clear()
        server.__exit__()


_BUCKETS = iter(range(10_000))


@pytest.fixture
def bucket(gcs):
    return gcs.create_bucket(f"bkt{next(_BUCKETS)}")


def _upload_dir(local: Path, url: str) -> str:
    for f in sorted(Path(local).rglob("*")):
        if f.is_file():
            storage.copy_file(f, f"{url}/{f.relative_to(local)}")
    return url


# --------------------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------------------

def test_lease_keeps_one_writer_and_takes_over_a_dead_one(bucket):
    url = f"{bucket}/run/.lock"
    first = storage.Lease(url, ttl_s=60)
    assert first.acquire() is None
    second = storage.Lease(url, ttl_s=60)
    holder = second.acquire()  # the server refuses the create-if-absent: the live holder is named
    assert holder is not None and holder["pid"] == os.getpid()
    assert second.generation is None
    first.release()
    assert not storage.blob(url).exists()
    assert second.acquire() is None  # free again
    second.release()
    # A lease left by a process that no longer exists on this host is taken over at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(dead.stdout), "host": __import__("socket").gethostname(), "renewed": time.time(),
              "ttl_s": 60}
    storage.blob(url).upload_from_string(json.dumps(record))
    third = storage.Lease(url, ttl_s=60)
    assert third.acquire() is None
    assert json.loads(storage.blob(url).download_as_bytes())["pid"] == os.getpid()
    third.release()
    # One on another host that stopped renewing is taken over after its ttl, not before.
    record = {"pid": 1, "host": "another-host", "renewed": time.time(), "ttl_s": 60}
    storage.blob(url).upload_from_string(json.dumps(record))
    assert storage.Lease(url).acquire()["host"] == "another-host"
    storage.blob(url).upload_from_string(json.dumps({**record, "renewed": time.time() - 61}))
    fourth = storage.Lease(url)
    assert fourth.acquire() is None
    fourth.release()


def test_a_holder_whose_lease_was_taken_stops(bucket):
    url = f"{bucket}/run/.lock"
    lost = []
    lease = storage.Lease(url, ttl_s=0.4, on_lost=lost.append)
    assert lease.acquire() is None
    storage.blob(url).upload_from_string(b'{"pid": 1, "host": "elsewhere"}')  # someone else's write
    deadline = time.time() + 10
    while not lost and time.time() < deadline:
        time.sleep(0.05)
    assert lost == [url]  # the renewal's generation precondition failed
    lease.release()
    assert json.loads(storage.blob(url).download_as_bytes())["host"] == "elsewhere"  # not deleted by the loser


def test_run_lock_refuses_a_second_train_on_a_bucket(bucket):
    run_dir = f"{bucket}/runs/x"
    with rundir.RunLock(run_dir):
        with pytest.raises(rundir.RunDirError, match=r"another `mft-jax train` is running in gs://.*pid \d+"):
            with rundir.RunLock(run_dir):
                pass
    with rundir.RunLock(run_dir):  # released on exit
        pass


def test_metrics_appends_compose_and_truncate(bucket):
    run_dir = f"{bucket}/runs/m"
    for step in (1, 2, 3):
        rundir.append_metrics(run_dir, {"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in rundir.read_metrics(run_dir)] == [1, 2, 3]
    assert not [n for n in storage.objects(run_dir) if ".part-" in n]  # the appended parts are gone
    assert rundir.truncate_metrics(run_dir, 2) == 1
    assert [r["step"] for r in rundir.read_metrics(run_dir)] == [1, 2]
    rundir.append_metrics(run_dir, {"step": 3, "loss": 0.3})
    assert [r["step"] for r in rundir.read_metrics(run_dir)] == [1, 2, 3]


def test_safetensors_read_by_ranges_from_a_bucket(bucket, tmp_path):
    model_dir = make_model_dir(tmp_path, num_layers=2)
    url = _upload_dir(model_dir, f"{bucket}/hf")
    cfg_local, local = convert.load_hf(model_dir)
    cfg_remote, remote = convert.load_hf(url)
    assert cfg_local == cfg_remote
    for (path, a), (_, b) in zip(sorted(flatten(local).items()), sorted(flatten(remote).items())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))  # the same bytes


def test_data_sources_and_cache_on_a_bucket(bucket, tmp_path, monkeypatch):
    """A gs:// source and a gs:// data.cache_dir: built on one host (its local mirror) and uploaded; a second host
    (an empty mirror) downloads it instead of building; the examples are those of the same file read locally."""
    import dataclasses

    from mft_jax.data import store

    model_dir = make_model_dir(tmp_path, num_layers=2)
    run = make_run(tmp_path, model_dir)
    source = f"{bucket}/data/train.jsonl"
    storage.copy_file(tmp_path / "train.jsonl", source)
    data = dataclasses.replace(run.data, train={source: None}, cache_dir=f"{bucket}/cache")
    local = store.build_dataset(dataclasses.replace(run.data, cache_dir=str(tmp_path / "local")), model_dir, "train")
    monkeypatch.setenv("MFT_JAX_CACHE", str(tmp_path / "host1"))
    built = store.build_dataset(data, model_dir, "train")
    assert not built.reused
    assert any(n.endswith("metadata.json") for n in storage.objects(f"{bucket}/cache"))
    monkeypatch.setenv("MFT_JAX_CACHE", str(tmp_path / "host2"))
    again = store.build_dataset(data, model_dir, "train")
    assert again.reused and again.key == built.key and str(tmp_path / "host2") in str(again.path)
    np.testing.assert_array_equal(again.lengths, local.lengths)
    a, b = again.data_source(), local.data_source()
    assert len(a) == len(b) == local.num_examples
    for i in range(len(a)):
        for k in b[i]:
            np.testing.assert_array_equal(np.asarray(a[i][k]), np.asarray(b[i][k]))


def test_output_directories_on_a_bucket_follow_the_local_rules(bucket, tmp_path):
    target = f"{bucket}/out"
    storage.blob(f"{bucket}/theirs/data.bin").upload_from_string(b"user data")
    with pytest.raises(outputs.OutputError, match=r"theirs: exists and was not written by mft-jax \(1 objects"):
        outputs.check_target(f"{bucket}/theirs")
    with pytest.raises(outputs.OutputError, match="is inside the input"):
        outputs.check_target(f"{bucket}/theirs/out", inputs=[f"{bucket}/theirs"])
    with pytest.raises(outputs.OutputError, match="is a whole bucket"):
        outputs.check_target(bucket)
    assert storage.blob(f"{bucket}/theirs/data.bin").download_as_bytes() == b"user data"
    # Written, then replaced by a second output of ours: stale objects of the first are gone, the marker says
    # complete, and no temporary prefix is left.
    with outputs.new_dir(target, command="test") as tmp:
        (tmp / "a.txt").write_text("one")
        (tmp / "old.txt").write_text("old")
    with outputs.new_dir(target, command="test") as tmp:
        (tmp / "a.txt").write_text("two")
    assert sorted(storage.objects(target)) == [outputs.MARKER, "a.txt"]
    assert storage.path(f"{target}/a.txt").read_text() == "two"
    assert outputs.read_marker(target)["complete"] is True
    assert [n for n in storage.objects(bucket) if n.startswith(".out.")] == []
    # A failing writer leaves the earlier output as it was and no temporary prefix.
    with pytest.raises(RuntimeError):
        with outputs.new_dir(target, command="test") as tmp:
            (tmp / "a.txt").write_text("three")
            raise RuntimeError("writer failed")
    assert storage.path(f"{target}/a.txt").read_text() == "two"
    assert [n for n in storage.objects(bucket) if n.startswith(".out.")] == []


def test_bucket_mistakes_are_one_line_and_change_nothing(bucket, tmp_path):
    """A missing bucket, a run directory that is not one, a missing model, an output over someone else's objects:
    one line naming the URL and the fix, exit 1, no traceback, the bucket's objects unchanged."""
    from fault_harness import TRACEBACK, run_cli

    model_dir = make_model_dir(tmp_path)
    run = make_run(tmp_path, model_dir, train={"max_steps": 1})
    raw = run.to_dict()
    raw["run_dir"] = "gs://no-such-bucket/runs/a"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    storage.blob(f"{bucket}/theirs/data.bin").upload_from_string(b"user data")
    before = {n: storage.blob(f"{bucket}/{n}").download_as_bytes() for n in storage.objects(bucket)}
    cases = [
        (["train", "--config", cfg], "gs://no-such-bucket/runs/a/.lock: not found (does the bucket "
                                     "gs://no-such-bucket exist? create it with `gcloud storage buckets create"),
        (["export", f"{bucket}/theirs", "--out", tmp_path / "x"], f"{bucket}/theirs: no config.yaml"),
        (["eval", "--model", f"{bucket}/nomodel", "--tasks", "loss", "--loss-data", tmp_path / "dev.jsonl"],
         f"model directory '{bucket}/nomodel' does not exist"),
        (["convert", "--from-hf", model_dir, "--out", f"{bucket}/theirs"],
         f"--out {bucket}/theirs: exists and was not written by mft-jax"),
        (["apply-masks", "--base", model_dir, "--masks", f"{bucket}/m.safetensors", "--out", tmp_path / "y"],
         f"masks file '{bucket}/m.safetensors' does not exist"),
    ]
    for argv, expected in cases:
        result = run_cli(*argv)
        assert result.code == 1, (argv, result.code, result.stderr)
        assert TRACEBACK not in result.stderr and expected in result.error_line(), (argv, result.stderr)
    after = {n: storage.blob(f"{bucket}/{n}").download_as_bytes() for n in storage.objects(bucket)}
    assert after == before
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --------------------------------------------------------------------------------------------------------
# The whole path
# --------------------------------------------------------------------------------------------------------

def _cli(*args, env, **kw):
    return subprocess.run([sys.executable, "-m", "mft_jax", *args], capture_output=True, text=True, env=env, **kw)


def _losses(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rundir.read_metrics(run_dir) if "loss" in r and "event" not in r}


@pytest.mark.slow
def test_convert_train_kill9_mid_checkpoint_resume_export_eval_on_gs(gcs, bucket, tmp_path):
    env = {**os.environ, **gcs.env(), "PYTHONUNBUFFERED": "1", "MFT_JAX_CACHE": str(tmp_path / "mirror")}
    model_dir = make_model_dir(tmp_path / "model")
    hf = _upload_dir(model_dir, f"{bucket}/hf")  # what the user copied to the bucket
    # convert: safetensors read by ranges from the bucket, orbax params written straight to it.
    converted = _cli("convert", "--from-hf", hf, "--out", f"{bucket}/orbax", env=env)
    assert converted.returncode == 0, converted.stderr
    assert "params/" in " ".join(storage.objects(f"{bucket}/orbax")) and outputs.read_marker(f"{bucket}/orbax")

    def config(name: str) -> Path:
        run = make_run(tmp_path / name, model_dir, train={"max_steps": 6},
                       ckpt={"save_every": 1, "keep": 3})
        raw = run.to_dict()
        raw["run_dir"] = f"{bucket}/runs/{name}"
        raw["model"]["path"] = f"{bucket}/orbax"
        raw["data"]["tokenizer"] = hf
        raw["data"]["cache_dir"] = f"{bucket}/cache"
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    straight = _cli("train", "--config", str(config("a")), env=env)
    assert straight.returncode == 0, straight.stderr
    # The second run's clients go through a proxy that holds the commit object of checkpoint 3: the process is
    # killed while that checkpoint is written (its arrays are on the bucket, its commit marker is not).
    proxy = HoldingProxy(gcs.url)
    proxy.arm(b"runs/b/checkpoints/3/commit_success.txt")
    cfg_b = config("b")
    proc = subprocess.Popen([sys.executable, "-m", "mft_jax", "train", "--config", str(cfg_b)],
                            env={**env, **gcs.env(proxy.url)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        assert proxy.held.wait(240), "the checkpoint's commit was never requested"
        # Meanwhile a second `train` on the same run directory is refused by the lease, in one line.
        second = _cli("train", "--config", str(cfg_b), env=env)
        assert second.returncode == 1, second.stderr
        assert "another `mft-jax train` is running in gs://" in second.stderr and "Traceback" not in second.stderr
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
        proxy.close()
    run_b = f"{bucket}/runs/b"
    written = storage.objects(run_b)
    assert any(n.startswith("checkpoints/3/state/") for n in written), written  # half-written: data, no commit
    assert "checkpoints/3/commit_success.txt" not in written
    from mft_jax import checkpoint

    assert checkpoint.Checkpointer(f"{run_b}/checkpoints").all_steps() == [1, 2]  # 3 is not a checkpoint
    assert not storage.blob(f"{run_b}/DONE").exists()
    # Resume with the same command: the dead holder's lease is taken over, step 2 restored, 3..6 trained again.
    resumed = _cli("train", "--config", str(cfg_b), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run_b}/checkpoints/2\n" in resumed.stdout, resumed.stdout
    la, lb = _losses(f"{bucket}/runs/a"), _losses(run_b)
    assert sorted(lb) == list(range(1, 7))  # each step once in metrics.jsonl
    assert la == lb  # bit-identical losses at every step
    assert not storage.blob(f"{run_b}/.lock").exists()  # released
    names = storage.objects(run_b)
    assert "config.yaml" in names and "DONE" in names and any(n.startswith("tb/events") for n in names)
    # export both runs to the bucket: the masks are identical bit for bit.
    for name in ("a", "b"):
        done = _cli("export", f"{bucket}/runs/{name}", "--out", f"{bucket}/export_{name}", env=env)
        assert done.returncode == 0, done.stderr
    ma, _ = export.load_masks(f"{bucket}/export_a/masks.safetensors")
    mb, meta = export.load_masks(f"{bucket}/export_b/masks.safetensors")
    for a, b in zip(jax.tree.leaves(ma), jax.tree.leaves(mb)):
        np.testing.assert_array_equal(a, b)
    assert int(meta["step"]) == 6
    # eval loss of the exported model, read from the bucket, equals that of the same export copied locally.
    local_export = tmp_path / "export_b_local"
    for name in storage.objects(f"{bucket}/export_b/hf"):
        (local_export / name).parent.mkdir(parents=True, exist_ok=True)
        storage.copy_file(f"{bucket}/export_b/hf/{name}", local_export / name)
    dev = str(tmp_path / "b" / "dev.jsonl")
    results = {}
    for where, model in (("gs", f"{bucket}/export_b/hf"), ("local", str(local_export))):
        out = tmp_path / f"eval_{where}.json"
        done = _cli("eval", "--model", model, "--tasks", "loss", "--loss-data", dev, "--max-seq-length", "32",
                    "--data-cache-dir", str(tmp_path / "eval_cache"), "--out", str(out), env=env)
        assert done.returncode == 0, done.stderr
        results[where] = {k: v for k, v in json.loads(out.read_text())["results"]["loss"].items() if k != "seconds"}
    assert results["gs"] == results["local"] and np.isfinite(results["gs"]["loss"])  # the same bytes, the same loss
    # apply-masks from the bucket reproduces the export's weights exactly.
    applied = _cli("apply-masks", "--base", hf, "--masks", f"{bucket}/export_b/masks.safetensors",
                   "--out", f"{bucket}/applied", env=env)
    assert applied.returncode == 0, applied.stderr
    _, pa = convert.load_hf(f"{bucket}/applied")
    _, pe = convert.load_hf(f"{bucket}/export_b/hf")
    for (path, a), (_, b) in zip(sorted(flatten(pa).items()), sorted(flatten(pe).items())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
