"""`mft-jax sweep`: train a grid of run configs, select each point's checkpoint on dev, evaluate it, and tabulate
and plot every metric against every swept key (mean ± std over seeds).

`--grid KEY=V1,V2,...` (repeatable) splits at the commas outside brackets and quotes; each value is YAML as in
`--set`: `mask.masked_layers=0-3,4-7` and `mask.masked_layers=[0,2],[1,3]` are two points each; `mask.keep` sets
keep_attn and keep_mlp. `--seeds N` adds train.seed = base seed + 0..N-1 as the outermost axis (a sweep half done
has every setting at the first seeds). Each point trains in DIR/<name> (its settings, e.g. `keep=0.8__masked_layers
=0-1__seed=0`) under the run-directory contract, so a killed sweep resumes its current point exactly; a point with
DONE and DIR/eval/<name>.json is finished and skipped. Selection: lowest `dev_loss` in metrics.jsonl, earliest on
ties (none recorded: the final step); a point sets the result-neutral ckpt.save_every = train.eval_every and a
ckpt.keep that keeps every evaluated step. Evaluation: `export.load_model("RUN:STEP")` on `--tasks` (the registry
and options of `mft-jax eval`; defaults from the base config). Outputs: sweep.json (each point's settings, seed,
step, metrics; the table), table.md, plots/<metric>_vs_<key>.png. DIR/sweep_spec.json records the sweep: a rerun
may change the grid's values or the seeds (it extends the sweep), not the base config, swept keys or evaluation
settings. Jobs: `--print-commands [PREFIX]` prints a command per unfinished point, `--point I` runs point I alone
(1-based); the plain command then evaluates what is left and writes the table.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

import jax
import numpy as np

from mft_jax import config as config_lib
from mft_jax import convert, rundir, train
from mft_jax.config import ConfigError
from mft_jax.evaluate import commands

SEED_KEY = "train.seed"
SPEC_FILE, RESULTS_FILE, TABLE_FILE = "sweep_spec.json", "sweep.json", "table.md"
_BOOKKEEPING = {"seconds", "n", "tokens", "batches", "truncated_prompts", "primary_score"}
# With the *_data options: what changes a point's evaluation (the data cache does not).
_EVAL_KEYS = ("tasks", "limit", "max_new_tokens", "max_length", "batch_size", "compute_dtype", "template",
              "max_seq_length")


class SweepError(ConfigError):
    """A bad grid, point or flag; one line naming it and the fix. Subclasses: the sweep directory (exit 1), a
    point stopped by SIGTERM / Ctrl-C with its checkpoint saved (exit 130)."""


class SweepDirError(SweepError):
    exit_code = 1


class SweepStopped(SweepError):
    exit_code = 130


# ---------------------------------------------- Grid and points --------------------------------------------------

def split_values(text: str, flag: str = "--grid") -> list[str]:
    """V1,V2,... split at the commas outside [], {} and quotes: `0-3,4-7` and `[1,2],[3]` are two values."""
    values, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    if depth or quote or not all(values):
        raise SweepError(f"{flag} {text!r}: unbalanced brackets or quotes, or an empty value; write V1,V2,... "
                         f"(a list value in brackets: mask.masked_layers=[0,2],[1,3])")
    return values


def parse_grid(items: list[str], seeds: int, base_seed: int) -> list[tuple[str, list[str]]]:
    """[(key, [value texts])]: the seed axis (unless the grid has train.seed), then the grid in order."""
    axes = []
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key or not all(key.split(".")):
            raise SweepError(f"--grid {item!r} must look like section.key=V1,V2,..., e.g. mask.keep=0.8,0.9")
        values = split_values(text, f"--grid {key} values")
        if len(set(values)) != len(values) or key in (k for k, _ in axes):
            raise SweepError(f"--grid {key}: a value or the key repeats; give one --grid per key, each value once")
        sets = set(config_lib.canonical_keys(key))
        for other, _ in axes:
            both = sets & set(config_lib.canonical_keys(other))
            if both:
                raise SweepError(f"--grid {other} and --grid {key} both set {', '.join(sorted(both))}; sweep one "
                                 f"of them (mask.keep sets keep_attn and keep_mlp together)")
        axes.append((key, values))
    if seeds < 1:
        raise SweepError(f"--seeds must be >= 1, got {seeds}")
    if SEED_KEY in (k for k, _ in axes):
        if seeds > 1:
            raise SweepError(f"--seeds {seeds} and --grid {SEED_KEY}=... both set the seeds; use one of them")
    else:
        axes.insert(0, (SEED_KEY, [str(base_seed + i) for i in range(seeds)]))
    return axes


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key's last part (`mask.keep` -> keep), or the whole key where two keys share a last part."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def safe_value(text: str) -> str:
    """A value as a file-name piece: quotes, brackets and spaces dropped, commas to '+', others to '_'."""
    out = re.sub(r"[\[\]{}\s\"']", "", text).replace(",", "+")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", out) or "_"


def make_points(axes: list[tuple[str, list[str]]]) -> list[dict]:
    """The cartesian product, first axis outermost, seed axis named last: [{index, name, settings}]."""
    shorts = short_names([k for k, _ in axes])
    order = [k for k, _ in axes if k != SEED_KEY] + [SEED_KEY] * any(k == SEED_KEY for k, _ in axes)
    points, names = [], {}
    for i, combo in enumerate(itertools.product(*(values for _, values in axes)), start=1):
        settings = dict(zip((k for k, _ in axes), combo))
        name = "__".join(f"{shorts[k]}={safe_value(settings[k])}" for k in order)
        if len(name) > 150:
            name = name[:120] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
        if name in names:
            raise SweepError(f"--grid values {names[name]} and {settings} give the same point name {name!r}; "
                             f"write the values so that they differ in letters, digits, '.', '-' or ','")
        names[name] = settings
        points.append({"index": i, "name": name, "settings": settings})
    return points


def ckpt_overrides(run: config_lib.RunConfig) -> list[str]:
    """Result-neutral ckpt settings that keep a checkpoint at every step whose dev loss is recorded."""
    every = run.train.eval_every
    if not (run.data.dev and every):
        return []  # only the final step is evaluated, and its checkpoint is always written
    out = [f"ckpt.save_every={every}"] if run.ckpt.save_every != every else []
    needed = math.ceil(run.train.max_steps / every) + 1 if run.train.max_steps else 10**6
    return out + ([f"ckpt.keep={needed}"] if run.ckpt.keep < needed else [])


def point_configs(base_raw: dict, points: list[dict], sweep_dir: Path) -> list[config_lib.RunConfig]:
    """Each point's RunConfig (base + its settings + ckpt_overrides + run_dir), all checked (layers against the
    model's config.json too) before any runs; sets point["overrides"], the --set list that makes it."""
    runs = []
    for point in points:
        grid = [f"{k}={v}" for k, v in point["settings"].items()]
        try:
            grid += ckpt_overrides(config_lib.from_dict(base_raw, grid, verbose=False))
            point["overrides"] = grid + [f"run_dir={sweep_dir / point['name']}"]
            runs.append(config_lib.from_dict(base_raw, point["overrides"], verbose=False))
            if (Path(runs[-1].model.path) / "config.json").is_file():
                runs[-1].mask.check_against(convert.load_config(runs[-1].model.path))
        except ConfigError as e:
            raise SweepError(f"point {point['name']}: {e}") from None
    return runs


