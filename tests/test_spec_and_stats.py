"""CacheSpec validation, and stats measured from the arrays."""

import dataclasses

import jax
import numpy as np
import pytest

import kvjax


@pytest.mark.parametrize("changes,match", [
    (dict(head_dim=7, store="q4"), r"CacheSpec.head_dim: must be a multiple of 2 for store='q4' \(got 7\)"),
    (dict(capacity=100, sinks=4, tail=64, migrate_batch=64),
     r"CacheSpec.capacity: must be >= sinks \+ tail \+ migrate_batch = 132 \(got 100\)"),
    (dict(store="q3"), r"CacheSpec.store: must be one of"),
    (dict(hot_dtype="float64"), r"CacheSpec.hot_dtype: must be one of"),
    (dict(overflow="wrap"), r"CacheSpec.overflow: must be one of \('slide', 'error'\)"),
    (dict(num_kv_heads=0), r"CacheSpec.num_kv_heads: must be >= 1"),
    (dict(head_dim=0), r"CacheSpec.head_dim: must be >= 1"),
    (dict(migrate_batch=0), r"CacheSpec.migrate_batch: must be >= 1"),
    (dict(tail=-1), r"CacheSpec.tail: must be >= 0"),
    (dict(sinks=-2), r"CacheSpec.sinks: must be >= 0"),
    (dict(capacity=4096.0), r"CacheSpec.capacity: must be an int"),
    (dict(store=("q8",)), r"CacheSpec.store: must be one of .* or a \(keys, values\) pair"),
    (dict(store=("q8", "q5")), r"CacheSpec.store: must be one of"),
    (dict(store="q8/q4/f32"), r"CacheSpec.store: must be one of"),
    (dict(head_dim=7, store=("q8", "q4")),
     r"CacheSpec.head_dim: must be a multiple of 2 for the values' store format 'q4' \(got 7\)"),
])
def test_invalid_spec_names_field_and_rule(changes, match):
  with pytest.raises(ValueError, match=match):
    kvjax.CacheSpec(**changes)


def test_spec_is_frozen_and_hashable():
  spec = kvjax.CacheSpec()
  assert hash(spec) == hash(kvjax.CacheSpec())
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.capacity = 3  # type: ignore[misc]
  assert kvjax.CacheSpec(tail=0, migrate_batch=1, capacity=1).capacity == 1


def test_key_and_value_formats_normalize():
  pair = kvjax.CacheSpec(store=("q8", "q4"))
  assert pair == kvjax.CacheSpec(store="q8/q4") == kvjax.CacheSpec(store=["q8", "q4"])
  assert hash(pair) == hash(kvjax.CacheSpec(store="q8/q4"))
  assert (pair.key_store, pair.value_store, pair.store_name) == ("q8", "q4", "q8/q4")
  assert kvjax.CacheSpec(store=("q4", "q4")) == kvjax.CacheSpec(store="q4")
  assert kvjax.CacheSpec(store=("q4", "q4")).store == "q4"


def filled(store, n=3000, **kw):
  spec = kvjax.CacheSpec(num_kv_heads=8, head_dim=128, capacity=4096, tail=256,
                         migrate_batch=64, store=store, **kw)
  x = np.random.default_rng(0).normal(size=(n, 8, 128)).astype(np.float32)
  return kvjax.append(kvjax.init(spec), x, x)


@pytest.mark.parametrize("store,key_bits,value_bits", [
    ("q8", 8.5, 8.5), ("q4", 4.5, 4.5), ("bf16", 16, 16), ("f32", 32, 32),
    (("q8", "q4"), 8.5, 4.5)])
def test_store_bits_per_value_measured(store, key_bits, value_bits):
  cache = filled(store)
  stats = kvjax.stats(cache)
  values = 2 * 8 * 128 * stats["store_tokens"]
  assert stats["store_tokens"] > 2000
  measured = 8 * stats["store_bytes"] / values
  assert measured == stats["store_bits_per_value"] == (key_bits + value_bits) / 2
  # Counted directly from the encoded leaves of the store, keys and values.
  for leaf, bits, name in ((cache.store_k, key_bits, "key_bits_per_value"),
                           (cache.store_v, value_bits, "value_bits_per_value")):
    per_slot = sum(a.nbytes for a in jax.tree.leaves(leaf)) / cache.spec.store_slots
    assert stats[name] == 8 * per_slot / (8 * 128) == bits
  leaves = jax.tree.leaves((cache.store_k, cache.store_v))
  per_slot = sum(a.nbytes for a in leaves) / cache.spec.store_slots
  assert stats["store_bytes"] == per_slot * stats["store_tokens"]


def test_allocated_bytes_and_compression_ratio():
  cache = filled("q4", sinks=4)
  stats = kvjax.stats(cache)
  assert stats["allocated_bytes"] == sum(a.nbytes for a in jax.tree.leaves(cache))
  retained = stats["sink_tokens"] + stats["tail_tokens"] + stats["store_tokens"]
  assert retained == stats["retained_tokens"] == 3000
  used = stats["sink_bytes"] + stats["tail_bytes"] + stats["store_bytes"]
  assert stats["sink_bytes"] == 4 * 2 * 8 * 128 * 2  # bfloat16 sinks, K and V
  assert stats["compression_ratio"] == pytest.approx(retained * 2 * 8 * 128 * 4 / used)
  assert 5.0 < stats["compression_ratio"] < 32 / 4.5  # the bf16 tail costs


def test_batched_stats_are_lists():
  cache = filled("q8", n=10)
  batched = jax.tree.map(lambda a: np.stack([a, a, a]), cache)
  stats = kvjax.stats(batched)
  assert stats["length"] == [10, 10, 10]
  assert stats["allocated_bytes"] == [kvjax.stats(cache)["allocated_bytes"]] * 3
  assert np.isnan(kvjax.stats(kvjax.clear(cache))["compression_ratio"])


def test_repr_is_readable():
  text = repr(filled("q4", n=5))
  assert "store='q4'" in text and "length=5" in text and "capacity=4096" in text


def test_public_api():
  for name in kvjax.__all__:
    assert getattr(kvjax, name) is not None, name
  assert {"init", "append", "migrate", "evict", "clear", "attend", "materialize",
          "stats", "check", "quantize", "dequantize", "backend_info",
          "CacheSpec", "KVCache"} <= set(kvjax.__all__)
