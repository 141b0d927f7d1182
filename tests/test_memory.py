"""Compiled temporary memory of `attend` is bounded by one block, not by the
context: measured with XLA's memory analysis on a 32k-token q4 cache (the
cache is only lowered and compiled, never filled)."""

import jax
import jax.numpy as jnp
import pytest

import kvjax


@pytest.mark.parametrize("store", ["q4", "q8", "bf16"])
def test_attend_temp_memory_at_32k_is_under_10_percent_of_f32_kv(store):
  context, h, d = 32768, 8, 128
  spec = kvjax.CacheSpec(num_kv_heads=h, head_dim=d, capacity=context,
                         tail=256, migrate_batch=64, store=store)
  cache = jax.eval_shape(lambda: kvjax.init(spec))
  q = jax.ShapeDtypeStruct((1, 32, d), jnp.float32)
  compiled = jax.jit(kvjax.attend).lower(cache, q).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  f32_kv = 2 * context * h * d * 4
  assert temp <= 0.10 * f32_kv, (temp, f32_kv)


def test_append_temp_memory_does_not_grow_with_capacity():
  temps = []
  for capacity in (4096, 65536):
    spec = kvjax.CacheSpec(num_kv_heads=8, head_dim=128, capacity=capacity,
                           store="q4")
    cache = jax.eval_shape(lambda: kvjax.init(spec))
    k = jax.ShapeDtypeStruct((1, 8, 128), jnp.float32)
    compiled = jax.jit(kvjax.append, donate_argnums=0).lower(cache, k, k).compile()
    temps.append(compiled.memory_analysis().temp_size_in_bytes)
  assert temps[1] <= temps[0] + 4096, temps
