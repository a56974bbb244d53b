"""Faults a user can make with configs, model files, output paths, flags and permissions, through the CLI.

Each case asserts the exit code (2 usage, 1 inputs / outputs), that the one error line names the input (path
or key), that no traceback is printed, and that no file outside the command's own output changed. The tiny
model, an orbax copy, a masks file and a run directory are built once for the module.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fault_harness import TRACEBACK, changes, run_cli, run_cli_process, snapshot
from mft_jax import cli, outputs
from run_fixtures import make_model_dir, make_run

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs shared by every case (never written by them): model, other-shape model, orbax copy, masks, run."""
    root = tmp_path_factory.mktemp("faults")
    model = make_model_dir(root / "model")  # 4 layers, hidden 32
    other = make_model_dir(root / "other", num_layers=2, hidden=48)
    twin = make_model_dir(root / "twin", seed=1)  # the model's shapes, other weights
    run = make_run(root / "r", model)
    run_yaml = root / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(run.to_dict()))
    run_dir = Path(run.run_dir)  # a run directory as `train` leaves it, minus the checkpoints' content
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(run_yaml.read_text())
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    made = run_cli("export", run_yaml, "--baseline", "magnitude", "--out", root / "baseline")
    assert made.code == 0, made.stderr
    made = run_cli("convert", "--from-hf", model, "--out", root / "orbax")
    assert made.code == 0, made.stderr
    return {"root": root, "model": model, "other": other, "twin": twin, "run_yaml": run_yaml, "run_dir": run_dir,
            "masks": root / "baseline" / "masks.safetensors", "orbax": root / "orbax"}


class Watch:
    """Snapshots the module's inputs and a test's own directory; `check` asserts on one CLI result."""

    def __init__(self, *roots):
        self.roots = roots
        self.before = snapshot(*roots)

    def check(self, result, code: int, *names, allowed=()):
        assert result.code == code, (result.code, result.stderr)
        assert TRACEBACK not in result.stderr and TRACEBACK not in result.stdout, result.stderr
        line = result.error_line()
        if code != 0:
            assert "error:" in line, result.stderr
            for name in names:
                assert str(name) in line, (name, line)
        assert changes(self.before, snapshot(*self.roots), allowed) == []
        return line


@pytest.fixture
def watch(world, tmp_path):
    return Watch(world["root"], tmp_path)


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01" * 100)
    return path


def _copy_model(world, dst: Path) -> Path:
    shutil.copytree(world["model"], dst)
    return dst


# --------------------------------------------------------------------------------------------------------
# Config files and --set
# --------------------------------------------------------------------------------------------------------

