"""Faults around training runs, through `mft-jax train`: run directories, concurrency, checkpoints, data and
resources. Each case asserts the exit code, that the one error line names the input (key, path or source), that
no traceback is printed, and that no file outside the run's own outputs changed.

(tests/test_faults_io.py covers configs, model files, output paths and flags; tests/test_rundir.py the behaviour
around these refusals: --extend, the lock, the fallback, kill -9.)
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fault_harness import TRACEBACK, changes, run_cli, snapshot
from mft_jax import config, rundir
from run_fixtures import chat_rows, make_model_dir, make_run, write_jsonl


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("faults_runs") / "model")


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory):
    """A finished 5-step run and its config file."""
    root = tmp_path_factory.mktemp("finished")
    run = make_run(root, model_dir, ckpt={"save_every": 2, "keep": 5})
    cfg = _config_file(run, root / "run.yaml")
    result = run_cli("train", "--config", cfg)
    assert result.code == 0, result.stderr
    return run, cfg


def _config_file(run, path: Path) -> Path:
    path.write_text(yaml.safe_dump(run.to_dict()))
    return path


def _check(result, code, *names, before=None, after=None, allowed=()):
    """The common assertions: exit code, no traceback, one error line naming `names`, nothing else changed."""
    assert result.code == code, (result.code, result.stdout[-2000:], result.stderr[-2000:])
    assert TRACEBACK not in result.stderr and TRACEBACK not in result.stdout, result.stderr
    line = result.error_line()
    if code:
        assert line.startswith("mft-jax train: error:"), result.stderr
        for name in names:
            assert str(name) in line, (name, line)
    if before is not None:
        assert changes(before, after, allowed) == []
    return line


# --------------------------------------------------------------------------------------------------------
# Run directories
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, named", [
    ("mask.keep_attn=0.5", "mask.keep_attn: 0.9 -> 0.5"),
    ("optim.lr=0.2", "optim.lr: 0.05 -> 0.2"),
    ("train.seed=3", "train.seed: 42 -> 3"),
])
def test_changed_config_on_an_existing_run(finished, model_dir, override, named):
    run, cfg = finished
    before = snapshot(run.run_dir, model_dir)
    _check(run_cli("train", "--config", cfg, "--set", override), 1, named, "new run_dir",
           before=before, after=snapshot(run.run_dir, model_dir))


def test_more_steps_without_extend(finished, model_dir):
    run, cfg = finished
    before = snapshot(run.run_dir, model_dir)
    _check(run_cli("train", "--config", cfg, "--set", "train.max_steps=9"), 1, "train.max_steps: 5 -> 9", "--extend",
           before=before, after=snapshot(run.run_dir, model_dir))


def test_extend_to_fewer_steps(finished, model_dir):
    """A finished 5-step run asked to --extend to 2 steps: refused (it used to print "step 5/2, loss nan")."""
    run, cfg = finished
    before = snapshot(run.run_dir, model_dir)
    _check(run_cli("train", "--config", cfg, "--extend", "--set", "train.max_steps=2"), 1,
           "train.max_steps: 5 -> 2", "cannot be shortened", before=before, after=snapshot(run.run_dir, model_dir))


def test_finished_run_again(finished, model_dir):
    run, cfg = finished
    before = snapshot(run.run_dir, model_dir)
    result = run_cli("train", "--config", cfg)
    _check(result, 0, before=before, after=snapshot(run.run_dir, model_dir))
    assert "already finished (step 5/5)" in result.stdout and "nan" not in result.stdout


def test_hand_edited_config_yaml(finished, tmp_path):
    """config.yaml edited after training: export (and a resume) would silently apply the new keep ratio."""
    run, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy)
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    saved["mask"]["keep_attn"] = 0.5
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))
    before = snapshot(copy)
    result = run_cli("export", copy, "--out", tmp_path / "export")
    assert result.code == 1 and TRACEBACK not in result.stderr, result.stderr
    line = result.error_line()
    assert line.startswith("mft-jax export: error: checkpoint") and "mask.keep_attn: 0.9 -> 0.5" in line, line
    assert changes(before, snapshot(copy)) == [] and not (tmp_path / "export").exists()


def test_run_dir_holding_other_files(model_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("\\documentclass{article}")
    cfg = _config_file(make_run(tmp_path, model_dir, run_dir=str(mine)), tmp_path / "run.yaml")
    before = snapshot(tmp_path)
    _check(run_cli("train", "--config", cfg), 1, str(mine), "not a run's", before=before, after=snapshot(tmp_path),
           allowed=(tmp_path / "cache",))


def test_saved_config_unreadable(finished, tmp_path):
    run, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(run.run_dir, copy)
    (copy / "config.yaml").write_text("mask: [unclosed\n")
    cfg = _config_file(config.from_dict({**run.to_dict(), "run_dir": str(copy)}, verbose=False), tmp_path / "r.yaml")
    before = snapshot(copy)
    _check(run_cli("train", "--config", cfg), 1, str(copy / "config.yaml"), "cannot be read",
           before=before, after=snapshot(copy))


# --------------------------------------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------------------------------------

def test_second_train_while_one_runs(model_dir, tmp_path):
    run = make_run(tmp_path, model_dir, train={"max_steps": 400}, ckpt={"save_every": 1000})
    cfg = _config_file(run, tmp_path / "run.yaml")
    first = subprocess.Popen([sys.executable, "-m", "mft_jax", "train", "--config", str(cfg)],
                             env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        metrics = Path(run.run_dir) / "metrics.jsonl"
        deadline = time.time() + 240
        # A step record means the loop runs, with its SIGTERM handler (which saves and exits 0) installed.
        while time.time() < deadline and first.poll() is None and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()[0]
        _check(run_cli("train", "--config", cfg), 1, f"pid {first.pid}", run.run_dir)
    finally:
        first.send_signal(signal.SIGTERM)
        output = first.communicate(timeout=240)[0]
    assert first.returncode == 0, output


def test_stale_lock_of_a_dead_process_does_not_block(model_dir, tmp_path):
    run = make_run(tmp_path, model_dir, train={"max_steps": 2})
    Path(run.run_dir).mkdir(parents=True)
    (Path(run.run_dir) / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "earlier"}))
    _check(run_cli("train", "--config", _config_file(run, tmp_path / "run.yaml")), 0)
    assert (Path(run.run_dir) / "DONE").is_file()


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------

def _damage(step_dir: Path):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:7])


def _interrupted_run(model_dir, root):
    """A 6-step run stopped after step 3 (checkpoints every 2 steps and at the stop), and its config file."""
    from mft_jax import train

    run = make_run(root, model_dir, train={"max_steps": 6}, ckpt={"save_every": 2, "keep": 5})
    train.train(run, verbose=False, max_steps_this_run=3)
    return run, _config_file(run, root / "run.yaml")


def test_damaged_latest_checkpoint_resumes_from_the_one_before(model_dir, tmp_path):
    run, cfg = _interrupted_run(model_dir, tmp_path)
    ckpt = Path(run.run_dir) / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    _damage(ckpt / str(steps[-1]))
    result = run_cli("train", "--config", cfg)
    _check(result, 0)
    assert f"warning: checkpoint {ckpt}/{steps[-1]} cannot be read" in result.stderr
    assert f"resumed from {ckpt}/{steps[-2]}" in result.stdout
    assert [p.name.split("-")[0] for p in (Path(run.run_dir) / "checkpoints_damaged").iterdir()] == [str(steps[-1])]


def test_no_readable_checkpoint(model_dir, tmp_path):
    run, cfg = _interrupted_run(model_dir, tmp_path)
    ckpt = Path(run.run_dir) / "checkpoints"
    steps = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    for step in steps:
        _damage(ckpt / str(step))
    before = snapshot(run.run_dir)
    line = _check(run_cli("train", "--config", cfg), 1, f"no checkpoint in {ckpt} can be read",
                  *(f"{step}: " for step in steps), before=before, after=snapshot(run.run_dir))
    assert len(line) < 2000


def test_checkpoint_of_another_process_count(model_dir, tmp_path):
    run, cfg = _interrupted_run(model_dir, tmp_path)
    ckpt = Path(run.run_dir) / "checkpoints"
    for step_dir in ckpt.iterdir():
        if step_dir.name.isdigit():
            os.replace(step_dir / "data" / "process_0.json", step_dir / "data" / "process_1.json")
    before = snapshot(run.run_dir)
    _check(run_cli("train", "--config", cfg), 1, "process_1.json", "saved by 1 processes",
           before=before, after=snapshot(run.run_dir))


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------

def _run_with_rows(model_dir, root, rows, **sections):
    data = write_jsonl(root / "data.jsonl", rows)
    run = make_run(root, model_dir, data={"train": {str(data): None}}, **sections)
    return run, _config_file(run, root / "run.yaml"), data


def test_source_losing_2_percent_of_rows(model_dir, tmp_path):
    rows = chat_rows(98) + [{"messages": [{"role": "user", "content": "no answer"}]}] * 2
    run, cfg, data = _run_with_rows(model_dir, tmp_path, rows)
    result = run_cli("train", "--config", cfg)
    line = _check(result, 1, str(data), "data.max_drop_fraction")
    assert "2 of 100" in line or "2.0%" in line, line
    # The per-source table came first.
    assert str(data) in result.stdout and "dropped" in result.stdout
    assert not Path(run.run_dir).exists() or not (Path(run.run_dir) / "checkpoints").exists()
    # Following the error's advice in the same run directory works: no step was kept, so the config may change.
    result = run_cli("train", "--config", cfg, "--set", "data.max_drop_fraction=0.05")
    _check(result, 0)
    events = [r for r in rundir.read_metrics(run.run_dir) if r.get("event") == "config_change"]
    assert events and events[0]["changes"] == {"data.max_drop_fraction": [0.01, 0.05]}, events
    assert yaml.safe_load((Path(run.run_dir) / "config.yaml").read_text())["data"]["max_drop_fraction"] == 0.05


def test_a_dev_set_cut_at_max_seq_length(model_dir, tmp_path):
    """Every dev row longer than max_seq_length: a warning naming the source and split (training goes on);
    with data.max_truncated_fraction below that share, one error line before any training."""
    long_rows = [{"messages": [{"role": "user", "content": "Count to eighty."},
                               {"role": "assistant", "content": " ".join(str(i) for i in range(80))}]}] * 16
    dev = write_jsonl(tmp_path / "long_dev.jsonl", long_rows)  # (make_run writes its own dev.jsonl)
    run = make_run(tmp_path, model_dir, data={"dev": {str(dev): None}, "max_seq_length": 64}, train={"max_steps": 1})
    cfg = _config_file(run, tmp_path / "run.yaml")
    result = run_cli("train", "--config", cfg)
    _check(result, 0)
    warning = next(line for line in result.stderr.splitlines() if line.startswith("warning: data.dev"))
    assert str(dev) in warning and "16 of 16 kept examples (100.0%) are cut at data.max_seq_length=64" in warning
    assert not [line for line in result.stderr.splitlines() if line.startswith("warning: data.train")]
    stopped = tmp_path / "stopped"
    before = snapshot(model_dir, dev)
    line = _check(run_cli("train", "--config", cfg, "--set", f"run_dir={stopped}", "--set",
                          "data.max_truncated_fraction=0.5"), 1, str(dev), "data.max_truncated_fraction=0.5",
                  "data.max_seq_length", before=before, after=snapshot(model_dir, dev))
    assert "set data.max_truncated_fraction=1 to accept it" in line
    assert not (stopped / "checkpoints").exists()


def test_rows_in_an_unknown_schema(model_dir, tmp_path):
    rows = [{"question_text": "what?", "answer_text": "that"}] * 50
    run, cfg, data = _run_with_rows(model_dir, tmp_path, rows)
    _check(run_cli("train", "--config", cfg), 1, str(data), "question_text")


def test_examples_too_long_for_max_seq_length(model_dir, tmp_path):
    long_prompt = [{"messages": [{"role": "user", "content": "word " * 400},
                                 {"role": "assistant", "content": "ok"}]}] * 10
    run, cfg, data = _run_with_rows(model_dir, tmp_path, chat_rows(40) + long_prompt)
    _check(run_cli("train", "--config", cfg), 1, str(data), "max_seq_length")


def test_empty_data_file(model_dir, tmp_path):
    run, cfg, data = _run_with_rows(model_dir, tmp_path, [])
    _check(run_cli("train", "--config", cfg), 1, str(data))


def test_missing_data_file(model_dir, tmp_path):
    run = make_run(tmp_path, model_dir, data={"train": {str(tmp_path / "nope.jsonl"): None}})
    _check(run_cli("train", "--config", _config_file(run, tmp_path / "run.yaml")), 1, str(tmp_path / "nope.jsonl"))


def test_data_file_that_is_not_jsonl(model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": []}\nthis is not json\n')
    run = make_run(tmp_path, model_dir, data={"train": {str(data): None}})
    _check(run_cli("train", "--config", _config_file(run, tmp_path / "run.yaml")), 1, str(data), "line 2")


def test_missing_tokenizer(model_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / f, bare / f)
    run = make_run(tmp_path, bare)
    _check(run_cli("train", "--config", _config_file(run, tmp_path / "run.yaml")), 2, str(bare), "data.tokenizer")
    assert not Path(run.run_dir).exists()


def test_hub_dataset_without_network(model_dir, tmp_path, monkeypatch):
    from mft_jax.data import sources

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=5.0: False)  # as on a machine without network
    run = make_run(tmp_path, model_dir, data={"train": {"some-org/some-dataset": 100}})
    line = _check(run_cli("train", "--config", _config_file(run, tmp_path / "run.yaml")), 1, "some-org/some-dataset",
                  "not reachable")
    assert "local copy" in line


# --------------------------------------------------------------------------------------------------------
# Resources and numerics
# --------------------------------------------------------------------------------------------------------

def test_disk_too_full_for_a_checkpoint(model_dir, tmp_path, monkeypatch):
    from mft_jax import preflight

    run = make_run(tmp_path, model_dir)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    cfg = _config_file(run, tmp_path / "run.yaml")
    before = snapshot(tmp_path)
    _check(run_cli("train", "--config", cfg), 1, str(run.run_dir), "one checkpoint needs", before=before,
           after=snapshot(tmp_path), allowed=(run.run_dir,))
    assert not Path(run.data.cache_dir).exists()


def test_tokenizer_larger_than_the_model(model_dir, tmp_path):
    import jax
    import jax.numpy as jnp

    from mft_jax import convert, model
    from mft_jax.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    small = convert.save_hf(cfg, model.init_params(cfg, jax.random.key(0), jnp.float32), tmp_path / "small",
                            tokenizer_dir=model_dir)
    run = make_run(tmp_path, small)
    _check(run_cli("train", "--config", _config_file(run, tmp_path / "run.yaml")), 2, str(small), "vocab_size 40")
    assert not Path(run.run_dir).exists()


def test_non_finite_loss(model_dir, tmp_path):
    run = make_run(tmp_path, model_dir, train={"mode": "fft", "max_steps": 4}, optim={"lr": 1e30},
                   ckpt={"save_every": 1})
    result = run_cli("train", "--config", _config_file(run, tmp_path / "run.yaml"))
    _check(result, 1, "not finite at step", "optim.lr")
    assert not (Path(run.run_dir) / "DONE").exists()
