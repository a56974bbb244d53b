"""Weights & Biases tracking: an offline run read back from its files equals what was logged; off means off."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import wandb_files
from mft_jax import config, tracking

# Records of the kinds metrics.jsonl holds: logged steps, a step with dev numbers, an event without a loss.
RECORDS = [
    {"step": 1, "loss": 2.5, "lr": 1e-05, "grad_norm": 0.75, "tokens_per_s": 1234.5, "mask_flips": 3,
     "kept": 0.9, "kept_attn": 0.9, "kept_mlp": 0.8999999761581421},
    {"step": 2, "event": "config_change", "total_steps": 4, "changes": {"train.log_every": [1, 2]}},
    {"step": 2, "loss": 2.25, "lr": 2e-05, "grad_norm": 0.5, "tokens_per_s": 1500.0, "dev_loss": 2.375,
     "dev_accuracy": 0.125},
    {"step": 4, "loss": 1.0000000000000002, "lr": 0.0, "grad_norm": 0.1, "tokens_per_s": 99.0},
]


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch):
    """wandb's settings, cache and data directories in tmp; no inherited WANDB_* choice; quiet."""
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP",
                 "WANDB_NAME", "WANDB_RESUME", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc key
    monkeypatch.setenv("WANDB_SILENT", "true")


def _run_config(run_dir: Path, **wandb) -> dict:
    return config.from_dict({"run_dir": str(run_dir), "mask": {"masked_layers": [1]}, "train": {"mode": "mft"},
                             "log": {"wandb": wandb}}, verbose=False).to_dict()


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (4, 3), (200, 30, 30)).save(path)
    return path


def test_offline_run_holds_the_config_every_record_and_the_plot(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    raw = _run_config(run_dir, project="mft-test", group="sweep-a", mode="offline")
    tracker = tracking.Tracker.open(raw, run_dir, config.WandbConfig(**raw["log"]["wandb"]))
    assert tracker.enabled
    for record in RECORDS:
        tracker.log(record)
    tracker.log_image("dev_accuracy", _png(tmp_path / "plot.png"))
    tracker.close()

    (offline,) = wandb_files.run_dirs(run_dir)  # wandb's files under RUN/wandb, not the cwd
    run_id = (run_dir / tracking.ID_FILE).read_text().strip()
    assert offline.name.endswith(f"-{run_id}") and len(run_id) == 12 and not any((tmp_path / "cwd").iterdir())
    rows = wandb_files.history(offline)
    assert rows[:len(RECORDS)] == RECORDS  # exact: JSON round trip of the same floats
    (image,) = rows[len(RECORDS):]
    assert image["step"] == 4 and image["dev_accuracy"]["_type"] == "image-file"
    assert (offline / "files" / image["dev_accuracy"]["path"]).read_bytes() == (tmp_path / "plot.png").read_bytes()
    assert [r["_step"] for r in wandb_files.history(offline, internal=True)] == [0, 1, 2, 3, 4]
    assert wandb_files.config(offline) == json.loads(json.dumps(raw))
    meta = wandb_files.run_record(offline)
    assert (meta.run_id, meta.project, meta.run_group, meta.job_type, meta.display_name) == (
        run_id, "mft-test", "sweep-a", "mft", "run")


def test_resume_continues_the_same_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    raw = _run_config(run_dir, project="mft-test", mode="offline")
    with tracking.Tracker.open(raw, run_dir, raw["log"]["wandb"]) as tracker:  # a dict works too
        tracker.log(RECORDS[0])
    raw["train"]["log_every"] = 2  # a result-neutral change between the two sessions
    with tracking.Tracker.open(raw, run_dir, raw["log"]["wandb"]) as tracker:
        tracker.log(RECORDS[2])
    first, second = wandb_files.run_dirs(run_dir)
    run_id = (run_dir / tracking.ID_FILE).read_text().strip()
    assert wandb_files.run_record(first).run_id == wandb_files.run_record(second).run_id == run_id
    assert wandb_files.run_record(second).resume
    assert wandb_files.history(first) + wandb_files.history(second) == [RECORDS[0], RECORDS[2]]
    assert wandb_files.config(second)["train"]["log_every"] == 2


def test_not_configured_does_nothing_and_imports_nothing(tmp_path):
    """No project, or mode disabled: no files, and neither wandb nor anything heavy is imported."""
    script = f"""
import sys
from pathlib import Path
from mft_jax import config, tracking
for cfg in (None, config.WandbConfig(), {{"project": "p", "mode": "disabled"}}):
    with tracking.Tracker.open({{"train": {{"mode": "mft"}}}}, Path({str(tmp_path / "run")!r}), cfg) as t:
        assert not t.enabled
        t.log({{"step": 1, "loss": 1.0}})
        t.log_image("plot", "missing.png")
print(sorted(m for m in ("wandb", "jax", "numpy") if m in sys.modules))  # (yaml: config reads YAML, ~10 ms)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert not (tmp_path / "run").exists()


def test_configured_without_wandb_installed_names_the_fix(tmp_path, monkeypatch):
    import importlib.util

    settings = {"project": "p", "mode": "offline"}
    tracking.check(settings)  # installed here: no error
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else ...)
    fix = r"^log.wandb.project is 'p' but wandb is not installed; pip install wandb \(or remove log.wandb"
    for attempt in (lambda: tracking.check(settings), lambda: tracking.Tracker.open({}, tmp_path / "run", settings)):
        with pytest.raises(tracking.TrackingError, match=fix) as err:
            attempt()
        assert isinstance(err.value, config.ConfigError) and "\n" not in str(err.value)
    tracking.check({"project": "p", "mode": "disabled"})  # off: wandb is not needed
    assert not (tmp_path / "run").exists()


def test_online_without_an_api_key_is_one_line_before_any_work(tmp_path):
    with pytest.raises(tracking.TrackingError, match=r"wandb could not start the online run \(No API key.*"
                                                     r"wandb login.*log.wandb.mode: offline") as err:
        tracking.Tracker.open({}, tmp_path / "run", {"project": "p", "mode": "online"})
    assert "\n" not in str(err.value)


def test_online_with_an_unreachable_server_fails_in_seconds(tmp_path, monkeypatch):
    """A key but no server (here a closed local port): one line within about the init timeout (wandb's own
    default retries for 90 s)."""
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=r"wandb could not start the online run .*"
                                                     r"http://127.0.0.1:9 is reachable \(log.wandb.init_timeout=3 s\)"
                                                     r".*log.wandb.mode: offline") as err:
        tracking.Tracker.open({}, tmp_path / "run", {"project": "p", "mode": "online", "init_timeout": 3})
    assert "\n" not in str(err.value) and time.monotonic() - start < 30


@pytest.mark.parametrize("wandb, message", [
    ({"mode": "sometimes", "project": "p"}, "log.wandb.mode is 'sometimes'; choose one of"),
    ({"group": "g"}, "log.wandb has settings but no project; set log.wandb.project"),
    ({"project": " "}, "log.wandb.project is empty"),
    ({"projet": "p"}, "unknown config key 'log.wandb.projet'; did you mean 'log.wandb.project'"),
])
def test_bad_wandb_settings_are_refused(wandb, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict({"mask": {"masked_layers": [1]}, "log": {"wandb": wandb}}, verbose=False)
