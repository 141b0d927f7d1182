"""Blockwise attention over the cache with an online softmax.

The store ring is read `block_size` tokens at a time inside a `while_loop`
whose trip count follows the retained store tokens, not the capacity; each
block is scored straight from its codes (see `_formats`), so the whole store
is never decoded and temporary memory is bounded by one block. The sinks and
the tail are small hot buffers read as one block each.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kvjax import _state
from kvjax._state import KVCache

DEFAULT_BLOCK_SIZE = 1024


class _Softmax(NamedTuple):
  """Running state of the online softmax, per query row `m` of `[H, M]`.

  Hot tiers accumulate values in the channel domain (`acc`), the store in
  its format's domain (`store_acc`, rotated for TurboQuant), so a rotation is
  undone once at the end, never per token.
  """
  max: jax.Array  # [H, M]
  denom: jax.Array  # [H, M]
  acc: jax.Array  # [H, M, D]
  store_acc: jax.Array  # [H, M, A]


class _Query(NamedTuple):
  q: jax.Array  # [H, M, D] float32, already scaled
  pos: jax.Array  # [M] int32 absolute positions
  window: jax.Array | None
  softcap: jax.Array | None


def _update(state: _Softmax, query: _Query, fmt, prepared_q, keys, values,
            key_pos, key_ok, *, store: bool):
  """Folds one block (`keys`, `values` encoded as `fmt`, leaves `[H, B, ...]`;
  `key_pos`, `key_ok`: `[B]`; `prepared_q` from `fmt.prepare_query`) into
  `state`, accumulating into `store_acc` if `store` else `acc`."""
  s = fmt.scores(prepared_q, keys)  # [H, M, B]
  if query.softcap is not None:
    s = query.softcap * jnp.tanh(s / query.softcap)
  visible = key_ok[None, :] & (key_pos[None, :] <= query.pos[:, None])
  if query.window is not None:
    visible &= key_pos[None, :] > query.pos[:, None] - query.window
  s = jnp.where(visible[None], s, -jnp.inf)
  new_max = jnp.maximum(state.max, jnp.max(s, axis=-1))
  # A row that has seen no key keeps max = -inf; shift it by 0 instead.
  shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
  p = jnp.exp(s - shift[..., None])
  correction = jnp.exp(state.max - shift)[..., None]
  acc, store_acc = state.acc * correction, state.store_acc * correction
  if store:
    store_acc = store_acc + fmt.weighted_sum(p, values)
  else:
    acc = acc + fmt.weighted_sum(p, values)
  return _Softmax(max=new_max,
                  denom=state.denom * correction[..., 0] + jnp.sum(p, axis=-1),
                  acc=acc, store_acc=store_acc)


def _check_query(cache: KVCache, q, q_pos, layer):
  _state.require_single(cache, "attend", layer)
  spec = cache.spec
  shape = getattr(q, "shape", None)
  if (shape is None or len(shape) != 3 or shape[0] < 1 or shape[2] != spec.head_dim
      or shape[1] < 1 or shape[1] % spec.num_kv_heads):
    raise ValueError(
        f"q: expected shape [n_q, Hq, {spec.head_dim}] with n_q >= 1 and Hq a "
        f"multiple of num_kv_heads={spec.num_kv_heads}, got {shape}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q: expected a float dtype, got {q.dtype}")
  if q_pos is not None:
    if jnp.shape(q_pos) != (shape[0],) or not jnp.issubdtype(
        jnp.result_type(q_pos), jnp.integer):
      raise ValueError(f"q_pos: expected int32 [{shape[0]}], got "
                       f"{jnp.result_type(q_pos)} {jnp.shape(q_pos)}")


@functools.partial(jax.jit, static_argnames="block_size")
def attend(cache: KVCache, q, *, q_pos=None, scale=None, window=None,
           softcap=None, layer=None, block_size: int = DEFAULT_BLOCK_SIZE):
  """Softmax attention of queries over the retained tokens.

  Args:
    cache: a `KVCache` (one sequence; `jax.vmap` for a batch).
    q: `[n_q, Hq, D]` queries; query head `h` reads kv head `h // (Hq // H)`.
    q_pos: int32 `[n_q]` absolute positions; default the last `n_q` appended.
    scale: logit scale, default `1/sqrt(D)`. Python number or traced scalar.
    window: if set, a query at `p` sees keys with `p - window < pos <= p`.
    softcap: if set, logits become `softcap * tanh(logits / softcap)`.
    layer: optional int scalar (may be traced): attend over this layer of a
      stack of caches (see `append`), reading its blocks in place.
    block_size: store tokens read per step (bounds temporary memory).

  Returns:
    `[n_q, Hq, D]` in `q.dtype`, accumulated in float32. A query that sees no
    key gets zeros.

  Raises:
    ValueError: at trace time, for a `q` or `q_pos` of the wrong shape.
  """
  _check_query(cache, q, q_pos, layer)
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
  stack, cache = cache, _state.layer_view(cache, layer)
  spec = cache.spec
  n_q, hq, d = q.shape
  h = spec.num_kv_heads
  group = hq // h
  if q_pos is None:
    q_pos = cache.length - n_q + jnp.arange(n_q, dtype=jnp.int32)
  if scale is None:
    scale = 1.0 / math.sqrt(d)
  # [n_q, H, G, D] -> [H, G * n_q, D]: row m is query m % n_q of group m // n_q.
  qh = jnp.transpose(q.astype(jnp.float32).reshape(n_q, h, group, d),
                     (1, 2, 0, 3)).reshape(h, group * n_q, d)
  query = _Query(
      q=qh * jnp.asarray(scale, jnp.float32),
      pos=jnp.tile(jnp.asarray(q_pos, jnp.int32), group),
      window=None if window is None else jnp.asarray(window, jnp.int32),
      softcap=None if softcap is None else jnp.asarray(softcap, jnp.float32))
  rows = group * n_q
  hot, store = _state.hot_format(spec), _state.store_format(spec)
  state = _Softmax(jnp.full((h, rows), -jnp.inf, jnp.float32),
                   jnp.zeros((h, rows), jnp.float32),
                   jnp.zeros((h, rows, d), jnp.float32),
                   jnp.zeros((h, rows, store.accumulator_dim(d)), jnp.float32))
  order = _state.small_leaf(stack.store_order, layer) if store.split else None
  end = _state.nonsink_count(cache)
  if spec.sinks:
    slot = jnp.arange(spec.sinks, dtype=jnp.int32)
    sink_k, sink_v = (jax.tree.map(lambda a: _state.small_leaf(a, layer), x)
                      for x in (stack.sink_k, stack.sink_v))
    state = _update(state, query, hot, query.q, sink_k, sink_v, slot,
                    slot < _state.sink_count(cache), store=False)
  store_q = store.prepare_query(query.q, None if order is None else order[0])
  state = _attend_store(stack, cache, layer, query, store_q, state, block_size)
  slot = jnp.arange(spec.tail_slots, dtype=jnp.int32)
  j = _state.ring_index(slot, end, spec.tail_slots)
  tail_k, tail_v = (jax.tree.map(lambda a: _state.small_leaf(a, layer), x)
                    for x in (stack.tail_k, stack.tail_v))
  state = _update(state, query, hot, query.q, tail_k, tail_v,
                  spec.sinks + j, j >= end - cache.tail_count, store=False)

  acc = state.acc + store.finish(state.store_acc, None if order is None else order[1])
  out = jnp.where(state.denom[..., None] > 0,
                  acc / jnp.maximum(state.denom, 1e-30)[..., None], 0.0)
  out = jnp.transpose(out.reshape(h, group, n_q, d), (2, 0, 1, 3))
  return out.reshape(n_q, hq, d).astype(q.dtype)


def _attend_store(stack: KVCache, cache: KVCache, layer, query: _Query,
                  store_q, state: _Softmax, block_size: int) -> _Softmax:
  """Folds the store tokens into `state`, one ring block per loop step.

  Blocks are `[b * B, (b + 1) * B)` of the ring, the last one clamped to end at
  the ring's end (its rows before `b * B` belong to the previous block and are
  masked). The loop starts at the block holding the oldest store token and
  runs only over blocks that can hold store tokens. `cache` has the counters
  (of `layer`), `stack` the buffers.
  """
  spec = cache.spec
  slots = spec.store_slots
  size = min(block_size, slots)
  n_blocks = -(-slots // size)
  spare = 1 if slots % size == 0 else 2  # the short last block may add one
  count = _state.store_count(cache)
  steps = jnp.where(count > 0, jnp.minimum(n_blocks, -(-count // size) + spare), 0)
  first = jnp.mod(cache.evicted, slots) // size
  end = _state.nonsink_count(cache)
  store_end = end - cache.tail_count
  fmt = _state.store_format(spec)

  def body(carry):
    i, st = carry
    b = jnp.mod(first + i, n_blocks)
    start = jnp.minimum(b * size, slots - size)
    slot = start + jnp.arange(size, dtype=jnp.int32)
    j = _state.ring_index(slot, end, slots)
    ok = (slot >= b * size) & (j >= cache.evicted) & (j < store_end)
    take = lambda a: _state.token_block(a, start, size, layer)
    keys = jax.tree.map(take, stack.store_k)
    values = jax.tree.map(take, stack.store_v)
    return i + 1, _update(st, query, fmt, store_q, keys, values,
                          spec.sinks + j, ok, store=True)

  _, state = jax.lax.while_loop(lambda c: c[0] < steps, body,
                                (jnp.int32(0), state))
  return state