# ---------------------------------------------- Selection and evaluation of one point ----------------------------

def select_step(run_dir: Path) -> tuple[int, float | None]:
    """(step, its dev loss): the lowest finite dev_loss in metrics.jsonl, earliest on ties; else the final step."""
    curve = [(r["dev_loss"], r["step"]) for r in rundir.read_metrics(run_dir)
             if isinstance(r.get("dev_loss"), (int, float)) and math.isfinite(r["dev_loss"])]
    loss, step = min(curve) if curve else (None, json.loads((run_dir / "DONE").read_text() or "{}").get("final_step"))
    if step is None or not (run_dir / "checkpoints" / str(step)).is_dir():
        raise SweepDirError(f"{run_dir}: no checkpoint for the selected step {step} (checkpoints "
                            f"{sorted(p.name for p in (run_dir / 'checkpoints').glob('[0-9]*'))}); was ckpt.keep "
                            f"lowered by hand? Delete this point's directory to train it again")
    return int(step), loss


def evaluate_point(args, run_dir: Path, step: int) -> dict:
    """{task: metrics} of the run's checkpoint `step` on --tasks (none: {})."""
    return commands.run_tasks(args, f"{run_dir}:{step}", verbose=args.verbose) if args.tasks else {}


def headline(results: dict, dev_loss: float | None) -> dict[str, float]:
    """The metrics the table shows: dev_loss, the loss task's `loss` and the other tasks' numbers (not counts)."""
    out = {"dev_loss": dev_loss} if dev_loss is not None else {}
    for task, metrics in results.items():
        keep = ("loss",) if task == "loss" else [m for m in metrics if m not in _BOOKKEEPING]
        out.update({task if m == task else f"{task}.{m}": float(metrics[m]) for m in keep
                    if isinstance(metrics.get(m), (int, float))})
    return out


