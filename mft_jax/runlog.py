"""A run's logs: metrics.jsonl (one JSON record per logged step or event), TensorBoard and a progress bar."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from tqdm import tqdm

from mft_jax import tracking


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
        self.file = open(run_dir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter  # optional: ImportError turns TensorBoard off

            # purge_step: TensorBoard drops the events of steps a resumed run trains again.
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start or None)
        except ImportError:  # TensorBoard logging is optional
            self.tb = None
        if progress_bar:
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=1.0)

    def write(self, record: dict):
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.tracker.log(record)
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
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
            self.file.close()
            if self.tb is not None:
                self.tb.close()