def test_yaml_syntax_error_names_file_line_column(world, watch, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\nmask: [1, 2\ntrain:\n  max_steps: 3\n")
    watch = Watch(world["root"], tmp_path)
    line = watch.check(run_cli("train", "--config", bad), 2, f"{bad}:")
    assert "YAML syntax error" in line and line.count(":") >= 3
    assert f"{bad}:4:" in line or f"{bad}:3:" in line


def test_unknown_config_key_suggests_the_right_one(world, watch):
    line = watch.check(run_cli("train", "--config", world["run_yaml"], "--set", "train.max_step=3"), 2,
                       "train.max_step")
    assert "did you mean 'train.max_steps'" in line


def test_bad_config_value(world, watch):
    watch.check(run_cli("train", "--config", world["run_yaml"], "--set", "train.max_steps=many"), 2,
                "train.max_steps", "must be an integer")


def test_override_without_value(world, watch):
    watch.check(run_cli("train", "--config", world["run_yaml"], "--set", "train.max_steps"), 2, "train.max_steps",
                "section.key=value")


def test_sweep_grid_keys_that_set_the_same_value(world, watch, tmp_path):
    """mask.keep sets keep_attn and keep_mlp: sweeping it beside mask.keep_attn would leave one silently unswept."""
    watch.check(run_cli("sweep", "--config", world["run_yaml"], "--grid", "mask.keep=0.8,0.9", "--grid",
                        "mask.keep_attn=0.5,0.7", "--out", tmp_path / "sweep"), 2,
                "--grid mask.keep and --grid mask.keep_attn", "mask.keep_attn")
    assert not (tmp_path / "sweep").exists()


def test_override_value_is_not_yaml(world, watch):
    watch.check(run_cli("train", "--config", world["run_yaml"], "--set", "mask.masked_layers=[1, 2"), 2,
                "mask.masked_layers", "not valid YAML")


def test_missing_config_file(world, watch, tmp_path):
    watch.check(run_cli("train", "--config", tmp_path / "nope.yaml"), 2, tmp_path / "nope.yaml", "does not exist")


def test_config_is_a_directory(world, watch, tmp_path):
    watch.check(run_cli("train", "--config", tmp_path), 2, tmp_path, "is a directory")


def test_config_is_not_a_mapping(world, watch, tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- model\n- mask\n")
    watch = Watch(world["root"], tmp_path)
    watch.check(run_cli("train", "--config", bad), 2, bad, "mapping of sections")


def test_binary_config_file(world, watch, tmp_path):
    bad = tmp_path / "blob.yaml"
    bad.write_bytes(bytes(range(128, 256)) * 4)
    watch = Watch(world["root"], tmp_path)
    watch.check(run_cli("train", "--config", bad), 2, bad, "not a text")


def test_demo_bad_setting_refused_before_any_work(world, watch, tmp_path):
    watch.check(run_cli("demo", "--out", tmp_path / "demo", "--set", "fft.steps=many"), 2, "fft.steps")
    assert not (tmp_path / "demo").exists()


def test_demo_config_yaml_syntax_error(world, watch, tmp_path):
    bad = tmp_path / "demo.yaml"
    bad.write_text("fft:\n  steps: 10\n  lr: [\n")
    watch = Watch(world["root"], tmp_path)
    watch.check(run_cli("demo", "--config", bad, "--out", tmp_path / "demo"), 2, f"{bad}:", "YAML syntax error")
    assert not (tmp_path / "demo").exists()


# --------------------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------------------

def test_truncated_safetensors(world, watch, tmp_path):
    base = _copy_model(world, tmp_path / "base")
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    watch = Watch(world["root"], tmp_path)
    line = watch.check(run_cli("apply-masks", "--base", base, "--masks", world["masks"], "--out", tmp_path / "out"),
                       1, weights, "truncated")
    assert "re-download" in line
    assert not (tmp_path / "out").exists()


def test_random_bytes_safetensors(world, watch, tmp_path):
    base = _copy_model(world, tmp_path / "base")
    (base / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    watch = Watch(world["root"], tmp_path)
    watch.check(run_cli("convert", "--from-hf", base, "--out", tmp_path / "out"), 1, base / "model.safetensors",
                "not a safetensors file")
    assert not (tmp_path / "out").exists()


def test_safetensors_offsets_that_do_not_match_the_shape(world, watch, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(world["model"] / "config.json", base / "config.json")
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [0, 64]}}).encode()
    (base / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    watch = Watch(world["root"], tmp_path)
    watch.check(run_cli("convert", "--from-hf", base, "--out", tmp_path / "out"), 1, "model.norm.weight",
                "needs 128")


def test_config_json_syntax_error(world, watch, tmp_path):
    base = _copy_model(world, tmp_path / "base")
    (base / "config.json").write_text('{"hidden_size": 32,\n "vocab_size": }\n')
    watch = Watch(world["root"], tmp_path)
    watch.check(run_cli("apply-masks", "--base", base, "--masks", world["masks"], "--out", tmp_path / "out"), 1,
                f"{base / 'config.json'}:2:", "invalid JSON")


def test_base_model_does_not_exist(world, watch, tmp_path):
    watch.check(run_cli("apply-masks", "--base", tmp_path / "nowhere", "--masks", world["masks"], "--out",
                        tmp_path / "out"), 1, tmp_path / "nowhere", "does not exist")


def test_to_hf_of_a_directory_that_is_not_orbax(world, watch, tmp_path):
    watch.check(run_cli("convert", "--to-hf", world["model"], "--out", tmp_path / "out"), 1, world["model"],
                "no params/")


# --------------------------------------------------------------------------------------------------------
# apply-masks and eval inputs
# --------------------------------------------------------------------------------------------------------

def test_apply_masks_onto_a_model_of_other_shapes(world, watch, tmp_path):
    line = watch.check(run_cli("apply-masks", "--base", world["other"], "--masks", world["masks"], "--out",
                               tmp_path / "out"), 1, world["masks"], world["other"])
    # 14 masks (layers 1, 2 x 7 projections) onto a 2-layer model of hidden size 48.
    assert "of its 14 masks, 7 for matrices the base model does not have (first: model.layers.2." in line
    assert "7 with other shapes (first: model.layers.1." in line and ", base weight [" in line
    assert not (tmp_path / "out").exists()


def test_apply_masks_onto_other_weights_of_the_same_shapes(world, watch, tmp_path):
    """The masks file records its base's fingerprint: another base of the same shapes is refused by name, and
    --allow-other-base applies them anyway; the base they were learned on passes."""
    line = watch.check(run_cli("apply-masks", "--base", world["twin"], "--masks", world["masks"], "--out",
                               tmp_path / "out"), 1, world["masks"], world["twin"], "--allow-other-base",
                       "learned on other weights")
    assert str(world["model"]) in line and not (tmp_path / "out").exists()
    forced = run_cli("apply-masks", "--base", world["twin"], "--masks", world["masks"], "--out", tmp_path / "forced",
                     "--allow-other-base")
    assert forced.code == 0 and (tmp_path / "forced" / "config.json").is_file(), forced.stderr
    same = run_cli("apply-masks", "--base", world["model"], "--masks", world["masks"], "--out", tmp_path / "same")
    assert same.code == 0, same.stderr


def test_masks_file_that_is_not_ours(world, watch, tmp_path):
    foreign = world["model"] / "model.safetensors"
    watch.check(run_cli("apply-masks", "--base", world["model"], "--masks", foreign, "--out", tmp_path / "out"), 1,
                foreign, "not an mft_jax masks file")


def test_damaged_masks_file(world, watch, tmp_path):
    damaged = tmp_path / "masks.safetensors"
    data = world["masks"].read_bytes()
    damaged.write_bytes(data[: len(data) - 100])
    watch = Watch(world["root"], tmp_path)
    watch.check(run_cli("apply-masks", "--base", world["model"], "--masks", damaged, "--out", tmp_path / "out"), 1,
                damaged, "truncated")


def test_masks_file_missing(world, watch, tmp_path):
    watch.check(run_cli("apply-masks", "--base", world["model"], "--masks", tmp_path / "m.safetensors", "--out",
                        tmp_path / "out"), 1, tmp_path / "m.safetensors", "does not exist")


def test_eval_model_does_not_exist(world, watch, tmp_path):
    watch.check(run_cli("eval", "--model", tmp_path / "nowhere", "--tasks", "loss", "--loss-data",
                        world["root"] / "r" / "dev.jsonl"), 1, tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------

def test_apply_masks_over_a_folder_with_user_files_is_refused(world, watch, tmp_path):
    folder = _user_folder(tmp_path / "mine")
    watch = Watch(world["root"], tmp_path)
    line = watch.check(run_cli("apply-masks", "--base", world["model"], "--masks", world["masks"], "--out", folder),
                       1, folder, "--overwrite")
    assert "not written by mft-jax" in line and "notes.txt" in line


def test_out_equal_to_base_is_refused_even_with_overwrite(world, watch):
    for extra in ([], ["--overwrite"]):
        line = watch.check(run_cli("apply-masks", "--base", world["model"], "--masks", world["masks"], "--out",
                                   world["model"], *extra), 1, world["model"])
        assert "is the input" in line


def test_out_inside_or_above_an_input_is_refused(world, watch):
    cases = [(world["model"] / "masked", "is inside the input"), (world["masks"].parent, "contains the input"),
             (world["root"], "contains the input")]
    for out, relation in cases:
        line = watch.check(run_cli("apply-masks", "--base", world["model"], "--masks", world["masks"], "--out", out,
                                   "--overwrite"), 1, out)
        assert relation in line, line


def test_out_dotdot_empties_nothing(world, tmp_path, monkeypatch):
    work = _user_folder(tmp_path / "work")
    (work / "here").mkdir()
    monkeypatch.chdir(work / "here")
    watch = Watch(world["root"], tmp_path)
    for extra in ([], ["--overwrite"]):
        line = watch.check(run_cli("apply-masks", "--base", world["model"], "--masks", world["masks"], "--out", "..",
                                   *extra), 1, "--out ..")
        assert "current directory" in line


def test_out_root_is_refused(world, watch):
    line = watch.check(run_cli("apply-masks", "--base", world["model"], "--masks", world["masks"], "--out", "/",
                               "--overwrite"), 1, "--out /")
    assert "filesystem root" in line


def test_convert_to_hf_over_an_existing_folder_is_refused(world, watch, tmp_path):
    folder = _user_folder(tmp_path / "hf_out")
    watch = Watch(world["root"], tmp_path)
    watch.check(run_cli("convert", "--to-hf", world["orbax"], "--out", folder), 1, folder, "not written by mft-jax")


def test_convert_out_is_an_existing_file(world, watch, tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"weights")
    watch = Watch(world["root"], tmp_path)
    watch.check(run_cli("convert", "--from-hf", world["model"], "--out", target, "--overwrite"), 1, target,
                "is a file")


def test_export_out_equal_to_or_above_the_run_or_in_its_checkpoints(world, watch):
    run_dir = world["run_dir"]
    for out in (run_dir, run_dir.parent, run_dir / "checkpoints" / "x"):
        watch.check(run_cli("export", run_dir, "--out", out, "--overwrite"), 1, out)


def test_export_inside_the_run_directory_passes_the_output_check(world, watch):
    run_dir = world["run_dir"]
    outputs.check_target(run_dir / "export", inputs=[run_dir / "config.yaml", run_dir / "checkpoints"])
    # It gets past the output check and fails on the (empty) checkpoints, naming them; nothing is written.
    watch.check(run_cli("export", run_dir, "--out", run_dir / "export"), 1, run_dir / "checkpoints",
                "no checkpoint")
    assert not (run_dir / "export").exists()


def test_rerun_replaces_our_own_output_and_overwrite_replaces_a_foreign_one(world, watch, tmp_path):
    out = tmp_path / "masked"
    args = ("apply-masks", "--base", world["model"], "--masks", world["masks"], "--out", out)
    watch.check(run_cli(*args), 0, allowed=(out,))
    first = json.loads((out / outputs.MARKER).read_text())
    assert first["command"] == "apply-masks" and first["complete"]
    assert sorted(first["inputs"]) == sorted(str(p.resolve()) for p in (world["model"], world["masks"]))
    (out / "stale.txt").write_text("from the first run")
    watch.check(run_cli(*args), 0, allowed=(out,))  # ours: replaced without --overwrite
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    watch.check(run_cli(*args, "--overwrite"), 0, allowed=(out,))
    foreign = _user_folder(tmp_path / "foreign")
    watch.check(run_cli("apply-masks", "--base", world["model"], "--masks", world["masks"], "--out", foreign,
                        "--overwrite"), 0, allowed=(out, foreign))
    assert not (foreign / "notes.txt").exists() and outputs.is_ours(foreign)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "masked"]  # no temporaries left


def test_leftovers_of_a_killed_writer(world, watch, tmp_path):
    out = tmp_path / "masked"
    ours = tmp_path / ".masked.tmp-otherpid-999999-0123abcd"  # another host: its liveness is unknown
    dead = tmp_path / f".masked.tmp-{outputs._host()}-999999-0123abcd"
    foreign = tmp_path / f".masked.tmp-{outputs._host()}-999998-0123abce"
    for path in (ours, dead):
        path.mkdir()
        (path / outputs.MARKER).write_text(json.dumps({"format": outputs.FORMAT, "complete": False}))
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    watch = Watch(world["root"], tmp_path)
    result = run_cli("apply-masks", "--base", world["model"], "--masks", world["masks"], "--out", out)
    watch.check(result, 0, allowed=(out, dead))
    assert not dead.exists() and ours.exists() and (foreign / "keep.txt").read_text() == "not ours"
    assert "holds no marker of ours" in result.stderr


def test_out_under_a_regular_file(world, watch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    watch = Watch(world["root"], tmp_path)
    watch.check(run_cli("apply-masks", "--base", world["model"], "--masks", world["masks"], "--out", blocker / "sub"),
                1, blocker, "not a directory")


def test_demo_over_a_foreign_folder_is_refused(world, watch, tmp_path):
    folder = _user_folder(tmp_path / "demo")
    watch = Watch(world["root"], tmp_path)
    watch.check(run_cli("demo", "--out", folder, "--set", "fft.steps=2"), 1, folder, "not written by mft-jax")


def test_claimed_dir_restores_the_earlier_output_when_the_writer_fails(tmp_path):
    out = tmp_path / "demo"
    with outputs.claimed_dir(out, command="demo") as claimed:
        (claimed / "results.json").write_text("first")
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with outputs.claimed_dir(out, command="demo") as claimed:
            assert not (claimed / "results.json").exists()  # a fresh directory while the new demo runs
            (claimed / "partial.txt").write_text("x")
            raise RuntimeError("boom")
    assert changes(before, snapshot(tmp_path)) == []


def test_failed_writer_leaves_no_directories(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        with outputs.new_dir(out, command="test") as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_demo_gives_back_the_earlier_one(tmp_path):
    """A demo killed outright (kill -9) while replacing an earlier demo: the target holds the partial new one
    (marked incomplete by a dead pid) and the earlier one sits aside; the next writer restores the earlier one."""
    out = tmp_path / "demo"
    dead = {"format": outputs.FORMAT, "command": "demo", "host": os.uname().nodename, "pid": 999999}
    out.mkdir()
    (out / outputs.MARKER).write_text(json.dumps({**dead, "complete": False}))
    (out / "partial.txt").write_text("half")
    aside = tmp_path / f".demo.old-{outputs._host()}-999999-0123abcd"
    aside.mkdir()
    (aside / outputs.MARKER).write_text(json.dumps({**dead, "complete": True}))
    (aside / "results.json").write_text("earlier")
    outputs.check_target(out)  # ours and its writer is gone: not refused as "being written"
    outputs.clean_leftovers(out.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert (out / "results.json").read_text() == "earlier" and not (out / "partial.txt").exists()


# --------------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------------

def test_convert_needs_exactly_one_direction(world, watch, tmp_path):
    watch.check(run_cli("convert", "--from-hf", world["model"], "--to-hf", world["orbax"], "--out", tmp_path / "o"),
                2, "--from-hf", "--to-hf")


def test_export_baseline_with_step(world, watch, tmp_path):
    watch.check(run_cli("export", world["run_yaml"], "--baseline", "random", "--step", "3", "--out",
                        tmp_path / "o"), 2, "--step")


def test_export_of_a_config_file_without_baseline(world, watch, tmp_path):
    watch.check(run_cli("export", world["run_yaml"], "--out", tmp_path / "o"), 2, world["run_yaml"], "--baseline")


def test_bad_max_shard_size(world, watch, tmp_path):
    watch.check(run_cli("convert", "--to-hf", world["orbax"], "--out", tmp_path / "o", "--max-shard-size", "lots"),
                2, "max_shard_size 'lots'")


def test_argparse_errors_exit_2(world, watch, tmp_path):
    result = run_cli("convert", "--from-hf", world["model"], "--out", tmp_path / "o", "--dtype", "int4")
    watch.check(result, 2, "--dtype", "invalid choice")


def test_missing_tokenizer_for_to_hf(world, watch, tmp_path):
    watch.check(run_cli("convert", "--to-hf", world["orbax"], "--out", tmp_path / "o", "--tokenizer",
                        tmp_path / "tok"), 1, tmp_path / "tok")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------------
# Permissions
# --------------------------------------------------------------------------------------------------------

def _deny(monkeypatch, path: Path, *, read: bool = False, write: bool = False):
    """Takes a permission away from `path`: chmod for an ordinary user; for root, whom file modes do not stop
    (CI runs as root), the same refusal simulated where the code meets it (open / os.access)."""
    if not ROOT_USER:
        path.chmod(0o555 if write else 0)
        return
    import builtins

    if read:
        real_open = builtins.open

        def guarded_open(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, *args, **kwargs)
        monkeypatch.setattr(builtins, "open", guarded_open)
    if write:
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == path and mode & os.W_OK
                            else real_access(p, mode, *a, **k))


def test_unreadable_config(world, tmp_path, monkeypatch):
    cfg = tmp_path / "run.yaml"
    shutil.copy(world["run_yaml"], cfg)
    watch = Watch(world["root"], tmp_path)
    _deny(monkeypatch, cfg, read=True)
    try:
        result = run_cli("train", "--config", cfg)
    finally:
        monkeypatch.undo()
        cfg.chmod(0o644)
    watch.check(result, 1, cfg, "Permission denied")


def test_unwritable_output_parent(world, tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    watch = Watch(world["root"], tmp_path)
    _deny(monkeypatch, parent, write=True)
    try:
        result = run_cli("apply-masks", "--base", world["model"], "--masks", world["masks"], "--out", parent / "out")
    finally:
        monkeypatch.undo()
        parent.chmod(0o755)
    watch.check(result, 1, parent, "permission denied")


# --------------------------------------------------------------------------------------------------------
# The error mapping itself
# --------------------------------------------------------------------------------------------------------

def test_error_table():
    from mft_jax.convert import CheckpointError
    from mft_jax.data.sources import DataError
    from mft_jax.train import NonFiniteLossError

    non_finite = NonFiniteLossError("loss or gradient is not finite at step 7 (loss=nan); the last checkpoint "
                                    "is intact")
    cases = [(cli.ConfigError("bad key"), 2), (DataError("bad row"), 1), (outputs.OutputError("refused"), 1),
             (CheckpointError("bad\n  tensor"), 1), (non_finite, 1), (KeyboardInterrupt(), 130),
             (FileNotFoundError(2, "No such file or directory", "/x/y"), 1), (PermissionError(13, "denied", "/x"), 1),
             (RuntimeError("boom\nsecond line"), 1)]
    for error, code in cases:
        got, message = cli.describe_error(error)
        assert got == code, error
        assert "\n" not in message
    assert cli.describe_error(non_finite)[1].startswith("loss or gradient is not finite at step 7")
    assert cli.describe_error(FileNotFoundError(2, "No such file or directory", "/x/y"))[1] == \
        "/x/y: No such file or directory"
    assert cli.describe_error(RuntimeError("boom\nsecond line"))[1] == \
        "unexpected RuntimeError: boom; second line (set MFT_JAX_DEBUG=1 for the traceback)"


def test_interrupt_and_unexpected_errors(world, watch, tmp_path, monkeypatch):
    from mft_jax import export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "apply_masks_file", interrupted)
    args = ("apply-masks", "--base", world["model"], "--masks", world["masks"], "--out", tmp_path / "o")
    assert watch.check(run_cli(*args), 130).endswith("error: interrupted")

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(export, "apply_masks_file", broken)
    line = watch.check(run_cli(*args), 1, "ZeroDivisionError", "MFT_JAX_DEBUG=1")
    assert line == ("mft-jax apply-masks: error: unexpected ZeroDivisionError: division by zero (set "
                    "MFT_JAX_DEBUG=1 for the traceback)")


def test_ctrl_c_inside_an_extension_import_is_one_line():
    """A Ctrl-C that lands in a C extension's initialisation surfaces as `ImportError: initialization failed`
    raised from the KeyboardInterrupt (seen with matplotlib's ft2font at 1.2 s): still one line and exit 130."""
    code = textwrap.dedent("""
        import sys
        class Interrupted:
            def find_spec(self, name, path=None, target=None):
                if name == "mft_jax.cli":
                    try:
                        raise KeyboardInterrupt
                    except KeyboardInterrupt as e:
                        raise ImportError("initialization failed") from e
        sys.meta_path.insert(0, Interrupted())
        from mft_jax.__main__ import main
        main()
    """)
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert (proc.returncode, proc.stderr) == (130, "mft-jax: error: interrupted\n"), proc.stderr[-2000:]


@pytest.mark.parametrize("after_s", [0.3, 1.2, 2.0, 2.3, 2.6, 3.5])
def test_ctrl_c_at_any_moment_is_one_line(world, tmp_path, after_s):
    """SIGINT to a real `mft-jax convert` while it imports (~2 s here), loads, writes orbax or exits: exit 130 and
    one error line, no traceback and no 'Exception ignored' report; or, once the command has finished, exit 0,
    or death by the signal during the interpreter's teardown (Python restores the default handler there; a
    shell reports 130), its output complete."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "mft_jax", "convert", "--from-hf", str(world["model"]), "--out",
                             str(tmp_path / "orbax")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo)})
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert TRACEBACK not in err and "Exception ignored" not in err, err[-3000:]
    if proc.returncode == 130:
        assert [line for line in err.splitlines() if line.strip()][-1].endswith("error: interrupted"), err[-2000:]
    else:
        assert proc.returncode in (0, -signal.SIGINT), (proc.returncode, err[-2000:])
        assert "wrote orbax params checkpoint" in out and (tmp_path / "orbax" / "config.json").is_file()


def test_real_process_one_line_and_debug_traceback(world, tmp_path):
    """In a real interpreter: one stderr line and exit 1 for a truncated model; MFT_JAX_DEBUG=1 shows the
    traceback (the library logging at start-up must not look like one)."""
    base = _copy_model(world, tmp_path / "base")
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    args = ("apply-masks", "--base", base, "--masks", world["masks"], "--out", tmp_path / "out")
    watch = Watch(world["root"], tmp_path)
    result = run_cli_process(*args)
    watch.check(result, 1, weights, "truncated")
    assert result.stderr.strip().splitlines() == [result.error_line()]
    debug = run_cli_process(*args, env={"MFT_JAX_DEBUG": "1"})
    assert debug.code == 1 and TRACEBACK in debug.stderr and "CheckpointError" in debug.stderr


def test_unknown_eval_task(world, watch):
    """Last: the evaluate helper turns unknown task names into an `EvalError(ConfigError)`, a usage error."""
    watch.check(run_cli("eval", "--model", world["model"], "--tasks", "gsm8k,bogus"), 2, "bogus")

