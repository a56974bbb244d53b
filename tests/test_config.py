"""Run-config loading: aliases, ranges, overrides and the errors users see."""

import pytest

from mft_jax import config


def test_reference_aliases_and_layer_ranges(capsys):
    cfg = config.from_dict({"mask": {"sparsity_attn": 0.9, "sparsity_mlp": 0.8, "masked_layers": "4-7",
                                     "subnet_mode": "mlp"}})
    assert cfg.mask.keep_attn == 0.9 and cfg.mask.keep_mlp == 0.8 and cfg.mask.modules == "mlp"
    assert cfg.mask.masked_layers == [4, 5, 6, 7]
    assert "fraction KEPT" in capsys.readouterr().out
    assert config.parse_layers("0-3,20") == [0, 1, 2, 3, 20]


def test_overrides():
    cfg = config.from_dict({"mask": {"masked_layers": [1]}}, ["train.max_steps=7", "optim.lr=1e-3",
                                                             "mask.masked_layers=2-3"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 1e-3 and cfg.mask.masked_layers == [2, 3]


@pytest.mark.parametrize("raw, message", [
    ({"mask": {"kep_attn": 0.9, "masked_layers": [0]}}, "unknown config key 'mask.kep_attn'; did you mean 'mask.keep_attn'"),
    ({"mask": {"keep_attn": 1.5, "masked_layers": [0]}}, r"mask.keep_attn must be in \(0, 1\]"),
    ({"mask": {"keep_mlp": 0.0, "masked_layers": [0]}}, r"mask.keep_mlp must be in \(0, 1\]"),
    ({"mask": {"masked_layers": []}}, "masked_layers is empty"),
    ({"mask": {"masked_layers": [0]}, "train": {"mode": "sft"}}, "train.mode is 'sft'"),
    ({"mask": {"masked_layers": [0]}, "optim": {"lr": "fast"}}, "optim.lr must be a number"),
    ({"mask": {"masked_layers": [0]}, "train": {"batch_size": 6, "micro_batch_size": 4}}, "must divide"),
    ({"mask": {"masked_layers": [0]}, "mesh": {"data": -1, "fsdp": -1}}, "at most one -1"),
    ({"mask": {"masked_layers": [0]}, "model": {"loss_chunk": -8}}, r"model.loss_chunk must be an integer >= 0"),
    ({"mask": {"masked_layers": [0]}, "model": {"remat": "attention"}},
     r"model.remat is 'attention'; choose one of \['none', 'full', 'dots', 'dots_attention'\]"),
    ({"mask": {"masked_layers": [0]}, "train": {"grad_reduce": "bf16"}},
     r"train.grad_reduce is 'bf16'; choose one of \['compute', 'fp32'\]"),
])
def test_bad_configs_name_the_key(raw, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict(raw)


def test_method_names_come_from_the_registry():
    """`train.mode` is checked against mft_jax.methods.METHODS (the one list), and a mode that bypassed the
    config check (set after loading) is refused by `methods.make`, never trained as FFT."""
    from mft_jax import methods

    with pytest.raises(config.ConfigError, match=r"train.mode is 'lorra'; choose one of \['mft', 'fft', 'lora'\]"):
        config.from_dict({"train": {"mode": "lorra"}})
    run = config.from_dict({"train": {"mode": "fft"}})
    tiny = config.LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                              num_attention_heads=2)
    assert isinstance(methods.make(run, tiny), methods.FFT)
    run.train.mode = "fft "
    with pytest.raises(config.ConfigError, match=r"train.mode 'fft ' is not a method; choose one of"):
        methods.make(run, tiny)


def test_masked_layers_checked_against_model():
    mask = config.from_dict({"mask": {"masked_layers": [1, 5]}}).mask
    with pytest.raises(config.ConfigError, match=r"\[5\] out of range: the model has 2 decoder layers"):
        mask.check_against(config.LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
                                              num_hidden_layers=2, num_attention_heads=2))


def test_a_row_count_glued_to_a_file_name_is_split_back(tmp_path):
    """`{train.jsonl:null}` (no space after the colon) is one YAML key 'train.jsonl:null': a data file and its
    row count, not a hub dataset; hub names with colons (org/name:config:split) stay as written."""
    local = tmp_path / "rows"
    local.write_text("")
    base = {"mask": {"masked_layers": [0]}}
    for override, expected in [("data.train={train.jsonl:null}", {"train.jsonl": None}),
                               ("data.train={a/b.parquet:12, c.json: 3}", {"a/b.parquet": 12, "c.json": 3}),
                               (f"data.dev={{{local}:~}}", {str(local): None}),
                               ("data.train={org/name:default:train: 5}", {"org/name:default:train": 5}),
                               ("data.train={org/name:train}", {"org/name:train": None})]:
        run = config.from_dict(base, [override], verbose=False)
        assert {**run.data.train, **run.data.dev} == expected, override

