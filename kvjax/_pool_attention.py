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
  """The jnp path: `[B, H, M, D]`, each sequence's pages read a block at a time."""
  del options  # in each query
  group = max(1, min(block_size // pool.spec.page_size, pool.spec.max_pages_per_seq))

  def one(slot, view, query):
    fold = functools.partial(_fold_pages, pool, slot, view, query, group)
    return _attention.attend_xla(view, view, None, query, _order(view), block_size,
                                 fold_store=fold)

  return jax.vmap(one)(slots, views, queries)


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


def _fold_pages(pool, slot, view, query, group: int, state, store_q):
  """Folds the store tokens of `slot` into `state`, `group` pages a step."""
  spec = pool.spec
  size = spec.page_size
  store_end = _state.nonsink_count(view) - view.tail_count
  steps = -(-(-(-store_end // size)) // group)
  table_row = pool.page_table[slot]
  formats = _state.store_formats(view.spec)
  h = spec.num_kv_heads

  def body(carry):
    i, st = carry
    cols = i * group + jnp.arange(group, dtype=jnp.int32)
    ids = jnp.clip(table_row[jnp.clip(cols, 0, spec.max_pages_per_seq - 1)], 0,
                   spec.num_pages - 1)
    take = lambda a: jnp.swapaxes(a[ids], 0, 1).reshape((h, group * size) + a.shape[3:])
    keys = jax.tree.map(take, pool.pages_k)
    values = jax.tree.map(take, pool.pages_v)
    j = (cols[:, None] * size + jnp.arange(size, dtype=jnp.int32)).reshape(-1)
    ok = (j < store_end) & (jnp.repeat(cols, size) < spec.max_pages_per_seq)
    return i + 1, _attention.fold_block(st, query, formats, store_q, keys, values,
                                        spec.sinks + j, ok, store=True)

  _, state = jax.lax.while_loop(lambda c: c[0] < steps, body, (jnp.int32(0), state))
  return state
