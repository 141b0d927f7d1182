"""The `KVCache` pytree and the bookkeeping derived from its counters.

Layout (head-major, which XLA:CPU attends over 5-7x faster than token-major):

  sink_k, sink_v   [H, sinks, D]          hot dtype, positions 0 .. sinks-1
  tail_k, tail_v   [H, tail_slots, D]     hot dtype ring, slot = j % tail_slots
  store_k, store_v [H, store_slots, ...]  store format ring, slot = j % store_slots

where `j = position - sinks` is a token's non-sink index. Every non-sink token
is encoded into the store ring when it is appended (a group is one token in one
head, so encoding it then gives the same bits as encoding it later); the tail
ring keeps its hot copy. The counters decide which tier a token is read from,
so migrating and evicting move no data. The retained non-sink tokens are
`j in [evicted, n_nonsink)`; the newest `tail_count` of them are in the tail,
the rest in the store.

Split TurboQuant formats (turbo2.5, turbo3.5) give their outlier half one bit
more. Which channels are outliers is fixed per head, for K and V separately,
by the first non-sink token (channels by decreasing magnitude; the first D/2
are the outliers) and kept in `store_order` until `clear`; other formats keep
an empty `[2, H, 0]` there (and a split format beside an unsplit one, as in
`store=("q8", "turbo3.5")`, the identity for the unsplit side).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from kvjax import _formats
from kvjax._spec import CacheSpec


@dataclasses.dataclass(frozen=True)
class KVCache:
  """A tiered KV cache. Build with `kvjax.init`; fields other than `spec` are
  private. Array leaves only; `spec` is static pytree metadata."""

  sink_k: Any
  sink_v: Any
  tail_k: Any
  tail_v: Any
  store_k: Any
  store_v: Any
  store_order: jax.Array  # int32 [2, H, D]: K and V channel order (split formats)
  length: jax.Array  # int32: positions handed out since init or clear
  evicted: jax.Array  # int32: non-sink tokens dropped (slide or evict)
  tail_count: jax.Array  # int32: newest retained tokens read from the tail
  rejected: jax.Array  # int32: tokens refused by overflow="error"
  # int32: tokens an append refused because its traced `layer` index was
  # outside the stack (recorded in every layer; a static index raises).
  bad_layer_tokens: jax.Array
  spec: CacheSpec = dataclasses.field(metadata=dict(static=True))

  def __repr__(self):
    s = self.spec
    try:
      counts = (f"length={self.length.tolist()}, tail={self.tail_count.tolist()}"
                f", evicted={self.evicted.tolist()}"
                f", rejected={self.rejected.tolist()}")
      if self.bad_layer_tokens.any():
        counts += f", bad_layer_tokens={self.bad_layer_tokens.tolist()}"
    except Exception:  # Traced: no values to show.
      counts = "traced"
    batch = self.length.shape
    return (f"KVCache(store={s.store_name!r}, hot_dtype={s.hot_dtype!r}, "
            f"capacity={s.capacity}, H={s.num_kv_heads}, D={s.head_dim}, "
            f"sinks={s.sinks}, tail={s.tail}"
            f"{', batch=' + str(batch) if batch else ''}; {counts})")


jax.tree_util.register_dataclass(KVCache)


def hot_format(spec: CacheSpec) -> _formats.RawFormat:
  return _formats.HOT_FORMATS[spec.hot_dtype]


def store_formats(spec: CacheSpec):
  """The store formats of the keys and of the values (often the same object)."""
  return _formats.FORMATS[spec.key_store], _formats.FORMATS[spec.value_store]


def store_split(spec: CacheSpec) -> bool:
  """Whether keys or values use a split TurboQuant format (an outlier order)."""
  return any(f.split for f in store_formats(spec))


def init(spec: CacheSpec, batch=None) -> KVCache:
  """An empty cache.

  Args:
    spec: the `CacheSpec`.
    batch: if given, a batch of `batch` independent caches (leading axis on
      every leaf), the same as `jax.vmap(lambda _: init(spec))(jnp.arange(batch))`;
      a stack of per-layer caches is `batch=num_layers` (see `append`'s
      `layer`), and `batch=(B, L)` is a batch of `B` such stacks.

  Returns:
    A `KVCache` with `length == 0`.

  Raises:
    ValueError: `spec` is not a `CacheSpec`, or `batch` is not a positive int
      or a tuple of them.
  """
  if not isinstance(spec, CacheSpec):
    raise ValueError(f"spec: expected a kvjax.CacheSpec, got {type(spec).__name__}")
  if batch is not None:
    shape = batch if isinstance(batch, tuple) else (batch,)
    if not shape or not all(_positive_int(b) for b in shape):
      raise ValueError("batch: expected a positive int or a tuple of them "
                       f"(e.g. (sequences, layers)), got {batch!r}")
    make = lambda _: init(spec)
    for _ in shape:
      make = jax.vmap(make)
    return make(jnp.zeros(tuple(int(b) for b in shape)))
  h, d = spec.num_kv_heads, spec.head_dim
  hot, (key, value) = hot_format(spec), store_formats(spec)
  # One array per counter: a shared one could not be donated twice.
  zero = lambda: jnp.zeros((), jnp.int32)
  return KVCache(
      sink_k=hot.empty((h, spec.sinks), d), sink_v=hot.empty((h, spec.sinks), d),
      tail_k=hot.empty((h, spec.tail_slots), d),
      tail_v=hot.empty((h, spec.tail_slots), d),
      store_k=key.empty((h, spec.store_slots), d),
      store_v=value.empty((h, spec.store_slots), d),
      store_order=jnp.tile(jnp.arange(d if store_split(spec) else 0, dtype=jnp.int32),
                           (2, h, 1)),
      length=zero(), evicted=zero(), tail_count=zero(), rejected=zero(),
      bad_layer_tokens=zero(), spec=spec)


def _positive_int(value) -> bool:
  return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and value >= 1)


# Derived bookkeeping (all int32, per sequence).

def sink_count(cache: KVCache):
  return jnp.minimum(cache.length, cache.spec.sinks)


def nonsink_count(cache: KVCache):
  """Non-sink positions handed out: the retained run ends here."""
  return jnp.maximum(cache.length - cache.spec.sinks, 0)


def retained_nonsink(cache: KVCache):
  return nonsink_count(cache) - cache.evicted


def store_count(cache: KVCache):
  return retained_nonsink(cache) - cache.tail_count


def retained(cache: KVCache):
  return sink_count(cache) + retained_nonsink(cache)


def ring_index(slot, end, slots: int):
  """The non-sink index held by ring `slot`: the one in `[end - slots, end)`
  congruent to it (may be negative: the slot was never written)."""
  return end - 1 - jnp.mod(end - 1 - slot, slots)


def require_cache(cache, fn_name: str) -> None:
  if not isinstance(cache, KVCache):
    raise ValueError(f"cache: expected a kvjax.KVCache, got "
                     f"{type(cache).__name__} (in kvjax.{fn_name})")


def require_single(cache: KVCache, fn_name: str, layer=None) -> None:
  """Transforms take one cache (or, with `layer`, a stack of per-layer caches
  with one leading axis); a batch goes through `jax.vmap`.

  A static `layer` outside the stack raises here; a traced one is checked
  where it is used (`layer_in_range`).
  """
  require_cache(cache, fn_name)
  if layer is None and cache.length.ndim:
    raise ValueError(
        f"cache: {fn_name} takes one cache, got a batch of shape "
        f"{cache.length.shape}; use jax.vmap(kvjax.{fn_name}), or layer= for "
        "a stack of per-layer caches")
  if layer is not None:
    if cache.length.ndim != 1:
      raise ValueError(
          f"cache: {fn_name}(..., layer=i) takes a stack of per-layer caches "
          f"(one leading axis, e.g. kvjax.init(spec, batch=num_layers)), got "
          f"counters of shape {cache.length.shape}")
    if (isinstance(layer, bool) or jnp.ndim(layer)
        or not jnp.issubdtype(jnp.result_type(layer), jnp.integer)):
      raise ValueError(f"layer: expected an int scalar, got {layer!r}")
    layers = cache.length.shape[0]
    if not isinstance(layer, jax.core.Tracer):
      index = int(layer)
      if not 0 <= index < layers:
        raise ValueError(f"layer: expected 0 <= layer < {layers} (the stack's "
                         f"layers), got {index}")


def layer_in_range(cache: KVCache, layer):
  """Whether `layer` (None: no stack) indexes the stack (a bool array)."""
  if layer is None:
    return jnp.bool_(True)
  return (layer >= 0) & (layer < cache.length.shape[0])


# A stack of per-layer caches is one `KVCache` whose leaves have a leading
# layer axis. With `layer` set, transforms read that layer's counters and
# write its rows in place, so a `lax.scan` / `fori_loop` over layers never
# copies a layer's buffers out of the stack.

def layer_view(cache: KVCache, layer) -> KVCache:
  """`cache` with the counters of `layer` (buffers stay stacked)."""
  if layer is None:
    return cache
  take = lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False)
  return dataclasses.replace(cache, length=take(cache.length),
                             evicted=take(cache.evicted),
                             tail_count=take(cache.tail_count),
                             rejected=take(cache.rejected),
                             bad_layer_tokens=take(cache.bad_layer_tokens))


def small_leaf(a, layer):
  """One layer of a small leaf (sinks, tail): a copy of O(tail) bytes."""
  return a if layer is None else jax.lax.dynamic_index_in_dim(a, layer, keepdims=False)


def token_block(a, start, size: int, layer):
  """Rows `[start, start + size)` of the token axis of one layer's leaf."""
  if layer is None:
    return jax.lax.dynamic_slice_in_dim(a, start, size, axis=1)
  begin = (layer, 0, start) + (0,) * (a.ndim - 3)
  return jax.lax.dynamic_slice(a, begin, (1, a.shape[1], size) + a.shape[3:])[0]


def scatter_rows(buffers, rows, index, layer):
  """Writes `rows` (leaves `[H, n, ...]`) at token slots `index: [n]` of
  `buffers` (of `layer`); an index equal to the slot count is dropped."""
  if layer is None:
    return jax.tree.map(lambda b, r: b.at[:, index].set(r, mode="drop"),
                        buffers, rows)
  # A scalar and an array index around a slice: numpy puts the indexed
  # (token) axis first in the update.
  return jax.tree.map(
      lambda b, r: b.at[layer, :, index].set(jnp.swapaxes(r, 0, 1), mode="drop"),
      buffers, rows)


def with_counters(cache: KVCache, layer, **counters) -> KVCache:
  """`cache` with new counter values (for `layer` of a stack)."""
  if layer is not None:
    counters = {name: getattr(cache, name).at[layer].set(value)
                for name, value in counters.items()}
  return dataclasses.replace(cache, **counters)
