"""The offline end-to-end demo: the paper's protocol on a tiny Llama and a synthetic task, in minutes on a CPU.

1. Make a task: two-step arithmetic word problems with worked solutions (train / dev / test, "messages"
   format, answers checked by exact match), and a BPE tokenizer trained on it.
2. FFT a small Llama from random init through the normal trainer; dev accuracy (greedy generation) every
   `eval_every` steps; FFT-best = the best dev checkpoint, exported as a HF model.
3. From FFT-best, with the same step budget: MFT, continued FFT; and the random and magnitude masks at the
   same layers and keep ratio (no training).
4. Every arm's checkpoint is chosen on dev, never on test, then scored on test (exact match and loss).
5. Table, results.json and a PNG plot; with --seeds N, mean and standard deviation over seeds.
"""

from __future__ import annotations

import copy
import json
import re
import time
from pathlib import Path

import numpy as np
import yaml

from mft_jax import config as config_lib
from mft_jax import outputs

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
ARMS = ("fft_best", "mft", "continued_fft", "random_mask", "magnitude_mask")
_NAMES = ("Ava", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon")
_ITEMS = ("apples", "books", "coins", "marbles", "pens", "stickers", "cards", "shells")


# --------------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------------

def make_problem(rng: np.random.Generator, max_operand: int) -> dict:
    """One word problem: start with a, then two changes (+ or -), never going below zero."""
    name, item = _NAMES[rng.integers(len(_NAMES))], _ITEMS[rng.integers(len(_ITEMS))]
    total = int(rng.integers(1, max_operand + 1))
    clauses, steps = [], []
    for _ in range(2):
        n = int(rng.integers(1, max_operand + 1))
        if rng.random() < 0.5 or n > total:
            clauses.append(f"finds {n} more")
            steps.append(f"{total} + {n} = {total + n}.")
            total += n
        else:
            clauses.append(f"gives away {n}")
            steps.append(f"{total} - {n} = {total - n}.")
            total -= n
    start = steps[0].split(" ")[0]
    question = (f"{name} has {start} {item}. {name} {clauses[0]}, then {clauses[1]}. "
                f"How many {item} does {name} have now?")
    answer = " ".join(steps) + f" The answer is {total}."
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "answer": total}


