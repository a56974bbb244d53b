"""Loss landscape and sharpness on the SFT loss of N fixed dev batches (`mft-jax landscape`).

L(x) = sum(w * nll) / sum(w) over the N batches (the dev loss of `mft_jax.losses`) is a function of the params
at `paths` only (by default the masked layers' kernels; the rest stay frozen), taken in float32 and merged into
the model, which casts them to the compute dtype (float32 by default, matmuls at full precision: second
derivatives need it). It runs on the mesh as training does: params sharded by `sharding.param_shardings`,
batches over the data axes, the vectors of `mft_jax.studies.hessian` laid out like the params they mirror.

- `interpolate`: L along the straight line (1 - a) A + a B between two models, over every param by default (so
  the ends are the two models' own losses; with `paths`, only those move and the a = 1 end is A with B's values
  there). The two ends are exactly A and B: each half of the line is computed from its nearer end.
- `surface`: L(x + a d1 + b d2) on a grid, d1 and d2 random Gaussian directions, filter-normalised (Li et al.,
  "Visualizing the Loss Landscape of Neural Nets", 2018): each filter of d rescaled to the norm of the same filter
  of x. A filter is one output unit: a column of a kernel [in, out] (a row of the [out, in] weight, as Li et
  al.'s code takes it for linear layers), so every unit moves in proportion to its own scale; a 1-D param is one.
- `sharpness`: the top Hessian eigenvalues (Lanczos) and the Hessian trace (Hutchinson), `mft_jax.studies.hessian`.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mft_jax import config as config_lib
from mft_jax import data, export, masking, model, outputs, sharding, trees
from mft_jax.config import ConfigError, LlamaConfig, MeshConfig
from mft_jax.studies import hessian
from mft_jax.studies.hessian import Curvature

DEFAULT_POINTS = tuple(k / 10 for k in range(-5, 16))  # -0.5 .. 1.5; 0 and 1 exactly


def select_paths(cfg: LlamaConfig, spec: str, mask_cfg=None) -> list[tuple[str, ...]]:
    """Param paths for `--params`: "masked" (the run's masked kernels), "all", or comma-separated patterns on
    slash-joined paths (fnmatch), e.g. "layers_4/mlp/*/kernel,norm/scale"."""
    every = list(trees.flatten(model.param_shapes(cfg)))
    if spec == "masked":
        paths = [] if mask_cfg is None else masking.masked_paths(cfg, mask_cfg)
        if not paths:
            raise ConfigError("--params masked needs the run config's mask.masked_layers; set them, or pass --params "
                              "all or patterns")
        mask_cfg.check_against(cfg)
        return paths
    if spec == "all":
        return every
    patterns = [s.strip() for s in spec.split(",") if s.strip()]
    paths = [p for p in every if any(fnmatch.fnmatchcase("/".join(p), pat) for pat in patterns)]
    if not paths:
        raise ConfigError(f"--params {spec!r} matches no param; paths look like {'/'.join(every[1])!r}")
    return paths


def stack_batches(batches: list[dict]) -> dict[str, np.ndarray]:
    """[B, L] batches -> [N, B, W] arrays, W the used width (padding columns past every document dropped,
    rounded up to a multiple of 64): trailing padding changes no loss, attention being causal."""
    keys = ("inputs", "targets", "loss_weights", "positions", "segment_ids")
    stacked = {k: np.stack([np.asarray(b[k]) for b in batches]) for k in keys}
    used = np.flatnonzero(stacked["segment_ids"].any(axis=(0, 1)))
    width = min(-(-(int(used[-1]) + 1 if used.size else 1) // 64) * 64, stacked["inputs"].shape[-1])
    return {k: v[..., :width] for k, v in stacked.items()}


# --------------------------------------------------------------------------------------------------------
# The objective on a mesh
# --------------------------------------------------------------------------------------------------------

_loss = jax.jit(lambda op, operand, x: op.loss(operand, x), static_argnums=0)
_hvp = jax.jit(lambda op, operand, x, v: op.constrain(op.matvec(operand, x, v)), static_argnums=0)


@jax.jit
def _lerp(a: dict, b: dict, alpha) -> dict:
    """(1 - alpha) a + alpha b, from the nearer end: exactly a at 0, b at 1, and a wherever a == b."""
    return jax.tree.map(lambda x, y: jnp.where(alpha < 0.5, x + alpha * (y - x), y - (1 - alpha) * (y - x)), a, b)


@jax.jit
def _filter_normalised(x: dict, key) -> dict:
    """A Gaussian direction like x with each filter (output unit: last axis) scaled to x's filter norm."""
    def one(i, w):
        d = jax.random.normal(jax.random.fold_in(key, i), w.shape, jnp.float32)
        axes = tuple(range(w.ndim - 1)) if w.ndim > 1 else (0,)
        norm = lambda a: jnp.sqrt(jnp.sum(a * a, axis=axes, keepdims=True))  # noqa: E731
        return d * norm(w) / (norm(d) + 1e-10)
    return {path: one(i, w) for i, (path, w) in enumerate(sorted(x.items()))}


_shift = jax.jit(lambda x, d1, d2, a, b: jax.tree.map(lambda x_, u, v: x_ + a * u + b * v, x, d1, d2))


class Objective:
    """L at the params of `paths` (None: every param) for N fixed batches, placed on `mesh` (default: every
    device on the data axis). Call its methods inside `with objective.context():`."""

    def __init__(self, cfg: LlamaConfig, params, batches, paths=None, mesh=None, *, compute_dtype="float32",
                 remat: str = "none", loss_chunk: int = 0):
        self.cfg = cfg
        self.mesh = mesh if mesh is not None else sharding.make_mesh(MeshConfig(data=-1))
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
        self.param_shardings = sharding.param_shardings(cfg, self.mesh, shapes)
        self.params = jax.device_put(params, self.param_shardings)
        stacked = batches if isinstance(batches, dict) else stack_batches(batches)
        dp = sharding.data_parallel_size(self.mesh)
        if stacked["inputs"].shape[1] * jax.process_count() % dp:
            raise ConfigError(f"landscape: a batch of {stacked['inputs'].shape[1] * jax.process_count()} rows does "
                              f"not split over the data-parallel size {dp}; use a multiple of {dp} (--batch-size)")
        self.batches = data.to_global_batch(stacked, sharding.batch_sharding(self.mesh, micro_batched=True))
        self.paths = sorted(trees.flatten(params)) if paths is None else sorted(paths)
        self.shardings = {p: trees.get_path(self.param_shardings, p) for p in self.paths}
        self.op = Curvature(cfg, jnp.dtype(compute_dtype).name, remat, loss_chunk, tuple(self.shardings.items()))
        self.x = self.select(self.params)

    def context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(sharding.axis_rules())
        stack.enter_context(jax.set_mesh(self.mesh))
        if self.op.compute_dtype == "float32":  # no TF32 / bf16-pass matmuls in curvature measurements
            stack.enter_context(jax.default_matmul_precision("highest"))
        return stack

    @property
    def operand(self):
        return self.params, self.batches

    @property
    def size(self) -> int:
        return sum(int(np.prod(a.shape)) for a in self.x.values())

    def select(self, params) -> dict:
        """float32 copies of params' leaves at `paths`, laid out like this model's."""
        return {p: jax.device_put(trees.get_path(params, p), self.shardings[p]).astype(jnp.float32)
                for p in self.paths}

    def matvec(self, v: dict) -> dict:
        """H v at this model's x."""
        return _hvp(self.op, self.operand, self.x, v)

    def loss(self, x: dict | None = None) -> float:
        return float(_loss(self.op, self.operand, self.x if x is None else x))

    def line(self, params_b, points=DEFAULT_POINTS, progress: bool = False) -> list[tuple[float, float]]:
        """[(a, L((1 - a) x + a x_b))] with x_b = params_b at `paths`."""
        if any(trees.get_path(params_b, p).shape != self.x[p].shape for p in self.paths):
            raise ConfigError("the two models' params differ in shape; compare models of one architecture")
        x_b, out = self.select(params_b), []
        with hessian.progress_bar(len(points), "line", progress) as bar:
            for alpha in points:
                out.append((float(alpha), self.loss(_lerp(self.x, x_b, jnp.float32(alpha)))))
                bar.update()
        return out

    def surface(self, *, points: int = 11, span: float = 1.0, key: jax.Array, progress: bool = False) -> dict:
        """{"alphas", "betas", "loss" [alphas][betas]} of L(x + a d1 + b d2), filter-normalised d1, d2."""
        grid = [float(g) for g in np.round(np.linspace(-span, span, points), 9)]
        d1, d2 = (_filter_normalised(self.x, jax.random.fold_in(key, i)) for i in (1, 2))
        values = []
        with hessian.progress_bar(points * points, "surface", progress) as bar:
            for a in grid:
                values.append([])
                for b in grid:
                    shifted = _shift(self.x, d1, d2, jnp.float32(a), jnp.float32(b))
                    values[-1].append(_loss(self.op, self.operand, shifted))
                    bar.update()
        loss = np.asarray(jax.device_get(values), np.float64)
        return {"alphas": grid, "betas": grid, "loss": loss.tolist(), "span": span}

    def sharpness(self, *, eigs: int = 3, iters: int = 20, probes: int = 16, key: jax.Array,
                  probe_kind: str = "rademacher", progress: bool = False) -> dict:
        """Top eigenvalues (Lanczos, `iters` steps) and trace (Hutchinson, `probes` probes) of the Hessian of L at
        x; eigs = 0 or probes = 0 skips that part. The same key gives the same start vector and probes."""
        out = {"params": self.size}
        if eigs > 0:
            lz = hessian.lanczos(self.matvec, self.x, iters=iters, eigs=eigs, key=jax.random.fold_in(key, 0),
                                 constrain=self.op.constrain, progress=progress)
            out.update(top_eigenvalues=lz["top_eigenvalues"], eigenvalue_residuals=lz["residuals"],
                       min_eigenvalue=lz["min_eigenvalue"], lanczos_iters=lz["iters"])
        if probes > 0:
            hu = hessian.hutchinson(self.matvec, self.x, probes=probes, kind=probe_kind,
                                    key=jax.random.fold_in(key, 1), constrain=self.op.constrain, progress=progress)
            out.update(trace=hu["trace"], trace_stderr=hu["trace_stderr"], probes=probes, probe_kind=probe_kind,
                       probe_values=hu["values"])
        return out


# --------------------------------------------------------------------------------------------------------
# Functions for callers (the demo): each places the model, runs and returns plain numbers
# --------------------------------------------------------------------------------------------------------

def loss(cfg, params, batches, mesh=None, **kw) -> float:
    """The SFT loss of the batches, as the landscape computes it."""
    objective = Objective(cfg, params, batches, [], mesh, **kw)
    with objective.context():
        return objective.loss()


def interpolate(cfg, params_a, params_b, batches, paths=None, points=DEFAULT_POINTS, mesh=None, *,
                progress: bool = False, **kw) -> list[tuple[float, float]]:
    """[(alpha, loss)] along (1 - alpha) A + alpha B (at `paths`; None: every param, so the ends are A and B)."""
    objective = Objective(cfg, params_a, batches, paths, mesh, **kw)
    with objective.context():
        return objective.line(params_b, points, progress)


def surface(cfg, params, batches, paths, mesh=None, *, points: int = 11, span: float = 1.0, key=None,
            progress: bool = False, **kw) -> dict:
    objective = Objective(cfg, params, batches, paths, mesh, **kw)
    with objective.context():
        return objective.surface(points=points, span=span, key=jax.random.key(0) if key is None else key,
                                 progress=progress)


def sharpness(cfg, params, batches, paths, mesh=None, *, eigs: int = 3, iters: int = 20, probes: int = 16,
              key=None, progress: bool = False, **kw) -> dict:
    """{"top_eigenvalues", "eigenvalue_residuals", "min_eigenvalue", "lanczos_iters", "trace", "trace_stderr",
    "loss", "params"} of the Hessian of the loss at `paths` (masked kernels: `masking.masked_paths`)."""
    objective = Objective(cfg, params, batches, paths, mesh, **kw)
    with objective.context():
        out = objective.sharpness(eigs=eigs, iters=iters, probes=probes,
                                  key=jax.random.key(0) if key is None else key, progress=progress)
        return {"loss": objective.loss(), **out}


# --------------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas, PNG)
# --------------------------------------------------------------------------------------------------------

def _subplots(*grid, figsize):
    from matplotlib.figure import Figure  # heavy (0.6 s), plots only; no pyplot: no figure registry, no backend

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid)


