"""A shrunken demo end to end: task, tokenizer, FFT, arms, dev selection, test scoring, report files."""

import json

from mft_jax import demo

SHRUNK = ["task.train_examples=160", "task.dev_examples=16", "task.test_examples=16", "model.hidden_size=32",
          "model.intermediate_size=64", "model.num_hidden_layers=2", "model.vocab_size=288", "fft.steps=6",
          "fft.eval_every=3", "fft.batch_size=8", "arms.steps=4", "arms.eval_every=2", "arms.batch_size=8",
          "mask.masked_layers=[1]", "eval.max_new_tokens=8",
          "model.max_seq_length=128"]  # a 288-token BPE spells a problem in ~94 tokens: none may be dropped


def test_shrunken_demo_end_to_end(tmp_path):
    report = demo.run(tmp_path, seeds=1, overrides=SHRUNK, verbose=False)
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
    # The MFT and magnitude arms zero exactly int((1 - keep) * n) weights of each masked matrix.
    for arm in ("mft", "magnitude_mask"):
        check = seed0["masked_zeros"][arm]
        assert check["new_zeros"] == check["expected_local_topk"] > 0
        assert check["matrices_exact"] == check["matrices"] == 7


def test_task_answers_are_exact():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(200):
        row = demo.make_problem(rng, 12)
        solution = row["messages"][1]["content"]
        assert demo.last_number(solution) == row["answer"] >= 0
        for step in solution.split(". ")[:2]:  # "a + b = c"
            lhs, rhs = step.rstrip(".").split(" = ")
            assert eval(lhs) == int(rhs)