# ---------------------------------------------- Aggregation: table, plots ----------------------------------------

def summarize(records: list[dict], axes: list[tuple[str, list[str]]]) -> list[dict]:
    """One row per setting (all swept keys but the seed), in grid order: metric -> {mean, std, values}."""
    keys = [k for k, _ in axes if k != SEED_KEY]
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(tuple(record["settings"][k] for k in keys), []).append(record)
    rows = []
    for combo, members in groups.items():
        metrics = {}
        for name in dict.fromkeys(m for r in members for m in r["metrics"]):
            values = np.asarray([r["metrics"][name] for r in members if name in r["metrics"]], np.float64)
            metrics[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1
                             else 0.0, "values": values.tolist()}
        rows.append({"settings": dict(zip(keys, combo)), "seeds": len(members), "metrics": metrics,
                     "steps": [r["step"] for r in members]})
    return rows


def format_table(rows: list[dict], axes: list[tuple[str, list[str]]], header: str) -> str:
    """Markdown: the swept keys, seeds, each metric's mean ± std over seeds, the selected steps."""
    keys = [k for k, _ in axes if k != SEED_KEY]
    metrics = list(dict.fromkeys(m for row in rows for m in row["metrics"]))
    head = [*short_names(keys).values(), "seeds", *metrics, "selected steps"]
    cells = [head, ["---"] * len(head)]
    for row in rows:
        stats = [f"{row['metrics'][m]['mean']:.4f} ± {row['metrics'][m]['std']:.4f}" if m in row["metrics"]
                 else "-" for m in metrics]
        steps = ", ".join(map(str, row["steps"]))
        cells.append([*(row["settings"][k] for k in keys), str(row["seeds"]), *stats, steps])
    return header + "\n\n" + "".join("| " + " | ".join(c) + " |\n" for c in cells)


def plot(rows: list[dict], axes: list[tuple[str, list[str]]], out_dir: Path) -> list[Path]:
    """plots/<metric>_vs_<key>.png: mean ± std over seeds against each swept key, a line per other setting."""
    import matplotlib  # heavy (~0.6 s), plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [(k, v) for k, v in axes if k != SEED_KEY]
    shorts = short_names([k for k, _ in swept])
    metrics = list(dict.fromkeys(m for row in rows for m in row["metrics"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric, (key, values) in itertools.product(metrics, swept):
        numeric = all(re.fullmatch(r"[-+]?[0-9.]+(e[-+]?[0-9]+)?", v) for v in values)  # else: in grid order
        xs = dict(zip(values, [float(v) for v in values] if numeric else range(len(values))))
        lines: dict[tuple, list] = {}
        for row in rows:
            if metric in row["metrics"]:
                other = tuple((shorts[k], row["settings"][k]) for k, _ in swept if k != key)
                lines.setdefault(other, []).append((xs[row["settings"][key]], row["metrics"][metric]))
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        for other, points in lines.items():
            points.sort(key=lambda p: p[0])
            ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points], [p[1]["std"] for p in points],
                        marker="o", capsize=3, label=", ".join(f"{k}={v}" for k, v in other) or None)
        if not numeric:
            ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        if any(other for other in lines):
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / f"{safe_value(metric)}_vs_{safe_value(shorts[key])}.png")
        fig.savefig(written[-1])
        plt.close(fig)
    return written


# ---------------------------------------------- The command ------------------------------------------------------

def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def _fill_eval_defaults(args, base: config_lib.RunConfig) -> None:
    """Unset evaluation options from the base config (its eval and data sections)."""
    defaults = {**{k: getattr(base.eval, k) for k in ("limit", "batch_size", "max_new_tokens", "max_length")},
                "tasks": ",".join(base.eval.tasks), "template": base.data.template,
                "max_seq_length": base.data.max_seq_length, "data_cache_dir": base.data.cache_dir}
    vars(args).update({k: v for k, v in defaults.items() if getattr(args, k) is None})
    args.tasks = ",".join(t.strip() for t in args.tasks.split(",") if t.strip())


