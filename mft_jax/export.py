"""Export a run: a bit-packed masks file and a dense masked Hugging Face model.

masks.safetensors holds, per masked matrix, its mask in Hugging Face layout ([out, in], row-major) packed
8 weights per byte (uint8, most significant bit first) under the HF tensor name; `__metadata__` records
the format, each matrix's shape and keep fraction, the base model and the step. It reproduces the training
mask exactly (computed from the fp32 scores by the same exact top-k), and `apply_masks_file` rebuilds the
dense masked model from the base checkpoint, so the file is a small shareable delta (1 bit per masked weight).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

import safetensors
import safetensors.numpy

from mft_jax import checkpoint as ckpt_lib
from mft_jax import config as config_lib
from mft_jax import baselines, convert, masking, model, outputs, sharding, storage
from mft_jax.config import LlamaConfig, MaskConfig, RunConfig
from mft_jax.state import StateLayout
from mft_jax.train import check_trained_config
from mft_jax.trees import flatten, get_path, unflatten

MASKS_FORMAT = "mft_jax.masks/1"


# --------------------------------------------------------------------------------------------------------
# The masks file
# --------------------------------------------------------------------------------------------------------

def save_masks(path: str | Path, masks, mask_cfg: MaskConfig, metadata: dict | None = None) -> Path:
    """Writes bool masks (our [in, out] kernel layout) as a bit-packed safetensors file in HF layout."""
    path = storage.path(path)
    hf_masks = {convert.hf_name(p): np.asarray(jax.device_get(m), dtype=bool).T for p, m in flatten(masks).items()}
    packed = masking.pack(hf_masks)  # {(name,): (bits, [out, in])}
    keeps = {convert.hf_name(p): masking.keep_fraction(p, mask_cfg) for p in flatten(masks)}
    meta = {"format": MASKS_FORMAT, "shapes": json.dumps({name: list(shape) for (name,), (_, shape) in packed.items()}),
            "keep": json.dumps(keeps), "mask": json.dumps(dataclasses.asdict(mask_cfg))}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tensors = {name: bits for (name,), (bits, _) in packed.items()}
    if storage.is_remote(path):  # one object write (atomic)
        storage.blob(str(path)).upload_from_string(safetensors.numpy.save(tensors, metadata=meta))
        return path
    tmp = path.with_name(path.name + ".tmp")
    safetensors.numpy.save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def base_fingerprint(params, paths) -> str:
    """16 hex digits identifying the base weights a mask was learned on: sha256 over a strided sample (up to 4096
    values) of each masked matrix, rounded to bf16, so that a bf16 copy of an fp32 base has the same one."""
    digest = hashlib.sha256()
    for path in paths:
        flat = np.asarray(jax.device_get(_to_host(get_path(params, path)))).reshape(-1)
        sample = flat[:: max(1, flat.size // 4096)].astype(ml_dtypes.bfloat16).astype(np.float32)
        digest.update("/".join(path).encode() + sample.tobytes())
    return digest.hexdigest()[:16]


def load_masks(path: str | Path) -> tuple[dict, dict]:
    """Reads a masks file -> (bool masks in our [in, out] layout keyed like the params, metadata).

    A file that is not ours, damaged or truncated fails with one line naming it (`CheckpointError`)."""
    path = storage.path(path)
    if not path.is_file():
        raise FileNotFoundError(f"masks file {str(path)!r} does not exist" if not path.exists() else
                                f"masks file {str(path)!r} is a directory; give the masks.safetensors file")
    try:
        local = storage.local_copy(path.parent, [path.name]) / path.name if storage.is_remote(path) else path
        with safetensors.safe_open(str(local), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != MASKS_FORMAT:
                raise convert.CheckpointError(
                    f"{path}: not an mft_jax masks file (format {meta.get('format')!r}, expected {MASKS_FORMAT!r}); "
                    f"give the masks.safetensors that `mft-jax export` wrote")
            bits = {name: f.get_tensor(name) for name in f.keys()}
    except safetensors.SafetensorError as e:
        raise convert.CheckpointError(f"{path}: damaged or truncated masks file ({e}); export it again") from None
    try:
        shapes = json.loads(meta["shapes"])
        if not isinstance(shapes, dict):
            raise ValueError("not a mapping")
    except (KeyError, TypeError, ValueError) as e:
        raise convert.CheckpointError(f"{path}: damaged masks file (metadata 'shapes' unreadable: {e}); "
                                      f"export it again") from None
    packed = {(name,): (_checked_bits(path, name, shape, bits.get(name)), tuple(shape))
              for name, shape in shapes.items()}
    hf_masks = masking.unpack(packed)
    return unflatten({_our_path(name, path): m.T for name, m in hf_masks.items()}), meta


def _checked_bits(path: Path, name: str, shape, bits) -> np.ndarray:
    """One mask's packed bits, after checking them against its declared shape."""
    if (not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape)):
        raise convert.CheckpointError(f"{path}: damaged masks file (mask {name} has shape {shape!r}); export it "
                                      f"again")
    count = shape[0] * shape[1]
    if bits is None or bits.dtype != np.uint8 or bits.shape != ((count + 7) // 8,):
        found = "missing" if bits is None else f"{bits.dtype.name} {list(bits.shape)}"
        raise convert.CheckpointError(f"{path}: damaged masks file (mask {name}: expected {(count + 7) // 8} "
                                      f"packed bytes, found {found}); export it again")
    return bits


def _our_path(hf_name: str, file: Path | None = None) -> tuple[str, ...]:
    """'model.layers.4.mlp.up_proj.weight' -> ('layers_4', 'mlp', 'up_proj', 'kernel')."""
    parts = hf_name.split(".")
    if not (len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[-1] == "weight"):
        raise convert.CheckpointError(f"{file}: damaged masks file (tensor {hf_name!r} is not a decoder-layer "
                                      f"weight); export it again")
    return (f"layers_{parts[2]}", parts[3], parts[4], "kernel")


def check_masks_fit(masks, cfg: LlamaConfig, masks_file, base) -> None:
    """Every mask names a matrix of the base model with the mask's shape; else one line with the count and
    first example of each kind of mismatch (checked on shapes only, before the base weights are read)."""
    shapes = model.param_shapes(cfg)
    missing, mismatched = [], []
    for p, m in flatten(masks).items():
        try:
            w = get_path(shapes, p)
        except (KeyError, TypeError):
            missing.append(convert.hf_name(p))
            continue
        if tuple(w.shape) != tuple(m.shape):
            mismatched.append(f"{convert.hf_name(p)}: mask {list(m.shape[::-1])}, base weight {list(w.shape[::-1])}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} for matrices the base model does not have (first: {missing[0]})")
    if mismatched:
        problems.append(f"{len(mismatched)} with other shapes (first: {mismatched[0]})")
    if problems:
        raise convert.CheckpointError(f"{masks_file} does not fit the base model {base} ({cfg.num_hidden_layers} "
                                      f"layers, hidden size {cfg.hidden_size}): of its {len(flatten(masks))} "
                                      f"masks, " + " and ".join(problems) + "; give the base model the masks were "
                                      "trained on")


def apply_masks_file(base: str | Path, masks_file: str | Path, out: str | Path, dtype=None, *,
                     overwrite: bool = False, allow_other_base: bool = False) -> Path:
    """Rebuilds the dense masked model from a base HF checkpoint and a masks file.

    Everything that needs only metadata (the output path, the base's config and file headers, the masks
    file and its fit to the base's shapes) is checked before the base weights are read. Masks learned on other
    weights of the same shapes (their file records the base's fingerprint) are refused unless
    `allow_other_base`."""
    outputs.check_target(out, inputs=[base, masks_file], overwrite=overwrite)
    cfg = convert.load_config(base)
    convert.tensor_index(base)  # validates every safetensors header against its file
    masks, meta = load_masks(masks_file)
    check_masks_fit(masks, cfg, masks_file, base)
    cfg, params = convert.load_hf(base, dtype=dtype)
    learned_on = meta.get("base_fingerprint")  # (files written before fingerprints have none)
    found = base_fingerprint(params, list(flatten(masks))) if learned_on and not allow_other_base else None
    if found is not None and found != learned_on:
        raise convert.CheckpointError(
            f"{masks_file} was learned on other weights (base {meta.get('base_model', '?')}, fingerprint "
            f"{learned_on}) than {base} (fingerprint {found}); give the base the masks were trained on, or pass "
            f"--allow-other-base to apply them anyway")
    return convert.save_hf(cfg, masking.apply_masks(params, masks), out, tokenizer_dir=_tokenizer_dir(base),
                           overwrite=overwrite, inputs=[base, masks_file], command="apply-masks")


def _tokenizer_dir(path) -> str | None:
    path = storage.path(path)
    return str(path) if any(path.glob("tokenizer*")) else None


# --------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------

def load_run_config(run_dir: str | Path) -> RunConfig:
    path = storage.path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml; is this a run directory written by `mft-jax train`?")
    return config_lib.load(path, verbose=False)


def restore_run(run_dir: str | Path, step: int | None = None, mesh=None):
    """(run config, model config, base params at their stored dtype, state layout, state) at `step`.

    The run's config, its checkpoint steps and the base model's metadata are checked before any weight is read."""
    run = load_run_config(run_dir)
    checkpoints = storage.path(run_dir) / "checkpoints"
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"{run_dir}: no checkpoints/ directory; train the run first (mft-jax train)")
    cfg = convert.load_config(run.model.path)
    mesh = mesh or sharding.make_mesh(config_lib.MeshConfig(data=-1))
    param_shardings = sharding.param_shardings(cfg, mesh)
    checkpointer = ckpt_lib.Checkpointer(checkpoints)
    try:
        steps = checkpointer.all_steps()
        if (step is None and not steps) or (step is not None and step not in steps):
            raise FileNotFoundError(f"{checkpoints}: no checkpoint{'' if step is None else f' for step {step}'}; "
                                    f"have steps {sorted(steps)}")
        _, params = convert.load_any(run.model.path, shardings=param_shardings)
        layout = StateLayout.for_run(run, cfg, mesh, param_shardings)
        step = max(steps) if step is None else step
        check_trained_config(_data_state(checkpoints / str(step)), run, f"{checkpoints}/{step}", extend=True)
        try:
            saved, _ = checkpointer.restore(step, layout.checkpoint_target(params), data=False)
        except (config_lib.ConfigError, convert.CheckpointError, OSError):
            raise
        except Exception as e:
            raise convert.CheckpointError(f"{checkpoints}: the checkpoint does not match the run's config.yaml or "
                                          f"is damaged ({convert.error_summary(e)})") from e
    finally:
        checkpointer.close()
    with jax.set_mesh(mesh):
        state = layout.restore(saved, params)
    return run, cfg, params, layout, state


