"""Configuration: the Llama architecture (`LlamaConfig`) and the run config (`RunConfig`).

`LlamaConfig` holds every field of a Hugging Face Llama `config.json` that changes the math. It reads the
format transformers 4.x wrote (`rope_theta`, `rope_scaling`, `torch_dtype`) and the one transformers 5
writes (`rope_parameters`, `dtype`), and writes the 4.x format, which both generations load.

`RunConfig` is the YAML run config. Every section is a dataclass; unknown keys and out-of-range values fail
with a `ConfigError` that names the key and the fix, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and says how to fix it."""


# --------------------------------------------------------------------------------------------------------
# Llama architecture
# --------------------------------------------------------------------------------------------------------

_DTYPES = ("float32", "bfloat16", "float16")
_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA_MODEL_TYPES = ("llama",)


@dataclass(frozen=True)
class LlamaConfig:
    """A Llama-family architecture. Field names follow Hugging Face's `LlamaConfig`."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: equal to num_attention_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"}.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    dtype: str = "float32"  # the checkpoint's storage dtype

    def __post_init__(self):
        # Normalise derived fields so that equal architectures compare equal.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_attention_heads, 1))
        if isinstance(self.eos_token_id, list) and len(self.eos_token_id) == 1:
            object.__setattr__(self, "eos_token_id", self.eos_token_id[0])
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "default") == "default":
            object.__setattr__(self, "rope_scaling", None)
        self.validate()

    def validate(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"model config: rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model config: rope_theta must be > 0, got {self.rope_theta}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"model config: dtype {self.dtype!r} is not one of {_DTYPES}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in _ROPE_TYPES:
                raise ConfigError(
                    f"model config: rope_scaling type {rope_type!r} is not supported; supported: "
                    f"{_ROPE_TYPES} (set rope_scaling to null for plain RoPE)")
            needed = {"linear": ("factor",),
                      "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings")}[rope_type]
            missing = [k for k in needed if k not in self.rope_scaling]
            if missing:
                raise ConfigError(f"model config: rope_scaling of type {rope_type!r} needs {missing}")

    def __hash__(self):  # hashable despite the rope_scaling dict, so jit can take it as a static argument
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Reads a Hugging Face `config.json` dict (transformers 4.x or 5.x format)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in _LLAMA_MODEL_TYPES:
            raise ConfigError(
                f"config.json: model_type {model_type!r} is not supported; mft_jax converts Llama-family "
                f"checkpoints (model_type 'llama': Llama 2, 3, 3.1, 3.2 and their fine-tunes)")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json: hidden_act {act!r} is not supported; Llama uses 'silu'")
        # transformers 5 keeps rope_theta inside rope_parameters; 4.x has rope_theta + rope_scaling.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        rope_scaling = None
        if rope:
            rope = dict(rope)
            if "type" in rope and "rope_type" not in rope:
                rope["rope_type"] = rope.pop("type")
            rope_theta = rope.pop("rope_theta", rope_theta)
            rope.pop("type", None)
            rope_type = rope.get("rope_type", "default")
            if rope_type not in _ROPE_TYPES:
                raise ConfigError(
                    f"config.json: rope type {rope_type!r} (rope_scaling / rope_parameters) is not supported; "
                    f"supported: {_ROPE_TYPES}")
            if rope_type != "default":
                rope_scaling = rope
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        if dtype not in _DTYPES:
            raise ConfigError(f"config.json: dtype {dtype!r} is not supported; use one of {_DTYPES}")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            dtype=dtype,
        )

    def to_hf(self) -> dict:
        """A `config.json` dict in the transformers 4.x layout, which transformers 4.x and 5.x both load."""
        out = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": self.dtype,
        }
        return out


# --------------------------------------------------------------------------------------------------------
# Run config sections
# --------------------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    path: str = ""  # Hugging Face checkpoint directory (config.json + *.safetensors)
    dtype: str | None = None  # storage dtype of the frozen weights; None: the checkpoint's
    compute_dtype: str = "bfloat16"
    attention: str = "auto"  # auto | xla | cudnn
    remat: str = "none"  # none | full | dots: rematerialisation policy of each decoder layer
    # > 0: the loss computes the LM head and cross-entropy this many positions at a time, recomputing them in
    # the backward pass, so no [B, L, V] fp32 logits exist (for large vocabularies; costs one more head matmul)
    loss_chunk: int = 0

    def validate(self):
        _choice("model.compute_dtype", self.compute_dtype, _DTYPES)
        if self.dtype is not None:
            _choice("model.dtype", self.dtype, _DTYPES)
        _choice("model.attention", self.attention, ("auto", "xla", "cudnn"))
        _choice("model.remat", self.remat, ("none", "full", "dots"))
        if not (isinstance(self.loss_chunk, int) and self.loss_chunk >= 0):
            raise ConfigError(f"model.loss_chunk must be an integer >= 0 (0 = off), got {self.loss_chunk!r}")


@dataclass
class MaskConfig:
    """Which matrices MFT masks and how (../shared/docs/MFT.md, "Exact semantics")."""

    mode: str = "local"  # local: per-matrix top-k of |score|; global: score >= threshold
    modules: str = "both"  # attn | mlp | both
    masked_layers: list[int] = field(default_factory=list)  # YAML also takes "4-7" or "0-3,20"
    keep_attn: float = 0.9  # fraction of each attention matrix kept (1 - mask ratio)
    keep_mlp: float = 0.9
    init: str = "normal"  # normal: N(0, std) scores; magnitude: scores = |W|
    std: float = 0.02
    threshold_attn: float = 0.0  # global mode only
    threshold_mlp: float = 0.0

    # The reference code's names, accepted with a printed note of what they mean.
    ALIASES = {
        "sparsity_attn": "keep_attn", "sparsity_mlp": "keep_mlp", "subnet_mode": "modules",
        "subnet_type": "mode", "layers": "masked_layers", "keep": ("keep_attn", "keep_mlp"),
    }
    ALIAS_NOTES = {
        "sparsity_attn": "the reference's sparsity_attn is the fraction KEPT: sparsity_attn 0.9 = keep 90%",
        "sparsity_mlp": "the reference's sparsity_mlp is the fraction KEPT: sparsity_mlp 0.9 = keep 90%",
        "subnet_mode": "subnet_mode is the reference's name for mask.modules (attn | mlp | both)",
        "subnet_type": "subnet_type is the reference's name for mask.mode (local | global)",
    }

    def validate(self):
        _choice("mask.mode", self.mode, ("local", "global"))
        _choice("mask.modules", self.modules, ("attn", "mlp", "both"))
        _choice("mask.init", self.init, ("normal", "magnitude"))
        for name in ("keep_attn", "keep_mlp"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise ConfigError(f"mask.{name} must be in (0, 1] (the fraction of weights kept), got {value!r}")
        if not self.std > 0:
            raise ConfigError(f"mask.std must be > 0, got {self.std}")
        if not self.masked_layers and self.mode == "local":
            raise ConfigError("mask.masked_layers is empty; list the decoder layers to mask, e.g. [4, 5, 6, 7] "
                              "or \"4-7\"")
        if len(set(self.masked_layers)) != len(self.masked_layers):
            raise ConfigError(f"mask.masked_layers has duplicates: {self.masked_layers}")
        if any(layer < 0 for layer in self.masked_layers):
            raise ConfigError(f"mask.masked_layers must be >= 0, got {self.masked_layers}")

    def check_against(self, cfg: LlamaConfig):
        bad = [layer for layer in self.masked_layers if layer >= cfg.num_hidden_layers]
        if bad:
            raise ConfigError(f"mask.masked_layers {bad} out of range: the model has {cfg.num_hidden_layers} "
                              f"decoder layers (0..{cfg.num_hidden_layers - 1})")


@dataclass
class DataConfig:
    """SFT data: sources, chat template, tokenization, batching (see mft_jax.data)."""

    # dataset_mixer: {source: rows}. A source is a local .jsonl / .json / .parquet path or a Hugging Face dataset
    # name (org/name: split train; org/name:split; org/name:config:split); rows is how many rows to take after
    # a seeded shuffle (null: all of them). Row schemas: see mft_jax.data.schemas.
    train: dict[str, int | None] = field(default_factory=dict)
    dev: dict[str, int | None] = field(default_factory=dict)  # held-out loss and checkpoint selection
    tokenizer: str | None = None  # a HF tokenizer directory; None: the model directory
    template: str = "tulu"  # tulu | chat_template | plain
    max_seq_length: int = 4096
    add_bos: bool = False
    packing: bool = False  # several examples per row (segment ids keep them apart)
    loss_reduction: str = "example"  # example: mean of per-example means (the reference); token
    shuffle: bool = True
    seed: int = 42
    cache_dir: str | None = None  # tokenized TFDS cache; None: ~/.cache/mft_jax/data
    num_workers: int = 0  # grain worker processes
    # Fail when a source drops more than this fraction of the rows taken from it (bad schema, no assistant
    # turn, too long for max_seq_length, ...). Not part of the cache key: checked on every build and cache hit.
    max_drop_fraction: float = 0.01

    def validate(self):
        _choice("data.template", self.template, ("tulu", "chat_template", "plain"))
        _choice("data.loss_reduction", self.loss_reduction, ("example", "token"))
        if not (isinstance(self.max_seq_length, int) and self.max_seq_length >= 2):
            raise ConfigError(f"data.max_seq_length must be an integer >= 2, got {self.max_seq_length!r}")
        for split in ("train", "dev"):
            for source, rows in getattr(self, split).items():
                if rows is not None and (not isinstance(rows, int) or rows <= 0):
                    raise ConfigError(f"data.{split}[{source!r}]: rows must be a positive integer or null (all), "
                                      f"got {rows!r}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not (isinstance(self.max_drop_fraction, (int, float)) and 0 <= self.max_drop_fraction <= 1):
            raise ConfigError(f"data.max_drop_fraction must be a number in [0, 1], got {self.max_drop_fraction!r}")


@dataclass
class OptimConfig:
    lr: float = 2e-5
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "linear"  # linear decay to 0 after warm-up | constant
    clip_grad_norm: float | None = None

    def validate(self):
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ConfigError(f"optim.b1 and optim.b2 must be in [0, 1), got {self.b1}, {self.b2}")
        _choice("optim.schedule", self.schedule, ("linear", "constant"))
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(f"optim.clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}")


@dataclass
class TrainConfig:
    mode: str = "mft"  # mft: train mask scores; fft: train the weights (the baseline)
    batch_size: int = 128  # sequences per optimizer step (global)
    micro_batch_size: int | None = None  # sequences per forward/backward; None: batch_size
    epochs: float = 2.0
    max_steps: int | None = None  # overrides epochs when set
    # false: an epoch's last, partial batch is trained on (its empty rows weigh 0), as the reference does
    drop_last: bool = False
    seed: int = 42
    log_every: int = 10
    eval_every: int | None = None  # dev-loss evaluation period in steps; None: only at the end

    def validate(self):
        _choice("train.mode", self.mode, ("mft", "fft"))
        if self.batch_size <= 0:
            raise ConfigError(f"train.batch_size must be > 0, got {self.batch_size}")
        micro = self.micro_batch_size or self.batch_size
        if micro <= 0 or self.batch_size % micro:
            raise ConfigError(f"train.micro_batch_size ({micro}) must divide train.batch_size ({self.batch_size})")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"train.max_steps must be > 0 or null, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise ConfigError(f"train.epochs must be > 0 when train.max_steps is null, got {self.epochs}")
        if self.log_every <= 0:
            raise ConfigError(f"train.log_every must be > 0, got {self.log_every}")


@dataclass
class MeshConfig:
    # Device-mesh axis sizes; one may be -1 (fills the remaining devices).
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ConfigError(f"mesh: axis sizes must be positive, with at most one -1 (fill); got "
                              f"data={self.data} fsdp={self.fsdp} tensor={self.tensor}")


@dataclass
class CheckpointConfig:
    save_every: int = 500  # steps; a final checkpoint is always written
    keep: int = 3  # last K checkpoints kept
    async_save: bool = True

    def validate(self):
        if self.save_every <= 0 or self.keep <= 0:
            raise ConfigError(f"ckpt.save_every and ckpt.keep must be > 0, got {self.save_every}, {self.keep}")


@dataclass
class EvalConfig:
    """Benchmark settings; each task decodes with its own olmes settings unless max_new_tokens overrides them,
    in a context window of max_length tokens (olmes's model default, 2048)."""

    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    max_new_tokens: int | None = None  # None: each task's own (gsm8k 512, humaneval 512, ifeval 1280, math 1024)
    max_length: int = 2048
    batch_size: int = 8

    def validate(self):
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"eval.limit must be > 0 or null, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ConfigError(f"eval.max_new_tokens must be > 0 or null, got {self.max_new_tokens}")
        if self.max_length <= 0 or (self.max_new_tokens or 0) >= self.max_length:
            raise ConfigError(f"eval.max_length ({self.max_length}) must exceed eval.max_new_tokens "
                              f"({self.max_new_tokens}); raise max_length")


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate()
        if self.train.mode == "fft":
            return
        if self.mask.mode == "local" and not self.mask.masked_layers:
            raise ConfigError("mask.masked_layers is empty; MFT needs at least one layer to mask")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------

def parse_layers(value: Any, key: str = "mask.masked_layers") -> list[int]:
    """`[4, 5]`, `"4-7"`, `"0-3,20"`, `7` -> a sorted list of ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, str):
        layers: list[int] = []
        for part in value.replace(" ", "").split(","):
            if not part:
                continue
            try:
                if "-" in part:
                    lo, hi = part.split("-")
                    layers.extend(range(int(lo), int(hi) + 1))
                else:
                    layers.append(int(part))
            except ValueError:
                raise ConfigError(f"{key}: cannot read {value!r}; write a list or ranges like \"4-7\" or "
                                  f"\"0-3,20\"") from None
        return layers
    if isinstance(value, (list, tuple)):
        out: list[int] = []
        for item in value:
            out.extend(parse_layers(item, key))
        return out
    raise ConfigError(f"{key}: expected a list of layer indices or a range string, got {value!r}")


def _choice(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{key} is {value!r}; choose one of {list(options)}")


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, (args[0] if len(args) == 1 else typing.Union[tuple(args)])
    return False, tp


def _coerce(key: str, value: Any, tp) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be null")
    tp = inner
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)  # YAML reads "2e-5" as a string
            except (TypeError, ValueError):
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if math.isnan(value):
            raise ConfigError(f"{key} is NaN")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(f"{key}[{k!r}]", v, val_tp) for k, v in value.items()}
    return value


def _build(cls, raw: dict, prefix: str, notes: list[str]):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    aliases = getattr(cls, "ALIASES", {})
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key in aliases and key not in names:
            targets = aliases[key]
            note = getattr(cls, "ALIAS_NOTES", {}).get(key)
            if note:
                notes.append(f"note: {full}: {note}")
            for target in (targets if isinstance(targets, tuple) else (targets,)):
                kwargs[target] = value
            continue
        if key not in names:
            close = difflib.get_close_matches(key, names + list(aliases), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {names}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        kwargs[key] = value
    for key, value in list(kwargs.items()):
        full = f"{prefix}{key}"
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{full}.", notes)
        elif key == "masked_layers":
            kwargs[key] = parse_layers(value, full)
        elif key == "mode" and cls is MaskConfig and value in ("local", "global"):
            kwargs[key] = value
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def _set_override(tree: dict, assignment: str) -> None:
    import yaml

    key, eq, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        raise ConfigError(f"override {assignment!r} must look like section.key=value, e.g. train.max_steps=10")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                          f"{key}='\"...\"'") from None
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = value


def from_dict(raw: dict, overrides: list[str] = (), verbose: bool = True) -> RunConfig:
    """Builds and validates a `RunConfig` from a nested dict plus `section.key=value` overrides."""
    import copy

    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"a run config is a mapping of sections (model:, mask:, data:, ...), got "
                          f"{type(raw).__name__} {str(raw)[:60]!r}")
    tree = copy.deepcopy(raw or {})
    for assignment in overrides:
        _set_override(tree, assignment)
    notes: list[str] = []
    cfg = _build(RunConfig, tree, "", notes)
    if verbose:
        for note in notes:
            print(note)
    cfg.validate()
    return cfg


def read_yaml(path: str | Path, what: str = "config file"):
    """The parsed YAML file at `path`. A missing file, a directory, binary content or a YAML syntax error (as
    file:line:column) is one line naming it (`ConfigError`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} " + ("is a directory; give the YAML file" if path.is_dir()
                                                      else "does not exist"))
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (YAML) file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
        raise ConfigError(f"{where}: YAML syntax error: {problem or str(e).splitlines()[0]}") from None


def load(path: str | Path, overrides: list[str] = (), verbose: bool = True) -> RunConfig:
    """Reads a YAML run config (`read_yaml`), applies `section.key=value` overrides, and validates it; a bad key
    or value is one line naming the file and the key (`ConfigError`)."""
    raw = read_yaml(path)
    try:
        return from_dict(raw, overrides, verbose)
    except ConfigError as e:
        raise type(e)(f"{path}: {e}") from None
