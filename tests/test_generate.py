"""Decoding: token-for-token parity with transformers' greedy `generate`, EOS, stop strings, sampling,
shape buckets (no recompilation), the recompute reference path, a batch sharded over a mesh, and new text
decoded in the prompt's context (leading spaces kept, as vLLM does). Prompt encoding (no BOS, the context
window) is pinned in test_olmes_protocol.py."""

import jax
import numpy as np
import pytest
import torch

from hf_models import make_hf_llama
from mft_jax import convert, sharding
from mft_jax import generate as gen
from mft_jax.config import MeshConfig
from mft_jax.data import train_bpe_tokenizer
from tolerances import assert_close, binomial_bound

LENGTHS = (3, 9, 14, 21)  # different lengths in one batch (left padding); 21 > the llama3 variant's 32 // 2


def _load(variant, tmp_path_factory, **overrides):
    hf = make_hf_llama(variant, **{"num_hidden_layers": 2, **overrides})  # 2 layers: XLA compiles faster
    path = tmp_path_factory.mktemp(variant)
    hf.save_pretrained(path)
    cfg, params = convert.load_hf(path)
    return hf, cfg, params


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """Grouped-query attention with llama3 rope scaling: the variant most tests use (one compile per shape)."""
    return _load("llama31_gqa", tmp_path_factory)


@pytest.fixture(scope="module", params=["llama2_mha", "llama31_gqa"])
def pair(request, tmp_path_factory, gqa):
    return gqa if request.param == "llama31_gqa" else _load(request.param, tmp_path_factory)


def _prompts(cfg, lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, cfg.vocab_size, size=n).tolist() for n in lengths]


def _hf_greedy(hf, prompt, max_new_tokens, eos_token_id=None):
    """transformers' greedy continuation of one unpadded prompt (new tokens, EOS excluded)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                          eos_token_id=eos_token_id, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    return new[:new.index(eos_token_id)] if eos_token_id in new else new


def test_greedy_matches_transformers(pair):
    hf, cfg, params = pair
    prompts = _prompts(cfg)
    ours = gen.generate(cfg, params, prompts, max_new_tokens=24, eos_ids=())
    for prompt, tokens in zip(prompts, ours):
        assert len(tokens) == 24
        assert tokens == _hf_greedy(hf, prompt, 24)


def test_eos_cuts_rows_like_transformers(gqa):
    hf, cfg, params = gqa
    prompts = _prompts(cfg, seed=1)
    free = gen.generate(cfg, params, prompts, max_new_tokens=24, eos_ids=())
    eos = free[1][5]  # a token that row 1 produces at step 5: it must stop there
    ours = gen.generate(cfg, params, prompts, max_new_tokens=24, eos_ids=(eos,))
    for prompt, row_free, row in zip(prompts, free, ours):
        expected = row_free[:row_free.index(eos)] if eos in row_free else row_free
        assert row == expected
        assert row == _hf_greedy(hf, prompt, 24, eos_token_id=eos)
    assert len(ours[1]) <= 5


def test_recompute_path_agrees(gqa):
    _, cfg, params = gqa
    prompts = _prompts(cfg, seed=2)
    cached = gen.generate(cfg, params, prompts, max_new_tokens=20, eos_ids=())
    assert gen.generate(cfg, params, prompts, max_new_tokens=20, eos_ids=(), recompute=True) == cached


def test_prompt_lengths_in_one_bucket_compile_once(gqa):
    _, cfg, params = gqa
    gen.generate(cfg, params, _prompts(cfg, (5, 7, 9, 30)), max_new_tokens=20, eos_ids=())
    sizes = gen._prefill._cache_size(), gen._decode._cache_size()
    # Other lengths, batch size and max_new_tokens in the same buckets (prompt 32, batch 4, new tokens 32).
    gen.generate(cfg, params, _prompts(cfg, (17, 2, 25), seed=3), max_new_tokens=31, eos_ids=())
    assert (gen._prefill._cache_size(), gen._decode._cache_size()) == sizes
    gen.generate(cfg, params, _prompts(cfg, (33,), seed=3), max_new_tokens=3, eos_ids=())  # a new bucket
    assert gen._prefill._cache_size() == sizes[0] + 1


def test_sampling_is_seeded_and_nucleus_of_one_is_greedy(gqa):
    _, cfg, params = gqa
    prompts = _prompts(cfg, seed=4)
    kw = dict(max_new_tokens=20, eos_ids=(), temperature=1.0, top_p=0.95)
    first = gen.generate(cfg, params, prompts, seed=7, **kw)
    assert gen.generate(cfg, params, prompts, seed=7, **kw) == first
    assert gen.generate(cfg, params, prompts, seed=8, **kw) != first
    greedy = gen.generate(cfg, params, prompts, max_new_tokens=20, eos_ids=())
    assert gen.generate(cfg, params, prompts, seed=7, **{**kw, "top_p": 1e-6}) == greedy


def test_sample_tokens_follows_softmax_and_top_p():
    logits_V = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    logits_NxV = np.broadcast_to(logits_V, (n, 4))
    # Each token's frequency within 5 binomial sigmas of its probability (a token of probability 0: never).
    draws = np.asarray(gen.sample_tokens(logits_NxV, keys, 1.0, 1.0, greedy=False, use_top_p=False))
    p = np.array([0.5, 0.3, 0.15, 0.05])
    assert_close(np.bincount(draws, minlength=4) / n, p, binomial_bound(p, n), "softmax")
    # top_p 0.7: {0.5, 0.3} is the smallest set reaching 0.7, renormalised to 5/8, 3/8.
    draws = np.asarray(gen.sample_tokens(logits_NxV, keys, 1.0, 0.7, greedy=False, use_top_p=True))
    p = np.array([0.625, 0.375, 0, 0])
    assert_close(np.bincount(draws, minlength=4) / n, p, binomial_bound(p, n), "top_p 0.7")
    # temperature 0.5 squares the probabilities before renormalising.
    draws = np.asarray(gen.sample_tokens(logits_NxV, keys, 0.5, 1.0, greedy=False, use_top_p=False))
    p = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    assert_close(np.bincount(draws, minlength=4) / n, p / p.sum(), binomial_bound(p / p.sum(), n), "temperature 0.5")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny BPE tokenizer and a random Llama over its vocabulary."""
    words = "alpha beta gamma delta eps zeta eta theta iota kappa lambda mu".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=8)) for _ in range(300)]
    tok_dir = train_bpe_tokenizer(texts, 120, tmp_path_factory.mktemp("tok"))
    from mft_jax.data import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    hf = make_hf_llama("llama32_tied", vocab_size=len(tokenizer), num_hidden_layers=2)
    path = tmp_path_factory.mktemp("text_model")
    hf.save_pretrained(path)
    cfg, params = convert.load_hf(path)
    return cfg, params, tokenizer


