"""Whole-model caches (`init_layers`, per-layer formats) and cache files
(`save` / `load`): routing against per-layer caches built on their own,
in-place layer loops, stats per layer and in total, bit-identical round
trips for every store format, byte-identical files across ISAs, and clear
errors for damaged files and wrong specs."""

import functools
import json
import os
import pathlib
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import _formats
from tests import attention_check

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASE = dict(num_kv_heads=2, head_dim=64, capacity=96, tail=8, migrate_batch=8, sinks=2)


def spec(store, **kw):
  return kvjax.CacheSpec(**{**BASE, "store": store, **kw})


def tokens(n, seed):
  return np.random.default_rng(seed).normal(size=(n, 2, 64)).astype(np.float32)


# A model whose first and last layers are protected, as a calibrated policy
# would do: runs of 1, 2 and 1 layers.
POLICY = [spec("q8"), spec(("q8", "q4")), spec(("q8", "q4")), spec("turbo3.5")]


@functools.lru_cache(maxsize=None)
def alone(i):
  """Layer i's cache built on its own."""
  return kvjax.append(kvjax.init(POLICY[i]), tokens(50, i), tokens(50, 10 + i))


def filled_model(specs=POLICY, n=50):
  model = kvjax.init_layers(specs)
  for i in range(len(specs)):
    model = kvjax.append(model, tokens(n, i), tokens(n, 10 + i), layer=i)
  return model


def test_init_layers_groups_runs_of_equal_specs():
  model = kvjax.init_layers(POLICY)
  assert model.run_layers == (1, 2, 1) and model.num_layers == 4
  assert model.specs == tuple(POLICY)
  assert [(first, n) for first, n, _ in kvjax.layer_runs(model)] == [(0, 1), (1, 2), (3, 1)]
  assert model.runs[1].length.shape == (2,)
  batched = kvjax.init_layers(POLICY, batch=3)
  assert batched.runs[1].length.shape == (3, 2)
  with pytest.raises(ValueError, match="specs: expected a non-empty sequence"):
    kvjax.init_layers([])
  with pytest.raises(ValueError, match="batch: expected a positive int"):
    kvjax.init_layers(POLICY, batch=0)


def test_layers_route_like_caches_built_alone():
  """Each layer of a ModelCache holds what a cache of its spec alone holds,
  and attention over it matches float64 attention over its tokens."""
  model = filled_model()
  q = np.random.default_rng(7).normal(size=(2, 4, 64)).astype(np.float32)
  for i in range(len(POLICY)):
    got = kvjax.materialize(model, layer=i)
    for a, b in zip(got, kvjax.materialize(alone(i))):
      np.testing.assert_array_equal(a, b)
    want = attention_check.reference_attend(alone(i), q, [48, 49])
    out = kvjax.attend(model, q, layer=i)  # the kernel on CPU
    assert attention_check.relative_error(out, want) <= 5e-5, i
  assert int(kvjax.length(model)) == 50


def test_stats_per_layer_and_total():
  model = filled_model()
  st = kvjax.stats(model)
  assert len(st["layers"]) == 4 and st["total"]["num_layers"] == 4
  for i in range(len(POLICY)):
    assert st["layers"][i] == kvjax.stats(alone(i))
  total = st["total"]
  for key in ("store_bytes", "tail_bytes", "sink_bytes", "allocated_bytes", "store_tokens"):
    assert total[key] == sum(layer[key] for layer in st["layers"])
  assert total["allocated_bytes"] == sum(a.nbytes for a in jax.tree.leaves(model))
  values = sum(layer["store_tokens"] for layer in st["layers"]) * 2 * 2 * 64
  assert total["store_bits_per_value"] == 8 * total["store_bytes"] / values
  # At D = 64: q8 keys (8 bits + f32 scale and zero per 64) but in layer 3
  # (turbo3.5: 3.5 bits + 2 bf16 norms per 64); values q8, q4, q4, turbo3.5.
  assert total["key_bits_per_value"] == pytest.approx((3 * (8 + 1) + 3.5 + 0.5) / 4)
  assert total["value_bits_per_value"] == pytest.approx((8 + 1 + 2 * (4 + 1) + 4) / 4)


