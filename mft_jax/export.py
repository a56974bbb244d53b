"""Export a run: a bit-packed masks file and a dense masked Hugging Face model.

masks.safetensors holds, per masked matrix, its mask in Hugging Face layout ([out, in], row-major) packed
8 weights per byte (uint8, most significant bit first) under the HF tensor name; `__metadata__` records
the format, each matrix's shape and keep fraction, the base model and the step. It reproduces the training
mask exactly (computed from the fp32 scores by the same exact top-k), and `apply_masks_file` rebuilds the
dense masked model from the base checkpoint, so the file is a small shareable delta (1 bit per masked weight).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from mft_jax import checkpoint as ckpt_lib
from mft_jax import config as config_lib
from mft_jax import convert, masking, model, sharding
from mft_jax.config import LlamaConfig, MaskConfig, RunConfig

MASKS_FORMAT = "mft_jax.masks/1"


# --------------------------------------------------------------------------------------------------------
# The masks file
# --------------------------------------------------------------------------------------------------------

def save_masks(path: str | Path, masks, mask_cfg: MaskConfig, metadata: dict | None = None) -> Path:
    """Writes bool masks (our [in, out] kernel layout) as a bit-packed safetensors file in HF layout."""
    path = Path(path)
    tensors, shapes, keeps = [], {}, {}
    for p, mask in masking.flatten(masks).items():
        hf_mask = np.asarray(jax.device_get(mask), dtype=bool).T  # HF layout [out, in]
        bits = np.packbits(hf_mask.reshape(-1))
        name = convert.hf_name(p)
        tensors.append((name, bits.shape, np.uint8, lambda bits=bits: bits))
        shapes[name] = list(hf_mask.shape)
        keeps[name] = masking.keep_fraction(p, mask_cfg)
    meta = {"format": MASKS_FORMAT, "shapes": json.dumps(shapes), "keep": json.dumps(keeps),
            "mask": json.dumps(dataclasses.asdict(mask_cfg))}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tmp = path.with_name(path.name + ".tmp")
    convert.write_safetensors(tmp, tensors, metadata=meta)
    tmp.replace(path)
    return path


def load_masks(path: str | Path) -> tuple[dict, dict]:
    """Reads a masks file -> (bool masks in our [in, out] layout keyed like the params, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"masks file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(header_len)).get("__metadata__", {})
    if meta.get("format") != MASKS_FORMAT:
        raise ValueError(f"{path}: not an mft_jax masks file (format {meta.get('format')!r}, "
                         f"expected {MASKS_FORMAT!r})")
    shapes = json.loads(meta["shapes"])
    refs = convert.read_safetensors_index(path)
    flat = {}
    for name, shape in shapes.items():
        bits = np.asarray(refs[name].load())
        hf_mask = np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape)
        flat[_our_path(name)] = hf_mask.T
    return masking.unflatten(flat), meta


def _our_path(hf_name: str) -> tuple[str, ...]:
    """'model.layers.4.mlp.up_proj.weight' -> ('layers_4', 'mlp', 'up_proj', 'kernel')."""
    parts = hf_name.split(".")
    assert parts[0] == "model" and parts[1] == "layers" and parts[-1] == "weight", hf_name
    return (f"layers_{parts[2]}", parts[3], parts[4], "kernel")


def apply_masks_file(base: str | Path, masks_file: str | Path, out: str | Path, dtype=None) -> Path:
    """Rebuilds the dense masked model from a base HF checkpoint and a masks file."""
    cfg, params = convert.load_hf(base, dtype=dtype)
    masks, _ = load_masks(masks_file)
    for p, m in masking.flatten(masks).items():
        try:
            w = masking.get_path(params, p)
        except KeyError:
            raise ValueError(f"{masks_file}: mask for {convert.hf_name(p)} but the base model has no such "
                             f"matrix") from None
        if w.shape != m.shape:
            raise ValueError(f"{masks_file}: mask for {convert.hf_name(p)} has shape {list(m.shape[::-1])}, "
                             f"the base model's weight {list(w.shape[::-1])}")
    return convert.save_hf(cfg, masking.apply_masks(params, masks), out, tokenizer_dir=_tokenizer_dir(base))


def _tokenizer_dir(path) -> str | None:
    path = Path(path)
    return str(path) if any(path.glob("tokenizer*")) else None


