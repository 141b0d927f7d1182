"""`attend` against float64 attention over `materialize` and against
`jax.nn.dot_product_attention`: GQA, windows, softcap, prefill chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from tests import reference


def filled_cache(store, *, capacity=50, tail=6, migrate_batch=4, sinks=2,
                 hot_dtype="float32", h=2, d=16, n=61, evict=0, seed=0):
  spec = kvjax.CacheSpec(num_kv_heads=h, head_dim=d, capacity=capacity,
                         tail=tail, migrate_batch=migrate_batch, sinks=sinks,
                         hot_dtype=hot_dtype, store=store)
  rng = np.random.default_rng(seed)
  k = rng.normal(size=(n, h, d)).astype(np.float32)
  v = rng.normal(size=(n, h, d)).astype(np.float32)
  # Keys with an offset and a large channel, as real keys have.
  k = k + 0.5
  k[..., 3] *= 8
  cache = kvjax.append(kvjax.init(spec), k, v)
  return kvjax.evict(cache, evict)


def reference_attend(cache, q, q_pos=None, **kw):
  k, v, pos, valid = (np.asarray(a) for a in kvjax.materialize(cache))
  if q_pos is None:
    length = kvjax.stats(cache)["length"]
    q_pos = length - q.shape[0] + np.arange(q.shape[0])
  return reference.attention(q, k, v, pos, valid, np.asarray(q_pos), **kw)


def assert_close(got, want, rtol=1e-5):
  got = np.asarray(got, np.float64)
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= rtol * scale, np.abs(got - want).max() / scale


STORES = ("f32", "bf16", "f16", "q8", "q4")


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("block_size", [7, 16, 1024])
def test_decode_matches_reference(store, block_size):
  cache = filled_cache(store)
  q = np.random.default_rng(1).normal(size=(1, 8, 16)).astype(np.float32)
  got = jax.jit(kvjax.attend, static_argnames="block_size")(
      cache, q, block_size=block_size)
  assert_close(got, reference_attend(cache, q))


@pytest.mark.parametrize("store", ("f32", "q4"))
@pytest.mark.parametrize("kw", [
    dict(), dict(window=9), dict(softcap=5.0), dict(scale=0.7),
    dict(window=30, softcap=2.0, scale=0.3)])
def test_prefill_chunk_options(store, kw):
  cache = filled_cache(store, n=40, evict=3)
  q = np.random.default_rng(2).normal(size=(5, 4, 16)).astype(np.float32) * 2
  got = jax.jit(kvjax.attend)(cache, q, **kw)  # traced scale/window/softcap
  assert_close(got, reference_attend(cache, q, **kw))


def test_explicit_positions_and_no_visible_key():
  cache = filled_cache("q8", n=30, sinks=0)
  q = np.random.default_rng(3).normal(size=(4, 2, 16)).astype(np.float32)
  q_pos = np.array([-1, 0, 12, 29], np.int32)
  got = np.asarray(kvjax.attend(cache, q, q_pos=q_pos))
  assert (got[0] == 0).all()  # sees no key
  assert_close(got, reference_attend(cache, q, q_pos=q_pos))
  # Keys evicted from the window are gone: a query before them sees nothing.
  evicted = kvjax.evict(cache, 20)
  got = np.asarray(kvjax.attend(evicted, q, q_pos=q_pos))
  assert (got[:3] == 0).all()
  assert_close(got, reference_attend(evicted, q, q_pos=q_pos))


def test_empty_cache_returns_zeros():
  spec = kvjax.CacheSpec(num_kv_heads=2, head_dim=8, capacity=16, tail=2,
                         migrate_batch=2, store="q4")
  out = kvjax.attend(kvjax.init(spec), jnp.ones((1, 2, 8)))
  assert out.shape == (1, 2, 8) and not np.asarray(out).any()


@pytest.mark.parametrize("store", ("f32", "q4"))
def test_matches_dot_product_attention(store):
  cache = filled_cache(store, n=45, hot_dtype="bfloat16")
  k, v, pos, valid = kvjax.materialize(cache)
  q = jax.random.normal(jax.random.key(4), (3, 8, 16), jnp.float32)
  q_pos = jnp.array([20, 40, 44])
  mask = valid[None, :] & (pos[None, :] <= q_pos[:, None])
  want = jax.nn.dot_product_attention(q[None], k[None], v[None],
                                      mask=mask[None, None])[0]
  np.testing.assert_allclose(kvjax.attend(cache, q, q_pos=q_pos), want,
                             rtol=1e-5, atol=1e-5)


def test_output_dtype_follows_query():
  cache = filled_cache("q4")
  q = jnp.ones((1, 4, 16), jnp.bfloat16)
  assert kvjax.attend(cache, q).dtype == jnp.bfloat16


def test_vmap_over_sequences_of_different_lengths():
  spec = kvjax.CacheSpec(num_kv_heads=2, head_dim=16, capacity=40, tail=4,
                         migrate_batch=4, sinks=1, store="q4")
  rng = np.random.default_rng(5)
  k = rng.normal(size=(3, 33, 2, 16)).astype(np.float32)
  n_valid = jnp.array([33, 7, 20], jnp.int32)
  caches = jax.vmap(kvjax.append)(kvjax.init(spec, batch=3), k, k, n_valid)
  q = rng.normal(size=(3, 2, 4, 16)).astype(np.float32)
  got = jax.jit(jax.vmap(kvjax.attend))(caches, q)
  for b in range(3):
    one = kvjax.append(kvjax.init(spec), k[b, :int(n_valid[b])], k[b, :int(n_valid[b])])
    assert_close(got[b], reference_attend(one, q[b]))


def test_bad_queries():
  cache = filled_cache("q4")
  with pytest.raises(ValueError, match=r"q: expected shape \[n_q, Hq, 16\]"):
    kvjax.attend(cache, jnp.ones((4, 16)))
  with pytest.raises(ValueError, match="multiple of num_kv_heads=2"):
    kvjax.attend(cache, jnp.ones((1, 3, 16)))
  with pytest.raises(ValueError, match=r"got \(1, 2, 8\)"):
    kvjax.attend(cache, jnp.ones((1, 2, 8)))
  with pytest.raises(ValueError, match="q: expected a float dtype"):
    kvjax.attend(cache, jnp.ones((1, 2, 16), jnp.int32))
  with pytest.raises(ValueError, match=r"q_pos: expected int32 \[1\]"):
    kvjax.attend(cache, jnp.ones((1, 2, 16)), q_pos=jnp.array([1, 2]))
  with pytest.raises(ValueError, match="block_size: expected a positive int, got 0"):
    kvjax.attend(cache, jnp.ones((1, 2, 16)), block_size=0)
  batch = jax.vmap(lambda _: cache)(jnp.arange(2))
  with pytest.raises(ValueError, match=r"use jax.vmap\(kvjax.attend\)"):
    kvjax.attend(batch, jnp.ones((1, 2, 16)))