def _data_state(step_dir: Path) -> dict | None:
    """Process 0's data-iterator record of a checkpoint (it also holds the config the step was trained with)."""
    try:
        return json.loads((step_dir / "data" / "process_0.json").read_text())
    except (OSError, ValueError):
        return None


def _export_inputs(run_dir: str | Path, run: RunConfig) -> list:
    """What an export reads, which its output may not be, hold or lie inside: the config file (or the run's
    config.yaml and checkpoints/; the output may lie elsewhere in the run directory), base model, tokenizer."""
    run_dir = storage.path(run_dir)
    reads = [run_dir] if run_dir.is_file() else [run_dir / "config.yaml", run_dir / "checkpoints"]
    return [*reads, run.model.path, run.data.tokenizer]


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None, baseline: str | None = None,
               seed: int = 42, *, overwrite: bool = False, calibration_tokens: int | None = None) -> dict:
    """Writes OUT/masks.safetensors (MFT or a baseline), OUT/hf (the dense masked model) and OUT/export.json.

    baseline: None (the run's learned masks), "random" (Bernoulli keep, `seed`), "magnitude" (smallest |W|
    dropped) or "wanda" (|W| * input norm over `calibration_tokens` training tokens, mft_jax.baselines), at the
    run's layers and keep ratios; for a baseline, RUN_DIR may also be a run config YAML file.
    OUT is checked before anything loads and written as a whole (`outputs.new_dir`): an existing OUT is
    replaced only if it is an earlier output of ours or with `overwrite`.
    On several processes every process calls it (the arrays may span them); process 0 writes the files.
    """
    out = storage.path(out)
    writer = jax.process_index() == 0
    if baseline not in (None, "random", "magnitude", "wanda"):
        raise config_lib.ConfigError(f"baseline {baseline!r}: choose random, magnitude or wanda")
    if calibration_tokens is not None and calibration_tokens <= 0:
        raise config_lib.ConfigError(f"--calibration-tokens must be > 0, got {calibration_tokens}")
    if baseline is not None and storage.path(run_dir).is_file():
        run = config_lib.load(run_dir, verbose=False)
    else:
        run = load_run_config(run_dir)
    inputs = _export_inputs(run_dir, run)
    outputs.check_target(out, inputs=inputs, overwrite=overwrite)
    tokenizer_dir = run.data.tokenizer or _tokenizer_dir(run.model.path)
    if tokenizer_dir is not None and not storage.path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"data.tokenizer {tokenizer_dir!r} (from {run_dir}) is not a directory")
    if baseline is not None:
        cfg, params = convert.load_any(run.model.path)
        meta = {"baseline": baseline, "seed": seed}
        if baseline == "random":
            masks = masking.random_masks(jax.random.key(seed), params, run.mask, cfg)
        elif baseline == "magnitude":
            masks = masking.magnitude_masks(params, run.mask, cfg)
        else:
            masks, meta = baselines.wanda_baseline(run, cfg, params, tokenizer_dir, calibration_tokens or
                                                   baselines.DEFAULT_CALIBRATION_TOKENS, verbose=writer)
        effective = masking.apply_masks(params, masks)
    else:
        run, cfg, params, layout, state = restore_run(run_dir, step)
        step = int(state.step)
        meta = {"run": str(storage.absolute(run_dir)), "step": step, "method": run.train.mode}
        masks = layout.method.masks(state.derived)
        effective = layout.dense(params, state)
    meta["base_model"] = str(storage.absolute(run.model.path))
    if masks is not None:  # what the masks were learned on: the base weights and the run's config
        meta["base_fingerprint"] = base_fingerprint(params, list(flatten(masks)))
        meta["run_config"] = json.dumps(run.to_dict())
    result = {"hf": str(out / "hf"), **meta}
    masks, effective = _to_host(masks), _to_host(effective)
    if masks is not None:
        result["masks"] = str(out / "masks.safetensors")
        result.update({k: float(v) for k, v in masking.mask_stats(masks).items()})
    if writer:
        with outputs.new_dir(out, inputs=inputs, overwrite=overwrite, command="export") as tmp:
            if masks is not None:
                save_masks(tmp / "masks.safetensors", masks, run.mask, meta)
            convert.save_hf(cfg, effective, tmp / "hf", dtype=cfg.dtype, tokenizer_dir=tokenizer_dir,
                            command="export")
            (tmp / "export.json").write_text(json.dumps(result, indent=2))
    if jax.process_count() > 1:  # no process returns before the files exist
        multihost_utils.sync_global_devices("mft_jax.export_run")
    return result


