"""Views of a paged pool: `materialize` (one sequence), `stats`, `check`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import _checks
from kvjax import _pool
from kvjax import _views
from kvjax._pool import PagedCache


def materialize(pool: PagedCache, seq):
  """One sequence's retained tokens, as `kvjax.materialize` gives them for
  the equivalent `KVCache` (`PagedSpec.cache_spec()`): `(k, v, pos, valid)`,
  `k, v: [sinks + max_pages_per_seq * page_size, H, D]` float32, sorted by
  position, valid rows first (invalid: zeros, `pos = -1`).

  Args:
    seq: a Python int or an int32 scalar (may be traced) slot id; a traced
      id outside the slots gives no valid row.
  """
  _pool.require_pool(pool, "materialize")
  return _materialize(pool, _pool.check_slots("seq", seq, pool.spec, scalar=True))


@jax.jit
def _materialize(pool: PagedCache, seq):
  spec = pool.spec
  in_range = (seq >= 0) & (seq < spec.max_seqs)
  slot = jnp.where(in_range, seq, 0)
  # The slot's store ring is its pages in table order (missing pages read as
  # page 0: those rows are past the sequence's end and never valid).
  ids = jnp.clip(pool.page_table[slot], 0, spec.num_pages - 1)
  ring = lambda a: jnp.swapaxes(a[ids], 0, 1).reshape(
      (a.shape[1], spec.max_tokens) + a.shape[3:])
  store = (jax.tree.map(ring, pool.pages_k), jax.tree.map(ring, pool.pages_v))
  k, v, pos, valid = _views._materialize(_pool.slot_view(pool, slot, store), None)
  valid = valid & in_range
  zero = lambda x: jnp.where(valid[:, None, None], x, 0.0)
  return zero(k), zero(v), jnp.where(valid, pos, -1), valid


def _bytes_per_row(tree) -> int:
  """Bytes of one token row (one head) of leaves shaped `[N, H, rows, ...]`."""
  leaves = jax.tree.leaves(tree)
  return sum(int(np.prod(a.shape[3:])) * a.dtype.itemsize for a in leaves)


def stats(pool: PagedCache) -> dict:
  """Host-side accounting of the pool, measured from its arrays.

  Returns:
    A dict of plain Python numbers: `pages_total`, `pages_free`, `pages_used`
    (owned by at least one sequence), `pages_shared` (by two or more),
    `length` and `refused_tokens` (lists per slot), `bad_slot_ids` (ids
    outside the slots or repeated, ignored under `jit`), `hot_bytes` (bytes
    of the retained sink and tail tokens), `hot_buffer_bytes` (the hot
    buffers of the slots in use), `store_bytes` (page rows holding tokens,
    scales and norms included, a shared page counted once), `page_bytes`
    (one page, keys and values), `pages_in_use_bytes` (`pages_used *
    page_bytes`: partly filled pages count whole), `allocated_bytes` (sum of
    `nbytes` of every leaf) and `store_bits_per_value`.
  """
  _pool.require_pool(pool, "stats")
  _checks.require_host(pool, "stats")
  spec = pool.spec
  h, d, size = spec.num_kv_heads, spec.head_dim, spec.page_size
  got = jax.device_get(dict(table=pool.page_table, ref=pool.ref_count,
                            free=pool.free_count, length=pool.length,
                            tail=pool.tail_count, refused=pool.refused,
                            bad=pool.bad_slots))
  table, ref, length = (np.asarray(got[k]) for k in ("table", "ref", "length"))
  row_bytes = h * (_bytes_per_row(pool.pages_k) + _bytes_per_row(pool.pages_v))
  hot_row = h * 2 * _bytes_per_row(pool.tail_k)  # K and V of one token
  end = np.maximum(length - spec.sinks, 0)
  # Rows of each page that hold a token of some owner (shared pages once).
  filled = np.zeros(spec.num_pages, np.int64)
  for s in np.flatnonzero(end):
    cols = np.arange(-(-int(end[s]) // size))
    rows = np.minimum(size, int(end[s]) - cols * size)
    np.maximum.at(filled, table[s, cols], rows)
  sinks = np.minimum(length, spec.sinks)
  tail = np.asarray(got["tail"])
  in_use = length > 0
  hot_slot_rows = spec.sinks + _pool.slot_spec(spec).tail_slots
  page_bytes = row_bytes * size
  used = int(np.sum(ref > 0))
  return dict(
      pages_total=spec.num_pages, pages_free=int(got["free"]), pages_used=used,
      pages_shared=int(np.sum(ref > 1)), length=length.tolist(),
      refused_tokens=np.asarray(got["refused"]).tolist(),
      bad_slot_ids=int(got["bad"]),
      hot_bytes=int(np.sum(sinks + tail)) * hot_row,
      hot_buffer_bytes=int(np.sum(in_use)) * hot_slot_rows * hot_row,
      store_bytes=int(filled.sum()) * row_bytes, page_bytes=page_bytes,
      pages_in_use_bytes=used * page_bytes,
      allocated_bytes=_views._tree_bytes(pool),
      store_bits_per_value=8.0 * row_bytes / (2 * h * d))


def check(pool: PagedCache) -> None:
  """Raises on the host if an append or fork was refused (or a traced slot
  id was bad); quiet otherwise.

  Raises:
    IndexError: slot ids outside `[0, max_seqs)` or repeated were ignored.
    OverflowError: names the sequences whose appends or forks were refused
      since they were last freed, and how many tokens.
  """
  _pool.require_pool(pool, "check")
  _checks.require_host(pool, "check")
  bad = int(jax.device_get(pool.bad_slots))
  if bad:
    raise IndexError(f"kvjax.paged: {bad} slot ids outside [0, max_seqs="
                     f"{pool.spec.max_seqs}) or repeated were ignored")
  refused = np.asarray(jax.device_get(pool.refused))
  if np.any(refused > 0):
    which = np.flatnonzero(refused)
    raise OverflowError(
        f"kvjax.paged: appends or forks were refused for sequences "
        f"{which.tolist()} ({refused[which].tolist()} tokens): the pool had too "
        f"few free pages ({int(jax.device_get(pool.free_count))} free now) or a "
        f"sequence reached max_pages_per_seq * page_size = {pool.spec.max_tokens} "
        "tokens. Free or preempt sequences, then append again (docs/serving.md).")
