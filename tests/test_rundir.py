"""The run directory as a contract: changed configs, finished runs, --extend, the lock, damaged checkpoints,
metrics.jsonl after crashes, and kill -9 at random steps ending bit-identical to an uninterrupted run."""

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

from mft_jax import checkpoint as ckpt_lib
from mft_jax import config, export, rundir, train
from mft_jax.config import ConfigError
from run_fixtures import make_model_dir, make_run

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("rundir") / "model")


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mft_jax", *args], capture_output=True, text=True, env=ENV, **kw)


def _config_file(run, path: Path) -> Path:
    path.write_text(yaml.safe_dump(run.to_dict()))
    return path


def _with(run, **sections):
    """The same run with some keys changed (without rewriting its data files, whose mtime keys the cache)."""
    raw = run.to_dict()
    for section, values in sections.items():
        raw[section].update(values)
    return config.from_dict(raw, verbose=False)


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in rundir.read_metrics(run_dir) if "loss" in r]


# --------------------------------------------------------------------------------------------------------
# The config comparison itself
# --------------------------------------------------------------------------------------------------------

def test_config_change_classification(model_dir, tmp_path):
    saved = make_run(tmp_path, model_dir).to_dict()

    def changed(**sections):
        return _with(make_run(tmp_path, model_dir), **sections).to_dict()

    # Keys that change results are refused, each named with both values.
    for sections, key in [({"mask": {"keep_attn": 0.5}}, "mask.keep_attn"), ({"optim": {"lr": 0.1}}, "optim.lr"),
                          ({"train": {"seed": 7}}, "train.seed"), ({"data": {"max_seq_length": 16}},
                                                                   "data.max_seq_length"),
                          ({"data": {"train": {"other.jsonl": None}}}, "data.train")]:
        with pytest.raises(rundir.RunDirError, match=key.replace(".", r"\.")):
            rundir.check_config_change(saved, changed(**sections), extend=False)
    # Run length: only with extend.
    longer = changed(train={"max_steps": 9})
    with pytest.raises(rundir.RunDirError, match="--extend"):
        rundir.check_config_change(saved, longer, extend=False)
    # ... and never shorter: in steps, or in epochs
    in_epochs = changed(train={"max_steps": None, "epochs": 2.0})
    for before, shorter in ((saved, changed(train={"max_steps": 2})),
                            (in_epochs, changed(train={"max_steps": None, "epochs": 1.0}))):
        with pytest.raises(rundir.RunDirError, match="cannot be shortened"):
            rundir.check_config_change(before, shorter, extend=True)
    allowed, steps = rundir.check_config_change(saved, longer, extend=True)
    assert steps == {"train.max_steps": (5, 9)} and allowed == {}
    # Keys that do not change results pass and are reported.
    neutral = changed(train={"log_every": 3, "eval_every": 2}, ckpt={"keep": 2}, mesh={"data": 2})
    allowed, steps = rundir.check_config_change(saved, neutral, extend=False)
    assert set(allowed) == {"train.log_every", "train.eval_every", "ckpt.keep", "mesh.data"} and steps == {}
    assert issubclass(rundir.RunDirError, ConfigError)


# --------------------------------------------------------------------------------------------------------
# Through `mft-jax train`
# --------------------------------------------------------------------------------------------------------

def test_extend_continues_and_is_recorded(model_dir, tmp_path):
    run = make_run(tmp_path, model_dir, train={"max_steps": 4})
    train.train(run, verbose=False)
    longer = _with(run, train={"max_steps": 6})
    with pytest.raises(rundir.RunDirError, match="--extend"):
        train.train(longer, verbose=False)
    summary = train.train(longer, verbose=False, extend=True)
    assert summary["start_step"] == 4 and summary["final_step"] == 6
    records = rundir.read_metrics(Path(run.run_dir))
    events = [r for r in records if r.get("event") == "extend"]
    assert events == [{"step": 4, "event": "extend", "total_steps": 6, "changes": {"train.max_steps": [4, 6]}}]
    assert _steps(Path(run.run_dir)) == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load((Path(run.run_dir) / "config.yaml").read_text())["train"]["max_steps"] == 6


def test_neutral_change_is_recorded(model_dir, tmp_path):
    run = make_run(tmp_path, model_dir, train={"max_steps": 4})
    train.train(run, verbose=False, max_steps_this_run=2)
    again = _with(run, train={"log_every": 2})
    train.train(again, verbose=False)
    events = [r for r in rundir.read_metrics(Path(run.run_dir)) if r.get("event")]
    assert events == [{"step": 2, "event": "config_change", "total_steps": 4,
                       "changes": {"train.log_every": [1, 2]}}]


