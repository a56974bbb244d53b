"""mft_jax: Mask Fine-Tuning (MFT) for Llama-family models in JAX/Flax."""

__version__ = "0.1.0"
