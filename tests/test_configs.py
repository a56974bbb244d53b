"""The shipped configs are the paper's runs: the reference's data mixtures, optimizer and mask settings."""

from pathlib import Path

import pytest

from mft_jax import config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# The reference's dataset_mixer per domain (Ming-K9/MFT configs/train_configs/llama2_7b_*.yaml), in order.
REFERENCE_MIXTURES = {
    "math": {"KKHYA/metamath_converted": 10000, "KKHYA/numinamath_tir_converted": 10000,
             "KKHYA/numinamath_cot_converted": 10000, "allenai/tulu-3-sft-personas-math": 10000,
             "allenai/tulu-3-sft-personas-math-grade": 10000, "allenai/tulu-3-sft-personas-algebra": 10000},
    "code": {"allenai/tulu-3-sft-personas-code": 10000, "KKHYA/evol_codealpaca_converted": 10000,
             "KKHYA/codefeedback_filtered_instructions_converted": 10000},
    "if": {"allenai/tulu-3-sft-personas-instruction-following": 10000, "KKHYA/oasst1_converted": 7000,
           "KKHYA/oasst2_converted": 9000, "KKHYA/coconot_converted": 10000,
           "KKHYA/aya_dataset_converted": 10000, "KKHYA/daring_anteater_converted": 10000},
}
MASKED_LAYERS = {"math": [4, 5, 6, 7], "code": [20, 21, 22, 23], "if": [0, 1, 2, 3]}
PAPER_CONFIGS = sorted(p.name for p in CONFIGS.glob("llama*.yaml"))
# The paper's math MFT recipe on the other families (mft_jax.config.families).
FAMILY_CONFIGS = ["mistral-7b-math-mft.yaml", "qwen25-7b-math-mft.yaml", "qwen3-8b-math-mft.yaml"]


def _domain(name: str) -> str:
    return "math" if "math" in name else "code" if "code" in name else "if"


def test_every_shipped_config_loads():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "demo.yaml")  # demo.yaml: mft_jax.demo's
    assert names == sorted(PAPER_CONFIGS + FAMILY_CONFIGS + ["tiny-cpu.yaml"])
    for name in names:
        assert config.load(CONFIGS / name, verbose=False).run_dir == f"runs/{name[:-5]}"


def test_every_domain_has_fft_and_mft():
    assert PAPER_CONFIGS == ["llama2-7b-code-fft.yaml", "llama2-7b-code-mft.yaml", "llama2-7b-if-fft.yaml",
                             "llama2-7b-if-mft.yaml", "llama2-7b-math-fft.yaml", "llama2-7b-math-mft.yaml",
                             "llama31-8b-math-mft.yaml"]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_matches_the_reference(name):
    run = config.load(CONFIGS / name, verbose=False)
    domain = _domain(name)
    # Data: the reference's sources and row counts, in its order, as the reference formats them.
    assert list(run.data.train.items()) == list(REFERENCE_MIXTURES[domain].items())
    assert sum(run.data.train.values()) == {"math": 60000, "code": 30000, "if": 56000}[domain]
    assert (run.data.template, run.data.max_seq_length, run.data.add_bos, run.data.seed) == ("tulu", 4096, False, 42)
    assert run.data.loss_reduction == "example" and not run.data.packing
    # Optimizer: AdamW 2e-5, betas (0.9, 0.999), eps 1e-8, no weight decay, 3% warm-up, linear decay, clip 1.0.
    o = run.optim
    assert (o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.warmup_ratio, o.schedule, o.clip_grad_norm) == \
        (2e-5, 0.9, 0.999, 1e-8, 0.0, 0.03, "linear", 1.0)
    # Steps: 2 epochs, the last partial batch kept; 128 sequences per step (the coding FFT script ran 4 GPUs: 64).
    t = run.train
    assert (t.epochs, t.max_steps, t.drop_last, t.seed) == (2, None, False, 42)
    assert t.batch_size == (64 if name == "llama2-7b-code-fft.yaml" else 128)
    assert t.mode == ("fft" if name.endswith("-fft.yaml") else "mft")
    # Mask: local top-k keeping 90% of every attention and MLP matrix of the domain's layers, N(0, 0.02) scores.
    m = run.mask
    assert (m.mode, m.modules, m.keep_attn, m.keep_mlp, m.init, m.std) == ("local", "both", 0.9, 0.9, "normal", 0.02)
    assert m.masked_layers == MASKED_LAYERS[domain]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_sources_resolve_to_hub_datasets(name):
    from mft_jax.data import sources

    run = config.load(CONFIGS / name, verbose=False)
    for source in run.data.train:
        assert not sources.is_local_source(source), source
        org_name, dataset_config, split = sources.parse_hub_name(source)
        assert (org_name, dataset_config, split) == (source, None, "train")


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_family_configs_are_the_math_mft_recipe(name):
    """The Llama-2-7B math MFT settings (mask, data mixture, optimizer, batch) with only the model, run_dir and the
    template (the tokenizer's own for the Qwen instruct families) changed."""
    paper = config.load(CONFIGS / "llama31-8b-math-mft.yaml", verbose=False).to_dict()
    ours = config.load(CONFIGS / name, verbose=False).to_dict()
    for section in ("mask", "optim", "train", "ckpt", "mesh"):
        assert ours[section] == paper[section], section
    assert ours["data"] == {**paper["data"], "template": "chat_template" if "qwen" in name else "tulu"}
    assert list(ours["data"]["train"].items()) == list(REFERENCE_MIXTURES["math"].items())
