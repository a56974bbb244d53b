"""Checkpoint conversion: sharded files, bad checkpoints, orbax round trip, the convert CLI."""

import json
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from hf_models import hf_logits, make_hf_llama
from mft_jax import convert, model, outputs
from tolerances import assert_close, forward_length, rounding_bound


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf = make_hf_llama("llama31_gqa")
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    hf.save_pretrained(path)
    return hf, path


def _all_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _shards(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return len(set(index["weight_map"].values())), index


def test_three_shard_checkpoint_converts(hf_dir, tmp_path):
    hf, path = hf_dir
    cfg, params = convert.load_hf(path)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    # transformers' own 3-shard layout loads ...
    for divisor in (3.0, 2.8, 2.6, 2.4, 2.2):
        hf.save_pretrained(tmp_path / "hf3", max_shard_size=int(total / divisor) + 1)
        if _shards(tmp_path / "hf3")[0] == 3:
            break
    assert _shards(tmp_path / "hf3")[0] == 3
    cfg3, params3 = convert.load_hf(tmp_path / "hf3")
    assert cfg3 == cfg and _all_equal(params, params3)
    # ... and ours writes one that loads back identically, with a correct index.
    out = convert.save_hf(cfg, params, tmp_path / "sharded", max_shard_size=total // 3 + 1)
    num_shards, index = _shards(out)
    assert num_shards >= 3 and index["metadata"]["total_size"] == total
    cfg2, params2 = convert.load_hf(out)
    assert cfg2 == cfg and _all_equal(params, params2)
    tokens = np.arange(20, dtype=np.int32)[None] % cfg.vocab_size
    ref = hf_logits(hf, tokens)
    # torch and XLA sum every matmul, norm and softmax of the forward pass in their own orders
    assert_close(model.forward(cfg2, params2, tokens), ref, rounding_bound(forward_length(cfg, 20), np.abs(ref).max()),
                 "logits vs transformers")


def test_bf16_and_sharded_loading(hf_dir):
    _, path = hf_dir
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    cfg, params = convert.load_hf(path)
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, P("fsdp") if x.ndim == 2 and x.shape[0] % 4 == 0
                                                     else P()), params)
    cfg_bf16, sharded = convert.load_hf(path, dtype=jnp.bfloat16, shardings=shardings)
    assert cfg_bf16.dtype == "bfloat16"
    for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
        assert b.dtype == jnp.bfloat16 and b.sharding == s
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(jnp.bfloat16))


def _rewrite(path, dst, edit):
    """Copies a single-file checkpoint, letting `edit` change its tensor dict."""
    refs = convert.tensor_index(path)
    tensors = {name: np.array(ref.load()) for name, ref in refs.items()}
    edit(tensors)
    dst.mkdir()
    convert.write_safetensors(dst / "model.safetensors",
                              [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()])
    (dst / "config.json").write_text((path / "config.json").read_text())
    return dst


def test_missing_tensor_is_named(hf_dir, tmp_path):
    _, path = hf_dir
    bad = _rewrite(path, tmp_path / "missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(convert.CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        convert.load_hf(bad)


def test_wrong_shape_is_named(hf_dir, tmp_path):
    _, path = hf_dir

    def edit(t):
        t["model.layers.2.self_attn.k_proj.weight"] = t["model.layers.2.self_attn.k_proj.weight"][:-1]

    bad = _rewrite(path, tmp_path / "shape", edit)
    with pytest.raises(convert.CheckpointError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight has shape"):
        convert.load_hf(bad)


def test_unexpected_tensor_and_missing_files_are_named(hf_dir, tmp_path):
    _, path = hf_dir
    bad = _rewrite(path, tmp_path / "extra", lambda t: t.update({"model.layers.9.mlp.up_proj.weight": np.zeros(3)}))
    with pytest.raises(convert.CheckpointError, match=r"unexpected tensors.*layers\.9"):
        convert.load_hf(bad)
    with pytest.raises(convert.CheckpointError, match="does not exist"):
        convert.load_hf(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(convert.CheckpointError, match="no \\*.safetensors"):
        convert.load_hf(tmp_path / "empty")


def test_convert_cli_round_trip(hf_dir, tmp_path):
    _, path = hf_dir
    orbax_dir, back = tmp_path / "orbax", tmp_path / "back"
    for args in (["--from-hf", str(path), "--out", str(orbax_dir)], ["--to-hf", str(orbax_dir), "--out", str(back)]):
        subprocess.run([sys.executable, "-m", "mft_jax", "convert", *args], check=True, capture_output=True)
    cfg, params = convert.load_hf(path)
    cfg2, params2 = convert.load_hf(back)
    assert cfg2 == cfg and _all_equal(params, params2)


def _safetensors(path, header, data: bytes = b"", header_len=None):
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


@pytest.mark.parametrize("header, data, header_len, message", [
    ({}, b"", 10**6, r"header claims 1000000 bytes, the file has \d+"),
    (b"{not json", b"", None, "header is not JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    ({"w": {"dtype": "F8", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), None, "unsupported dtype 'F8'"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), None, "invalid shape"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), None, "invalid data_offsets"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), None, "holds 8 bytes, but shape"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), None, r"truncated: tensor w ends"),
    ({"w": {"dtype": "F32"}}, b"", None, "has no dtype / shape / data_offsets"),
])
def test_damaged_safetensors_headers_fail_before_any_read(tmp_path, header, data, header_len, message):
    path = _safetensors(tmp_path / "x.safetensors", header, data, header_len)
    with pytest.raises(convert.CheckpointError, match=message) as info:
        convert.read_safetensors_index(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_short_file_and_valid_header(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(convert.CheckpointError, match="shorter than its 8-byte header length"):
        convert.read_safetensors_index(tmp_path / "short.safetensors")
    good = _safetensors(tmp_path / "ok.safetensors", {"__metadata__": {"format": "pt"},
                                                      "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                        np.array([1.5, -2.0], np.float32).tobytes())
    refs, meta = convert.read_safetensors_header(good)
    assert meta == {"format": "pt"}
    np.testing.assert_array_equal(refs["w"].load(), [1.5, -2.0])


def test_save_hf_keeps_a_foreign_directory_and_replaces_its_own(hf_dir, tmp_path):
    _, path = hf_dir
    cfg, params = convert.load_hf(path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(outputs.OutputError, match="not written by mft-jax"):
        convert.save_hf(cfg, params, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    out = convert.save_hf(cfg, params, tmp_path / "out")
    (out / "extra.txt").write_text("from the first export")
    convert.save_hf(cfg, params, out)  # an earlier output of ours: replaced as a whole
    assert not (out / "extra.txt").exists() and outputs.is_ours(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]
    _, params2 = convert.load_hf(out)
    assert _all_equal(params, params2)
