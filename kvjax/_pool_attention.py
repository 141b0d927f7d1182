"""Ragged attention over a paged pool, reading each sequence's pages in place.

Each sequence runs `kvjax.attend`'s jnp path on its hot tiers; its store is
read through its page table, `block_size // page_size` pages a step, in a
loop whose trip count follows the retained tokens. No sequence's store is
gathered whole: temporary memory is one block per sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import _attention
from kvjax import _checks
from kvjax import _pool
from kvjax import _state
from kvjax import ffi
from kvjax._pool import PagedCache


def attend(pool: PagedCache, seq, q, *, q_pos=None, scale=None, window=None,
           softcap=None, block_size: int = _attention.DEFAULT_BLOCK_SIZE,
           implementation=None):
  """Softmax attention of each sequence's queries over its retained tokens.

  Args:
    pool: a `PagedCache`.
    seq: int32 `[B]`, distinct slot ids.
    q: `[B, n_q, Hq, D]` queries (decode: `n_q = 1`; a prefill chunk: more);
      query head `h` reads kv head `h // (Hq // H)`.
    q_pos: optional int `[B, n_q]` absolute positions; default each
      sequence's last `n_q` positions.
    scale, window, softcap: as `kvjax.attend`.
    block_size: store tokens read per step by the jnp path (whole pages).
    implementation: None (the C++ kernel through the page tables on CPU
      when it is loaded, else the jnp path), "ffi" or "xla", as
      `kvjax.attend`.

  Returns:
    `[B, n_q, Hq, D]` in `q.dtype`: what `kvjax.attend` gives on each
    sequence's equivalent `KVCache`. A traced slot id outside the slots
    gives NaN.
  """
  _pool.require_pool(pool, "attend")
  spec = pool.spec
  seq = _pool.check_slots("seq", seq, spec)
  b = seq.shape[0]
  shape = getattr(q, "shape", None)
  if (shape is None or len(shape) != 4 or shape[0] != b or shape[1] < 1
      or shape[3] != spec.head_dim or shape[2] < 1 or shape[2] % spec.num_kv_heads):
    raise ValueError(
        f"q: expected shape [B={b}, n_q, Hq, {spec.head_dim}] with n_q >= 1 and Hq "
        f"a multiple of num_kv_heads={spec.num_kv_heads}, got {shape}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q: expected a float dtype, got {q.dtype}")
  if q_pos is not None:
    if isinstance(q_pos, (list, tuple)):
      q_pos = np.asarray(q_pos)
    if jnp.shape(q_pos) != shape[:2] or not jnp.issubdtype(jnp.result_type(q_pos),
                                                           jnp.integer):
      raise ValueError(f"q_pos: expected int32 [{b}, {shape[1]}], got "
                       f"{_checks.describe(q_pos)}")
  scale, window, softcap = _attention._options(scale, window, softcap, block_size)
  if implementation not in _attention.IMPLEMENTATIONS:
    raise ValueError(f"implementation: expected one of {_attention.IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  return _attend(pool, seq, q, q_pos, scale, window, softcap, block_size=block_size,
                 implementation=implementation)


@functools.partial(jax.jit, static_argnames=("block_size", "implementation"))
def _attend(pool, seq, q, q_pos, scale, window, softcap, *, block_size, implementation):
  spec = pool.spec
  ok = _pool.valid_slots(seq, spec)
  slots = jnp.where(ok, seq, 0)
  views = jax.vmap(lambda s: _pool.slot_view(pool, s))(slots)
  queries = jax.vmap(lambda view, q_b, q_pos_b: _attention.query_rows(
      view.spec, view.length, q_b, q_pos_b, scale, window, softcap),
      in_axes=(0, 0, None if q_pos is None else 0))(views, q, q_pos)
  args = (pool, slots, views, queries, (window, softcap), block_size)
  mode = _attention._resolve_implementation(implementation, q.shape[1])
  if mode == "xla":
    out = _attend_xla(*args)
  elif mode == "ffi":
    out = _attend_kernel(*args)
  else:
    out = jax.lax.platform_dependent(cpu=lambda: _attend_kernel(*args),
                                     default=lambda: _attend_xla(*args))
  out = jnp.where(ok[:, None, None, None], out, jnp.nan)
  return jax.vmap(_attention.output_rows)(out, q)


def _order(view):
  return view.store_order if _state.store_split(view.spec) else None


def _attend_xla(pool, slots, views, queries, options, block_size):
  """The jnp path: `[B, H, M, D]`. The store of the whole batch is one work
  list of (sequence, block of pages) items, `B` items a loop step, so the
  steps follow the batch's total length, not B times the longest; each
  sequence's hot tiers are then folded in as `kvjax.attend` does."""
  del options  # in each query
  spec = views.spec
  key = _state.store_formats(spec)[0]
  store_q = jax.vmap(lambda view, query: _attention._prepare_query(
      key, query.q, _order(view)))(views, queries)
  stores = _fold_store_items(pool, slots, views, queries, store_q, block_size)

  def one(view, query, store):
    return _attention.attend_xla(view, view, None, query, _order(view), block_size,
                                 fold_store=lambda state, _: _attention.merge_softmax(state, store))

  return jax.vmap(one)(views, queries, stores)


