"""The offline end-to-end demo: the paper's protocol on a tiny Llama and a synthetic task, in minutes on a CPU.

1. Make a task (mft_jax.demo.task): arithmetic word problems, train / dev / test, and a BPE tokenizer on it.
2. FFT a small Llama from random init through the normal trainer; dev accuracy (greedy generation) every
   `eval_every` steps; FFT-best = the best dev checkpoint, exported as a HF model.
3. From FFT-best, with the same step budget: MFT, continued FFT and LoRA; then MFT on the LoRA-merged model
   (MFT on top of another fine-tuning method); and the random, magnitude and Wanda masks at the same layers
   and keep ratio (no training).
4. Every arm's checkpoint is chosen on dev, never on test, then scored on test (exact match and loss), and
   its sharpness measured on dev batches (top Hessian eigenvalue and trace over the masked layers' kernels).
5. Table, results.json and PNG plots (mft_jax.demo.report); with --seeds N, mean and std over seeds.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import jax
import numpy as np
import yaml

from mft_jax import config as config_lib
from mft_jax import convert, export, masking, model, outputs, rundir, train
from mft_jax.data import load_tokenizer, train_bpe_tokenizer
from mft_jax.demo import report as demo_report
from mft_jax.demo.task import accuracy, make_task, read_rows
from mft_jax.evaluate.base import EvalModel
from mft_jax.evaluate.loss import Loss
from mft_jax.studies import landscape
from mft_jax.trees import get_path

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
ARMS = ("fft_best", "mft", "continued_fft", "lora", "mft_on_lora", "random_mask", "magnitude_mask", "wanda_mask")
TRAINED = {"mft": "mft", "continued_fft": "fft", "lora": "lora"}  # arm -> train.mode, from FFT-best
BASELINES = {"random_mask": "random", "magnitude_mask": "magnitude", "wanda_mask": "wanda"}


# --------------------------------------------------------------------------------------------------------
# One seed
# --------------------------------------------------------------------------------------------------------

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
    curve = [(r["step"], r["dev_accuracy"]) for r in rundir.read_metrics(run_dir) if "dev_accuracy" in r]
    best = max(curve, key=lambda sc: (sc[1], -sc[0]))
    return best[0], best[1], curve


class _Seed:
    """One seed of the demo in OUT/seed{N}: its task, tokenizer, base run config and the arms' results."""

    def __init__(self, seed: int, out: Path, demo_cfg: dict, verbose: bool):
        self.seed, self.out, self.demo_cfg = seed, out, demo_cfg
        self.log = print if verbose else (lambda *a, **k: None)
        self.verbose = verbose
        out.mkdir(parents=True, exist_ok=True)
        self.splits = make_task(out, seed, demo_cfg["task"])
        m = demo_cfg["model"]
        texts = [msg["content"] for r in read_rows(self.splits["train"]) for msg in r["messages"]]
        self.tok_dir = train_bpe_tokenizer(texts, m["vocab_size"], out / "tokenizer")
        self.tokenizer = load_tokenizer(self.tok_dir)
        self.cfg = config_lib.LlamaConfig(
            vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
            num_hidden_layers=m["num_hidden_layers"], num_attention_heads=m["num_attention_heads"],
            num_key_value_heads=m["num_key_value_heads"], max_position_embeddings=max(2 * m["max_seq_length"], 128),
            bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, tie_word_embeddings=False)
        if len(self.tokenizer) > self.cfg.vocab_size:
            raise config_lib.ConfigError(f"demo: the tokenizer has {len(self.tokenizer)} tokens, more than "
                                         f"model.vocab_size {self.cfg.vocab_size}")
        self.dev_rows, self.test_rows = read_rows(self.splits["dev"]), read_rows(self.splits["test"])
        mask, arms = demo_cfg["mask"], demo_cfg["arms"]
        wandb = demo_cfg["log"]["wandb_project"]
        self.base = {
            "model": {"compute_dtype": "float32"},
            "mask": {"masked_layers": mask["masked_layers"], "keep_attn": mask["keep"], "keep_mlp": mask["keep"],
                     "init": mask["init"], "std": mask["std"]},
            "lora": {"rank": arms["lora_rank"], "alpha": arms["lora_alpha"], "dropout": arms["lora_dropout"]},
            "data": {"train": {str(self.splits["train"]): None}, "dev": {str(self.splits["dev"]): None},
                     "tokenizer": str(self.tok_dir), "max_seq_length": m["max_seq_length"],
                     "cache_dir": str(out / "data_cache")},
            "optim": {"warmup_ratio": 0.0},
            "train": {"seed": seed, "log_every": 50},
            "ckpt": {"keep": 1000, "async_save": False},
            "mesh": {"data": -1},
            "log": {"wandb": {"project": wandb, "group": demo_cfg["log"]["wandb_group"],
                              "mode": demo_cfg["log"]["wandb_mode"]} if wandb else None},
        }

    def dev_metrics(self, step, params):
        model_ = EvalModel(self.cfg, params, self.tokenizer, str(self.tok_dir), compute_dtype="float32",
                           batch_size=len(self.dev_rows))
        return {"dev_accuracy": accuracy(model_, self.dev_rows, self.demo_cfg["eval"]["max_new_tokens"])}

    def train_arm(self, name: str, mode: str, start: Path, optim: dict, steps: int, batch_size: int,
                  eval_every: int) -> tuple[Path, int, float, list]:
        """Trains one arm from `start`, chooses its checkpoint on dev and exports it; (hf dir, step, dev, curve)."""
        origin = start.parent.name if start.name == "hf" else start.name  # fft_best/hf -> fft_best; init
        self.log(f"[seed {self.seed}] {name}: {steps} steps from {origin}")
        wandb = self.base["log"]["wandb"]
        run = _run_config(self.base, run_dir=str(self.out / name), model={"path": str(start)}, optim=optim,
                          train={"mode": mode, "batch_size": batch_size, "max_steps": steps,
                                 "eval_every": eval_every}, ckpt={"save_every": eval_every},
                          log={"wandb": wandb and {**wandb, "name": f"seed{self.seed}-{name}"}})
        train.train(run, verbose=self.verbose, dev_metrics=self.dev_metrics)
        step, dev, curve = _best_step(self.out / name)
        export.export_run(self.out / name, self.out / f"{name}_best", step=step)
        return self.out / f"{name}_best" / "hf", step, dev, curve


