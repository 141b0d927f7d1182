"""The TurboQuant C++ kernels inside kvjax: caches built with either backend
are bit-identical (vmap, scan, one-token and chunked appends, the outlier
order), vmap with unbatched operands, empty batches, the kernels in the
compiled append, and clear errors. Bits per ISA: tests/ffi_isa_check.py and
the standalone program (tests/test_ffi_native.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import _turbo
from tests.test_ffi_kernels import assert_same_bits

INFO = kvjax.backend_info()
needs_ffi = pytest.mark.skipif(not INFO["ffi_loaded"],
                               reason=f"C++ kernels not loaded: {INFO['reason']}")


def filled_cache(store):
  """Chunked and one-token appends under vmap, then a scan of one-token
  appends, with a NaN in one sequence's first non-sink token."""
  spec = kvjax.CacheSpec(num_kv_heads=2, head_dim=32, capacity=48, tail=4,
                         migrate_batch=4, store=store, sinks=2)
  cache = kvjax.init(spec, batch=2)
  rng = np.random.default_rng(5)
  for n in (7, 1, 12, 1):
    k, v = (rng.normal(size=(2, n, 2, 32)) * 5 for _ in range(2))
    if n == 7:
      k[1, 2, 0, 3] = np.nan
    cache = jax.vmap(kvjax.append)(cache, jnp.asarray(k, jnp.float32),
                                   jnp.asarray(v, jnp.float32))
  steps = jnp.asarray(rng.normal(size=(6, 2, 1, 2, 32)), jnp.float32)
  cache, _ = jax.lax.scan(lambda c, kv: (jax.vmap(kvjax.append)(c, kv, kv), None),
                          cache, steps)
  return cache


@needs_ffi
@pytest.mark.parametrize("store", ["turbo3.5", "turbo2p"])
def test_cache_is_identical_with_either_backend(store, monkeypatch):
  caches = {}
  for backend in ("jax", "ffi"):
    monkeypatch.setenv("KVJAX_BACKEND", backend)
    jax.clear_caches()  # the backend is read when a function is traced
    caches[backend] = filled_cache(store)
  jax.clear_caches()
  assert_same_bits(caches["ffi"], caches["jax"])
  if store == "turbo3.5":  # each sequence and head chose its own order
    order = np.asarray(caches["ffi"].store_order)
    assert (order != np.arange(32)).any()
    assert (np.sort(order, -1) == np.arange(32)).all()
  assert np.asarray(caches["ffi"].store_k.norms).any()


@needs_ffi
def test_append_runs_the_kernels_on_cpu():
  spec = kvjax.CacheSpec(num_kv_heads=2, head_dim=32, capacity=16, tail=4,
                         migrate_batch=4, store="turbo3.5")
  kv = jnp.ones((1, 2, 32), jnp.float32)
  hlo = jax.jit(jax.vmap(kvjax.append)).lower(
      kvjax.init(spec, batch=3), kv[None].repeat(3, 0), kv[None].repeat(3, 0)).compile().as_text()
  assert "kvjax_turbo_encode" in hlo and "kvjax_turbo_order" in hlo
  # The jnp order rule (a D x D comparison count) is not in the CPU program.
  assert not re.search(r"pred\[[0-9,]*32,32\]", hlo)


@needs_ffi
@pytest.mark.parametrize("fmt", ["turbo4", "turbo3.5", "turbo1p"])
def test_vmap_with_unbatched_operands_and_empty_batches(fmt):
  f = _turbo.FORMATS[fmt]
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 32)), jnp.float32)
  order = jnp.asarray(np.stack([np.random.default_rng(i).permutation(32) for i in range(5)]),
                      jnp.int32)
  enc = lambda x, o, b: f.encode(x, o, backend=b)
  want = enc(x, order, "jax")
  got = jax.vmap(enc, in_axes=(0, None, None))(x, order, "ffi")
  assert_same_bits(got, want)
  # Unbatched norms under vmap over the codes (and an unbatched order).
  dec = lambda c, n: f.decode(_turbo.TurboCodes(c, n), order, backend="ffi")
  got = jax.vmap(dec, in_axes=(0, None))(want.codes, want.norms[0])
  ref = f.decode(_turbo.TurboCodes(want.codes, jnp.broadcast_to(want.norms[0], want.norms.shape)),
                 order, backend="jax")
  np.testing.assert_array_equal(np.asarray(got).view(np.uint32), np.asarray(ref).view(np.uint32))
  empty = kvjax.quantize(np.zeros((0, 4, 32), np.float32), fmt, backend="ffi")
  assert empty.codes.shape[:2] == (0, 4)
  assert kvjax.dequantize(empty, fmt, backend="ffi").shape == (0, 4, 32)


@needs_ffi
def test_the_order_kernel_chooses_only_where_asked():
  f = _turbo.FORMATS["turbo3.5"]
  token = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 16)), jnp.float32)
  token = token.at[0, 1, 4].set(jnp.nan)
  previous = jnp.tile(jnp.arange(16, dtype=jnp.int32), (2, 3, 1))
  chosen = f.choose_order(token, jnp.bool_(True), previous, backend="ffi")
  np.testing.assert_array_equal(chosen, f.outlier_order(token))
  assert int(chosen[0, 1, 0]) == 4  # NaN counts as the largest magnitude
  kept = f.choose_order(token, jnp.bool_(False), previous, backend="ffi")
  np.testing.assert_array_equal(kept, previous)
  batched = jax.vmap(lambda t, c: f.choose_order(t, c, previous[0], backend="ffi"))(
      token, jnp.array([True, False]))
  np.testing.assert_array_equal(batched[0], chosen[0])
  np.testing.assert_array_equal(batched[1], previous[1])


@needs_ffi
def test_ffi_backend_errors_are_clear():
  with pytest.raises(ValueError, match="backend='ffi'.*not for 'f32'"):
    kvjax.quantize(np.zeros((2, 32), np.float32), "f32", backend="ffi")
  with pytest.raises(ValueError, match="power of two"):
    kvjax.quantize(np.zeros((2, 48), np.float32), "turbo4", backend="ffi")