def _to_host(tree):
    """Arrays this process cannot read whole (sharded across processes) gathered into numpy; the others are
    left as they are (the writers fetch them one at a time). Every process must call it with the same tree."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return None if tree is None else jax.tree.map(one, tree)


def _split_spec(spec: str) -> tuple[str, str]:
    """RUN_DIR[:STEP] or a HF directory -> (path, step or "")."""
    if storage.is_remote(spec):  # gs://RUN:STEP: the step follows the last colon
        head, _, tail = spec.rpartition(":")
        return (head, tail) if tail.isdigit() and head != "gs" else (spec, "")
    return spec.partition(":")[::2] if not Path(spec).exists() else (spec, "")


def _is_run(path: str) -> bool:
    return (storage.path(path) / "config.yaml").is_file() and (storage.path(path) / "checkpoints").is_dir()


def model_mesh_config(spec: str) -> config_lib.MeshConfig:
    """The mesh a model is evaluated on by default: a run's own mesh section, else every device on `data`."""
    path, _ = _split_spec(spec)
    return load_run_config(path).mesh if _is_run(path) else config_lib.MeshConfig()


def load_model(spec: str, mesh=None) -> tuple[LlamaConfig, dict, str | None]:
    """A HF checkpoint directory, or RUN_DIR[:STEP] with the run's masks applied on the fly (no export).

    With `mesh`, the params are placed by the project's sharding rules (`sharding.param_shardings`: fsdp and
    tensor axes): a HF directory is read straight into those shards (each host reads only its devices' rows),
    a run is restored onto them. Returns (model config, params to run, tokenizer directory)."""
    path, step = _split_spec(spec)
    if _is_run(path):
        run, cfg, params, layout, state = restore_run(path, int(step) if step else None, mesh=mesh)
        return cfg, layout.dense(params, state), run.data.tokenizer or _tokenizer_dir(run.model.path)
    shardings = None if mesh is None else sharding.param_shardings(convert.load_config(path), mesh)
    cfg, params = convert.load_any(path, shardings=shardings)
    return cfg, params, _tokenizer_dir(path)
