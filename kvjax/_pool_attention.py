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
from kvjax._pool import PagedCache


def attend(pool: PagedCache, seq, q, *, q_pos=None, scale=None, window=None,
           softcap=None, block_size: int = _attention.DEFAULT_BLOCK_SIZE):
  """Softmax attention of each sequence's queries over its retained tokens.

  Args:
    pool: a `PagedCache`.
    seq: int32 `[B]`, distinct slot ids.
    q: `[B, n_q, Hq, D]` queries (decode: `n_q = 1`; a prefill chunk: more);
      query head `h` reads kv head `h // (Hq // H)`.
    q_pos: optional int `[B, n_q]` absolute positions; default each
      sequence's last `n_q` positions.
    scale, window, softcap: as `kvjax.attend`.
    block_size: store tokens read per step (whole pages).

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
  return _attend(pool, seq, q, q_pos, scale, window, softcap, block_size=block_size)


@functools.partial(jax.jit, static_argnames=("block_size",))
def _attend(pool, seq, q, q_pos, scale, window, softcap, *, block_size):
  spec = pool.spec
  ok = _pool.valid_slots(seq, spec)
  slots = jnp.where(ok, seq, 0)
  if q_pos is None:
    q_pos = jnp.full(q.shape[:2], -1, jnp.int32)  # marks "the default"
    default_pos = True
  else:
    default_pos = False
  group = max(1, min(block_size // spec.page_size, spec.max_pages_per_seq))

  def one(slot, q_b, q_pos_b, ok_b):
    view = _pool.slot_view(pool, slot)
    query = _attention.query_rows(view.spec, view.length, q_b,
                                  None if default_pos else q_pos_b, scale, window, softcap)
    order = view.store_order if _state.store_split(view.spec) else None
    fold = functools.partial(_fold_pages, pool, slot, view, query, group)
    out = _attention.attend_xla(view, view, None, query, order, block_size,
                                fold_store=fold)
    return _attention.output_rows(jnp.where(ok_b, out, jnp.nan), q_b)

  return jax.vmap(one)(slots, q, q_pos, ok)


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