def test_traced_layer_needs_a_single_run():
  model = filled_model()
  with pytest.raises(ValueError, match="a traced layer index needs every layer to share"):
    jax.jit(lambda m, i: kvjax.attend(m, jnp.ones((1, 4, 64)), layer=i))(model, 1)
  with pytest.raises(ValueError, match=r"layer: expected 0 <= layer < 4 \(the model's layers\), got 4"):
    kvjax.append(model, tokens(1, 0), tokens(1, 0), layer=4)
  with pytest.raises(ValueError, match="needs layer=i"):
    kvjax.attend(model, jnp.ones((1, 4, 64)))
  uniform = kvjax.init_layers([spec("q4")] * 3)
  out = jax.jit(lambda m, i: kvjax.append(m, tokens(2, 0), tokens(2, 1), layer=i))(uniform, 2)
  assert kvjax.stats(out)["total"]["retained_tokens"] == 2
  assert kvjax.stats(out)["layers"][2]["length"] == 2


def test_decode_step_over_all_layers_in_place():
  """A jitted, donated step appending to and attending over every layer
  (a Python loop over layers of differing specs) copies no store. As in a
  model, each layer's keys depend on the previous layer's attention: that
  orders the reads of a run before its next write (docs/layers.md)."""
  model = kvjax.init_layers([spec("q8", capacity=2048), spec(("q8", "q4"), capacity=2048),
                             spec(("q8", "q4"), capacity=2048)])

  def step(model, x, q):
    outs = []
    for i in range(model.num_layers):
      k = x * (i + 1.0)
      model = kvjax.append(model, k, k, layer=i)
      outs.append(kvjax.attend(model, q, layer=i))
      x = x + outs[-1].mean()
    return model, jnp.stack(outs)

  run = jax.jit(step, donate_argnums=0)
  hlo = run.lower(model, tokens(1, 0), jnp.ones((1, 4, 64))).compile().as_text()
  big = [line for line in hlo.splitlines() if " copy(" in line and "2046" in line]
  assert not big, big
  # A scan over one run's layers with a traced index, put back in place.
  first, n, _ = kvjax.layer_runs(model)[1]
  k = tokens(3, 5)
  stack = jax.lax.fori_loop(0, n, lambda i, s: kvjax.append(s, k, k, layer=i), model.runs[1])
  model = model.replace_run(1, stack)
  assert [layer["length"] for layer in kvjax.stats(model)["layers"]] == [0, 3, 3]


def test_migrate_evict_clear_check_on_every_layer():
  model = filled_model()
  evicted = kvjax.evict(model, 5)
  assert [l["evicted_tokens"] for l in kvjax.stats(evicted)["layers"]] == [5] * 4
  one = kvjax.evict(model, 7, layer=2)
  assert [l["evicted_tokens"] for l in kvjax.stats(one)["layers"]] == [0, 0, 7, 0]
  migrated = kvjax.migrate(model)
  assert all(l["tail_tokens"] <= 8 for l in kvjax.stats(migrated)["layers"])
  cleared = kvjax.clear(model)
  assert kvjax.stats(cleared)["total"]["retained_tokens"] == 0
  kvjax.check(model)
  full = kvjax.init_layers([spec("q8", overflow="error")] * 2 + [spec("q4")])
  full = kvjax.append(full, tokens(100, 0), tokens(100, 1), layer=1)
  with pytest.raises(OverflowError, match=r"ModelCache layers 0\.\.1 .*rejected caches \[1\]"):
    kvjax.check(full)


# Every store format, each as one layer of one ModelCache (one file), and a
# batch of stacks: save -> load gives the same leaves, bit for bit.
ALL_FORMATS = [spec(f, head_dim=64, hot_dtype=("float32", "bfloat16", "float16")[i % 3])
               for i, f in enumerate(_formats.FORMATS)] + [spec(("q8", "q4"))]

WRITE_ALL_FORMATS = """
import sys, numpy as np, kvjax
from tests import test_layers_and_files as t
kvjax.save(sys.argv[1], t.filled_model(t.ALL_FORMATS, n=120))
"""


def assert_same_leaves(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.atleast_1d(np.asarray(x)).view(np.uint8),
                                  np.atleast_1d(np.asarray(y)).view(np.uint8))


