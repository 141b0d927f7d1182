"""Transforms under jit, vmap and lax.scan; in-place updates; overflow
reporting; bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import kvjax
from tests import reference

SPEC = kvjax.CacheSpec(num_kv_heads=2, head_dim=8, capacity=30, tail=4,
                       migrate_batch=3, sinks=2, hot_dtype="bfloat16",
                       store="q4")


def tokens(n, seed=0, spec=SPEC):
  rng = np.random.default_rng(seed)
  shape = (n, spec.num_kv_heads, spec.head_dim)
  return (rng.normal(size=shape).astype(np.float32),
          rng.normal(size=shape).astype(np.float32))


def assert_same_view(a, b):
  for x, y in zip(kvjax.materialize(a), kvjax.materialize(b)):
    np.testing.assert_array_equal(x, y)
  assert kvjax.stats(a) == kvjax.stats(b) or _nan_equal(kvjax.stats(a), kvjax.stats(b))


def _nan_equal(a, b):
  return all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)


@pytest.mark.parametrize("splits", [[45], [1] * 45, [5, 1, 20, 19], [2, 31, 12]])
def test_state_does_not_depend_on_how_appends_are_split(splits):
  k, v = tokens(45)
  whole = kvjax.append(kvjax.init(SPEC), k, v)
  cache, start = kvjax.init(SPEC), 0
  for n in splits:
    cache = kvjax.append(cache, k[start:start + n], v[start:start + n])
    start += n
  assert_same_view(cache, whole)


def test_no_retrace_over_decode_steps():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(cache, k, v):
    return kvjax.append(cache, k, v)

  cache = kvjax.init(SPEC)
  for i in range(40):  # crosses migrations, ring wraps and sliding
    cache = step(cache, *tokens(1, seed=i))
  assert kvjax.stats(cache)["length"] == 40


def test_scan_decode_loop_matches_python_loop():
  k, v = tokens(37, seed=3)
  q = np.random.default_rng(4).normal(size=(37, 1, 4, 8)).astype(np.float32)

  def step(cache, xs):
    kt, vt, qt = xs
    cache = kvjax.append(cache, kt[None], vt[None])
    return cache, kvjax.attend(cache, qt)

  final, outs = jax.jit(lambda c: jax.lax.scan(step, c, (k, v, q)))(kvjax.init(SPEC))
  cache = kvjax.init(SPEC)
  for t in range(37):
    cache, out = step(cache, (k[t], v[t], q[t]))
    np.testing.assert_allclose(outs[t], out, rtol=1e-6, atol=1e-6)
  assert_same_view(final, cache)


def test_vmap_ragged_rows_match_single_caches():
  """Rows of a batch append, evict and clear independently."""
  batch = 3
  k, v = tokens(batch * 25, seed=5)
  k, v = k.reshape(batch, 25, 2, 8), v.reshape(batch, 25, 2, 8)
  n_valid = jnp.array([25, 0, 13], jnp.int32)
  evict_n = jnp.array([4, 2, 30], jnp.int32)
  append = jax.jit(jax.vmap(kvjax.append))
  caches = append(kvjax.init(SPEC, batch=batch), k, v, n_valid)
  caches = jax.jit(jax.vmap(kvjax.evict))(caches, evict_n)
  caches = append(caches, k[:, :6], v[:, :6], jnp.array([6, 3, 1], jnp.int32))
  singles = []
  for b in range(batch):
    c = kvjax.append(kvjax.init(SPEC), k[b], v[b], n_valid[b])
    c = kvjax.evict(c, evict_n[b])
    c = kvjax.append(c, k[b, :6], v[b, :6], [6, 3, 1][b])
    singles.append(c)
    row = jax.tree.map(lambda a: a[b], caches)
    assert_same_view(row, c)
  stats = kvjax.stats(caches)
  assert stats["length"] == [kvjax.stats(c)["length"] for c in singles]
  cleared = jax.vmap(lambda c, f: jax.lax.cond(f, kvjax.clear, lambda x: x, c))(
      caches, jnp.array([True, False, True]))
  assert kvjax.stats(cleared)["length"] == [0, stats["length"][1], 0]


def test_init_batch_equals_vmapped_init():
  chex.assert_trees_all_equal(kvjax.init(SPEC, batch=2),
                              jax.vmap(lambda _: kvjax.init(SPEC))(jnp.arange(2)))


def test_clear_restarts_every_counter():
  spec = kvjax.CacheSpec(num_kv_heads=2, head_dim=8, capacity=12, tail=2,
                         migrate_batch=2, store="q8", overflow="error")
  cache = kvjax.append(kvjax.init(spec), *tokens(20, spec=spec))
  assert kvjax.stats(cache)["rejected_tokens"] == 8
  cache = kvjax.clear(cache)
  stats = kvjax.stats(cache)
  assert (stats["length"], stats["evicted_tokens"], stats["rejected_tokens"],
          stats["overflow"], stats["retained_tokens"]) == (0, 0, 0, False, 0)
  k, v = tokens(3, seed=9, spec=spec)
  model = reference.CacheModel(spec)
  model.append(k, v)
  cache = kvjax.append(cache, k, v)
  np.testing.assert_array_equal(kvjax.materialize(cache)[0], model.materialize()[0])


@pytest.mark.parametrize("hot_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("store", ["q4", "bf16"])
def test_donated_append_copies_no_cache_sized_buffer(hot_dtype, store):
  spec = kvjax.CacheSpec(num_kv_heads=4, head_dim=32, capacity=4096, tail=64,
                         migrate_batch=32, sinks=4, hot_dtype=hot_dtype,
                         store=store)
  cache = kvjax.init(spec)
  big = {tuple(a.shape) for a in jax.tree.leaves(cache) if a.size >= 4 * 64 * 32}
  for n in (1, 16):
    k = jnp.ones((n, 4, 32), jnp.float32)
    hlo = jax.jit(kvjax.append, donate_argnums=0).lower(cache, k, k).compile().as_text()
    copies = [line for line in hlo.splitlines()
              if " copy(" in line or "copy-start" in line]
    shapes = [line.split("=")[1].split("{")[0].strip() for line in copies]
    for shape in big:
      text = ",".join(map(str, shape))
      assert not any(f"[{text}]" in s for s in shapes), (shape, copies)
    # Every cache-sized output is aliased to its input (updated in place).
    assert hlo.count("may-alias") + hlo.count("must-alias") >= len(big), hlo[:400]


def test_overflow_error_is_recorded_reported_and_checkified():
  spec = kvjax.CacheSpec(num_kv_heads=2, head_dim=8, capacity=10, tail=2,
                         migrate_batch=2, sinks=1, store="q8", overflow="error")
  cache = kvjax.append(kvjax.init(spec), *tokens(8, spec=spec))
  kvjax.check(cache)  # healthy: quiet
  full = jax.jit(kvjax.append)(cache, *tokens(5, seed=1, spec=spec))
  stats = kvjax.stats(full)
  assert (stats["length"], stats["rejected_tokens"], stats["overflow"]) == (10, 3, True)
  with pytest.raises(OverflowError, match="rejected 3 tokens"):
    kvjax.check(full)
  # Nothing retained was replaced: the first 10 tokens are all still there.
  assert np.asarray(kvjax.materialize(full)[2]).tolist() == list(range(10))

  checked = checkify.checkify(jax.jit(kvjax.append))
  err, _ = checked(cache, *tokens(5, seed=1, spec=spec))
  assert "rejected 3 tokens" in err.get()
  err, _ = checked(cache, *tokens(2, seed=1, spec=spec))
  assert err.get() is None
  batched = jax.vmap(lambda _: cache)(jnp.arange(2))
  k, v = tokens(5, seed=2, spec=spec)
  err, out = checkify.checkify(jax.jit(jax.vmap(kvjax.append)))(
      batched, np.stack([k, k]), np.stack([v, v]), jnp.array([1, 4], jnp.int32))
  assert "rejected 2 tokens" in err.get()
  with pytest.raises(OverflowError, match=r"rejected caches \[1\] of the leading axis .*: \[2\] tokens"):
    kvjax.check(out)


def test_evict_and_slide_count_every_dropped_token():
  cache = kvjax.append(kvjax.init(SPEC), *tokens(50))  # capacity 30, 2 sinks
  stats = kvjax.stats(cache)
  assert stats["evicted_tokens"] == 50 - 30 and stats["retained_tokens"] == 30
  cache = kvjax.evict(cache, 100)  # clipped to the non-sink tokens
  stats = kvjax.stats(cache)
  assert stats["evicted_tokens"] == 48 and stats["retained_tokens"] == 2
  assert np.asarray(kvjax.materialize(cache)[2])[:3].tolist() == [0, 1, -1]


def test_bad_input_raises_at_trace_time():
  cache = kvjax.init(SPEC)
  k, v = tokens(3)
  with pytest.raises(ValueError, match=r"k: expected shape \[n, 2, 8\]"):
    jax.jit(kvjax.append)(cache, k[:, :1], v)
  with pytest.raises(ValueError, match=r"v: expected shape \[n, 2, 8\]"):
    kvjax.append(cache, k, v[0])
  with pytest.raises(ValueError, match="v: expected the same shape as k"):
    kvjax.append(cache, k, v[:2])
  with pytest.raises(ValueError, match="k: expected a float dtype"):
    kvjax.append(cache, k.astype(np.int32), v)
  with pytest.raises(ValueError, match="n_valid: expected an int scalar"):
    kvjax.append(cache, k, v, jnp.array([1, 2]))
  with pytest.raises(ValueError, match=r"n: expected an int scalar"):
    kvjax.evict(cache, jnp.array([1, 2]))
  with pytest.raises(ValueError, match=r"use jax.vmap\(kvjax.append\)"):
    kvjax.append(kvjax.init(SPEC, batch=2), k, v)
  with pytest.raises(ValueError, match="spec: expected a kvjax.CacheSpec"):
    kvjax.init({"capacity": 3})
  with pytest.raises(ValueError, match="batch: expected a positive int"):
    kvjax.init(SPEC, batch=0)
  with pytest.raises(ValueError, match="cache: expected a kvjax.KVCache"):
    kvjax.stats(k)


def test_layer_stack_matches_separate_caches():
  """append/attend with layer=i in a fori_loop over a stack of per-layer
  caches give what separate caches give."""
  layers = 3
  rng = np.random.default_rng(11)
  k = jnp.asarray(rng.normal(size=(layers, 9, 2, 8)), jnp.float32)
  q = jnp.asarray(rng.normal(size=(layers, 9, 4, 8)), jnp.float32)

  def over_layers(stack, n_valid):
    def body(i, carry):
      stack, outs = carry
      stack = kvjax.append(stack, k[i], k[i] * 2, n_valid, layer=i)
      out = kvjax.attend(stack, q[i], q_pos=jnp.arange(9) + kvjax.length(stack)[i] - n_valid,
                         layer=i)
      return stack, outs.at[i].set(out)
    return jax.lax.fori_loop(0, layers, body, (stack, jnp.zeros(q.shape)))

  stack = kvjax.init(SPEC, batch=layers)
  run = jax.jit(over_layers, donate_argnums=0)
  for n_valid in (9, 4, 9, 9):
    stack, outs = run(stack, jnp.int32(n_valid))
  singles = [kvjax.init(SPEC) for _ in range(layers)]
  for n_valid in (9, 4, 9, 9):
    for i in range(layers):
      singles[i] = kvjax.append(singles[i], k[i], k[i] * 2, n_valid)
  for i in range(layers):
    assert_same_view(jax.tree.map(lambda a: a[i], stack), singles[i])
    want = kvjax.attend(singles[i], q[i], q_pos=jnp.arange(9) + 31 - 9)
    np.testing.assert_allclose(outs[i], want, rtol=1e-6, atol=1e-6)


def test_layer_stack_updates_in_place():
  spec = kvjax.CacheSpec(num_kv_heads=4, head_dim=32, capacity=4096, tail=64,
                         migrate_batch=32, store="q4")
  stack = kvjax.init(spec, batch=6)
  k = jnp.ones((6, 1, 4, 32))

  def step(stack):
    def body(i, s):
      s = kvjax.append(s, k[i], k[i], layer=i)
      return s
    return jax.lax.fori_loop(0, 6, body, stack)

  hlo = jax.jit(step, donate_argnums=0).lower(stack).compile().as_text()
  big = [line for line in hlo.splitlines() if " copy(" in line and "4096" in line]
  assert not big, big


def test_layer_argument_errors():
  stack = kvjax.init(SPEC, batch=2)
  k, v = tokens(1)
  with pytest.raises(ValueError, match="layer: expected an int scalar"):
    kvjax.append(stack, k, v, layer=jnp.array([0, 1]))
  with pytest.raises(ValueError, match=r"takes a stack of per-layer caches"):
    kvjax.attend(kvjax.init(SPEC), jnp.ones((1, 2, 8)), layer=0)