def check_tasks(args) -> None:
    """Reads every task's data now, so a wrong task name or file fails before any training."""
    if "loss" in args.tasks.split(",") and not args.loss_data:
        raise SweepError("--tasks loss needs --loss-data FILE[,FILE] (held-out data, e.g. the test split; the "
                         "dev split's loss is recorded for every point anyway, as dev_loss)")
    if args.tasks:
        commands.make_tasks(args)


def check_spec(sweep_dir: Path, spec: dict) -> None:
    """Refuses a directory that is not this sweep's: another base config, swept keys or evaluation settings."""
    path = sweep_dir / SPEC_FILE
    if not path.is_file():
        if sweep_dir.exists() and (not sweep_dir.is_dir() or any(p.name[0] != "." for p in sweep_dir.iterdir())):
            raise SweepDirError(f"--out {sweep_dir} is a file or holds files but no {SPEC_FILE}, so it is not a "
                                f"sweep's; give a new or empty directory")
        return
    saved = json.loads(path.read_text())
    for field, what in (("keys", "swept keys"), ("eval", "evaluation settings"), ("base", "base config")):
        if saved.get(field) != spec[field]:
            old, new = saved.get(field), spec[field]
            diff = rundir.diff_configs(old or {}, new) if isinstance(new, dict) else {field: (old, new)}
            first = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:3])
            raise SweepDirError(f"{path}: this sweep was started with other {what} ({first}); a rerun may only "
                                f"change the grid's values or --seeds. Use a new --out, or the saved settings")


def run(args) -> int:
    """`mft-jax sweep` (see the module docstring); 0 when every point (or --point) is finished."""
    base = config_lib.load(args.config, args.set or [], verbose=True)
    base_raw = base.to_dict()
    axes = parse_grid(args.grid, args.seeds, base.train.seed)
    points = make_points(axes)
    sweep_dir = Path(args.out or f"{base.run_dir.rstrip('/')}_sweep")
    runs = point_configs(base_raw, points, sweep_dir)
    _fill_eval_defaults(args, base)
    check_tasks(args)
    evaluation = {k: v for k, v in sorted(vars(args).items()) if k in _EVAL_KEYS or k.endswith("_data")}
    spec = json.loads(json.dumps({
        "base_config": str(Path(args.config).resolve()), "set": args.set or [],
        "base": {k: v for k, v in base_raw.items() if k != "run_dir"}, "keys": [k for k, _ in axes],
        "grid": [[k, v] for k, v in axes], "eval": evaluation, "points": len(points)}))
    check_spec(sweep_dir, spec)
    finished = [is_finished(sweep_dir, p) for p in points]
    if jax.process_index() == 0:  # with several processes, process 0 writes the sweep's own files
        sweep_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_atomic(sweep_dir / SPEC_FILE, json.dumps(spec, indent=2))
    if args.print_commands:
        return print_commands(args, points, finished)
    if args.point is not None and not 1 <= args.point <= len(points):
        raise SweepError(f"--point {args.point}: the sweep has points 1..{len(points)}")
    chosen = points if args.point is None else [points[args.point - 1]]
    started, trained = time.perf_counter(), 0
    todo = sum(not finished[p["index"] - 1] for p in chosen)
    for point in chosen:
        where = f"[sweep] point {point['index']}/{len(points)} {point['name']}"
        if finished[point["index"] - 1]:
            print(f"{where}: finished earlier, skipped", flush=True)
            continue
        print(f"{where}: training and evaluating (elapsed {_clock(time.perf_counter() - started)})", flush=True)
        t0 = time.perf_counter()
        record = run_point(args, point, runs[point["index"] - 1], sweep_dir)
        trained += 1
        elapsed = time.perf_counter() - started
        eta = elapsed / trained * (todo - trained)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items())
        print(f"{where}: step {record['step']} selected, {shown} ({_clock(time.perf_counter() - t0)}; elapsed "
              f"{_clock(elapsed)}, ETA {_clock(eta)})", flush=True)
    if args.point is None and jax.process_index() == 0:
        collect(sweep_dir, points, axes, spec)
    return 0


def is_finished(sweep_dir: Path, point: dict) -> bool:
    return (sweep_dir / point["name"] / "DONE").is_file() and (sweep_dir / "eval" / f"{point['name']}.json").is_file()