def _save(fig, path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_lines(lines: dict[str, list], path, title: str = "") -> Path:
    """The loss along each line {label: [(alpha, loss)]}; alpha = 0 is A, 1 is B."""
    fig, ax = _subplots(figsize=(6, 4))
    for label, points in lines.items():
        alphas, values = zip(*points)
        ax.plot(alphas, values, marker=".", label=label)
    for end in (0, 1):
        ax.axvline(end, color="gray", linewidth=0.6, linestyle=":")
    ax.set(xlabel="alpha: (1 - alpha) A + alpha B", ylabel="dev loss", title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_surface(surface: dict, path, title: str = "") -> Path:
    """Filled contours of the loss over the two filter-normalised directions; the model at the centre."""
    alphas, betas = np.asarray(surface["alphas"]), np.asarray(surface["betas"])
    values = np.asarray(surface["loss"]).T  # rows: betas (y), columns: alphas (x)
    fig, ax = _subplots(figsize=(5, 4.5))
    filled = ax.contourf(alphas, betas, values, levels=20, cmap="viridis")
    fig.colorbar(filled, ax=ax, label="dev loss")
    ax.plot(0, 0, "r+", markersize=10)
    ax.set(xlabel="direction 1 (filter-normalised)", ylabel="direction 2 (filter-normalised)", title=title)
    return _save(fig, path)


def plot_sharpness(per_model: dict[str, dict], path, title: str = "") -> Path:
    """Bars per model: the top Hessian eigenvalue, and the Hutchinson trace with its standard error."""
    names = list(per_model)
    top = [m.get("top_eigenvalues", [np.nan])[0] for m in per_model.values()]
    trace = [m.get("trace", np.nan) for m in per_model.values()]
    stderr = [m.get("trace_stderr") or 0.0 for m in per_model.values()]
    fig, axes = _subplots(1, 2, figsize=(9, 3.8))
    for ax, values, err, label in ((axes[0], top, None, "top Hessian eigenvalue"),
                                   (axes[1], trace, stderr, "Hessian trace (Hutchinson, +- s.e.)")):
        ax.bar(range(len(names)), values, yerr=err, color="tab:blue", capsize=3)
        ax.set_xticks(range(len(names)), [_label(n) for n in names], rotation=20, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------
# mft-jax landscape
# --------------------------------------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("landscape", help="dev-loss lines, surface and sharpness (Hessian eigenvalues, trace)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_RUN", help="HF checkpoint directory or RUN_DIR[:STEP] (model A)")
    p.add_argument("--config", default=None, help="run config YAML for data.dev, the mask and the mesh (default: "
                                                  "RUN_DIR/config.yaml when MODEL_OR_RUN is a run)")
    p.add_argument("--against", nargs="+", default=[], metavar="OTHER", help="models B: lines A -> B, their sharpness")
    p.add_argument("--out", required=True, help="output directory (new, or an earlier output of mft-jax)")
    p.add_argument("--batches", type=int, default=4, help="dev batches the loss is measured on (default 4)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: the run's micro-batch)")
    p.add_argument("--params", default="masked", help="params the surface and the Hessian are taken over: masked "
                   "(the run's masked kernels), all, or patterns like 'layers_4/mlp/*/kernel,layers_5/*/*/kernel'")
    p.add_argument("--line-params", choices=["all", "same"], default="all",
                   help="params the lines move: all (the straight line between the models) or the --params ones")
    p.add_argument("--line-range", type=float, nargs=2, default=(-0.5, 1.5), metavar=("LOW", "HIGH"))
    p.add_argument("--line-points", type=int, default=21, help="alphas along each line (0 and 1 always added)")
    p.add_argument("--surface", action="store_true", help="also the 2-D filter-normalised surface around A")
    p.add_argument("--surface-points", type=int, default=11, help="grid points per direction")
    p.add_argument("--surface-span", type=float, default=1.0, help="the grid spans [-SPAN, SPAN] x [-SPAN, SPAN]")
    p.add_argument("--eigs", type=int, default=3, help="top Hessian eigenvalues per model (0: none)")
    p.add_argument("--iters", type=int, default=20, help="Lanczos steps (memory: ITERS + 1 vectors of the params)")
    p.add_argument("--probes", type=int, default=16, help="Hutchinson probes for the trace (0: no trace)")
    p.add_argument("--seed", type=int, default=0, help="seed of the directions, start vector and probes")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"], help="default: float32")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if mft-jax did not write it")
    p.set_defaults(func=run)
    return p


def _check_args(args) -> None:
    for name, low in (("batches", 1), ("eigs", 0), ("probes", 0), ("iters", 1), ("line_points", 2),
                      ("surface_points", 2), ("batch_size", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if args.eigs > args.iters:
        raise ConfigError(f"--eigs {args.eigs} needs at least as many Lanczos steps; raise --iters to >= {args.eigs}")
    if not args.surface_span > 0 or not args.line_range[0] < args.line_range[1]:
        raise ConfigError("--surface-span must be > 0 and --line-range LOW HIGH must have LOW < HIGH")


def _base(spec: str) -> str:
    """RUN_DIR[:STEP] -> RUN_DIR, as export.load_model reads it (a path that exists is taken whole)."""
    return spec if Path(spec).exists() else spec.partition(":")[0]


def _run_config(args):
    if args.config:
        return config_lib.load(args.config, verbose=False), args.config
    base = Path(_base(args.model))
    if (base / "config.yaml").is_file():
        return export.load_run_config(base), str(base / "config.yaml")
    raise ConfigError(f"landscape: {args.model} is not a run directory; give --config RUN.yaml (its data.dev, mask "
                      f"and mesh sections say what to measure on)")


def dev_batches(run_cfg, tokenizer_dir, num_batches: int, batch_size: int) -> list[dict]:
    """The first `num_batches` batches of data.dev in file order, `batch_size` rows each (this process's share)."""
    if not run_cfg.data.dev:
        raise ConfigError("data.dev lists no sources; the landscape is measured on held-out batches: add data.dev")
    if batch_size % jax.process_count():
        raise ConfigError(f"--batch-size {batch_size} must be a multiple of the process count {jax.process_count()}")
    loader = data.make_loader(run_cfg.data, tokenizer_dir, "dev", batch_size // jax.process_count(), shuffle=False,
                              num_epochs=1, drop_remainder=False)
    return [batch for _, batch in zip(range(min(num_batches, loader.num_batches)), loader)]


def run(args) -> int:
    """`mft-jax landscape`: OUT/landscape.json and PNGs (lines.png, surface.png, sharpness.png)."""
    _check_args(args)
    run_cfg, config_file = _run_config(args)
    inputs = [*(_base(s) for s in [args.model, *args.against]), config_file]
    outputs.check_target(args.out, inputs=inputs, overwrite=args.overwrite)
    start = time.perf_counter()
    cfg, params, tokenizer_dir = export.load_model(args.model)
    paths = select_paths(cfg, args.params, run_cfg.mask)
    batch_size = args.batch_size or run_cfg.train.micro_batch_size or run_cfg.train.batch_size
    batches = dev_batches(run_cfg, run_cfg.data.tokenizer or tokenizer_dir or run_cfg.model.path, args.batches,
                          batch_size)
    mesh = sharding.make_mesh(run_cfg.mesh)
    kw = dict(compute_dtype=args.compute_dtype, remat=run_cfg.model.remat, loss_chunk=run_cfg.model.loss_chunk)
    key, progress = jax.random.key(args.seed), jax.process_index() == 0
    points = sorted({0.0, 1.0, *(float(a) for a in np.round(np.linspace(*args.line_range, args.line_points), 9))})
    measure = dict(eigs=args.eigs, iters=args.iters, probes=args.probes, key=key, progress=progress)

    def model_numbers(objective):
        with objective.context():
            numbers = {"loss": objective.loss()}
            if args.eigs or args.probes:
                numbers.update(objective.sharpness(**measure))
        return numbers

    a = Objective(cfg, params, batches, paths, mesh, **kw)
    result = {"model": args.model, "against": args.against, "config": str(config_file), "params": args.params,
              "paths": ["/".join(p) for p in a.paths], "param_count": a.size, "batches": len(batches),
              "batch_size": batch_size, "mesh": dict(a.mesh.shape), "compute_dtype": args.compute_dtype,
              "seed": args.seed, "models": {args.model: model_numbers(a)}, "lines": {}}
    if args.surface:
        with a.context():
            result["surface"] = a.surface(points=args.surface_points, span=args.surface_span, key=key,
                                          progress=progress)
    params, a = a.params, None  # placed on the mesh once; the objectives below reuse them
    for spec in args.against:
        other_cfg, other, _ = export.load_model(spec)
        if jax.tree.map(np.shape, other) != jax.tree.map(np.shape, params):
            raise ConfigError(f"--against {spec}: another architecture than {args.model} ({other_cfg.num_hidden_layers}"
                              f" layers, hidden {other_cfg.hidden_size}); compare models of one architecture")
        line = Objective(cfg, params, batches, None if args.line_params == "all" else paths, mesh, **kw)
        with line.context():
            curve = line.line(other, points, progress)
        result["lines"][spec] = {"params": args.line_params, "points": curve, "loss_a": dict(curve)[0.0],
                                 "loss_b": dict(curve)[1.0]}
        del line
        result["models"][spec] = model_numbers(Objective(cfg, other, batches, paths, mesh, **kw))
    result["seconds"] = round(time.perf_counter() - start, 1)
    if jax.process_index() == 0:
        _write(args, result, inputs)
        for spec, numbers in result["models"].items():
            print(summary(spec, numbers))
        print(f"wrote {Path(args.out) / 'landscape.json'}")
    return 0


def summary(name: str, numbers: dict) -> str:
    """One line: a model's loss, top eigenvalues and trace (the demo prints these per arm)."""
    line = f"{name}: loss {numbers['loss']:.5f}"
    if "top_eigenvalues" in numbers:
        line += ", top Hessian eigenvalues " + ", ".join(f"{e:.5g}" for e in numbers["top_eigenvalues"])
    if "trace" in numbers:
        line += f", trace {numbers['trace']:.5g}" + (f" +- {numbers['trace_stderr']:.2g}" if numbers["trace_stderr"]
                                                      else "")
    return line


def _label(spec: str) -> str:
    """A short name for plots: the last two path components (exports end in .../NAME/hf)."""
    return "/".join(Path(spec).parts[-2:])


def _write(args, result: dict, inputs) -> None:
    name = _label(args.model)
    with outputs.new_dir(args.out, inputs=inputs, overwrite=args.overwrite, command="landscape") as tmp:
        (tmp / "landscape.json").write_text(json.dumps(result, indent=2) + "\n")
        if result["lines"]:
            plot_lines({_label(s): v["points"] for s, v in result["lines"].items()}, tmp / "lines.png",
                       f"dev loss from A = {name} ({result['batches']} batches)")
        if "surface" in result:
            plot_surface(result["surface"], tmp / "surface.png", f"{name}: {result['param_count']} params")
        if args.eigs or args.probes:
            plot_sharpness(result["models"], tmp / "sharpness.png", f"Hessian over {result['params']} params")
