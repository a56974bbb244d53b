"""The model families mft_jax reads and writes: Hugging Face `model_type` -> how its config.json maps onto the
switches of our one model (`LlamaConfig`), and back.

Every family here is a Llama with switches, so one model serves them all:
  llama    Llama 2 / 3 / 3.1 / 3.2: `attention_bias` (q, k, v, o), `mlp_bias`, rope scaling linear / llama3.
  mistral  Mistral 7B: `sliding_window` on every layer (null in v0.3, 4096 in v0.1).
  qwen2    Qwen2 and Qwen2.5: bias on q, k, v and none on o (`qkv_bias`); a sliding window only with
           `use_sliding_window`, on the layers from `max_window_layers` on; tied embeddings on the small ones.
  qwen3    Qwen3: RMSNorm over each head of q and k before rope (`qk_norm`), `head_dim` independent of
           hidden_size, `attention_bias` (q, k, v, o) as configured; the sliding window as qwen2.
A family is `read` (the switches from config.json) and `write` (the family's own keys for config.json, the
architecture class transformers builds). Adding one: docs/architecture.md, "How to add a family".
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from mft_jax.config.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the class written into config.json's "architectures"
    read: Callable[[dict], dict]  # config.json -> LlamaConfig switch fields
    write: Callable[[object], dict]  # LlamaConfig -> the family's own config.json keys
    summary: str
    switches: frozenset[str]  # the switches it may set (qk_norm on a llama cannot be written as a llama)
    required: frozenset[str] = frozenset()  # the ones it always sets


def _window_layers(hf: dict, use_window: bool) -> dict:
    """sliding_window / max_window_layers from a Qwen config.json: the window applies only with
    use_sliding_window, to layers >= max_window_layers; an explicit `layer_types` must say the same."""
    window = hf.get("sliding_window") if use_window else None
    first = int(hf.get("max_window_layers", 0) or 0) if window is not None else 0
    types = hf.get("layer_types")
    if types is not None:
        n = len(types)
        sliding = [t == "sliding_attention" for t in types]
        first = next((i for i, s in enumerate(sliding) if s), n)
        if sliding != [i >= first for i in range(n)]:
            raise ConfigError(f"config.json: layer_types {types!r} mixes full and sliding-window layers in an order "
                              f"mft_jax does not model (full layers first, then sliding ones)")
        if first == n:
            return {"sliding_window": None, "max_window_layers": 0}
        window = hf.get("sliding_window")
        if window is None:
            raise ConfigError("config.json: layer_types has sliding_attention layers but sliding_window is null")
    if window is not None and first >= int(hf["num_hidden_layers"]):
        window, first = None, 0  # no layer slides
    return {"sliding_window": window, "max_window_layers": first if window is not None else 0}


def _read_llama(hf: dict) -> dict:
    return {"attention_bias": bool(hf.get("attention_bias", False)), "mlp_bias": bool(hf.get("mlp_bias", False))}


def _read_mistral(hf: dict) -> dict:
    return {"sliding_window": hf.get("sliding_window"), "max_window_layers": 0}


def _read_qwen2(hf: dict) -> dict:
    return {"qkv_bias": True, **_window_layers(hf, bool(hf.get("use_sliding_window", False)))}


def _read_qwen3(hf: dict) -> dict:
    return {"qk_norm": True, "attention_bias": bool(hf.get("attention_bias", False)),
            **_window_layers(hf, bool(hf.get("use_sliding_window", False)))}


def _write_llama(cfg) -> dict:
    return {"attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias}


def _write_mistral(cfg) -> dict:
    return {"sliding_window": cfg.sliding_window}


def _qwen_window(cfg) -> dict:
    window = cfg.sliding_window is not None
    return {"use_sliding_window": window, "sliding_window": cfg.sliding_window,
            "max_window_layers": cfg.max_window_layers if window else cfg.num_hidden_layers}


def _write_qwen3(cfg) -> dict:
    return {"attention_bias": cfg.attention_bias, **_qwen_window(cfg)}


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", _read_llama, _write_llama, "Llama 2, 3, 3.1, 3.2 and their fine-tunes",
           frozenset({"attention_bias", "mlp_bias"})),
    Family("mistral", "MistralForCausalLM", _read_mistral, _write_mistral, "Mistral 7B v0.1 - v0.3",
           frozenset({"sliding_window"})),
    Family("qwen2", "Qwen2ForCausalLM", _read_qwen2, _qwen_window, "Qwen2 and Qwen2.5",
           frozenset({"qkv_bias", "sliding_window"}), frozenset({"qkv_bias"})),
    Family("qwen3", "Qwen3ForCausalLM", _read_qwen3, _write_qwen3, "Qwen3 (dense)",
           frozenset({"qk_norm", "attention_bias", "sliding_window"}), frozenset({"qk_norm"})),
)}


def family(model_type: str) -> Family:
    found = FAMILIES.get(model_type)
    if found is None:
        listed = "; ".join(f"{name} ({f.summary})" for name, f in FAMILIES.items())
        raise ConfigError(f"config.json: model_type {model_type!r} is not supported; mft_jax reads {listed}")
    return found


def check_switches(cfg) -> None:
    """A config's switches must be ones its family has (qk_norm on a llama cannot be written as a llama)."""
    found = family(cfg.model_type)
    allowed, required = found.switches, found.required
    on = {name for name in ("attention_bias", "mlp_bias", "qkv_bias", "qk_norm") if getattr(cfg, name)}
    if cfg.sliding_window is not None:
        on.add("sliding_window")
    if on - allowed or required - on:
        raise ConfigError(f"model config: model_type {cfg.model_type!r} has {sorted(allowed)}, but this config "
                          f"sets {sorted(on)}" + (f" and lacks {sorted(required - on)}" if required - on else ""))
