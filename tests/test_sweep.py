"""`mft-jax sweep`: grid syntax and point names, data.fraction, checkpoint selection, the table, the arith task,
and a sweep killed after its first point that resumes without touching it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mft_jax import config
from mft_jax.demo import task as demo_task
from mft_jax.studies import sweep
from mft_jax.data import sources, store
from mft_jax.evaluate import Arith
from tests.run_fixtures import chat_rows, make_model_dir, make_run, write_jsonl


def test_grid_values_points_and_names():
    assert sweep.split_values("0-3,4-7") == ["0-3", "4-7"]
    assert sweep.split_values("[0,2], [1,3]") == ["[0,2]", "[1,3]"]
    assert sweep.split_values("'a,b',c") == ["'a,b'", "c"]
    for bad in ("[0,1", "0.5,,0.9", "'a"):
        with pytest.raises(sweep.SweepError, match="unbalanced brackets or quotes, or an empty value"):
            sweep.split_values(bad)
    axes = sweep.parse_grid(["mask.keep=0.5,0.7,0.9", "mask.masked_layers=0-1,[2,3]"], seeds=2, base_seed=5)
    assert axes[0] == ("train.seed", ["5", "6"])  # outermost: the first half of the sweep is seed 5
    points = sweep.make_points(axes)
    assert len(points) == 12
    assert points[0]["name"] == "keep=0.5__masked_layers=0-1__seed=5"
    assert points[1]["name"] == "keep=0.5__masked_layers=2+3__seed=5"
    assert points[6]["name"] == "keep=0.5__masked_layers=0-1__seed=6"
    base = make_run_dict()
    run = config.from_dict(base, [f"{k}={v}" for k, v in points[1]["settings"].items()], verbose=False)
    assert (run.mask.masked_layers, run.mask.keep_attn, run.mask.keep_mlp, run.train.seed) == ([2, 3], 0.5, 0.5, 5)
    with pytest.raises(sweep.SweepError, match="give the same point name 'layers=1\\+2__seed=0'"):
        sweep.make_points(sweep.parse_grid(["layers=[1,2],'1,2'"], seeds=1, base_seed=0))
    with pytest.raises(sweep.SweepError, match="--seeds 2 and --grid train.seed"):
        sweep.parse_grid(["train.seed=1,2"], seeds=2, base_seed=0)
    for a, b, both in (("mask.keep", "mask.keep_mlp", "mask.keep_mlp"), ("mask.layers", "mask.masked_layers",
                                                                        "mask.masked_layers")):
        with pytest.raises(sweep.SweepError, match=f"--grid {a} and --grid {b} both set {both}"):
            sweep.parse_grid([f"{a}=1,2", f"{b}=3,4"], seeds=1, base_seed=0)
    assert [k for k, _ in sweep.parse_grid(["mask.keep_attn=0.5", "mask.keep_mlp=0.7"], 1, 0)][1:] == [
        "mask.keep_attn", "mask.keep_mlp"]  # the two halves of mask.keep are separate keys


def make_run_dict() -> dict:
    return {"model": {"path": "m"}, "mask": {"masked_layers": [1]}, "data": {"train": {"t.jsonl": None}},
            "train": {"max_steps": 10, "eval_every": 4}, "ckpt": {"save_every": 3, "keep": 2}}


def test_checkpoints_kept_for_selection():
    run = config.from_dict(make_run_dict(), ["data.dev={d.jsonl: null}"], verbose=False)
    assert sweep.ckpt_overrides(run) == ["ckpt.save_every=4", "ckpt.keep=4"]  # steps 4, 8, 10 (+1 spare)
    assert sweep.ckpt_overrides(config.from_dict(make_run_dict(), verbose=False)) == []  # no dev: final step only


def test_data_fraction_takes_a_nested_seeded_subset(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"i": i} for i in range(20)])
    whole, _ = sources.mix({str(path): None}, seed=3)
    assert [r["i"] for r in whole] == list(range(20))  # fraction 1: file order, as before
    quarter, taken = sources.mix({str(path): None}, seed=3, fraction=0.25)
    half, _ = sources.mix({str(path): None}, seed=3, fraction=0.5)
    permutation = np.random.default_rng(3).permutation(20)
    assert [r["i"] for r in quarter] == permutation[:5].tolist() and taken[0].rows_read == 20
    assert [r["i"] for r in half][:5] == [r["i"] for r in quarter]  # nested
    sampled, _ = sources.mix({str(path): 10}, seed=3, fraction=0.3)  # 30% of the 10 the mixer takes
    assert [r["i"] for r in sampled] == permutation[:3].tolist() == [r["i"] for r in sources.mix({str(path): 3}, 3)[0]]
    assert sources.fraction_rows(3, 0.01) == 1
    cfg = config.DataConfig(train={str(path): None}, dev={str(path): None})
    keys = {f: {s: store.cache_key(config.DataConfig(**{**vars(cfg), "fraction": f}), str(tmp_path), s)
                for s in ("train", "dev")} for f in (1.0, 0.5)}
    assert keys[1.0]["train"] != keys[0.5]["train"] and keys[1.0]["dev"] == keys[0.5]["dev"]
    for bad in (0, 1.5):
        with pytest.raises(config.ConfigError, match=r"data.fraction must be a number in \(0, 1\]"):
            config.DataConfig(fraction=bad).validate()


def test_select_step_lowest_dev_loss_earliest_on_ties(tmp_path):
    records = [{"step": 2, "dev_loss": 0.5}, {"step": 4, "dev_loss": 0.3}, {"step": 5, "loss": 0.1},
               {"step": 6, "dev_loss": 0.3}, {"step": 8, "dev_loss": float("nan")}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step in (2, 4, 6):
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
    assert sweep.select_step(tmp_path) == (4, 0.3)
    (tmp_path / "checkpoints" / "4").rmdir()
    with pytest.raises(sweep.SweepDirError, match=r"no checkpoint for the selected step 4 \(checkpoints \['2', '6'\]"):
        sweep.select_step(tmp_path)


def test_table_mean_and_std_over_seeds():
    axes = [("train.seed", ["0", "1"]), ("mask.keep", ["0.5", "0.9"])]
    records = [{"settings": {"train.seed": s, "mask.keep": k}, "step": 10 + int(s),
                "metrics": {"dev_loss": v, "arith.accuracy": 1 - v}}
               for (s, k), v in zip([("0", "0.5"), ("0", "0.9"), ("1", "0.5"), ("1", "0.9")], [0.4, 0.2, 0.6, 0.2])]
    rows = sweep.summarize(records, axes)
    assert [r["settings"] for r in rows] == [{"mask.keep": "0.5"}, {"mask.keep": "0.9"}]
    assert rows[0]["metrics"]["dev_loss"]["mean"] == pytest.approx(0.5, abs=1e-15)
    assert rows[0]["metrics"]["dev_loss"]["std"] == pytest.approx(np.sqrt(0.02), rel=1e-12)  # ddof=1
    table = sweep.format_table(rows, axes, "# t")
    assert "| keep | seeds | dev_loss | arith.accuracy | selected steps |" in table
    assert "| 0.5 | 2 | 0.5000 ± 0.1414 | 0.5000 ± 0.1414 | 10, 11 |" in table
    assert "| 0.9 | 2 | 0.2000 ± 0.0000 | 0.8000 ± 0.0000 | 10, 11 |" in table


class _FixedModel:
    """Stands in for an EvalModel: returns fixed completions and records the prompts it was given."""

    def __init__(self, completions):
        self.completions, self.prompts = completions, []

    def complete(self, prompts, max_new_tokens=None, **_):
        self.prompts.append(list(prompts))
        return self.completions

    def generate(self, prompts, settings):
        return self.complete(prompts, settings.max_new_tokens)

    def truncated_prompts(self, prompts, settings):
        return 0


def test_arith_task_is_the_demos_accuracy(tmp_path):
    rows = [demo_task.make_problem(np.random.default_rng(i), 9) for i in range(4)]
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    completions = [f"So {rows[0]['answer']}.", "no number", f"The answer is {rows[2]['answer'] + 1}.",
                   f"1 + 1 = 2. The answer is {rows[3]['answer']}."]
    model = _FixedModel(completions)
    metrics = Arith(path).load().run(model)
    assert metrics["accuracy"] == demo_task.accuracy(model, rows, 40) == 0.5
    assert model.prompts[0] == model.prompts[1]  # the same prompts as the demo's
    limited = Arith(path).load(limit=2)
    assert limited.run(_FixedModel(completions[:2])) == {"accuracy": 0.5, "n": 2, "primary_score": 0.5,
                                                         "truncated_prompts": 0}
    assert [r["predicted"] for r in limited.records] == [rows[0]["answer"], None]
    write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(config.ConfigError, match="bad.jsonl', line 1: rows need .* integer \"answer\""):
        Arith(tmp_path / "bad.jsonl")


def _sweep_args(cfg: Path, out: Path, test_file: Path, *extra: str) -> list[str]:
    return ["--config", str(cfg), "--grid", "mask.keep=0.5,0.9", "--out", str(out), "--tasks", "loss,arith",
            "--loss-data", str(test_file), "--arith-data", str(test_file), "--max-new-tokens", "4", *extra]


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_sweep_resumes_after_kill_without_redoing_finished_points(tmp_path, capsys):
    model_dir = make_model_dir(tmp_path / "model")
    run = make_run(tmp_path, model_dir, train={"max_steps": 4, "eval_every": 2, "log_every": 2, "seed": 0},
                   ckpt={"save_every": 4, "keep": 1, "async_save": False})
    cfg = tmp_path / "base.yaml"
    cfg.write_text(yaml.safe_dump(run.to_dict()))
    rows = [{**r, "answer": int(r["messages"][1]["content"].split()[-1].rstrip("."))} for r in chat_rows(8, seed=3)]
    test_file = write_jsonl(tmp_path / "test.jsonl", rows)
    out = tmp_path / "sweep"
    args = _sweep_args(cfg, out, test_file, "--set", "data.fraction=0.5")

    # Every point is checked before any trains: a layer the model lacks fails at once, with nothing written.
    with pytest.raises(sweep.SweepError, match=r"point masked_layers=7__seed=0: mask.masked_layers \[7\] out of "
                                               r"range: the model has 4 decoder layers"):
        sweep.main(["--config", str(cfg), "--grid", "mask.masked_layers=0-1,7", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()

    # A real process, SIGKILLed as soon as it reports its first point done (while the second one runs).
    proc = subprocess.Popen([sys.executable, "-m", "mft_jax.studies.sweep", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "point 1/2" in line and "selected" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    first, second = "keep=0.5__seed=0", "keep=0.9__seed=0"
    assert (out / first / "DONE").is_file() and not (out / "eval" / f"{second}.json").exists()
    before = {**_files(out / first), "eval": (out / "eval" / f"{first}.json").stat().st_mtime_ns}

    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert f"[sweep] point 1/2 {first}: finished earlier, skipped" in printed
    assert f"[sweep] point 2/2 {second}: step " in printed and "ETA 0m00s" in printed
    assert {**_files(out / first), "eval": (out / "eval" / f"{first}.json").stat().st_mtime_ns} == before
    report = json.loads((out / "sweep.json").read_text())
    assert [p["name"] for p in report["points"]] == [first, second]
    for point in report["points"]:
        steps = [r["step"] for r in map(json.loads, (out / point["name"] / "metrics.jsonl").read_text().splitlines())
                 if "dev_loss" in r]
        assert steps == [2, 4] and point["step"] in steps  # each dev step once, though the second was killed
        assert set(point["metrics"]) == {"dev_loss", "loss", "arith.accuracy"}
        assert point["metrics"]["loss"] == point["results"]["loss"]["loss"] > 0
    point_run = config.load(out / second / "config.yaml", verbose=False)
    assert (point_run.mask.keep_attn, point_run.mask.keep_mlp, point_run.ckpt.save_every) == (0.9, 0.9, 2)
    assert store.build_dataset(point_run.data, str(model_dir), "train").num_examples == 32  # data.fraction 0.5 of 64
    table = (out / "table.md").read_text()
    assert "| keep | seeds | dev_loss | loss | arith.accuracy | selected steps |" in table
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "arith.accuracy_vs_keep.png", "dev_loss_vs_keep.png", "loss_vs_keep.png"]

    # One point alone (as a job would): finished, so skipped; no table is rewritten.
    table_mtime = (out / "table.md").stat().st_mtime_ns
    assert sweep.main(args + ["--point", "2"]) == 0
    assert f"[sweep] point 2/2 {second}: finished earlier, skipped" in capsys.readouterr().out
    assert (out / "table.md").stat().st_mtime_ns == table_mtime
    with pytest.raises(sweep.SweepError, match=r"--point 3: the sweep has points 1\.\.2"):
        sweep.main(args + ["--point", "3"])

    # Another base config into the same directory: refused; more grid values: an extension (one new point).
    with pytest.raises(sweep.SweepDirError, match=r"other base config \(optim.lr: 0.05 -> 0.01\)"):
        sweep.main(args + ["--set", "optim.lr=0.01"])
    capsys.readouterr()
    extended = [a.replace("0.5,0.9", "0.5,0.9,0.7") for a in args]
    assert sweep.main(extended + ["--print-commands", "sbatch launch/slurm.sbatch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sbatch launch/slurm.sbatch --config {cfg} --set "
                                                   f"data.fraction=0.5 --set train.seed=0 --set mask.keep=0.7")
    assert lines[0].endswith(f"--set ckpt.save_every=2 --set ckpt.keep=3 --run-dir {out}/keep=0.7__seed=0")
