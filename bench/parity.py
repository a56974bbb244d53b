"""Converter round trip on tiny random Llamas: prints max |logits| error against transformers (fp32).

For each architecture variant: HF -> load_hf -> forward, and load_hf -> save_hf -> transformers.
Needs torch (a test dependency): `bash launch/install.sh --test && .venv/bin/python bench/parity.py`.
"""

import sys
import tempfile
from pathlib import Path

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_models import VARIANTS, hf_logits, make_hf_llama  # noqa: E402

from mft_jax import convert, model  # noqa: E402


def main():
    print(f"{'variant':<14} {'params':>8} {'HF->ours max|dlogit|':>22} {'ours->HF max|dlogit|':>22} {'tensors equal':>14}")
    for variant in sorted(VARIANTS):
        hf = make_hf_llama(variant)
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(Path(tmp) / "hf")
            cfg, params = convert.load_hf(Path(tmp) / "hf")
            tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 48)).astype(np.int32)
            ref = hf_logits(hf, tokens)
            err_in = np.abs(np.asarray(model.forward(cfg, params, tokens)) - ref).max()
            convert.save_hf(cfg, params, Path(tmp) / "back")
            back = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "back").eval()
            err_out = np.abs(hf_logits(back, tokens) - ref).max()
            same = all((a == b).all() for a, b in zip(hf.state_dict().values(), back.state_dict().values()))
        print(f"{variant:<14} {model.count_params(cfg):>8} {err_in:>22.2e} {err_out:>22.2e} {str(same):>14}")


if __name__ == "__main__":
    main()