def _fold_store_items(pool, slots, views, queries, store_q, block_size: int):
  """Per sequence, the softmax state of its store tokens: `_Softmax` with a
  leading batch axis, computed over a work list of page blocks."""
  spec = pool.spec
  size, b = spec.page_size, slots.shape[0]
  group = max(1, min(block_size // size, spec.max_pages_per_seq))
  h, rows, d = queries.q.shape[1:]
  value = _state.store_formats(views.spec)[1]
  formats = _state.store_formats(views.spec)
  store_end = jax.vmap(lambda v: _state.nonsink_count(v) - v.tail_count)(views)
  items = -(-(-(-store_end // size)) // group)  # [B] page blocks per sequence
  ends = jnp.cumsum(items)
  total = ends[-1]
  empty = _attention.empty_softmax(h, rows, d, value.accumulator_dim(d))
  states = jax.tree.map(lambda x: jnp.broadcast_to(x, (b,) + x.shape), empty)

  def body(carry):
    step, states = carry
    t = step * b + jnp.arange(b, dtype=jnp.int32)
    owner = jnp.clip(jnp.searchsorted(ends, t, side="right"), 0, b - 1).astype(jnp.int32)
    block = t - (ends[owner] - items[owner])
    cols = block[:, None] * group + jnp.arange(group, dtype=jnp.int32)  # [W, g]
    ids = jnp.clip(pool.page_table[slots[owner][:, None],
                                   jnp.clip(cols, 0, spec.max_pages_per_seq - 1)],
                   0, spec.num_pages - 1)
    take = lambda a: jnp.swapaxes(a[ids], 1, 2).reshape(
        (b, h, group * size) + a.shape[3:])  # [W, g, H, P, ...] -> [W, H, g * P, ...]
    keys = jax.tree.map(take, pool.pages_k)
    values = jax.tree.map(take, pool.pages_v)
    j = (cols[:, :, None] * size + jnp.arange(size, dtype=jnp.int32)).reshape(b, -1)
    ok = ((j < store_end[owner][:, None]) & (t < total)[:, None]
          & (jnp.repeat(cols, size, axis=1) < spec.max_pages_per_seq))
    mine = lambda tree: jax.tree.map(lambda x: x[owner], tree)
    folded = jax.vmap(lambda query, sq, k, v, pos, ok: _attention.fold_block(
        empty, query, formats, sq, k, v, pos, ok, store=True))(
            mine(queries), mine(store_q), keys, values, spec.sinks + j, ok)
    return step + 1, _attention.merge_softmax(states, folded, into=owner)

  steps = -(-total // b)
  _, states = jax.lax.while_loop(lambda c: c[0] < steps, body, (jnp.int32(0), states))
  return states


def _attend_kernel(pool, slots, views, queries, options, block_size):
  """The C++ kernel through the page tables: `[B, H, M, D]`. It reads the
  slots' hot tiers and pages where they are (the slots as a stack's layers)."""
  del block_size
  window, softcap = options
  spec = views.spec
  d = spec.head_dim
  hot, (key, value) = _state.hot_format(spec), _state.store_formats(spec)
  q_store = jax.vmap(lambda view, query: key.flat_query(
      _attention._prepare_query(key, query.q, _order(view))))(views, queries)
  stack = _pool.slot_stack(pool)
  hot_leaves = tuple(x.data for x in (stack.sink_k, stack.sink_v, stack.tail_k, stack.tail_v))
  out_hot, out_store = ffi.attend(
      queries.q, q_store, queries.pos, (stack.length, stack.evicted, stack.tail_count), slots,
      window, softcap, hot_leaves, key.kernel_leaves(pool.pages_k),
      value.kernel_leaves(pool.pages_v), hot.kernel_layout(d), key.kernel_layout(d),
      value.kernel_layout(d), value.accumulator_dim(d), page_table=pool.page_table)
  finish = jax.vmap(lambda view, acc: _attention._finish(value, acc, _order(view)))
  return out_hot + finish(views, out_store)
