"""`eval` and `generate` on several processes: 2 processes x 4 CPU devices (each a whole model copy on a mesh of
its own 4 devices, each its share of the prompts and of the loss task's batches) give the results file, the
samples and the printed generations of 1 process x 4 devices, bit for bit, and process 1 writes nothing.

Why exactly: with --batch-size 1 every device decodes one prompt per batch in both runs (the same shapes, so the
same arithmetic per prompt), and the loss task's per-row sums come from the same batches on the same 4-device
data mesh (no sum crosses devices) and are added on the host in row order in both runs."""

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mft_jax import config, convert, data, generate
from mft_jax.demo import task as demo_task
from run_fixtures import chat_rows, make_model_dir, write_jsonl
from test_multihost import _child_env, _free_port

CHILD = textwrap.dedent("""
    import sys
    from mft_jax import cli, distributed
    distributed.initialize()
    import jax
    processes, eval_argv, generate_argv = int(sys.argv[1]), sys.argv[2].split("|"), sys.argv[3].split("|")
    generate_argv += [w for p in open(sys.argv[4]).read().split("\\0") for w in ("--prompt", p)]
    assert (jax.process_count(), jax.local_device_count()) == (processes, 4), jax.devices()
    cli.main(eval_argv)
    cli.main(generate_argv)
""")


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """The same `eval` (arith: 7 prompts, 3 and 4 per process; loss: 10 rows in 3 batches of 4, 1 and 2 per
    process) and `generate` (3 of the arith prompts, 1 and 2 per process; greedy, so it reuses eval's compiled
    decode), run by 1 process x 4 devices ("one") and by 2 processes x 4 devices ("p0", "p1"), all three started
    together, each in a working directory of its own (--out is relative)."""
    root = tmp_path_factory.mktemp("multihost_eval")
    model_dir = make_model_dir(root / "model", num_layers=2, seed=11)
    rng = np.random.default_rng(0)
    arith = write_jsonl(root / "arith.jsonl", [demo_task.make_problem(rng, 20) for _ in range(7)])
    dev = write_jsonl(root / "dev.jsonl", chat_rows(16, seed=1))
    data_cfg = config.DataConfig(dev={str(dev): None}, max_seq_length=32, cache_dir=str(root / "cache"))
    data.build_dataset(data_cfg, model_dir, "dev")  # once here, not by every process at once
    eval_argv = ["eval", "--model", str(model_dir), "--tasks", "arith,loss", "--arith-data", str(arith),
                 "--loss-data", str(dev), "--max-seq-length", "32", "--data-cache-dir", str(root / "cache"),
                 "--limit", "10", "--max-new-tokens", "8", "--batch-size", "1", "--out", "results.json"]
    generate_argv = ["generate", "--model", str(model_dir), "--max-new-tokens", "8", "--batch-size", "1"]
    (root / "prompts.txt").write_text("\0".join(demo_task.prompt(row) for row in demo_task.read_rows(arith)[:3]))
    script = root / "child.py"
    script.write_text(CHILD)
    before = _files(root)
    port = _free_port()
    procs = {}
    for name, processes, env in (("p0", 2, _child_env(4, 0, port)), ("p1", 2, _child_env(4, 1, port)),
                                 ("one", 1, _child_env(4))):
        (root / name).mkdir()
        log = open(root / f"{name}.log", "w")
        procs[name] = (log, subprocess.Popen([sys.executable, str(script), str(processes), "|".join(eval_argv),
                                              "|".join(generate_argv), str(root / "prompts.txt")], cwd=root / name,
                                             env=env, stdout=log, stderr=subprocess.STDOUT))
    yield root, procs, before
    for log, proc in procs.values():  # only left running when a test stopped before waiting for them
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def runs(started):
    """`started`'s processes waited for: (root, {name: (working directory, stdout)}, files under root before)."""
    root, procs, before = started
    deadline = time.time() + 300
    try:
        while time.time() < deadline and any(proc.poll() is None for _, proc in procs.values()):
            if any(proc.poll() not in (None, 0) for _, proc in procs.values()):
                break  # a failed process leaves its peer waiting in a collective: stop them all now
            time.sleep(0.2)
    finally:
        for log, proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = {name: (root / f"{name}.log").read_text() for name in procs}
    failed = [name for name, (_, proc) in procs.items() if proc.returncode != 0]
    assert not failed, "\n\n".join(f"== {name} (exit {procs[name][1].returncode}):\n{logs[name][-5000:]}"
                                   for name in failed)
    return root, {name: (root / name, logs[name]) for name in procs}, before


def test_samples_follow_the_prompts_place_in_the_whole_list(started):
    """What `generate` on several processes relies on (runs here while the processes above work): a share of the
    prompts samples with first_index = its start as the whole list does (one prompt per batch in both)."""
    root = started[0]
    cfg, params = convert.load_hf(root / "model" / "hf")
    prompts = [[5, 9, 13], [7, 3], [11, 12, 4, 8], [6]]
    kw = dict(max_new_tokens=6, eos_ids=(), temperature=1.0, seed=3, batch_size=1)
    whole = generate.generate(cfg, params, prompts, **kw)
    assert generate.generate(cfg, params, prompts[2:], first_index=2, **kw) == whole[2:]
    assert generate.generate(cfg, params, prompts[2:], **kw) != whole[2:]  # the keys of prompts 0 and 1


def _results(workdir: Path) -> dict:
    report = json.loads((workdir / "results.json").read_text())
    for metrics in report["results"].values():
        metrics.pop("seconds")  # wall time, the one field that differs between runs
    return report


def test_two_processes_write_the_results_of_one(runs):
    root, out, before = runs
    (one, _), (p0, _) = out["one"], out["p0"]
    report, ref = _results(p0), _results(one)
    assert report == ref  # every metric (the loss's included) and setting, exactly
    assert report["results"]["arith"]["n"] == 7 and report["results"]["loss"]["batches"] == 3
    assert report["results"]["loss"]["loss"] > 0
    samples, ref_samples = ((d / "results_samples" / "arith.jsonl").read_text() for d in (p0, one))
    assert samples == ref_samples  # the greedy texts, in order
    texts = [json.loads(line)["completion"] for line in samples.splitlines()]
    assert len(texts) == 7 and len(set(texts)) > 1 and all(t.strip() for t in texts)


def test_only_process_0_writes_and_prints(runs):
    root, out, before = runs
    (p0, log0), (p1, log1), (one, log_one) = out["p0"], out["p1"], out["one"]
    assert sorted(_files(p0)) == sorted(_files(one)) == ["results.json", "results_samples/.mft_jax_output.json",
                                                         "results_samples/arith.jsonl"]
    assert _files(p1) == {}
    # nothing else under the shared directory changed (model, data, its cache): the logs and the three
    # working directories are the only new files
    after = {k: v for k, v in _files(root).items() if not k.startswith(("p0", "p1", "one"))}
    assert after == before
    header = "task   metric"
    assert header in log0 and header in log_one and header not in log1
    assert "wrote results.json" in log0 and "wrote" not in log1 and "### prompt" not in log1
    # each process decoded its share of the 7 arith prompts: the first 3, the last 4
    assert re.search(r"generate \(process 0\): 100%\|\S+\| 3/3 ", log0), log0
    assert re.search(r"generate \(process 1\): 100%\|\S+\| 4/4 ", log1), log1


def test_generate_splits_prompts_and_process_0_prints(runs):
    _, out, _ = runs

    def printed(log):
        return log[log.index("### prompt"):]

    text, ref = printed(out["p0"][1]), printed(out["one"][1])
    assert text == ref and text.count("### completion") == 3
