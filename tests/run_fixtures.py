"""A tiny offline MFT setup for tests: a BPE tokenizer, a random Llama saved as a HF checkpoint, chat data."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mft_jax import config, convert, data, model, optim, sharding, step as step_lib
from mft_jax.data import train_bpe_tokenizer
from mft_jax.state import StateLayout


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_model_dir(root: Path, *, num_layers: int = 4, hidden: int = 32, dtype=jnp.float32, seed: int = 0,
                   **switches) -> Path:
    """A random tiny Llama (or, with `switches` such as model_type="qwen3", qk_norm=True, another family) with its
    tokenizer, as a HF checkpoint directory."""
    root.mkdir(parents=True, exist_ok=True)
    texts = [m["content"] for r in chat_rows(300, seed=99) for m in r["messages"]]
    tok_dir = train_bpe_tokenizer(texts, 128, root / "tokenizer")
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]) + 8
    cfg = config.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                             dtype=jnp.dtype(dtype).name, **switches)
    params = model.init_params(cfg, jax.random.key(seed), dtype)
    return convert.save_hf(cfg, params, root / "hf", tokenizer_dir=tok_dir)


def make_run(root: Path, model_dir: Path, n_train: int = 64, **sections) -> config.RunConfig:
    root.mkdir(parents=True, exist_ok=True)
    data_file = write_jsonl(root / "train.jsonl", chat_rows(n_train))
    dev_file = write_jsonl(root / "dev.jsonl", chat_rows(16, seed=1))
    raw = {
        "run_dir": str(root / "run"),
        "model": {"path": str(model_dir), "compute_dtype": "float32"},
        "mask": {"masked_layers": [1, 2], "keep_attn": 0.9, "keep_mlp": 0.8},
        "data": {"train": {str(data_file): None}, "dev": {str(dev_file): None}, "max_seq_length": 32,
                 "cache_dir": str(root / "cache")},
        "optim": {"lr": 0.05, "warmup_ratio": 0.0},
        "train": {"batch_size": 16, "micro_batch_size": 8, "max_steps": 5, "log_every": 1},
        "ckpt": {"save_every": 2, "keep": 10},
        "mesh": {"data": -1},
    }
    for section, values in sections.items():
        raw.setdefault(section, {})
        if isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    return config.from_dict(raw, verbose=False)


class StepSetup:
    """A run's state layout and jitted step on a mesh, built as the training loop builds them."""

    def __init__(self, run, cfg, mesh, param_shardings, total_steps):
        self.run, self.cfg, self.mesh, self.param_shardings = run, cfg, mesh, param_shardings
        self.layout = StateLayout.for_run(run, cfg, mesh, param_shardings, total_steps=total_steps)
        self.loss = step_lib.make_loss(run, cfg, self.layout)
        self.schedule = optim.lr_schedule(run.optim, total_steps)

    def init_state(self, params, key):
        return self.layout.init(params, key)

    def jit_step(self, params):
        return step_lib.jit_train_step(self.layout, self.loss, self.schedule, self.run.train.seed, params,
                                       self.run.train.grad_reduce)


def global_batch(batch: dict, mesh) -> dict:
    """Host [M, B, L] arrays -> global arrays laid out as the step takes them."""
    return data.to_global_batch(batch, sharding.batch_sharding(mesh))
