"""Checkpoint conversion: sharded files, bad checkpoints, orbax round trip, the convert CLI."""

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap

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


# --------------------------------------------------------------------------------------------------------
# Host memory: one tensor in flight, each device slice read once, nothing cached on the params
# --------------------------------------------------------------------------------------------------------

def _mesh_shardings(tree, spec_of):
    from jax.sharding import NamedSharding

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, spec_of(p[-1].key, x.shape)), tree)


def _count_row_reads(monkeypatch):
    """Records (tensor offset, first row, end row) of every read the loaders make from a safetensors file."""
    from mft_jax import safetensors_io

    reads = []
    original = safetensors_io.TensorRef._read

    def counting(self, start, stop):
        reads.append((self.offset, start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(safetensors_io.TensorRef, "_read", counting)
    return reads


@pytest.mark.parametrize("split", ["hf_rows", "hf_columns"])
def test_sharded_load_reads_each_distinct_slice_once(hf_dir, monkeypatch, split):
    """On a (data 2, fsdp 4) mesh each param has at most 4 distinct slices, each held by 2 devices: a slice is
    read once, and a slice of HF rows reads only those rows (a host reads only the rows of its slices)."""
    from jax.sharding import PartitionSpec as P

    _, path = hf_dir
    cfg, plain = convert.load_hf(path)
    refs = convert.tensor_index(path)

    def spec_of(leaf_name, shape):
        if leaf_name == "kernel":  # ours [in, out]: HF rows are our out (axis 1), HF columns our in (axis 0)
            axis = 1 if split == "hf_rows" else 0
            return P(*["fsdp" if a == axis else None for a in range(2)]) if shape[axis] % 4 == 0 else P()
        return P("fsdp") if len(shape) == 1 and shape[0] % 4 == 0 else P()

    shardings = _mesh_shardings(plain, spec_of)
    reads = _count_row_reads(monkeypatch)
    _, sharded = convert.load_hf(path, shardings=shardings)
    expected_rows = 0
    for (p, want), got, sharding in zip(convert.named_leaves(plain), [x for _, x in convert.named_leaves(sharded)],
                                        [s for _, s in convert.named_leaves(shardings)]):
        assert got.sharding == sharding and np.array_equal(np.asarray(got), np.asarray(want)), p
        ref = refs[convert.hf_name(p)]
        ranges = sorted((a, b) for offset, a, b in reads if offset == ref.offset)
        rows, parts = ref.shape[0], len({str(s.index) for s in got.addressable_shards})
        if parts == 1:  # replicated on 8 devices: read once, not 8 times
            expected = [(0, rows)]
        elif split == "hf_rows" or len(ref.shape) == 1:  # each row once
            expected = [(i * rows // 4, (i + 1) * rows // 4) for i in range(4)]
        else:  # a block of columns of a row-major file needs its rows: once per distinct slice, not per device
            expected = [(0, rows)] * 4
        assert ranges == expected, p
        expected_rows += sum(b - a for a, b in expected)
    assert sum(b - a for _, a, b in reads) == expected_rows  # and nothing else was read


def test_orbax_round_trip_cast_sharded_and_older_checkpoints(hf_dir, tmp_path):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from jax.sharding import PartitionSpec as P

    _, path = hf_dir
    cfg, params = convert.load_hf(path)
    out = convert.save_orbax(cfg, params, tmp_path / "orbax")
    cfg2, back = convert.load_orbax(out)
    assert cfg2 == cfg and _all_equal(params, back)
    shardings = _mesh_shardings(params, lambda name, shape: P("fsdp") if shape[0] % 4 == 0 else P())
    cfg3, sharded = convert.load_any(out, dtype=jnp.bfloat16, shardings=shardings)
    assert cfg3.dtype == "bfloat16"
    for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
        assert b.dtype == jnp.bfloat16 and b.sharding == s
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(jnp.bfloat16))
    # stored uncompressed (zstd's buffers would hold a second copy of the model while saving)
    store = convert._OrbaxArrays(out / "params").open("embed_tokens")
    assert store.spec().to_json()["metadata"].get("compressor") is None
    # what earlier versions wrote (orbax's StandardCheckpointer: zstd, one chunk per array) still loads
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((out / "config.json").read_text())
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(old.absolute() / "params", params)
    assert _all_equal(params, convert.load_orbax(old)[1])
    # a config.json of other shapes is named with the first param that does not fit
    hf_cfg = json.loads((out / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**hf_cfg, "intermediate_size": 2 * hf_cfg["intermediate_size"]}))
    with pytest.raises(convert.CheckpointError, match=r"layers_0\.mlp\.down_proj\.kernel has shape \[112, 64\], but "
                                                      r"its config\.json implies \[224, 64\]"):
        convert.load_orbax(old)
    (old / "config.json").write_text(json.dumps({**hf_cfg, "num_hidden_layers": hf_cfg["num_hidden_layers"] + 1}))
    with pytest.raises(convert.CheckpointError, match=r"params: no array layers_3\.input_layernorm\.scale, which its "
                                                      r"config\.json implies"):
        convert.load_orbax(old)


def test_save_hf_holds_one_tensor_and_caches_nothing_on_the_params(tmp_path):
    import tracemalloc

    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from mft_jax.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, dtype="float32")
    params = model.init_params(cfg, jax.random.key(0), jnp.float32)
    sizes = [x.size * x.dtype.itemsize for x in jax.tree.leaves(params)]
    largest, total = max(sizes), sum(sizes)  # 4 MiB (embedding, head), 13.6 MiB
    shardings = _mesh_shardings(params, lambda name, shape: P("fsdp") if shape[0] % 4 == 0 else P())
    sources = {"one device": lambda: jax.tree.map(jnp.copy, params),
               "8 devices": lambda: jax.device_put(params, shardings),
               "numpy": lambda: jax.tree.map(lambda x: np.array(x, copy=True), params)}
    files = {}
    for name, make in sources.items():
        for dtype in ("float32", "bfloat16"):
            convert.save_hf(cfg, make(), tmp_path / "warm", dtype=dtype)  # compiles the transposes once
            tree = jax.block_until_ready(make())  # fresh arrays: nothing cached on them yet
            tracemalloc.start()
            out = convert.save_hf(cfg, tree, tmp_path / f"{name}-{dtype}", dtype=dtype)
            kept, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            # one tensor on host (8 devices: assembled from its shards) plus one cast/transposed block of it;
            # fetching whole params, or caching host copies on them, would reach the model's size
            assert peak < 2 * largest + 2**20 < total, (name, dtype, peak)
            assert kept < 2**20, (name, dtype, kept)
            files[name, dtype] = (out / "model.safetensors").read_bytes()
    for dtype in ("float32", "bfloat16"):
        assert files["one device", dtype] == files["8 devices", dtype] == files["numpy", dtype]
    _, bf16 = convert.load_hf(tmp_path / "numpy-bfloat16")
    assert all(np.array_equal(np.asarray(b), np.asarray(a).astype(jnp.bfloat16))
               for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(bf16)))