def _first_new_suffix(tokenizer, tokens, start):
    """(k, s): the first k >= start and shortest suffix s of text(tokens[:k]) that text(tokens[:k-1]) lacks."""
    for k in range(start, len(tokens) + 1):
        before, text = tokenizer.decode(tokens[:k - 1]), tokenizer.decode(tokens[:k])
        for n in range(1, len(text) + 1):
            if text[-n:] not in before:
                return k, text[-n:]
    raise AssertionError("the continuation never grows")


def test_stop_strings_cut_tokens_and_text(text_model):
    cfg, params, tokenizer = text_model
    prompts = ["alpha beta", "gamma delta eps zeta"]
    free = gen.generate_text(cfg, params, tokenizer, prompts, max_new_tokens=24, eos_ids=())
    free_tokens = gen.generate(cfg, params, [tokenizer(p)["input_ids"] for p in prompts], max_new_tokens=24,
                               eos_ids=())
    # The shortest stop string that first completes at token k >= 6 of row 0's continuation.
    k, stop = _first_new_suffix(tokenizer, free_tokens[0], start=6)
    cut = gen.generate(cfg, params, [tokenizer(p)["input_ids"] for p in prompts], max_new_tokens=24, eos_ids=(),
                       stop_strings=[stop], tokenizer=tokenizer, stop_check_every=4)
    assert cut[0] == free_tokens[0][:k]
    texts = gen.generate_text(cfg, params, tokenizer, prompts, max_new_tokens=24, eos_ids=(),
                              stop_strings=[stop], stop_check_every=4)
    assert texts[0] == free[0][:free[0].index(stop)]
    for full, short in zip(free, texts):  # every row is a prefix of its unstopped text
        assert full.startswith(short) and stop not in short


def test_batch_and_params_sharded_over_mesh_match(gqa):
    _, cfg, params = gqa
    prompts = _prompts(cfg, seed=5)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))  # the trainer's mesh, 8 CPU devices
    sharded = jax.device_put(params, sharding.param_shardings(cfg, mesh))
    single = gen.generate(cfg, params, prompts, max_new_tokens=20, eos_ids=())
    assert gen.generate(cfg, sharded, prompts, max_new_tokens=20, eos_ids=(), mesh=mesh) == single


def test_bad_inputs_are_named(gqa):
    _, cfg, params = gqa
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(cfg, params, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate(cfg, params, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate(cfg, params, [[cfg.vocab_size]], max_new_tokens=2)
    with pytest.raises(ValueError, match="tokenizer"):
        gen.generate(cfg, params, [[1]], max_new_tokens=2, stop_strings=["x"])


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace decoder, as Llama 2's): decoding a token list drops the
    leading space of its first token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁hello": 3, "▁world": 4, "▁▁▁": 5, "return": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_new_text_keeps_its_leading_space_and_indentation(metaspace_tokenizer, monkeypatch):
    tok = metaspace_tokenizer
    assert tok.decode([4]) == "world" and tok.decode([5, 6]) != "   return"  # what decoding alone loses
    assert gen.decode_new(tok, [3], [4]) == " world"
    assert gen.decode_new(tok, [3], [5, 6]) == "   return"  # indentation of generated code survives
    assert gen.decode_new(tok, [], [4]) == "world"
    # generate_text decodes after the prompt's last tokens, and cuts at stop strings (empty ones never match).
    monkeypatch.setattr(gen, "generate", lambda cfg, params, prompts, **kw: [[5, 6, 4]] * len(prompts))
    assert gen.generate_text(None, None, tok, ["hello"], max_new_tokens=3) == ["   return world"]
    assert gen.generate_text(None, None, tok, ["hello"], max_new_tokens=3, stop_strings=["", " world"]) == [
        "   return"]


def test_stop_strings_are_found_in_the_prompts_context(metaspace_tokenizer):
    tok = metaspace_tokenizer
    # " world" is only a stop string when the first new token is decoded with its leading space.
    assert gen._first_stop([4, 3], [" world"], tok, context=[3]) == 1
    assert gen._first_stop([4, 3], [" world"], tok) is None
    assert gen.cut_at_stop("a\n\nb", ["", "\n\n"]) == "a"
