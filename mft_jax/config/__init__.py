"""Configuration: the Llama architecture (`LlamaConfig`) and the run config (`RunConfig`).

`LlamaConfig` holds every field of a Hugging Face Llama `config.json` that changes the math. It reads the
format transformers 4.x wrote (`rope_theta`, `rope_scaling`, `torch_dtype`) and the one transformers 5
writes (`rope_parameters`, `dtype`), and writes the 4.x format, which both generations load.

`RunConfig` is the YAML run config. Every section is a dataclass; unknown keys and out-of-range values fail
with a `ConfigError` that names the key and the fix, before any work starts.

Modules: `errors` (ConfigError), `llama` (LlamaConfig), `run` (the sections), `loading` (YAML and overrides).
"""

from mft_jax.config.errors import ConfigError, choice
from mft_jax.config.llama import ATTN_PROJ, MLP_PROJ, PROJECTIONS, LlamaConfig
from mft_jax.config.loading import canonical_keys, from_dict, load, parse_layers, read_yaml
from mft_jax.config.run import (ATTENTION_CHOICES, REMAT_CHOICES, CheckpointConfig, DataConfig, EvalConfig,
                                LogConfig, LoraConfig, MaskConfig, MeshConfig, ModelConfig, OptimConfig, RunConfig,
                                TrainConfig, WandbConfig)

__all__ = ["ATTENTION_CHOICES", "ATTN_PROJ", "MLP_PROJ", "PROJECTIONS", "REMAT_CHOICES", "CheckpointConfig",
           "ConfigError", "DataConfig", "EvalConfig", "LlamaConfig", "LogConfig", "LoraConfig", "MaskConfig",
           "MeshConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig", "WandbConfig", "canonical_keys",
           "choice", "from_dict", "load", "parse_layers", "read_yaml"]
