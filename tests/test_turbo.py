"""TurboQuant formats: the paper's distortion numbers, unbiased prod
variants, real packing, bit-exact encoding, and the cache's attention in the
rotated domain."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import kvjax
from kvjax import _turbo, _turbo_codebooks
from tests import reference

ROOT = pathlib.Path(__file__).resolve().parent.parent
MSE = ("turbo1", "turbo2", "turbo3", "turbo4")
PROD = ("turbo1p", "turbo2p", "turbo3p", "turbo4p")
SPLIT = ("turbo2.5", "turbo3.5")
ALL = MSE + SPLIT + PROD
# turboquant.md: Lloyd-Max at d = 128, positive centroids * sqrt(d), D_mse.
PAPER_CENTROIDS = {1: [0.7994], 2: [0.4525, 1.5052],
                   3: [0.2444, 0.7533, 1.3366, 2.1315],
                   4: [0.1279, 0.3864, 0.6536, 0.9371, 1.2478, 1.6043, 2.0459, 2.6889]}
PAPER_D_MSE = {1: 0.3609, 2: 0.1160, 3: 0.03397, 4: 0.009315}
EXACT_D_PROD = {1: 1.563, 2: 0.564, 3: 0.181, 4: 0.0531}  # d * D_prod at d = 128
BIAS_TOLERANCE = {1: 0.02, 2: 0.0075, 3: 0.0025, 4: 0.001}  # ~3 std across S


def unit_vectors(n, d, seed):
  x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


roundtrip = jax.jit(lambda x, fmt: kvjax.dequantize(kvjax.quantize(x, fmt), fmt),
                    static_argnums=1)


@pytest.mark.slow
def test_regenerating_codebooks_reproduces_the_shipped_table():
  spec = importlib.util.spec_from_file_location(
      "make_codebooks", ROOT / "scripts" / "make_turbo_codebooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.render() == (ROOT / "kvjax" / "_turbo_codebooks.py").read_text()


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_matches_the_paper(bits):
  c = np.asarray(_turbo_codebooks.CENTROIDS[128][bits]) * math.sqrt(128)
  np.testing.assert_allclose(c[2 ** (bits - 1):], PAPER_CENTROIDS[bits], rtol=1e-3)
  np.testing.assert_allclose(c, -c[::-1])
  assert _turbo_codebooks.D_MSE[128][bits] == pytest.approx(PAPER_D_MSE[bits], rel=1e-3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_distortion_of_unit_vectors(bits):
  x = unit_vectors(20000, 128, seed=bits)
  err = np.sum((np.asarray(roundtrip(x, f"turbo{bits}")) - x) ** 2, -1)
  assert np.mean(err) == pytest.approx(PAPER_D_MSE[bits], rel=0.03)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prod_is_unbiased_with_the_papers_distortion(bits):
  x = unit_vectors(40000, 128, seed=10 + bits)
  y = np.concatenate([np.asarray(roundtrip(x[i:i + 10000], f"turbo{bits}p"))
                      for i in range(0, len(x), 10000)])
  bias = np.mean(np.sum(x * y, -1)) - 1
  assert abs(bias) < BIAS_TOLERANCE[bits], bias
  # For a query uniform on the sphere, d * E<q, err>^2 = E||err||^2.
  assert np.mean(np.sum((y - x) ** 2, -1)) == pytest.approx(EXACT_D_PROD[bits], rel=0.05)
  if bits == 1:  # the mse quantizer at the same b is biased: 0.64 of <x, x>
    mse = np.asarray(roundtrip(x[:5000], "turbo1"))
    assert np.mean(np.sum(x[:5000] * mse, -1)) == pytest.approx(0.64, abs=0.01)


@pytest.mark.parametrize("fmt", ALL)
def test_measured_bits_are_label_plus_norms(fmt):
  spec = kvjax.CacheSpec(num_kv_heads=2, head_dim=128, capacity=64, tail=0,
                         migrate_batch=1, store=fmt)
  x = np.random.default_rng(0).normal(size=(64, 2, 128)).astype(np.float32)
  stats = kvjax.stats(kvjax.append(kvjax.init(spec), x, x))
  label = float(fmt[5:].rstrip("p"))
  norms = 16 * (2 if (fmt in SPLIT or fmt in PROD) else 1)
  assert stats["store_bits_per_value"] == label + norms / 128
  assert {"turbo3.5": 3.75, "turbo2.5": 2.75}.get(fmt, 99) >= stats["store_bits_per_value"]


def outlier_keys(n, d, seed=0):
  rng = np.random.default_rng(seed)
  k = rng.normal(size=(n, 2, d)).astype(np.float32)
  channels = rng.choice(d, size=4, replace=False)
  k[..., channels] = k[..., channels] * 20 + 10
  return k


def relative_key_mse(store, k, d):
  spec = kvjax.CacheSpec(num_kv_heads=2, head_dim=d, capacity=len(k), tail=0,
                         migrate_batch=1, store=store, hot_dtype="float32")
  cache = kvjax.append(kvjax.init(spec), k, k)
  got = np.asarray(kvjax.materialize(cache)[0])
  return np.sum((got - k) ** 2) / np.sum(k ** 2), kvjax.stats(cache)["store_bits_per_value"]


@pytest.mark.parametrize("d", [64, 128])
def test_turbo35_beats_q4_on_keys_with_outlier_channels(d):
  k = outlier_keys(1500, d)
  q4_err, q4_bits = relative_key_mse("q4", k, d)
  t_err, t_bits = relative_key_mse("turbo3.5", k, d)
  assert t_err < 0.5 * q4_err, (t_err, q4_err)
  if d == 64:  # 4.0 vs 5.0 bits: the bar's 80% of q4
    assert t_bits <= 0.8 * q4_bits
  else:  # turboquant.md's budget, two 16-bit norms: 3.75 bits, 83% of q4's 4.5
    assert t_bits == 3.75 and q4_bits == 4.5


def test_cache_outlier_split_beats_the_fixed_split():
  k = outlier_keys(1500, 128, seed=3)
  cache_err, _ = relative_key_mse("turbo3.5", k, 128)
  fixed = np.asarray(roundtrip(k, "turbo3.5"))
  assert cache_err < np.sum((fixed - k) ** 2) / np.sum(k ** 2)


def adversarial_vectors(d):
  rng = np.random.default_rng(1)
  tiny = np.finfo(np.float32).tiny
  rows = [np.zeros(d), np.full(d, -0.0), np.full(d, 1e-30), np.full(d, tiny / 3),
          np.r_[1e30, np.zeros(d - 1)], np.full(d, 3e37), rng.normal(size=d) * 1e-20,
          np.r_[1000.0, rng.normal(size=d - 1) * 1e-3], np.ones(d),
          np.r_[np.nan, np.ones(d - 1)], np.r_[np.ones(d - 1), -np.inf]]
  return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("fmt", ALL)
def test_encode_and_decode_are_bit_exact_eagerly_and_under_jit(fmt):
  x = np.concatenate([np.random.default_rng(2).normal(size=(300, 64)) * 3,
                      adversarial_vectors(64)]).astype(np.float32)
  eager = kvjax.quantize(x, fmt)
  jitted = jax.jit(lambda a: kvjax.quantize(a, fmt))(x)
  np.testing.assert_array_equal(eager.codes, jitted.codes)
  np.testing.assert_array_equal(eager.norms, jitted.norms)
  dec = np.asarray(kvjax.dequantize(eager, fmt)).view(np.uint32)
  dec_jit = np.asarray(jax.jit(lambda e: kvjax.dequantize(e, fmt))(eager)).view(np.uint32)
  np.testing.assert_array_equal(dec, dec_jit)
  finite = np.isfinite(x).all(-1)
  out = np.asarray(kvjax.dequantize(eager, fmt))
  assert np.isnan(out[~finite]).all() and np.isfinite(out[finite]).all()
  assert not out[300:302].any()  # the zero vectors (+0, -0) decode to zeros


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_encode_matches_an_independent_numpy_model(bits):
  x = np.random.default_rng(bits).normal(size=(500, 128)).astype(np.float32) * 2
  enc = kvjax.quantize(x, f"turbo{bits}")
  codes, norm = reference.turbo_mse_encode(
      x, bits, _turbo.signs(128), _turbo_codebooks.CENTROIDS[128][bits])
  np.testing.assert_array_equal(np.asarray(_turbo.unpack(enc.codes, bits, 128)), codes)
  want = norm.astype(ml_dtypes.bfloat16).view(np.uint16)
  np.testing.assert_array_equal(np.asarray(enc.norms)[:, 0], want)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_packing_layout(bits):
  codes = np.random.default_rng(bits).integers(0, 2 ** bits, (5, 64)).astype(np.uint8)
  packed = np.asarray(_turbo.pack(jnp.asarray(codes), bits))
  assert packed.shape == (5, 64 * bits // 8)
  word = int.from_bytes(packed[0, :bits].tobytes(), "little")
  assert [(word >> (k * bits)) & (2 ** bits - 1) for k in range(8)] == codes[0, :8].tolist()
  np.testing.assert_array_equal(_turbo.unpack(jnp.asarray(packed), bits, 64), codes)


def test_turbo_needs_a_power_of_two_head_dim():
  with pytest.raises(ValueError, match="CacheSpec.head_dim: must be a power of two"):
    kvjax.CacheSpec(head_dim=96, store="turbo3.5")
  with pytest.raises(ValueError, match="x: last axis"):
    kvjax.quantize(np.zeros((2, 96), np.float32), "turbo4")


def turbo_cache(store, n=70, sinks=2, tail=8, seed=0, capacity=80, migrate_batch=4):
  spec = kvjax.CacheSpec(num_kv_heads=2, head_dim=32, capacity=capacity, tail=tail,
                         migrate_batch=migrate_batch, sinks=sinks, hot_dtype="float32", store=store)
  rng = np.random.default_rng(seed)
  k = rng.normal(size=(n, 2, 32)).astype(np.float32)
  k[..., 5] = k[..., 5] * 10 + 4
  v = rng.normal(size=(n, 2, 32)).astype(np.float32)
  return spec, k, v


@pytest.mark.parametrize("store", ALL)
def test_attend_matches_reference_over_materialize(store):
  spec, k, v = turbo_cache(store)
  cache = kvjax.evict(kvjax.append(kvjax.init(spec), k, v), 3)
  q = np.random.default_rng(9).normal(size=(3, 4, 32)).astype(np.float32)
  q_pos = np.array([30, 60, 69])
  got = np.asarray(jax.jit(kvjax.attend, static_argnames="block_size")(
      cache, q, q_pos=q_pos, window=50, block_size=16))
  km, vm, pos, valid = (np.asarray(a) for a in kvjax.materialize(cache))
  want = reference.attention(q, km, vm, pos, valid, q_pos, window=50)
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("store", ("turbo3.5", "turbo2p"))
def test_store_holds_the_formats_reconstruction(store):
  spec, k, v = turbo_cache(store, sinks=0, tail=0, capacity=70, migrate_batch=1)
  splits = [kvjax.append(kvjax.init(spec), k, v)]
  c = kvjax.init(spec)
  for a, b in ((0, 1), (1, 40), (40, 70)):  # the first token fixes the split
    c = kvjax.append(c, k[a:b], v[a:b])
  splits.append(c)
  fmt = kvjax._formats.FORMATS[store]

  @jax.jit
  def roundtrip_with_split(x):
    order = fmt.outlier_order(x[0]) if fmt.split else None
    return fmt.decode(fmt.encode(x, order), order)

  for cache in splits:
    km, vm, _, _ = (np.asarray(a) for a in kvjax.materialize(cache))
    for x, got in ((k, km), (v, vm)):
      np.testing.assert_array_equal(got, roundtrip_with_split(jnp.asarray(x)))
