"""A run's logs: metrics.jsonl (one JSON record per logged step or event), TensorBoard and a progress bar.

On a gs:// run directory each record is appended by composing objects (`storage.append_text`), and TensorBoard
writes its events object itself (tensorboardX's gs:// writer uploads the whole file on each flush, so it is
flushed every `_REMOTE_TB_FLUSH_S` seconds and at the end, not at each record)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from tqdm import tqdm

from mft_jax import storage, tracking

_REMOTE_TB_FLUSH_S = 60


class MetricsLog:
    """metrics.jsonl, TensorBoard and a progress bar; only process 0 writes."""

    def __init__(self, run_dir: Path, total: int, start: int, progress_bar: bool = True, run_config=None,
                 wandb=None):
        self.enabled = jax.process_index() == 0
        self.file = self.tb = self.bar = None
        self.tracker = tracking.Tracker()  # does nothing unless log.wandb is configured
        if not self.enabled:
            return
        self.tracker = tracking.Tracker.open(run_config or {}, run_dir, wandb)
        self.remote = storage.is_remote(run_dir)
        self.metrics = storage.path(run_dir) / "metrics.jsonl"
        self.file = None if self.remote else open(self.metrics, "a")
        try:
            from tensorboardX import SummaryWriter  # optional: ImportError turns TensorBoard off

            # purge_step: TensorBoard drops the events of steps a resumed run trains again.
            self.tb = SummaryWriter(str(storage.path(run_dir) / "tb"), purge_step=start or None,
                                    flush_secs=_REMOTE_TB_FLUSH_S if self.remote else 120)
        except ImportError:  # TensorBoard logging is optional
            self.tb = None
        if progress_bar:
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=1.0)

    def write(self, record: dict):
        if not self.enabled:
            return
        if self.remote:
            storage.append_text(self.metrics, json.dumps(record) + "\n")
        else:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.tracker.log(record)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
            if not self.remote:
                self.tb.flush()

    def progress(self, steps: int, postfix: dict):
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self, exit_code: int = 0):
        self.tracker.close(exit_code)
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            if self.file is not None:
                self.file.close()
            if self.tb is not None:
                self.tb.close()