def test_save_load_every_format_bit_identical_and_byte_identical_across_isas(tmp_path):
  model = filled_model(ALL_FORMATS, n=120)
  path = tmp_path / "model.kvjax"
  kvjax.save(path, model)
  loaded = kvjax.load(path, spec=ALL_FORMATS)
  assert_same_leaves(model, loaded)
  # Loaded caches work: attention over the loaded layer equals the original's.
  q = jnp.ones((1, 4, 64))
  for i in (3, 7, len(ALL_FORMATS) - 1):
    np.testing.assert_array_equal(kvjax.attend(loaded, q, layer=i), kvjax.attend(model, q, layer=i))
  # The same tokens written by another process with the scalar kernels (and,
  # in this process, the best ISA this CPU runs): the same bytes.
  other = tmp_path / "scalar.kvjax"
  proc = subprocess.run([sys.executable, "-c", WRITE_ALL_FORMATS, str(other)], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "KVJAX_ISA": "scalar"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert other.read_bytes() == path.read_bytes()


def read_safetensors(path):
  """An independent reader of the safetensors layout: header and tensors."""
  data = pathlib.Path(path).read_bytes()
  (size,) = struct.unpack("<Q", data[:8])
  header = json.loads(data[8:8 + size])
  dtypes = {"F32": np.float32, "U8": np.uint8, "U16": np.uint16, "I32": np.int32,
            "BOOL": np.bool_}
  tensors = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    begin, end = entry["data_offsets"]
    tensors[name] = np.frombuffer(data[8 + size + begin:8 + size + end],
                                  dtypes[entry["dtype"]]).reshape(entry["shape"])
  return header["__metadata__"], tensors


def test_file_is_safetensors_with_the_spec_in_its_metadata(tmp_path):
  stack = kvjax.init(spec("q4"), batch=(2, 3))
  stack = jax.vmap(jax.vmap(lambda c, k: kvjax.append(c, k, k)))(
      stack, np.broadcast_to(tokens(30, 1), (2, 3, 30, 2, 64)))
  kvjax.save(tmp_path / "s.kvjax", stack)
  metadata, tensors = read_safetensors(tmp_path / "s.kvjax")
  assert metadata["format"] == "kvjax" and metadata["version"] == "1"
  assert metadata["kind"] == "KVCache" and json.loads(metadata["batch"]) == [2, 3]
  assert json.loads(metadata["specs"])[0]["store"] == "q4"
  np.testing.assert_array_equal(tensors["store_k.codes"], stack.store_k.codes)
  np.testing.assert_array_equal(tensors["length"], stack.length)
  loaded = kvjax.load(tmp_path / "s.kvjax", spec=spec("q4"))
  assert_same_leaves(stack, loaded)
  single = jax.tree.map(lambda a: a[1, 2], stack)
  kvjax.save(tmp_path / "one.kvjax", single)
  assert_same_leaves(single, kvjax.load(tmp_path / "one.kvjax"))


def test_damaged_files_and_wrong_specs_are_clear_errors(tmp_path):
  model = filled_model()
  path = tmp_path / "m.kvjax"
  kvjax.save(path, model)
  data = path.read_bytes()
  (size,) = struct.unpack("<Q", data[:8])
  cases = {
      "truncated": (data[:-100], "truncated"),
      "flipped tensor byte": (data[:8 + size + 999] + bytes([data[8 + size + 999] ^ 4])
                              + data[8 + size + 1000:], "checksum mismatch"),
      "header edited": (data.replace(b"turbo3.5", b"turbo2.5", 1), "checksum mismatch"),
      "empty": (b"", "too short"),
      "not a kvjax file": (struct.pack("<Q", 2) + b"{}", "no __metadata__"),
  }
  for name, (bad, match) in cases.items():
    (tmp_path / "bad").write_bytes(bad)
    with pytest.raises(kvjax.CacheFileError, match=match):
      kvjax.load(tmp_path / "bad")
  wrong = [POLICY[0], POLICY[1], POLICY[2], spec("turbo3.5", capacity=128)]
  with pytest.raises(kvjax.CacheFileError,
                     match=r"layer 3: the file's spec differs from spec=: capacity=96 \(spec= has 128\)"):
    kvjax.load(path, spec=wrong)
  with pytest.raises(ValueError, match="expected one CacheSpec per layer"):
    kvjax.load(path, spec=POLICY[0])
  assert_same_leaves(model, kvjax.load(path))
