"""Optional experiment tracking: Weights & Biases (the reference reports its runs there).

`log.wandb: {project, group, mode}` in a run config turns it on: the run config, every `metrics.jsonl` record
and the plots go to one wandb run. Without a project (or with mode `disabled`) the `Tracker` does nothing and
wandb is never imported; with a project but no wandb installed, opening it fails before any work
(`TrackingError`: pip install wandb).

- One wandb run per run directory: its id is kept in RUN/wandb_id, so a resumed `train` continues the same
  wandb run (resume="allow"); wandb's own files go under RUN/wandb (or `log.wandb.dir`/wandb), never the cwd.
- Every record is one history row, logged as it is (nested dicts become nested keys); the record's `step` is
  the x-axis of every chart (`define_metric`), so wandb's own row counter `_step` never has to match it.
  After a resume, metrics.jsonl drops the records past the restored checkpoint and those steps are trained
  again; wandb's history is append-only, so it holds both versions of those steps.
- Sweeps: give every point the same `log.wandb.group` (e.g. the sweep's name); the job type is train.mode.
- `mode: offline` writes everything locally with no network (`wandb sync RUN/wandb/offline-run-*` uploads
  it later).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path
from typing import Any

from mft_jax import storage
from mft_jax.config import ConfigError, WandbConfig

ID_FILE = "wandb_id"  # in the run directory: the wandb run id a resume continues
FILES_DIR = "wandb"  # wandb's own directory name under its `dir`


class TrackingError(ConfigError):
    """Tracking is configured but cannot run (wandb not installed)."""


def _wandb_config(cfg: WandbConfig | dict | None) -> WandbConfig | None:
    """The wandb settings if tracking is on (a project and a mode other than disabled), else None."""
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        cfg = WandbConfig(**cfg)
        cfg.validate()
    return cfg if cfg.project and cfg.mode != "disabled" else None


def check(wandb_cfg: WandbConfig | dict | None) -> None:
    """Raises `TrackingError` now if tracking is on but wandb is not installed (no import: call it while
    checking the config, before data and compilation)."""
    cfg = _wandb_config(wandb_cfg)
    if cfg is not None and importlib.util.find_spec("wandb") is None:
        raise _not_installed(cfg)


def _server() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def _not_installed(cfg: WandbConfig) -> TrackingError:
    return TrackingError(f"log.wandb.project is {cfg.project!r} but wandb is not installed; pip install wandb "
                         f"(or remove log.wandb from the run config)")


def run_id(run_dir: str | Path) -> str:
    """The wandb run id of a run directory: read from RUN/wandb_id, or made (12 hex digits) and written there.
    Stored rather than derived from the path, so a new run in a reused directory name is a new wandb run."""
    path = storage.path(run_dir) / ID_FILE
    if path.is_file():
        stored = path.read_text().strip()
        if stored:
            return stored
    new = secrets.token_hex(6)
    storage.write_atomic(path, new + "\n")
    return new


class Tracker:
    """One run's experiment tracker; every method is a no-op when tracking is off.

    Call it on process 0 only (as `metrics.jsonl` is written): `Tracker.open(...)`, then `log(record)` for
    every record written to metrics.jsonl, `log_image(name, path)` for plots, and `close()` at the end."""

    def __init__(self, run=None):
        self.run = run

    @property
    def enabled(self) -> bool:
        return self.run is not None

    @classmethod
    def open(cls, run_config: dict, run_dir: str | Path, wandb_cfg: WandbConfig | dict | None) -> "Tracker":
        """Starts (or, with the id in RUN/wandb_id, resumes) the wandb run of `run_dir`, with `run_config`
        (`RunConfig.to_dict()`) as its config. Returns a no-op tracker when `wandb_cfg` does not turn it on."""
        cfg = _wandb_config(wandb_cfg)
        if cfg is None:
            return cls()
        try:
            import wandb  # optional: only runs with log.wandb set need it
        except ImportError:
            raise _not_installed(cfg) from None
        run_dir = storage.path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # wandb writes its own files with local file calls: a gs:// run keeps them in the local cache.
        files_root = Path(cfg.dir) if cfg.dir else (storage.local_cache(run_dir) if storage.is_remote(run_dir)
                                                    else run_dir)
        files_root.mkdir(parents=True, exist_ok=True)
        job_type = (run_config.get("train") or {}).get("mode")
        try:
            timeouts = wandb.Settings(init_timeout=cfg.init_timeout, login_timeout=cfg.init_timeout,
                                      x_graphql_timeout_seconds=cfg.init_timeout)
            run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, name=cfg.name or run_dir.name,
                             job_type=job_type, id=run_id(run_dir), resume="allow", mode=cfg.mode,
                             dir=str(files_root), reinit="create_new", settings=timeouts)
        except wandb.errors.Error as e:  # e.g. online without an API key: one line, before any training
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrackingError(f"log.wandb: wandb could not start the {cfg.mode} run ({reason}); log in with "
                                f"`wandb login` (or set WANDB_API_KEY), check that {_server()} is reachable "
                                f"(log.wandb.init_timeout={cfg.init_timeout:g} s), or set log.wandb.mode: "
                                f"offline") from None
        # After a resume the run already holds a config; result-neutral keys (log_every, ...) may have changed.
        run.config.update(run_config, allow_val_change=True)
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return cls(run)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record (a step's numbers or an event) as one history row."""
        if self.run is not None:
            self.run.log(dict(record))

    def log_image(self, name: str, path: str | Path) -> None:
        """A plot (PNG file) under `name`, at the last logged step."""
        if self.run is not None:
            import wandb  # optional: a run exists only if it imported above

            self.run.log({name: wandb.Image(str(path))})

    def close(self, exit_code: int = 0) -> None:
        """Finishes the wandb run (uploads what is left online; closes the files offline). Idempotent."""
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)
