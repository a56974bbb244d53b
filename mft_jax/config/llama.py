"""`LlamaConfig`: every field of a Hugging Face `config.json` that changes the math, for Llama and the families
that are Llama with switches (Mistral, Qwen2 / 2.5, Qwen3: `mft_jax.config.families`).

It reads the format transformers 4.x wrote (`rope_theta`, `rope_scaling`, `torch_dtype`) and the one
transformers 5 writes (`rope_parameters`, `dtype`), and writes the 4.x format, which both generations load.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from mft_jax.config import families
from mft_jax.config.errors import ConfigError

# The seven projections of a decoder layer (the matrices MFT masks and LoRA adapts), each with the module that
# holds it: param path (f"layers_{i}", PROJECTIONS[name], name, "kernel").
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = {**{name: "self_attn" for name in ATTN_PROJ}, **{name: "mlp" for name in MLP_PROJ}}

_DTYPES = ("float32", "bfloat16", "float16")
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaConfig:
    """A Llama-family architecture. Field names follow Hugging Face's `LlamaConfig`; the switches after
    `pad_token_id` are the other families' (see mft_jax.config.families)."""

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
    model_type: str = "llama"  # the family (config.json's model_type), written back on export
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2); attention_bias is on q, k, v and o
    qk_norm: bool = False  # RMSNorm over each head of q and k before rope (Qwen3)
    sliding_window: int | None = None  # a query sees this many keys (itself included) on the sliding layers
    max_window_layers: int = 0  # layers from this one on slide (Qwen's max_window_layers; 0: every layer)

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
        families.family(self.model_type)
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"model config: sliding_window must be a positive integer or null, got "
                              f"{self.sliding_window!r}")
        if not isinstance(self.max_window_layers, int) or self.max_window_layers < 0:
            raise ConfigError(f"model config: max_window_layers must be an integer >= 0, got "
                              f"{self.max_window_layers!r}")
        families.check_switches(self)
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

    def window(self, layer: int) -> int | None:
        """The sliding window of decoder layer `layer`, or None (full causal attention)."""
        return self.sliding_window if layer >= self.max_window_layers else None

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
        family = families.family(model_type)
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json: hidden_act {act!r} is not supported; the {model_type} family uses "
                              f"'silu'")
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
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            dtype=dtype,
            model_type=model_type,
            **family.read(hf),
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
        if self.model_type != "llama":  # the family's own keys in place of Llama's biases
            family = families.family(self.model_type)
            del out["attention_bias"], out["mlp_bias"]
            out.update(architectures=[family.architecture], model_type=family.model_type, **family.write(self))
        return out