def run_seed(seed: int, out: Path, demo_cfg: dict, verbose: bool = True) -> dict:
    """Every arm of one seed; returns its results (also written to OUT/results.json)."""
    started = time.perf_counter()
    s = _Seed(seed, out, demo_cfg, verbose)
    fft_cfg, arm_cfg = demo_cfg["fft"], demo_cfg["arms"]
    init_dir = convert.save_hf(s.cfg, model.init_params(s.cfg, jax.random.key(seed)), out / "init",
                               tokenizer_dir=s.tok_dir)

    # FFT from random init; FFT-best on dev, exported.
    best_dir, fft_step, fft_dev, fft_curve = s.train_arm(
        "fft", "fft", init_dir, {"lr": fft_cfg["lr"], "warmup_ratio": fft_cfg["warmup_ratio"]}, fft_cfg["steps"],
        fft_cfg["batch_size"], fft_cfg["eval_every"])
    s.log(f"[seed {seed}] FFT-best: step {fft_step}, dev accuracy {fft_dev:.3f}")

    # The trained arms from FFT-best with the same step budget, then MFT on the LoRA-merged model.
    budget = (arm_cfg["steps"], arm_cfg["batch_size"], arm_cfg["eval_every"])
    chosen, curves = {"fft_best": (best_dir, fft_step, fft_dev)}, {"fft": fft_curve}
    starts = {"mft": best_dir, "continued_fft": best_dir, "lora": best_dir, "mft_on_lora": None}
    for arm, start in starts.items():
        mode = TRAINED.get(arm, "mft")
        lr = arm_cfg[{"mft": "mft_lr", "fft": "fft_lr", "lora": "lora_lr"}[mode]]
        hf_dir, step, dev, curve = s.train_arm(arm, mode, start or chosen["lora"][0], {"lr": lr}, *budget)
        chosen[arm] = (hf_dir, step, dev)
        curves[arm] = [(fft_step + t, a) for t, a in curve]
    baseline_cfg = out / "baseline.yaml"
    baseline_cfg.write_text(yaml.safe_dump(_run_config(s.base, run_dir=str(out / "baselines"),
                                                       model={"path": str(best_dir)}).to_dict()))
    for arm, kind in BASELINES.items():
        export.export_run(baseline_cfg, out / arm, baseline=kind, seed=seed,
                          calibration_tokens=demo_cfg["baselines"]["wanda_calibration_tokens"])
        chosen[arm] = (out / arm / "hf", None, None)

    arms, lines = _score_arms(s, chosen, best_dir)
    results = {"seed": seed, "arms": arms, "curves": curves, "landscape": lines}
    results["masked_zeros"] = {arm: r.pop("masked_zeros") for arm, r in results["arms"].items() if "masked_zeros" in r}
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _score_arms(s: _Seed, chosen: dict, best_dir: Path) -> tuple[dict, dict]:
    """Per arm, its chosen model's test accuracy and loss (dev accuracy for the untrained ones), its sharpness
    on dev batches and, for masked arms, the exact count of the zeros they added; and the dev loss along the
    straight lines FFT-best -> MFT and FFT-best -> continued FFT (every param moved). Each model loads once."""
    out, lines, max_new = {}, {}, s.demo_cfg["eval"]["max_new_tokens"]
    _, best_params = convert.load_hf(best_dir)
    test_data = config_lib.DataConfig(train={str(s.splits["test"]): None}, tokenizer=str(s.tok_dir),
                                      max_seq_length=s.demo_cfg["model"]["max_seq_length"],
                                      cache_dir=str(s.out / "data_cache"))
    run = _run_config(s.base)
    land = s.demo_cfg["landscape"]
    batches = landscape.dev_batches(run, str(s.tok_dir), land["dev_batches"], land["batch_size"])
    paths = masking.masked_paths(s.cfg, run.mask)
    for arm, (hf_dir, step, dev) in chosen.items():
        arm_cfg, params = convert.load_hf(hf_dir)
        eval_model = EvalModel(arm_cfg, params, s.tokenizer, str(s.tok_dir), compute_dtype="float32",
                               batch_size=len(s.test_rows))
        if dev is None:
            dev = accuracy(eval_model, s.dev_rows, max_new)
        out[arm] = {"test_accuracy": accuracy(eval_model, s.test_rows, max_new), "dev_accuracy": dev, "step": step,
                    "test_loss": Loss(test_data, str(s.tok_dir), split="train").run(eval_model)["loss"]}
        out[arm].update(_sharpness(s, params, batches, paths))
        if arm in ("mft", "random_mask", "magnitude_mask", "wanda_mask"):  # masked from FFT-best: exact count
            out[arm]["masked_zeros"] = _masked_zero_fraction(best_params, params, paths, run.mask)
        if arm in ("mft", "continued_fft"):
            alphas = np.linspace(0.0, 1.0, land["points"]).tolist()
            lines[arm] = landscape.interpolate(s.cfg, best_params, params, batches, points=alphas)
    return out, lines