# --------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------

def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml; is this a run directory written by `mft-jax train`?")
    return config_lib.load(path, verbose=False)


def restore_run(run_dir: str | Path, step: int | None = None, mesh=None):
    """(run config, model config, base params at their stored dtype, Setup, state with masks) at `step`."""
    from mft_jax import train

    run = load_run_config(run_dir)
    cfg = convert.load_config(run.model.path)
    mesh = mesh or sharding.make_mesh(config_lib.MeshConfig(data=-1))
    param_shardings = sharding.param_shardings(cfg, mesh)
    _, params = convert.load_any(run.model.path, shardings=param_shardings)
    setup = train.Setup(run, cfg, mesh, param_shardings, total_steps=1, micro_batches=1)
    checkpointer = ckpt_lib.Checkpointer(Path(run_dir) / "checkpoints")
    try:
        state, _ = checkpointer.restore(step, setup.checkpoint_target(params), data=False)
    finally:
        checkpointer.close()
    with jax.set_mesh(mesh):
        state = setup.with_masks(state)
    return run, cfg, params, setup, state


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None, baseline: str | None = None,
               seed: int = 0) -> dict:
    """Writes OUT/masks.safetensors (MFT or a baseline) and OUT/hf (the dense masked model).

    baseline: None (the run's learned masks), "random" (Bernoulli keep) or "magnitude" (smallest |W| dropped),
    at the run's layers and keep ratios; for a baseline, RUN_DIR may also be a run config YAML file.
    On several processes every process calls it (the arrays may span them); process 0 writes the files.
    """
    out = Path(out)
    writer = jax.process_index() == 0
    if baseline is not None:
        run = (config_lib.load(run_dir, verbose=False) if Path(run_dir).is_file() else load_run_config(run_dir))
        cfg, params = convert.load_any(run.model.path)
        if baseline == "random":
            masks = masking.random_masks(jax.random.key(seed), params, run.mask, cfg)
        elif baseline == "magnitude":
            masks = masking.magnitude_masks(params, run.mask, cfg)
        else:
            raise ValueError(f"baseline {baseline!r}: choose random or magnitude")
        meta = {"baseline": baseline, "seed": seed}
        effective, fft = masking.apply_masks(params, masks), False
    else:
        run, cfg, params, setup, state = restore_run(run_dir, step)
        step = int(state["step"])
        meta = {"run": str(Path(run_dir).absolute()), "step": step}
        fft = run.train.mode == "fft"
        masks = None if fft else state["masks"]
        effective = setup.effective_params(params, state)
    meta["base_model"] = str(Path(run.model.path).absolute())
    result = {"hf": str(out / "hf"), **meta}
    masks, effective = _to_host(masks), _to_host(effective)
    if masks is not None:
        result["masks"] = str(out / "masks.safetensors")
        result.update({k: float(v) for k, v in masking.mask_stats(masks).items()})
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        if masks is not None:
            save_masks(out / "masks.safetensors", masks, run.mask, meta)
        convert.save_hf(cfg, effective, out / "hf", dtype=cfg.dtype,
                        tokenizer_dir=run.data.tokenizer or _tokenizer_dir(run.model.path))
        (out / "export.json").write_text(json.dumps(result, indent=2))
    if jax.process_count() > 1:  # no process returns before the files exist
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mft_jax.export_run")
    return result


def _to_host(tree):
    """Arrays this process cannot read whole (sharded across processes) gathered into numpy; the others are
    left as they are (the writers fetch them one at a time). Every process must call it with the same tree."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return None if tree is None else jax.tree.map(one, tree)


def load_model(spec: str) -> tuple[LlamaConfig, dict, str | None]:
    """A HF checkpoint directory, or RUN_DIR[:STEP] with the run's masks applied on the fly (no export).

    Returns (model config, params to run, tokenizer directory)."""
    path, _, step = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if (Path(path) / "config.yaml").is_file() and (Path(path) / "checkpoints").is_dir():
        run, cfg, params, setup, state = restore_run(path, int(step) if step else None)
        return cfg, setup.effective_params(params, state), run.data.tokenizer or _tokenizer_dir(run.model.path)
    cfg, params = convert.load_any(path)
    return cfg, params, _tokenizer_dir(path)