def make_task(out: Path, seed: int, task_cfg: dict) -> dict[str, Path]:
    """Writes train/dev/test .jsonl (disjoint questions) under OUT; returns their paths."""
    rng = np.random.default_rng(seed)
    sizes = {"train": task_cfg["train_examples"], "dev": task_cfg["dev_examples"], "test": task_cfg["test_examples"]}
    seen, splits = set(), {}
    for split, size in sizes.items():
        rows = []
        while len(rows) < size:
            row = make_problem(rng, task_cfg["max_operand"])
            key = row["messages"][0]["content"]
            if key not in seen:
                seen.add(key)
                rows.append(row)
        splits[split] = out / f"{split}.jsonl"
        splits[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return splits


def last_number(text: str) -> int | None:
    numbers = re.findall(r"-?\d+", text)
    return int(numbers[-1]) if numbers else None


def accuracy(eval_model, rows: list[dict], max_new_tokens: int) -> float:
    """Exact match of the last number of the greedy completion with the answer."""
    from mft_jax.data import format_tulu

    prompts = [format_tulu(r["messages"][:1], add_generation_prompt=True) for r in rows]
    completions = eval_model.complete(prompts, max_new_tokens=max_new_tokens)
    return float(np.mean([last_number(c) == r["answer"] for c, r in zip(completions, rows)]))


# --------------------------------------------------------------------------------------------------------
# One seed
# --------------------------------------------------------------------------------------------------------

def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run_config(base: dict, **sections) -> config_lib.RunConfig:
    raw = copy.deepcopy(base)
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return config_lib.from_dict(raw, verbose=False)


def _best_step(run_dir: Path) -> tuple[int, float, list[tuple[int, float]]]:
    """The checkpoint step with the highest dev accuracy (earliest on ties) and the dev curve."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["dev_accuracy"]) for r in rows if "dev_accuracy" in r]
    best = max(curve, key=lambda sc: (sc[1], -sc[0]))
    return best[0], best[1], curve


def run_seed(seed: int, out: Path, demo_cfg: dict, verbose: bool = True) -> dict:
    import jax

    from mft_jax import convert, export, model, train
    from mft_jax.data import load_tokenizer, train_bpe_tokenizer
    from mft_jax.evaluate.base import EvalModel
    from mft_jax.evaluate.loss import Loss

    log = print if verbose else (lambda *a, **k: None)
    out.mkdir(parents=True, exist_ok=True)
    task_cfg, model_cfg, fft_cfg, arm_cfg, mask_cfg = (demo_cfg[k] for k in ("task", "model", "fft", "arms", "mask"))
    max_new = demo_cfg["eval"]["max_new_tokens"]
    started = time.perf_counter()

    # 1. Task, tokenizer, a random Llama saved as a HF checkpoint.
    splits = make_task(out, seed, task_cfg)
    texts = [m["content"] for r in _read_rows(splits["train"]) for m in r["messages"]]
    tok_dir = train_bpe_tokenizer(texts, model_cfg["vocab_size"], out / "tokenizer")
    tokenizer = load_tokenizer(tok_dir)
    cfg = config_lib.LlamaConfig(
        vocab_size=model_cfg["vocab_size"], hidden_size=model_cfg["hidden_size"],
        intermediate_size=model_cfg["intermediate_size"], num_hidden_layers=model_cfg["num_hidden_layers"],
        num_attention_heads=model_cfg["num_attention_heads"], num_key_value_heads=model_cfg["num_key_value_heads"],
        max_position_embeddings=max(2 * model_cfg["max_seq_length"], 128), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    if len(tokenizer) > cfg.vocab_size:
        raise config_lib.ConfigError(f"demo: the tokenizer has {len(tokenizer)} tokens, more than "
                                     f"model.vocab_size {cfg.vocab_size}")
    init_dir = convert.save_hf(cfg, model.init_params(cfg, jax.random.key(seed)), out / "init", tokenizer_dir=tok_dir)
    dev_rows, test_rows = _read_rows(splits["dev"]), _read_rows(splits["test"])

    def dev_metrics(step, params):
        return {"dev_accuracy": accuracy(EvalModel(cfg, params, tokenizer, str(tok_dir), compute_dtype="float32",
                                                   batch_size=len(dev_rows)), dev_rows, max_new)}

    base = {
        "model": {"compute_dtype": "float32"},
        "mask": {"masked_layers": mask_cfg["masked_layers"], "keep_attn": mask_cfg["keep"],
                 "keep_mlp": mask_cfg["keep"], "init": mask_cfg["init"], "std": mask_cfg["std"]},
        "data": {"train": {str(splits["train"]): None}, "dev": {str(splits["dev"]): None},
                 "tokenizer": str(tok_dir), "max_seq_length": model_cfg["max_seq_length"],
                 "cache_dir": str(out / "data_cache")},
        "optim": {"warmup_ratio": 0.0},
        "train": {"seed": seed, "log_every": 50},
        "ckpt": {"keep": 1000, "async_save": False},
        "mesh": {"data": -1},
    }

    # 2. FFT from random init; FFT-best on dev, exported.
    log(f"[seed {seed}] FFT from random init: {fft_cfg['steps']} steps")
    fft_run = _run_config(base, run_dir=str(out / "fft"), model={"path": str(init_dir)},
                          optim={"lr": fft_cfg["lr"], "warmup_ratio": fft_cfg["warmup_ratio"]},
                          train={"mode": "fft", "batch_size": fft_cfg["batch_size"], "max_steps": fft_cfg["steps"],
                                 "eval_every": fft_cfg["eval_every"]},
                          ckpt={"save_every": fft_cfg["eval_every"]})
    train.train(fft_run, verbose=verbose, dev_metrics=dev_metrics)
    fft_step, fft_dev, fft_curve = _best_step(out / "fft")
    export.export_run(out / "fft", out / "fft_best", step=fft_step)
    best_dir = out / "fft_best" / "hf"
    log(f"[seed {seed}] FFT-best: step {fft_step}, dev accuracy {fft_dev:.3f}")

    # 3. Arms from FFT-best with the same step budget.
    arm_train = {"batch_size": arm_cfg["batch_size"], "max_steps": arm_cfg["steps"], "eval_every": arm_cfg["eval_every"]}
    chosen = {"fft_best": (best_dir, fft_step, fft_dev)}
    curves = {"fft": fft_curve}
    for arm, mode, lr in (("mft", "mft", arm_cfg["mft_lr"]), ("continued_fft", "fft", arm_cfg["fft_lr"])):
        log(f"[seed {seed}] {arm}: {arm_cfg['steps']} steps from FFT-best")
        run = _run_config(base, run_dir=str(out / arm), model={"path": str(best_dir)}, optim={"lr": lr},
                          train={**arm_train, "mode": mode}, ckpt={"save_every": arm_cfg["eval_every"]})
        train.train(run, verbose=verbose, dev_metrics=dev_metrics)
        step, dev, curve = _best_step(out / arm)
        export.export_run(out / arm, out / f"{arm}_best", step=step)
        chosen[arm] = (out / f"{arm}_best" / "hf", step, dev)
        curves[arm] = [(fft_step + s, a) for s, a in curve]
    baseline_run = _run_config(base, run_dir=str(out / "baselines"), model={"path": str(best_dir)})
    baseline_cfg = out / "baseline.yaml"
    baseline_cfg.write_text(yaml.safe_dump(baseline_run.to_dict()))
    for arm, kind in (("random_mask", "random"), ("magnitude_mask", "magnitude")):
        export.export_run(baseline_cfg, out / arm, baseline=kind, seed=seed)
        chosen[arm] = (out / arm / "hf", None, None)

    # 4. Test (and dev, for the baselines) on each arm's chosen checkpoint.
    results = {"seed": seed, "arms": {}}
    mask_check = {}
    best_params = None  # FFT-best, loaded once for the masked arms' sparsity check (only read on the host)
    for arm, (hf_dir, step, dev) in chosen.items():
        arm_cfg_model, params = convert.load_hf(hf_dir)
        eval_model = EvalModel(arm_cfg_model, params, tokenizer, str(tok_dir), compute_dtype="float32",
                               batch_size=len(test_rows))
        if dev is None:
            dev = accuracy(eval_model, dev_rows, max_new)
        test_data = config_lib.DataConfig(train={str(splits["test"]): None}, tokenizer=str(tok_dir),
                                          max_seq_length=model_cfg["max_seq_length"], cache_dir=str(out / "data_cache"))
        loss = Loss(test_data, str(tok_dir), split="train").run(eval_model)["loss"]
        results["arms"][arm] = {"test_accuracy": accuracy(eval_model, test_rows, max_new), "test_loss": loss,
                                "dev_accuracy": dev, "step": step}
        if arm != "fft_best" and arm != "continued_fft":  # masked arms: check the exact sparsity
            if best_params is None:
                _, best_params = convert.load_hf(best_dir)
            mask_check[arm] = _masked_zero_fraction(best_params, params, mask_cfg, cfg)
    results["masked_zeros"] = mask_check
    results["curves"] = curves
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _masked_zero_fraction(base_params, params, mask_cfg: dict, cfg) -> dict:
    """Zeros the arm added in the masked matrices, against int((1 - keep) * n) per matrix (local top-k)."""
    from mft_jax import masking

    mc = config_lib.MaskConfig(masked_layers=mask_cfg["masked_layers"], keep_attn=mask_cfg["keep"],
                               keep_mlp=mask_cfg["keep"])
    new_zeros = expected = exact = 0
    paths = masking.masked_paths(cfg, mc)
    for path in paths:
        w = np.asarray(masking.get_path(base_params, path))
        added = int((np.asarray(masking.get_path(params, path)) == 0).sum() - (w == 0).sum())
        target = int((1 - mask_cfg["keep"]) * w.size)
        new_zeros, expected, exact = new_zeros + added, expected + target, exact + (added == target)
    return {"new_zeros": new_zeros, "expected_local_topk": expected, "matrices_exact": exact,
            "matrices": len(paths)}


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------

def summarize(per_seed: list[dict]) -> dict:
    table = {}
    for arm in ARMS:
        rows = [r["arms"][arm] for r in per_seed]
        table[arm] = {}
        for metric in ("test_accuracy", "test_loss", "dev_accuracy"):
            values = np.asarray([row[metric] for row in rows], np.float64)
            table[arm][metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1
                                  else 0.0, "values": values.tolist()}
    return table


def format_table(table: dict, seeds: int) -> str:
    pm = " +- std" if seeds > 1 else ""
    lines = [f"{'arm':<16} {'test acc' + pm:>20} {'test loss' + pm:>20} {'dev acc':>9}"]
    for arm, metrics in table.items():
        acc, loss, dev = (metrics[k] for k in ("test_accuracy", "test_loss", "dev_accuracy"))
        acc_s = f"{acc['mean']:.3f}" + (f" +- {acc['std']:.3f}" if seeds > 1 else "")
        loss_s = f"{loss['mean']:.4f}" + (f" +- {loss['std']:.4f}" if seeds > 1 else "")
        lines.append(f"{arm:<16} {acc_s:>20} {loss_s:>20} {dev['mean']:>9.3f}")
    return "\n".join(lines)


def plot(per_seed: list[dict], table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    colors = {"fft": "tab:blue", "continued_fft": "tab:orange", "mft": "tab:green"}
    for i, result in enumerate(per_seed):
        for arm, curve in result["curves"].items():
            steps, accs = zip(*curve)
            ax.plot(steps, accs, color=colors[arm], alpha=0.9 if i == 0 else 0.35, marker="o", markersize=3,
                    label={"fft": "FFT", "continued_fft": "continued FFT", "mft": "MFT"}[arm] if i == 0 else None)
    for arm, color, label in (("random_mask", "tab:red", "random mask"), ("magnitude_mask", "tab:purple",
                                                                           "magnitude mask")):
        ax.axhline(table[arm]["dev_accuracy"]["mean"], color=color, linestyle="--", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("dev accuracy (exact match)")
    ax.set_title(f"mft-jax demo ({len(per_seed)} seed{'s' if len(per_seed) > 1 else ''})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _read_demo_yaml(path: Path) -> dict:
    raw = config_lib.read_yaml(path, "demo config")
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise config_lib.ConfigError(f"demo config {path}: expected sections of key: value (see {DEMO_CONFIG})")
    return raw


def _check_type(key: str, value, default) -> None:
    """A demo setting has the type of its default (ints stay ints, lists stay lists)."""
    if key == "mask.masked_layers" and isinstance(value, str):
        return  # "1-2" style ranges; parsed and checked by the run config
    if isinstance(default, bool) or default is None:
        ok = isinstance(value, type(default)) if default is not None else True
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise config_lib.ConfigError(f"demo config: {key} must be {type(default).__name__} like its default "
                                     f"{default!r}, got {value!r}")


def load_demo_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """The demo settings: PATH (default configs/demo.yaml; keys it omits keep demo.yaml's values) plus
    `section.key=value` overrides, each key and type checked against configs/demo.yaml."""
    path = Path(path or DEMO_CONFIG)
    cfg = _read_demo_yaml(path)
    defaults = _read_demo_yaml(DEMO_CONFIG)
    valid = [f"{s}.{k}" for s in defaults for k in defaults[s]]
    for section, values in cfg.items():
        if section not in defaults:
            raise config_lib.ConfigError(f"demo config {path}: unknown section {section!r}; valid: {list(defaults)}")
        unknown = set(values) - set(defaults[section])
        if unknown:
            raise config_lib.ConfigError(f"demo config {path}: unknown keys {sorted(unknown)} in {section!r}")
    for assignment in overrides:
        key, eq, value = assignment.partition("=")
        section, _, name = key.strip().partition(".")
        if not eq:
            raise config_lib.ConfigError(f"--set {assignment!r} must look like section.key=value, e.g. fft.steps=500")
        if section not in defaults or name not in defaults[section]:
            raise config_lib.ConfigError(f"demo config: unknown key {key!r} in --set {assignment!r}; write "
                                         f"section.key=value with a key of {valid}")
        try:
            cfg.setdefault(section, {})[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise config_lib.ConfigError(f"--set {assignment!r}: the value is not valid YAML") from None
    merged = {section: {**values, **cfg.get(section, {})} for section, values in defaults.items()}
    for section, values in defaults.items():
        for name, default in values.items():
            _check_type(f"{section}.{name}", merged[section][name], default)
    return merged


def run(out: str | Path = "runs/demo", seeds: int = 1, config_path: str | Path | None = None,
        overrides: list[str] = (), verbose: bool = True, overwrite: bool = False) -> dict:
    """Runs the demo into OUT (see the module docstring); returns the report.

    OUT is the demo's own directory (`outputs.claimed_dir`): new or empty, or an earlier demo's (moved aside
    and removed once this one completes, put back if it fails); a directory mft-jax did not write is refused
    unless `overwrite`. The runs inside record absolute paths, so the demo writes in place, not via a rename."""
    demo_cfg = load_demo_config(config_path, overrides)
    if seeds < 1:
        raise config_lib.ConfigError(f"--seeds must be >= 1, got {seeds}")
    with outputs.claimed_dir(out, inputs=[config_path or DEMO_CONFIG], overwrite=overwrite, command="demo") as out:
        return _run(out, seeds, demo_cfg, verbose)


def _run(out: Path, seeds: int, demo_cfg: dict, verbose: bool) -> dict:
    started = time.perf_counter()
    per_seed = [run_seed(seed, out / f"seed{seed}", demo_cfg, verbose) for seed in range(seeds)]
    table = summarize(per_seed)
    report = {"seeds": seeds, "table": table, "per_seed": per_seed, "config": demo_cfg,
              "seconds": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    plot(per_seed, table, out / "dev_accuracy.png")
    print()
    print(format_table(table, seeds))
    print(f"\nmasked-matrix zeros (new / expected): "
          + ", ".join(f"{arm} {c['new_zeros']}/{c['expected_local_topk']}"
                      for arm, c in per_seed[0]["masked_zeros"].items()))
    print(f"wrote {out / 'results.json'} and {out / 'dev_accuracy.png'} in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    run()
