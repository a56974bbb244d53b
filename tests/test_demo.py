"""A shrunken demo end to end: task, tokenizer, FFT, arms, dev selection, test scoring, report files."""

import json

import pytest

import wandb_files
from mft_jax import rundir
from mft_jax.demo import protocol as demo, task as demo_task

SHRUNK = ["task.train_examples=160", "task.dev_examples=16", "task.test_examples=16", "model.hidden_size=32",
          "model.intermediate_size=64", "model.num_hidden_layers=2", "model.vocab_size=288", "fft.steps=6",
          "fft.eval_every=3", "fft.batch_size=8", "arms.steps=4", "arms.eval_every=2", "arms.batch_size=8",
          "mask.masked_layers=[1]", "eval.max_new_tokens=8",
          "model.max_seq_length=128",  # a 288-token BPE spells a problem in ~94 tokens: none may be dropped
          "landscape.batch_size=8", "landscape.iterations=6", "landscape.probes=4", "landscape.points=5"]
WANDB = ["log.wandb_project=mft-demo-test", "log.wandb_mode=offline"]


def test_shrunken_demo_end_to_end(tmp_path):
    report = demo.run(tmp_path, seeds=1, overrides=SHRUNK + WANDB, verbose=False)
    assert (tmp_path / "dev_accuracy.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["table"]) == set(demo.ARMS)
    for arm, metrics in saved["table"].items():
        assert 0.0 <= metrics["test_accuracy"]["mean"] <= 1.0
        assert metrics["test_loss"]["mean"] > 0
    seed0 = report["per_seed"][0]
    # FFT-best and the trained arms were chosen on dev among their evaluated checkpoints.
    assert seed0["arms"]["fft_best"]["step"] in (3, 6)
    assert seed0["arms"]["mft"]["step"] in (2, 4)
    assert seed0["arms"]["lora"]["step"] in (2, 4) and seed0["arms"]["mft_on_lora"]["step"] in (2, 4)
    # The masked arms from FFT-best zero exactly int((1 - keep) * n) weights of each masked matrix.
    assert set(seed0["masked_zeros"]) == {"mft", "random_mask", "magnitude_mask", "wanda_mask"}
    for arm in ("mft", "magnitude_mask", "wanda_mask"):
        check = seed0["masked_zeros"][arm]
        assert check["new_zeros"] == check["expected_local_topk"] > 0
        assert check["matrices_exact"] == check["matrices"] == 7
    # Sharpness per arm, and the two interpolation lines end at their models' dev losses.
    for arm in demo.ARMS:
        assert seed0["arms"][arm]["top_eigenvalue"] > 0 and "hessian_trace" in seed0["arms"][arm]
    for arm, line in seed0["landscape"].items():
        assert [a for a, _ in line] == [0.0, 0.25, 0.5, 0.75, 1.0], arm
    assert seed0["landscape"]["mft"][0][1] == seed0["landscape"]["continued_fft"][0][1]  # both start at FFT-best
    for arm, line in [("fft_best", seed0["landscape"]["mft"][0]), ("mft", seed0["landscape"]["mft"][-1]),
                      ("continued_fft", seed0["landscape"]["continued_fft"][-1])]:
        # the same dev loss of the same model, from two compiled programs (summation orders may differ)
        assert line[1] == pytest.approx(seed0["arms"][arm]["landscape_loss"], rel=1e-5), arm
    assert (tmp_path / "landscape.png").stat().st_size > 10_000
    # The offline wandb run of the MFT arm holds exactly the records of its metrics.jsonl.
    (run_dir,) = wandb_files.run_dirs(tmp_path / "seed0" / "mft")
    assert wandb_files.history(run_dir) == rundir.read_metrics(tmp_path / "seed0" / "mft")
    assert wandb_files.config(run_dir)["train"]["mode"] == "mft"


def test_task_answers_are_exact():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(200):
        row = demo_task.make_problem(rng, 12)
        solution = row["messages"][1]["content"]
        assert demo_task.last_number(solution) == row["answer"] >= 0
        for step in solution.split(". ")[:2]:  # "a + b = c"
            lhs, rhs = step.rstrip(".").split(" = ")
            assert eval(lhs) == int(rhs)