def test_write_safetensors_streams_blocks_and_checks_their_size(tmp_path):
    blocks = [np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(6, 9, dtype=np.float32).reshape(1, 3)]
    convert.write_safetensors(tmp_path / "a.safetensors", [("w", (3, 3), np.float32, lambda: iter(blocks))])
    np.testing.assert_array_equal(convert.read_safetensors_index(tmp_path / "a.safetensors")["w"].load(),
                                  np.arange(9, dtype=np.float32).reshape(3, 3))
    with pytest.raises(ValueError, match=r"tensor w: produced 24 bytes, declared shape \(3, 3\) x float32 needs 36"):
        convert.write_safetensors(tmp_path / "b.safetensors", [("w", (3, 3), np.float32, lambda: iter(blocks[:1]))])


_TWO_PROCESS_CHILD = textwrap.dedent("""
    import json, sys
    from mft_jax import distributed
    distributed.initialize()
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mft_jax import convert, model, safetensors_io
    src, out, record = sys.argv[1:]
    rows = []
    read_rows = safetensors_io.TensorRef._read
    safetensors_io.TensorRef._read = lambda self, a, b: rows.append(b - a) or read_rows(self, a, b)
    cfg = convert.load_config(src)
    mesh = jax.make_mesh((8,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
    # kernels split over their out dimension (HF rows) across the 8 devices of both processes; the rest replicated
    spec = lambda p, x: P(None, "tensor") if p[-1].key == "kernel" and x.shape[1] % 8 == 0 else P()
    shardings = jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, spec(p, x)),
                                                 model.param_shapes(cfg))
    _, params = convert.load_hf(src, shardings=shardings)
    rows_read = sum(rows)
    convert.save_orbax(cfg, params, out)
    _, back = convert.load_orbax(out, shardings=shardings)
    same = all(np.array_equal(np.asarray(s.data), np.asarray(t.data)) for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(back)) for s, t in zip(a.addressable_shards,
                                                                                    b.addressable_shards))
    json.dump({"rows_read": rows_read, "same": same, "processes": jax.process_count()},
              open(f"{record}.{jax.process_index()}", "w"))
""")


def test_two_processes_read_their_rows_and_write_their_shards(hf_dir, tmp_path):
    """2 processes x 4 CPU devices load a HF checkpoint onto one mesh, reading only the HF rows of their own
    slices, save it as one orbax checkpoint (each writing its shards) and read it back onto the mesh."""
    _, path = hf_dir
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MFT_JAX_")}
        env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   MFT_JAX_COORDINATOR=f"localhost:{port}", MFT_JAX_NUM_PROCESSES="2", MFT_JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_CHILD, str(path), str(tmp_path / "orbax"),
                                       str(tmp_path / "record")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output[-3000:]
    records = [json.loads((tmp_path / f"record.{i}").read_text()) for i in range(2)]
    refs = convert.tensor_index(path)
    split = [n for n, r in refs.items() if len(r.shape) == 2 and "embed" not in n and r.shape[0] % 8 == 0]
    assert split and "lm_head.weight" not in split  # 97 vocab rows: replicated
    half = sum(r.shape[0] for r in refs.values()) - sum(refs[n].shape[0] for n in split) // 2
    assert records == [{"rows_read": half, "same": True, "processes": 2}] * 2
    written = sorted(p.name for p in (tmp_path / "orbax" / "params").iterdir() if p.name.startswith("ocdbt.process_"))
    assert written == ["ocdbt.process_0", "ocdbt.process_1"]
    assert _all_equal(convert.load_hf(path)[1], convert.load_orbax(tmp_path / "orbax")[1])
    assert outputs.is_ours(tmp_path / "orbax") and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
