"""Pure cache transforms: append, migrate, evict, clear, check.

Each costs O(tokens appended), never O(capacity): appends scatter rows into
the rings (in place when the cache is donated or a loop carry), and migrating
or evicting only moves counters (see `_state`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from kvjax import _checks
from kvjax import _layers
from kvjax import _state
from kvjax._layers import ModelCache
from kvjax._state import KVCache


def _check_tokens(name: str, x, spec) -> None:
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  want = f"[n, {spec.num_kv_heads}, {spec.head_dim}]"
  if shape is None or len(shape) != 3 or shape[0] < 1 or tuple(shape[1:]) != (
      spec.num_kv_heads, spec.head_dim):
    raise ValueError(f"{name}: expected shape {want} with n >= 1 "
                     f"(num_kv_heads, head_dim from the spec), got {shape}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name}: expected a float dtype, got {dtype}")


def _tail_after(tail_count, added, spec):
  """Tail size after `added` more tokens, migrating whole batches whenever it
  reaches `tail + migrate_batch` (closed form of doing it token by token)."""
  c = tail_count + added
  full = spec.tail + spec.migrate_batch
  return jnp.where(c < full, c, spec.tail + jnp.mod(c - spec.tail,
                                                    spec.migrate_batch))


def append(cache: KVCache, k, v, n_valid=None, *, layer=None) -> KVCache:
  """Appends tokens to the cache.

  Args:
    cache: a `KVCache`; with `layer`, a stack of per-layer caches or a
      `ModelCache` (`kvjax.init_layers`).
    k, v: `[n, H, D]`, any float dtype, `n >= 1` (static). Rounded to the
      spec's `hot_dtype` first; the store encodes the rounded values.
    n_valid: optional int scalar (may be traced): only the first `n_valid`
      tokens are appended, the rest are padding and ignored entirely
      (clipped to `[0, n]`).
    layer: optional int scalar (may be traced): append to this layer of a
      stack of caches (`kvjax.init(spec, batch=num_layers)`), in place, as in
      a `lax.scan` / `fori_loop` over a model's layers. A traced index
      outside the stack stores nothing and is recorded in every layer
      (`stats()["bad_layer_tokens"]`, `kvjax.check` raises `IndexError`).

  Returns:
    The new cache. Tokens get positions `length, length + 1, ...`.

  Raises:
    ValueError: at trace time, if `k` or `v` has the wrong shape or dtype,
      `n_valid` is not an int scalar, or a static `layer` is outside the stack.
  """
  if isinstance(cache, ModelCache):
    return _layers.on_layer(cache, layer, "append",
                            lambda stack, i: append(stack, k, v, n_valid, layer=i))
  # Checked here, before `jit` makes every argument a tracer, so concrete
  # values are named in the message.
  _state.require_single(cache, "append", layer)
  _check_tokens("k", k, cache.spec)
  _check_tokens("v", v, cache.spec)
  if k.shape != v.shape:
    raise ValueError(f"v: expected the same shape as k {k.shape}, got {v.shape}")
  if n_valid is not None:
    _checks.int_scalar("n_valid", n_valid)
  return _append(cache, k, v, n_valid, layer)


@jax.jit
def _append(cache: KVCache, k, v, n_valid, layer) -> KVCache:
  out, store_rows, store_index = append_rows(cache, k, v, n_valid, layer)
  return dataclasses.replace(out, **{
      name: _state.scatter_rows(getattr(cache, name), rows, store_index, layer)
      for name, rows in zip(("store_k", "store_v"), store_rows)})


def append_rows(cache: KVCache, k, v, n_valid, layer):
  """`append` but for the store: the cache with its sinks, tail and counters
  updated, the encoded store rows (keys, values; leaves `[H, n, ...]`) and
  their ring slots `[n]` (`store_slots` where a row is not kept). The paged
  pool writes the same rows into pages, so both hold the same bits."""
  stack, cache = cache, _state.layer_view(cache, layer)
  spec = cache.spec
  n = k.shape[0]
  if n_valid is None:
    n_valid = jnp.int32(n)
  else:
    n_valid = jnp.clip(_checks.int_scalar("n_valid", n_valid), 0, n)
  in_range = _state.layer_in_range(stack, layer)
  misrouted = jnp.where(in_range, 0, n_valid)
  n_valid = jnp.where(in_range, n_valid, 0)

  if spec.overflow == "error":
    accepted = jnp.minimum(n_valid, spec.capacity - _state.retained(cache))
  else:
    accepted = n_valid
  refused = n_valid - accepted
  if spec.overflow == "error":
    # Only here: a debug_check puts an effect in the jaxpr, which moves every
    # call off jit's fast dispatch path (~0.3 ms on CPU).
    checkify.debug_check(
        refused == 0, "kvjax.append: overflow='error' and the cache is full: "
        "rejected {} tokens", refused)
  hot, formats = _state.hot_format(spec), _state.store_formats(spec)
  row = jnp.arange(n, dtype=jnp.int32)
  pos = cache.length + row
  new_length = cache.length + accepted
  new_end = jnp.maximum(new_length - spec.sinks, 0)
  j = pos - spec.sinks  # non-sink index
  ok = row < accepted

  def ring_index(keep, slots):
    return jnp.where(keep, jnp.mod(j, slots), slots)

  sink_index = jnp.where(ok & (pos < spec.sinks), pos, spec.sinks)
  live = ok & (j >= 0)
  # Within one call only the newest `slots` tokens can survive in a ring, so
  # indices never collide.
  tail_index = ring_index(live & (j >= new_end - spec.tail_slots), spec.tail_slots)
  store_index = ring_index(live & (j >= new_end - spec.store_slots),
                           spec.store_slots)

  # K and V go through the hot rounding and the store encoding together.
  kv = jnp.swapaxes(jnp.stack([k, v]), 1, 2)  # [2, H, n, D]
  hot_rows = hot.encode(kv)
  rounded = hot.decode(hot_rows)
  order = stack.store_order
  split = _state.store_split(spec)
  if split:
    # The first non-sink token (position `sinks`) fixes each head's outlier
    # channels; whichever call appends it, the choice is the same.
    first = spec.sinks - cache.length
    has_first = (first >= 0) & (first < accepted)
    token = jax.lax.dynamic_index_in_dim(rounded, jnp.clip(first, 0, n - 1), 2, False)
    previous = _state.small_leaf(order, layer)
    # Computed only by the append that holds that token, batched or not (on
    # CPU the kernel sorts only where `has_first`).
    if formats[0] is formats[1]:
      order = formats[0].choose_order(token, has_first, previous)
    else:
      order = jnp.stack([f.choose_order(token[i], has_first, previous[i]) if f.split
                         else previous[i] for i, f in enumerate(formats)])
  if formats[0] is formats[1]:  # K and V encoded together
    both = formats[0].encode(rounded, order[:, :, None, :])
    store_rows = [jax.tree.map(lambda a: a[i], both) for i in range(2)]
  else:
    store_rows = [f.encode(rounded[i], order[i][:, None, :]) for i, f in enumerate(formats)]
  new = {}
  for i, name in enumerate(("k", "v")):
    hot_i = jax.tree.map(lambda a: a[i], hot_rows)
    for tier, rows, index in (("sink_", hot_i, sink_index),
                              ("tail_", hot_i, tail_index)):
      new[tier + name] = _state.scatter_rows(getattr(stack, tier + name), rows,
                                             index, layer)

  added = new_end - _state.nonsink_count(cache)
  evicted = cache.evicted
  if spec.overflow == "slide":
    evicted = jnp.maximum(evicted, new_end - spec.store_slots)
  if split:
    new["store_order"] = (order if layer is None
                          else stack.store_order.at[layer].set(order))
  out = _state.with_counters(
      dataclasses.replace(stack, **new), layer, length=new_length,
      evicted=evicted, tail_count=_tail_after(cache.tail_count, added, spec),
      rejected=cache.rejected + refused)
  if layer is not None:
    out = dataclasses.replace(out, bad_layer_tokens=out.bad_layer_tokens + misrouted)
  return out, store_rows, store_index


def migrate(cache: KVCache, *, layer=None) -> KVCache:
  """Moves every tail token beyond the newest `tail` into the store now.

  Only a counter changes: the store already holds every token's codes.
  With `layer`, only that layer of a stack or `ModelCache` (a `ModelCache`
  without `layer`: every layer).
  """
  if isinstance(cache, ModelCache):
    if layer is None:
      return _layers.every_layer(cache, "migrate", migrate)
    return _layers.on_layer(cache, layer, "migrate", lambda s, i: migrate(s, layer=i))
  _state.require_single(cache, "migrate", layer)
  return _migrate(cache, layer)


@jax.jit
def _migrate(cache: KVCache, layer) -> KVCache:
  view = _state.layer_view(cache, layer)
  return _state.with_counters(
      cache, layer, tail_count=jnp.minimum(view.tail_count, cache.spec.tail))


def evict(cache: KVCache, n, *, layer=None) -> KVCache:
  """Drops the `n` oldest non-sink tokens.

  Args:
    cache: a `KVCache`; with `layer`, a stack of per-layer caches.
    n: int scalar (may be traced); clipped to the retained non-sink count.
    layer: optional int scalar (may be traced): evict from this layer only
      (a `ModelCache` without `layer`: from every layer).

  Raises:
    ValueError: `n` is not an int scalar (a float is never truncated).
  """
  if isinstance(cache, ModelCache):
    _checks.int_scalar("n", n)
    if layer is None:
      return _layers.every_layer(cache, "evict", lambda c: evict(c, n))
    return _layers.on_layer(cache, layer, "evict", lambda s, i: evict(s, n, layer=i))
  _state.require_single(cache, "evict", layer)
  _checks.int_scalar("n", n)
  return _evict(cache, n, layer)


@jax.jit
def _evict(cache: KVCache, n, layer) -> KVCache:
  n = _checks.int_scalar("n", n)
  view = _state.layer_view(cache, layer)
  retained = _state.retained_nonsink(view)
  n = jnp.clip(n, 0, retained)
  return _state.with_counters(
      cache, layer, evicted=view.evicted + n,
      tail_count=jnp.minimum(view.tail_count, retained - n))


def clear(cache: KVCache) -> KVCache:
  """An empty cache with the same spec; every counter restarts at 0.

  Nothing the cleared sequence wrote can influence a later result: its rows
  stay in the buffers until overwritten but are never read (attention
  selects, never multiplies by zero), and per-head state such as the split
  formats' outlier order is chosen again by the next first non-sink token.
  A batch, a stack or a `ModelCache` is cleared entirely.
  """
  if isinstance(cache, ModelCache):
    return _layers.every_run(cache, _clear)
  _state.require_cache(cache, "clear")
  return _clear(cache)


@jax.jit
def _clear(cache: KVCache) -> KVCache:
  zero = lambda: jnp.zeros_like(cache.length)  # distinct, so donatable
  return dataclasses.replace(cache, length=zero(), evicted=zero(),
                             tail_count=zero(), rejected=zero(),
                             bad_layer_tokens=zero())


def acknowledge_overflow(cache: KVCache) -> KVCache:
  """The cache with its record of rejected tokens reset to 0.

  Call it after handling an overflow (`kvjax.check` raised, or
  `stats()["overflow"]`): `check` is then quiet until the next refusal.
  Nothing else changes. Works on one cache, a batch, a stack or a
  `ModelCache` (every entry).
  """
  if isinstance(cache, ModelCache):
    return _layers.every_run(cache, _acknowledge_overflow)
  _state.require_cache(cache, "acknowledge_overflow")
  return _acknowledge_overflow(cache)


@jax.jit
def _acknowledge_overflow(cache: KVCache) -> KVCache:
  return dataclasses.replace(cache, rejected=jnp.zeros_like(cache.rejected))


def _which(counts: np.ndarray) -> str:
  """Which caches of a batch/stack have a nonzero count, and the counts."""
  bad = np.argwhere(counts > 0)
  values = counts[counts > 0].tolist()
  if counts.ndim == 1:
    return (f"caches {bad[:, 0].tolist()} of the leading axis (sequences of a "
            f"batch, or layers of a stack): {values} tokens")
  if counts.ndim == 2:
    pairs = [tuple(int(i) for i in p) for p in bad]
    return f"caches (sequence, layer) {pairs}: {values} tokens"
  return f"caches at {[tuple(int(i) for i in p) for p in bad]}: {values} tokens"


def check(cache: KVCache) -> None:
  """Raises on the host if any append refused tokens.

  Returns quietly for a healthy cache (or batch / stack of caches). A host
  function: call it outside `jit`. A `ModelCache` is checked run by run,
  naming its layers.

  Raises:
    IndexError: an append with a traced `layer` outside the stack stored
      nothing (`stats()["bad_layer_tokens"]`).
    OverflowError: `overflow="error"` rejected tokens since the last
      `clear` or `acknowledge_overflow`, saying how many (and in which
      caches of a batch or stack).
  """
  if isinstance(cache, ModelCache):
    for run, (first, n, _) in zip(cache.runs, _layers.layer_runs(cache)):
      try:
        check(run)
      except (IndexError, OverflowError) as e:
        raise type(e)(f"ModelCache layers {first}..{first + n - 1} (one run; its caches "
                      f"are indexed from 0 within it): {e}") from None
    return
  _state.require_cache(cache, "check")
  _checks.require_host(cache, "check")
  misrouted = np.asarray(jax.device_get(cache.bad_layer_tokens))
  if np.any(misrouted > 0):
    # Recorded in every layer of a stack (layers are the last axis).
    layers = misrouted.shape[-1] if misrouted.ndim else 1
    per_stack = misrouted.max(axis=-1) if misrouted.ndim else misrouted
    detail = (f"{int(per_stack)} tokens" if per_stack.ndim == 0
              else f"in sequences {np.flatnonzero(per_stack).tolist()}: "
              f"{per_stack[per_stack > 0].tolist()} tokens")
    raise IndexError(
        "kvjax: append(..., layer=i) was called with a traced layer index "
        f"outside the stack of {layers} layers and stored nothing; refused "
        f"{detail}.")
  rejected = np.asarray(jax.device_get(cache.rejected))
  if np.any(rejected > 0):
    detail = (f"rejected {_which(rejected)}" if rejected.ndim
              else f"rejected {int(rejected)} tokens")
    raise OverflowError(
        f"kvjax cache overflow: overflow='error' and capacity="
        f"{cache.spec.capacity} was reached; {detail}. Evict tokens or use a "
        "larger capacity, then kvjax.acknowledge_overflow(cache).")
