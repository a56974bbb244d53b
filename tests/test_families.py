"""Mistral, Qwen2 / 2.5 and Qwen3 against transformers' own classes (MistralForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM): random tiny configs that exercise each family's switches (q/k/v bias, per-head q/k norm,
head_dim != hidden / heads, a sliding window shorter than the sequence, on every layer or from a layer on, tied
and untied embeddings), read from their checkpoints and written back; logits within the forward bounds of
tests/tolerances.py in fp32 and bf16; the published parameter counts from abstract init."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_models import hf_logits
from mft_jax import convert, model
from mft_jax.config import ConfigError, LlamaConfig
from tolerances import BF16_EPS, assert_close, forward_length, rounding_bound

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3, max_position_embeddings=128,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")

# name -> (transformers config class, model class, settings)
VARIANTS = {
    "mistral_window": (transformers.MistralConfig, transformers.MistralForCausalLM,
                       dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=7)),
    "mistral_v03_tied": (transformers.MistralConfig, transformers.MistralForCausalLM,
                         dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=None,
                              tie_word_embeddings=True, head_dim=24)),
    "qwen2_tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                   dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2_window_from_layer_1": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                                  dict(num_attention_heads=4, num_key_value_heads=1, use_sliding_window=True,
                                       sliding_window=6, max_window_layers=1, tie_word_embeddings=False)),
    "qwen3_head_dim_bias": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                            dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, attention_bias=True,
                                 tie_word_embeddings=False)),
    "qwen3_tied": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                   dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
}


def make_hf(variant: str, seed: int = 0):
    config_cls, model_cls, settings = VARIANTS[variant]
    torch.manual_seed(seed)
    hf = model_cls(config_cls(**{**COMMON, **settings})).eval()
    with torch.no_grad():  # HF inits norms to ones and biases to zeros; random ones make the test stronger
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def family_pair(request, tmp_path_factory):
    hf = make_hf(request.param)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(path)
    cfg, params = convert.load_hf(path)
    return request.param, hf, path, cfg, params


def _tokens(cfg, b, length, seed=0):
    return np.random.default_rng(seed).integers(3, cfg.vocab_size, size=(b, length)).astype(np.int32)


def test_switches_are_read(family_pair):
    name, hf, _, cfg, params = family_pair
    hf_cfg = hf.config
    assert cfg.model_type == hf_cfg.model_type
    layer = params["layers_0"]["self_attn"]
    assert ("bias" in layer["q_proj"]) == (name.startswith("qwen2") or hf_cfg.to_dict().get("attention_bias", False))
    assert ("bias" in layer["o_proj"]) == bool(hf_cfg.to_dict().get("attention_bias", False))
    assert ("q_norm" in layer) == name.startswith("qwen3")
    head_dim = hf_cfg.to_dict().get("head_dim") or hf_cfg.hidden_size // hf_cfg.num_attention_heads
    assert cfg.head_dim == head_dim and cfg.tie_word_embeddings == hf_cfg.tie_word_embeddings
    windows = [cfg.window(i) for i in range(cfg.num_hidden_layers)]
    expected = {"mistral_window": [7, 7, 7], "qwen2_window_from_layer_1": [None, 6, 6]}.get(name, [None] * 3)
    assert windows == expected


def test_logits_match_transformers_fp32(family_pair):
    _, hf, _, cfg, params = family_pair
    tokens = _tokens(cfg, 2, 24)  # longer than every sliding window above
    ours = np.asarray(model.forward(cfg, params, tokens))
    ref = hf_logits(hf, tokens)
    # torch and XLA sum every matmul, norm and softmax of the forward pass in their own orders
    assert_close(ours, ref, rounding_bound(forward_length(cfg, 24), np.abs(ref).max()), "logits vs transformers")


def test_logits_match_transformers_bf16(family_pair, tmp_path):
    _, hf, path, cfg, _ = family_pair
    tokens = _tokens(cfg, 2, 24)
    bf16_cfg, params = convert.load_hf(path, dtype=jnp.bfloat16)
    ours = np.asarray(model.forward(bf16_cfg, params, tokens, options=model.Options(jnp.bfloat16)))
    ref = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), tokens)  # a copy: the module's model stays fp32
    # both round every activation to bf16, at different points: the bound of the same analysis with bf16's eps
    assert_close(ours, ref, rounding_bound(forward_length(cfg, 24), np.abs(ref).max(), eps=BF16_EPS),
                 "bf16 logits vs transformers in bf16")


def test_written_back_transformers_loads_it_equal(family_pair, tmp_path):
    name, hf, _, cfg, params = family_pair
    out = convert.save_hf(cfg, params, tmp_path / "ours")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == hf.config.model_type and written["architectures"] == [type(hf).__name__]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf)
    tokens = _tokens(cfg, 2, 24, seed=1)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf, tokens))  # the same weights exactly
    assert convert.load_config(out) == cfg


def test_kv_cache_decoding_matches_the_full_forward(family_pair):
    """Greedy decoding with the KV cache (the sliding window applied to the cache too) gives the tokens that
    re-running the full sequence gives."""
    _, _, _, cfg, params = family_pair
    prompt = _tokens(cfg, 1, 9, seed=2)
    new = 12  # 9 + 12 > every window
    seq = prompt
    for _ in range(new):
        logits = np.asarray(model.forward(cfg, params, seq))[:, -1]
        seq = np.concatenate([seq, logits.argmax(-1)[:, None].astype(np.int32)], axis=1)
    cache = model.init_cache(cfg, 1, 32)
    segments = np.ones_like(prompt)
    positions = np.arange(prompt.shape[1], dtype=np.int32)[None]
    logits, cache = model.forward_with_cache(cfg, params, prompt, positions, segments, cache, 0, last_only=True)
    produced = []
    for i in range(new):
        token = np.asarray(logits)[:, -1].argmax(-1).astype(np.int32)[:, None]
        produced.append(int(token[0, 0]))
        index = prompt.shape[1] + i
        logits, cache = model.forward_with_cache(cfg, params, token, np.array([[index]], np.int32),
                                                 np.ones_like(token), cache, index)
    assert produced == seq[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("model_type, hf, expected", [
    ("mistral", dict(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, sliding_window=None), 7_248_023_552),
    ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False), 7_615_616_512),
    ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True), 494_032_768),
    ("qwen3", dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
     8_190_735_360),
])
def test_published_parameter_counts(model_type, hf, expected):
    """Mistral-7B-v0.3, Qwen2.5-7B, Qwen2.5-0.5B, Qwen3-8B (their config.json values), counted from abstract init."""
    cfg = LlamaConfig.from_hf({"model_type": model_type, **hf})
    assert model.count_params(cfg) == expected


def test_unsupported_families_and_switches_are_one_line():
    with pytest.raises(ConfigError, match=r"model_type 'gemma' is not supported; mft_jax reads llama .*qwen3"):
        LlamaConfig.from_hf({"model_type": "gemma", **{k: v for k, v in COMMON.items() if k != "attn_implementation"},
                             "num_attention_heads": 4})
    with pytest.raises(ConfigError, match=r"rope type 'yarn' .* is not supported"):
        LlamaConfig.from_hf({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                             "num_hidden_layers": 2, "num_attention_heads": 2,
                             "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match=r"model_type 'llama' has .* but this config sets \['qk_norm'\]"):
        LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                    qk_norm=True)


# --------------------------------------------------------------------------------------------------------
# A tiny MFT run per family
# --------------------------------------------------------------------------------------------------------

RUN_FAMILIES = {
    "mistral": dict(model_type="mistral", sliding_window=8),  # shorter than the 32-token rows
    "qwen2": dict(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", qk_norm=True, head_dim=16),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(RUN_FAMILIES))
def test_mft_run_resumes_after_kill9_exports_and_applies(family, tmp_path):
    """Trains, is killed with SIGKILL after step 2 and resumes to the same losses bit for bit; the export loads in
    transformers' own class with the logits of our masked forward; apply-masks rebuilds the same weights."""
    import os
    import signal
    import subprocess
    import sys

    import yaml

    from mft_jax import export, rundir
    from run_fixtures import make_model_dir, make_run
    from test_rundir import _wait_for_step

    model_dir = make_model_dir(tmp_path / "model", **RUN_FAMILIES[family])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def config_file(name):
        # the tokenizer from its own directory: one beside a config.json of model_type mistral makes transformers
        # import mistral-common, which the tests install without its dependencies (only its data files are used)
        run = make_run(tmp_path / name, model_dir, train={"max_steps": 5}, ckpt={"save_every": 1, "keep": 3},
                       data={"tokenizer": str(tmp_path / "model" / "tokenizer")})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(run.to_dict()))
        return run, path

    def cli(path):
        return subprocess.run([sys.executable, "-m", "mft_jax", "train", "--config", str(path)], env=env,
                              capture_output=True, text=True)

    straight, path_a = config_file("a")
    assert cli(path_a).returncode == 0
    killed, path_b = config_file("b")
    proc = subprocess.Popen([sys.executable, "-m", "mft_jax", "train", "--config", str(path_b)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reached = _wait_for_step(Path(killed.run_dir) / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert reached
    resumed = cli(path_b)
    assert resumed.returncode == 0, resumed.stderr
    losses = [{r["step"]: r["loss"] for r in rundir.read_metrics(Path(run.run_dir)) if "loss" in r}
              for run in (straight, killed)]
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3, 4, 5]
    result = export.export_run(killed.run_dir, tmp_path / "export")
    _, cfg, params, layout, state = export.restore_run(killed.run_dir)
    dense = layout.dense(params, state)
    hf = transformers.AutoModelForCausalLM.from_pretrained(result["hf"], attn_implementation="eager").eval()
    assert hf.config.model_type == family
    tokens = _tokens(cfg, 2, 24, seed=3)
    ref = hf_logits(hf, tokens)
    assert_close(np.asarray(model.forward(cfg, dense, tokens)), ref,
                 rounding_bound(forward_length(cfg, 24), np.abs(ref).max()), "export in transformers vs ours")
    applied = export.apply_masks_file(model_dir, result["masks"], tmp_path / "applied")
    _, exported = convert.load_hf(result["hf"])
    _, rebuilt = convert.load_hf(applied)
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(rebuilt)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(RUN_FAMILIES))
def test_fft_lora_and_baselines_run_on_every_family(family, tmp_path):
    """FFT and LoRA train (loss finite, the trained tensors moved, biases and q/k norms included under FFT); the
    magnitude and Wanda baselines keep exactly num_kept(n, keep) weights of each of the seven projections of the
    masked layers, nothing else."""
    from mft_jax import export, masking, train
    from run_fixtures import make_model_dir, make_run
    from mft_jax.trees import flatten

    model_dir = make_model_dir(tmp_path / "model", **RUN_FAMILIES[family])
    _, base = convert.load_hf(model_dir)
    for mode in ("fft", "lora"):
        run = make_run(tmp_path / mode, model_dir, train={"mode": mode, "max_steps": 2}, lora={"rank": 4},
                       data={"tokenizer": str(tmp_path / "model" / "tokenizer")})  # as above
        summary = train.train(run, verbose=False)
        assert np.isfinite(summary["last"]["loss"])
        _, _, _, layout, state = export.restore_run(run.run_dir)
        dense = flatten(layout.dense(base, state))
        moved = {p for p, x in flatten(base).items() if not np.array_equal(np.asarray(x), np.asarray(dense[p]))}
        if mode == "fft":
            frozen_under_mft = {p for p in flatten(base) if p[-1] == "bias" or "q_norm" in p or "k_norm" in p}
            assert frozen_under_mft <= moved  # FFT trains them too
        else:  # LoRA merges into the kernels it adapts only
            assert moved and all(p[-1] == "kernel" for p in moved)
    run = make_run(tmp_path / "baseline", model_dir, train={"max_steps": 1},
                   data={"tokenizer": str(tmp_path / "model" / "tokenizer")})
    for baseline in ("magnitude", "wanda"):
        result = export.export_run(_run_file(run, tmp_path), tmp_path / baseline,
                                   baseline=baseline, calibration_tokens=256)
        masks, _ = export.load_masks(result["masks"])
        masked = flatten(masks)
        assert sorted(masked) == sorted(masking.masked_paths(convert.load_config(model_dir), run.mask))
        for path, m in masked.items():
            keep = masking.keep_fraction(path, run.mask)
            assert int(np.asarray(m).sum()) == masking.num_kept(np.asarray(m).size, keep), (baseline, path)


def _run_file(run, tmp_path) -> Path:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run.to_dict()))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(RUN_FAMILIES))
def test_sweep_landscape_and_eval_run_on_every_family(family, tmp_path, capsys):
    """The studies on each family, through the CLI: a two-point sweep trains and evaluates both points; the
    landscape's line from the base model to a trained point ends at the two models' own dev losses (as `eval`
    measures them); `eval --tasks loss` of a run equals the sweep's measurement of the same point exactly."""
    import yaml

    from mft_jax import cli
    from run_fixtures import chat_rows, make_model_dir, make_run, write_jsonl
    from tolerances import step_length

    model_dir = make_model_dir(tmp_path / "model", **RUN_FAMILIES[family])
    run = make_run(tmp_path, model_dir, train={"max_steps": 2, "seed": 0}, ckpt={"save_every": 2, "keep": 1},
                   data={"tokenizer": str(tmp_path / "model" / "tokenizer")})
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(run.to_dict()))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", chat_rows(6, seed=5))
    out = tmp_path / "sweep"
    cli.main(["sweep", "--config", str(base), "--grid", "mask.keep=0.5,0.9", "--out", str(out),
                     "--tasks", "loss", "--loss-data", str(held_out)])  # errors exit
    report = json.loads((out / "sweep.json").read_text())
    assert [p["name"] for p in report["points"]] == ["keep=0.5__seed=0", "keep=0.9__seed=0"]
    point = out / "keep=0.5__seed=0"
    swept = report["points"][0]["results"]["loss"]["loss"]
    assert np.isfinite(swept) and swept > 0

    results = tmp_path / "eval.json"
    cli.main(["eval", "--model", str(point), "--tasks", "loss", "--loss-data", str(held_out), "--out", str(results),
              "--max-seq-length", str(run.data.max_seq_length), "--template", run.data.template])
    assert json.loads(results.read_text())["results"]["loss"]["loss"] == swept  # same program, same rows

    landscape_out = tmp_path / "landscape"
    cli.main(["landscape", str(model_dir), "--config", str(point / "config.yaml"), "--against", str(point),
                     "--out", str(landscape_out), "--batches", "1", "--line-points", "3", "--eigs", "1",
                     "--iters", "4", "--probes", "0"])
    capsys.readouterr()
    result = json.loads((landscape_out / "landscape.json").read_text())
    line, own = result["lines"][str(point)], {spec: m["loss"] for spec, m in result["models"].items()}
    # the line's ends are W_a + alpha (W_b - W_a) at alpha 0 and 1: the models up to one rounding per weight,
    # through another program (a forward pass of at most 64 positions over at most 16 x 64 tokens)
    n = step_length(convert.load_config(model_dir), 64, 16 * 64)
    assert_close([line["loss_a"], line["loss_b"]], [own[str(model_dir)], own[str(point)]],
                 rounding_bound(n, max(own.values())), "line ends vs the models' own losses")
    assert abs(line["loss_b"] - line["loss_a"]) > rounding_bound(n, max(own.values()))  # the training moved it
    assert np.isfinite(result["models"][str(point)]["top_eigenvalues"]).all()
