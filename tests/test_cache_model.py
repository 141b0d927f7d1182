"""Model-based test: random programs of append / migrate / evict / clear run on
kvjax (under jit) and on the plain numpy model in `reference.py`; after every
step positions, tier counts, eviction and values must agree, so no token is
ever lost or misplaced."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvjax
from tests import reference

SPECS = {
    "f32-sinks-slide": kvjax.CacheSpec(
        num_kv_heads=2, head_dim=4, capacity=24, tail=4, migrate_batch=3,
        sinks=2, hot_dtype="float32", store="f32"),
    # Keys and values in different formats: q4 and q8 on both sides.
    "q4/q8-bf16-error": kvjax.CacheSpec(
        num_kv_heads=2, head_dim=6, capacity=20, tail=3, migrate_batch=2,
        hot_dtype="bfloat16", store=("q4", "q8"), overflow="error"),
    "q8/q4-f16-notail-slide": kvjax.CacheSpec(
        num_kv_heads=1, head_dim=8, capacity=17, tail=0, migrate_batch=1,
        sinks=3, hot_dtype="float16", store=("q8", "q4")),
    "bf16-sink-error": kvjax.CacheSpec(
        num_kv_heads=3, head_dim=2, capacity=13, tail=5, migrate_batch=4,
        sinks=1, hot_dtype="float32", store="bf16", overflow="error"),
}
CHUNKS = (1, 5, 24)  # static append sizes; n_valid varies below them


@functools.lru_cache(maxsize=None)
def jitted(name):
  return {
      "append": jax.jit(kvjax.append),
      "migrate": jax.jit(kvjax.migrate),
      "evict": jax.jit(kvjax.evict),
      "clear": jax.jit(kvjax.clear),
      "materialize": jax.jit(kvjax.materialize),
      "attend": jax.jit(kvjax.attend),
  }


operation = st.one_of(
    st.tuples(st.just("append"), st.sampled_from(CHUNKS),
              st.integers(0, 24), st.integers(0, 2**31 - 1)),
    st.tuples(st.just("migrate")),
    st.tuples(st.just("evict"), st.integers(0, 30)),
    st.tuples(st.just("clear")),
)


def assert_same(cache, model, spec):
  stats = kvjax.stats(cache)
  for key, want in model.counts().items():
    assert stats[key] == want, (key, stats[key], want)
  k, v, pos, valid = (np.asarray(a) for a in
                      jitted(spec)["materialize"](cache))
  wk, wv, wpos, wvalid = model.materialize()
  np.testing.assert_array_equal(pos, wpos)
  np.testing.assert_array_equal(valid, wvalid)
  np.testing.assert_array_equal(k, wk)
  np.testing.assert_array_equal(v, wv)


def run_program(name, program):
  spec = SPECS[name]
  ops = jitted(spec)
  cache, model = kvjax.init(spec), reference.CacheModel(spec)
  for op in program:
    if op[0] == "append":
      _, n, n_valid, seed = op
      rng = np.random.default_rng(seed)
      shape = (n, spec.num_kv_heads, spec.head_dim)
      k = rng.normal(size=shape).astype(np.float32) * 3
      v = rng.normal(size=shape).astype(np.float32)
      cache = ops["append"](cache, k, v, jnp.int32(n_valid))
      model.append(k, v, n_valid)
    elif op[0] == "evict":
      cache = ops["evict"](cache, jnp.int32(op[1]))
      model.evict(op[1])
    else:
      cache = ops[op[0]](cache)
      getattr(model, op[0])()
    assert_same(cache, model, spec)
  # Attention over the final state against float64 attention over the model.
  q = np.random.default_rng(0).normal(
      size=(2, 2 * spec.num_kv_heads, spec.head_dim)).astype(np.float32)
  got = np.asarray(ops["attend"](cache, q))
  k, v, pos, valid = model.materialize()
  want = reference.attention(q, k, v, pos, valid,
                             model.length - 2 + np.arange(2))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("name", sorted(SPECS))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(operation, min_size=1, max_size=14))
def test_random_programs_match_numpy_model(name, program):
  run_program(name, program)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_long_program_wraps_every_ring(name):
  """Enough tokens to wrap the store and tail rings several times."""
  program = [("append", 24, 24, i) for i in range(5)]
  program += [("append", 1, 1, 100 + i) for i in range(30)]
  program += [("evict", 7), ("append", 5, 3, 1), ("migrate",), ("append", 24, 17, 2)]
  run_program(name, program)


def test_quantized_values_within_error_bound():
  """The store's values stay within half a quantization step of the hot ones."""
  spec = SPECS["q4/q8-bf16-error"]
  model = reference.CacheModel(spec)
  rng = np.random.default_rng(5)
  k = rng.normal(size=(spec.capacity, spec.num_kv_heads, spec.head_dim)).astype(np.float32)
  cache = kvjax.append(kvjax.init(spec), k, k)
  model.append(k, k)
  got = np.asarray(kvjax.materialize(cache)[0])
  hot = np.stack([t[1] for t in model.nonsink])
  span = hot.max(-1, keepdims=True) - hot.min(-1, keepdims=True)
  assert kvjax.stats(cache)["store_tokens"] > 0
  assert (np.abs(got - hot) <= span / 15 / 2 * (1 + 2**-10)).all()
