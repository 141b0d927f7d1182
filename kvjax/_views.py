"""Views of a cache: `materialize` (the retained tokens) and `stats`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import _checks
from kvjax import _layers
from kvjax import _state
from kvjax._state import KVCache


def materialize(cache: KVCache, *, layer=None):
  """The retained tokens, dequantized, sorted by position, valid rows first.

  Args:
    cache: a `KVCache`; with `layer`, a stack of per-layer caches or a
      `ModelCache`.
    layer: optional int scalar (may be traced): that layer of the stack. A
      traced index outside the stack gives NaN `k` and `v` (and no valid row).

  Returns:
    `(k, v, pos, valid)`: `k, v: [capacity, H, D]` float32, `pos: int32
    [capacity]`, `valid: bool [capacity]`; invalid rows have `k = v = 0` and
    `pos = -1`. (ruvllm: `get_all_kv`.)
  """
  if isinstance(cache, _layers.ModelCache):
    return _layers.read_layer(cache, layer, "materialize",
                              lambda stack, i: materialize(stack, layer=i))
  _state.require_single(cache, "materialize", layer)
  return _materialize(cache, layer)


@jax.jit
def _materialize(cache: KVCache, layer):
  if layer is not None:
    in_range = _state.layer_in_range(cache, layer)
    one = jax.tree.map(
        lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), cache)
    k, v, pos, valid = _materialize(one, None)
    nan = jnp.where(in_range, 0.0, jnp.nan)
    return k + nan, v + nan, jnp.where(in_range, pos, -1), valid & in_range
  spec = cache.spec
  hot, formats = _state.hot_format(spec), _state.store_formats(spec)
  row = jnp.arange(spec.capacity, dtype=jnp.int32)
  sinks = _state.sink_count(cache)
  end = _state.nonsink_count(cache)
  j = cache.evicted + row - sinks  # non-sink index of rows after the sinks
  in_sink = row < sinks
  in_store = ~in_sink & (j < end - cache.tail_count)
  in_tail = ~in_sink & ~in_store & (j < end)
  valid = in_sink | in_store | in_tail

  def rows(fmt, enc, index, order=None):  # decoded [capacity, H, D] at ring slots
    if jax.tree.leaves(enc)[0].shape[1] == 0:  # no sinks
      return jnp.zeros((spec.capacity, spec.num_kv_heads, spec.head_dim))
    taken = jax.tree.map(lambda a: jnp.take(a, index, axis=1, mode="clip"), enc)
    return jnp.swapaxes(fmt.decode(taken, order), 0, 1)

  out = []
  for i, (sink, tail, stored) in enumerate(
      ((cache.sink_k, cache.tail_k, cache.store_k),
       (cache.sink_v, cache.tail_v, cache.store_v))):
    store = formats[i]
    order = cache.store_order[i][:, None, :] if store.split else None
    x = jnp.where(in_sink[:, None, None], rows(hot, sink, row), 0.0)
    x = jnp.where(in_store[:, None, None],
                  rows(store, stored, jnp.mod(j, spec.store_slots), order), x)
    x = jnp.where(in_tail[:, None, None],
                  rows(hot, tail, jnp.mod(j, spec.tail_slots)), x)
    out.append(x)
  pos = jnp.where(in_sink, row, spec.sinks + j)
  return out[0], out[1], jnp.where(valid, pos, -1), valid


def _tree_bytes(tree) -> int:
  """Sum of `nbytes` of every array leaf (shapes only, so abstract values work)."""
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize
             for a in jax.tree.leaves(tree))


def stats(cache: KVCache) -> dict:
  """Host-side accounting, measured from the arrays.

  Returns:
    A dict of plain Python numbers (for a batched or layer-stacked cache,
    nested lists shaped like its leading axes): `length`, `sink_tokens`, `tail_tokens`, `store_tokens`,
    `retained_tokens`, `evicted_tokens`, `overflow`, `rejected_tokens`
    (refused by `overflow="error"` since the last `clear` or
    `acknowledge_overflow`), `bad_layer_tokens` (refused by an append with a
    traced `layer` outside the stack),
    `sink_bytes`, `tail_bytes`, `store_bytes` (bytes the retained tokens of
    each tier occupy, scales and zeros included), `allocated_bytes` (sum of
    `nbytes` of every leaf), `store_bits_per_value` (from the store arrays'
    bytes per token slot, keys and values together; `key_bits_per_value` and
    `value_bits_per_value` each alone) and `compression_ratio` (float32 bytes of the
    retained tokens / bytes they occupy; nan for an empty cache).

    For a `ModelCache`: `{"layers": [one such dict per layer], "total":
    {...}}`, where the total sums the bytes and tokens of every layer (and
    sequence) and measures `store_bits_per_value`, `key_bits_per_value`,
    `value_bits_per_value` and `compression_ratio` over all of them.
  """
  if isinstance(cache, _layers.ModelCache):
    return _model_stats(cache)
  _state.require_cache(cache, "stats")
  _checks.require_host(cache, "stats")
  spec = cache.spec
  batch_shape = cache.length.shape
  batch = int(np.prod(batch_shape)) if batch_shape else 1

  def per_token(a, b, slots):  # bytes of one token (K and V) in one sequence
    return _tree_bytes((a, b)) // (slots * batch) if slots else 0

  sink_b = per_token(cache.sink_k, cache.sink_v, spec.sinks)
  tail_b = per_token(cache.tail_k, cache.tail_v, spec.tail_slots)
  store_b = per_token(cache.store_k, cache.store_v, spec.store_slots)
  key_b = per_token(cache.store_k, (), spec.store_slots)
  value_b = per_token(cache.store_v, (), spec.store_slots)
  values_per_token = 2 * spec.num_kv_heads * spec.head_dim

  counts = jax.device_get(dict(
      length=cache.length, sink_tokens=_state.sink_count(cache), tail_tokens=cache.tail_count,
      store_tokens=_state.store_count(cache), evicted_tokens=cache.evicted,
      rejected_tokens=cache.rejected, bad_layer_tokens=cache.bad_layer_tokens))
  counts = {k: np.asarray(v).reshape(-1) for k, v in counts.items()}
  allocated = _tree_bytes(cache) // batch

  rows = []
  for i in range(batch):
    r = {k: int(v[i]) for k, v in counts.items()}
    r["retained_tokens"] = r["sink_tokens"] + r["tail_tokens"] + r["store_tokens"]
    r["overflow"] = r["rejected_tokens"] > 0
    r["sink_bytes"] = r["sink_tokens"] * sink_b
    r["tail_bytes"] = r["tail_tokens"] * tail_b
    r["store_bytes"] = r["store_tokens"] * store_b
    r["allocated_bytes"] = allocated
    r["store_bits_per_value"] = 8.0 * store_b / values_per_token
    r["key_bits_per_value"] = 16.0 * key_b / values_per_token
    r["value_bits_per_value"] = 16.0 * value_b / values_per_token
    used = r["sink_bytes"] + r["tail_bytes"] + r["store_bytes"]
    r["compression_ratio"] = (4.0 * values_per_token * r["retained_tokens"] / used
                              if used else float("nan"))
    rows.append(r)
  if not batch_shape:
    return rows[0]
  # Nested lists shaped like the batch axes (e.g. [sequence][layer]).
  return {k: np.array([r[k] for r in rows], dtype=object).reshape(batch_shape).tolist()
          for k in rows[0]}



_SUMMED = ("sink_tokens", "tail_tokens", "store_tokens", "retained_tokens",
           "evicted_tokens", "rejected_tokens", "bad_layer_tokens", "sink_bytes",
           "tail_bytes", "store_bytes", "allocated_bytes")


def _model_stats(cache) -> dict:
  """Per-layer stats and totals of a `ModelCache` (measured, run by run)."""
  batched = cache.runs[0].length.ndim == 2
  layers, totals = [], {k: 0 for k in _SUMMED}
  store_values = key_bits = value_bits = retained_values = 0.0
  for run, n in zip(cache.runs, cache.run_layers):
    st = stats(run)  # values nested [layer] or [sequence][layer]
    per_value = 2 * run.spec.num_kv_heads * run.spec.head_dim
    for i in range(n):
      layer = {k: [row[i] for row in v] if batched else v[i] for k, v in st.items()}
      layers.append(layer)
      entries = [{k: v[b] for k, v in layer.items()} for b in range(len(layer["length"]))] \
          if batched else [layer]
      for e in entries:
        for k in _SUMMED:
          totals[k] += e[k]
        store_values += e["store_tokens"] * per_value
        retained_values += e["retained_tokens"] * per_value
        key_bits += e["store_tokens"] * per_value / 2 * e["key_bits_per_value"]
        value_bits += e["store_tokens"] * per_value / 2 * e["value_bits_per_value"]
  nan = float("nan")
  used = totals["sink_bytes"] + totals["tail_bytes"] + totals["store_bytes"]
  totals.update(
      store_bits_per_value=8.0 * totals["store_bytes"] / store_values if store_values else nan,
      key_bits_per_value=2 * key_bits / store_values if store_values else nan,
      value_bits_per_value=2 * value_bits / store_values if store_values else nan,
      compression_ratio=4.0 * retained_values / used if used else nan,
      num_layers=cache.num_layers, length=layers[0]["length"])
  return {"layers": layers, "total": totals}