def _masked_zero_fraction(base_params, params, paths, mask_cfg: config_lib.MaskConfig) -> dict:
    """Zeros the arm added in the masked matrices, against int((1 - keep) * n) per matrix (local top-k)."""
    new_zeros = expected = exact = 0
    for path in paths:
        w = np.asarray(get_path(base_params, path))
        added = int((np.asarray(get_path(params, path)) == 0).sum() - (w == 0).sum())
        target = w.size - masking.num_kept(w.size, masking.keep_fraction(path, mask_cfg))
        new_zeros, expected, exact = new_zeros + added, expected + target, exact + (added == target)
    return {"new_zeros": new_zeros, "expected_local_topk": expected, "matrices_exact": exact,
            "matrices": len(paths)}


def _sharpness(s: _Seed, params, batches, paths) -> dict:
    """Top Hessian eigenvalue and trace of the dev loss over the masked kernels (the same probes for every arm)."""
    cfg = s.demo_cfg["landscape"]
    found = landscape.sharpness(s.cfg, params, batches, paths, eigs=cfg["eigenvalues"], iters=cfg["iterations"],
                                probes=cfg["probes"], key=jax.random.key(s.seed))
    return {"top_eigenvalue": found["top_eigenvalues"][0], "hessian_trace": found["trace"],
            "hessian_trace_stderr": found["trace_stderr"], "landscape_loss": found["loss"]}


# --------------------------------------------------------------------------------------------------------
# Config and the whole demo
# --------------------------------------------------------------------------------------------------------

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
    table = demo_report.summarize(per_seed)
    report = {"seeds": seeds, "table": table, "per_seed": per_seed, "config": demo_cfg,
              "seconds": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    demo_report.plot(per_seed, table, out / "dev_accuracy.png")
    demo_report.plot_landscape(per_seed, table, out / "landscape.png")
    print()
    print(demo_report.format_table(table, seeds))
    print("\nmasked-matrix zeros (new / expected): "
          + ", ".join(f"{arm} {c['new_zeros']}/{c['expected_local_topk']}"
                      for arm, c in per_seed[0]["masked_zeros"].items()))
    print(f"wrote {out / 'results.json'}, {out / 'dev_accuracy.png'} and {out / 'landscape.png'} in "
          f"{report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    run()