def run_point(args, point: dict, run: config_lib.RunConfig, sweep_dir: Path) -> dict:
    """Trains (or resumes, or finds finished) the point's run, selects its step on dev, evaluates it, and
    writes eval/<name>.json (the point's record) last, so that a point killed anywhere is done again."""
    summary = train.train(run, verbose=args.verbose)
    if summary.get("stopped"):
        raise SweepStopped(f"point {point['index']} ({point['name']}) stopped ({summary['stopped']}) at step "
                           f"{summary.get('final_step')} with a checkpoint; run the same command again to resume")
    run_dir = Path(run.run_dir)
    step, dev_loss = select_step(run_dir)
    results = evaluate_point(args, run_dir, step)
    record = {"name": point["name"], "index": point["index"], "settings": point["settings"],
              "seed": run.train.seed, "run_dir": str(run_dir), "step": step,
              "selection": "dev_loss" if dev_loss is not None else "final step (no dev loss recorded)",
              "metrics": headline(results, dev_loss), "results": results}
    if jax.process_index() == 0:  # every process has the same record (evaluate hands out process 0's metrics)
        (sweep_dir / "eval").mkdir(exist_ok=True)
        rundir.write_atomic(sweep_dir / "eval" / f"{point['name']}.json", json.dumps(record, indent=2, default=str))
    return record


def collect(sweep_dir: Path, points: list[dict], axes, spec: dict) -> dict:
    """sweep.json, table.md and plots/ from the points' records."""
    records = [json.loads((sweep_dir / "eval" / f"{p['name']}.json").read_text()) for p in points]
    rows = summarize(records, axes)
    header = (f"# Sweep {sweep_dir}\n\nbase config {spec['base_config']}; {len(points)} points ({len(rows)} "
              f"settings x {len(points) // max(len(rows), 1)} seeds); checkpoint: lowest dev loss (earliest on "
              f"ties); mean ± std (sample, ddof=1) over seeds")
    table = format_table(rows, axes, header)
    rundir.write_atomic(sweep_dir / TABLE_FILE, table)
    report = {"spec": spec, "points": records, "table": rows}
    rundir.write_atomic(sweep_dir / RESULTS_FILE, json.dumps(report, indent=2, default=str))
    plots = plot(rows, axes, sweep_dir / "plots")
    print(table)
    print(f"wrote {sweep_dir / RESULTS_FILE}, {sweep_dir / TABLE_FILE} and {len(plots)} plots in "
          f"{sweep_dir / 'plots'}", flush=True)
    return report


def print_commands(args, points: list[dict], finished: list[bool]) -> int:
    """One shell command per unfinished point: PREFIX --config BASE [--set K=V]... and the run directory
    (`--run-dir DIR` for a launch script, which all three take; `--set run_dir=DIR` otherwise)."""
    prefix = shlex.split(args.print_commands)
    launch = any("launch/" in word for word in prefix)
    for point in (p for p, done in zip(points, finished) if not done):
        *sets, run_dir = point["overrides"]
        words = [*prefix, "--config", args.config, *(w for s in [*(args.set or []), *sets] for w in ("--set", s))]
        print(shlex.join(words + (["--run-dir", run_dir.partition("=")[2]] if launch else ["--set", run_dir])))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `sweep` on an argparse subparsers object (sets func=run)."""
    p = subparsers.add_parser("sweep", help="train and evaluate a grid of run configs; table and plots over seeds")
    p.add_argument("--config", required=True, help="the base run config (YAML)")
    p.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="a swept key and its values, repeatable (mask.masked_layers=0-1,2-3; mask.keep=0.8,0.9)")
    p.add_argument("--seeds", type=int, default=1, help="train.seed = base seed + 0..N-1 for every setting")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every point")
    p.add_argument("--out", default=None, help="the sweep directory (default: the base run_dir + '_sweep')")
    p.add_argument("--point", type=int, default=None, metavar="I", help="run only point I (1-based), e.g. in a job")
    p.add_argument("--print-commands", nargs="?", const="mft-jax train", default=None, metavar="PREFIX",
                   help="print one command per unfinished point (default PREFIX 'mft-jax train'; e.g. "
                        "'sbatch launch/slurm.sbatch') and run nothing")
    p.add_argument("--verbose", action="store_true", help="show training and evaluation output")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch (default: the config's eval)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override every task's own limit")
    p.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16"],
                   help="evaluation activations (default: bfloat16 on accelerators, float32 on CPU)")
    commands.add_task_args(p, required=False)
    p.set_defaults(func=run, tasks=None, max_length=None, template=None, max_seq_length=None, data_cache_dir=None,
                   tokenizer=None)
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mft-jax")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sweep", *map(str, argv or [])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