def test_lock_refuses_a_second_process_and_ignores_a_dead_one(model_dir, tmp_path):
    run_dir = tmp_path / "locked"
    run_dir.mkdir()
    # A lock left by a process that died (kill -9 leaves the file, not the flock).
    (run_dir / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "then"}))
    with rundir.RunLock(run_dir):
        held = json.loads((run_dir / ".lock").read_text())
        assert held["pid"] == os.getpid()
        # Another process trying the same directory is refused, naming the holder.
        code = ("import sys; from mft_jax import rundir\n"
                "try:\n    rundir.RunLock(sys.argv[1]).__enter__()\n"
                "except rundir.RunDirError as e:\n    print(e); sys.exit(3)\n")
        other = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True)
        assert other.returncode == 3, other.stderr
        assert f"pid {os.getpid()}" in other.stdout and "another `mft-jax train` is running" in other.stdout
    assert not (run_dir / ".lock").exists()  # removed on release
    with rundir.RunLock(run_dir):  # free again
        pass


def _damage(step_dir: Path):
    """Truncates every data file of a checkpoint's state (what a disk fault or a partial copy leaves)."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:7])


def test_damaged_latest_checkpoint_falls_back(model_dir, tmp_path, capfd):
    run = make_run(tmp_path, model_dir, train={"max_steps": 6}, ckpt={"save_every": 2, "keep": 5})
    train.train(run, verbose=False, max_steps_this_run=4)
    ckpt_dir = Path(run.run_dir) / "checkpoints"
    saved = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert saved[-2:] == [2, 4]
    _damage(ckpt_dir / "4")
    capfd.readouterr()
    summary = train.train(run, verbose=False)  # resumes from 2 and trains 3..6 again
    assert summary["start_step"] == 2 and summary["final_step"] == 6
    err = capfd.readouterr().err
    assert f"warning: checkpoint {ckpt_dir}/4 cannot be read" in err and "Traceback" not in err
    damaged = list((Path(run.run_dir) / ckpt_lib.DAMAGED_DIR).iterdir())
    assert [p.name.split("-")[0] for p in damaged] == ["4"]
    assert _steps(Path(run.run_dir)) == [1, 2, 3, 4, 5, 6]


def _wait_for_step(metrics: Path, step: int, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if step <= max(_steps(metrics.parent) or [0]):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow  # ~60 s on 2 cores; the default suite keeps test_train's kill-and-resume and the fault tests
def test_kill_9_five_times_ends_bit_identical(model_dir, tmp_path):
    """SIGKILL (no handler runs: async saves cut short, metrics lines half written) at 5 random steps of one
    run; the same command each time resumes, and the end result equals an uninterrupted run exactly."""
    total = 14
    overrides = {"train": {"max_steps": total}, "ckpt": {"save_every": 1, "keep": 2}}
    straight = make_run(tmp_path / "a", model_dir, **overrides)
    assert _cli("train", "--config", str(_config_file(straight, tmp_path / "a.yaml"))).returncode == 0
    killed = make_run(tmp_path / "b", model_dir, **overrides)
    cfg = _config_file(killed, tmp_path / "b.yaml")
    metrics = Path(killed.run_dir) / "metrics.jsonl"
    rng = np.random.default_rng(int(time.time()))
    kills = []
    for _ in range(5):
        done = max(_steps(metrics.parent) or [0])
        target = int(rng.integers(done + 1, min(done + 3, total - 1) + 1))
        proc = subprocess.Popen([sys.executable, "-m", "mft_jax", "train", "--config", str(cfg)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        reached = _wait_for_step(metrics, target, proc)
        proc.send_signal(signal.SIGKILL)
        stderr = proc.communicate(timeout=60)[1]
        assert reached, stderr
        kills.append(target)
    assert not (Path(killed.run_dir) / "DONE").exists()
    final = _cli("train", "--config", str(cfg))
    assert final.returncode == 0, (kills, final.stderr)

    def losses(run):
        return {r["step"]: r["loss"] for r in rundir.read_metrics(Path(run.run_dir)) if "loss" in r}

    assert _steps(metrics.parent) == list(range(1, total + 1)), kills  # no step twice, none missing
    assert losses(killed) == losses(straight), kills  # bit-identical losses at every step
    a = export.restore_run(straight.run_dir)[4]
    b = export.restore_run(killed.run_dir)[4]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
