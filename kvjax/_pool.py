"""The paged pool's state and its allocating transforms: init, append, free, fork.

Layout (`S = max_seqs`, `N = num_pages`, `P = page_size`):

  pages_k, pages_v  [N, H, P, ...]          store format; page-major, then head-major
  sink_k, sink_v    [S, H, sinks, D]        hot dtype
  tail_k, tail_v    [S, H, tail + P, D]     hot dtype ring, as a KVCache's tail
  store_order       [S, 2, H, D or 0]       split TurboQuant outlier order
  page_table        [S, max_pages_per_seq]  page of each non-sink index // P; N = none
  ref_count         [N]                     page-table entries pointing at each page
  free_pages, free_count                    a stack: free_pages[:free_count] are free
  length, tail_count, refused   [S]         as a KVCache's counters (no eviction)
  generation        [S]                     times each slot was freed
  bad_slots         []                      slot ids outside [0, S) or repeated

A slot is a `KVCache` (`PagedSpec.cache_spec()`) whose store ring is the
concatenation of its pages: non-sink token `j` is row `j % P` of page
`page_table[s, j // P]`. Appends run the `KVCache` append on the slot's hot
tiers and counters (`_transforms.append_rows`) and write the same encoded rows
into pages, so the bits are those of the equivalent cache. Pages come off the
free stack inside `jit`; every operation touches only the slots and pages it
names (in place under donation), never the whole pool.

Full pages are never written again (there is no sliding), so `fork` shares
them by reference count; the page still being filled is copied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import _checks
from kvjax import _state
from kvjax import _transforms
from kvjax._spec import PagedSpec
from kvjax._state import KVCache


@dataclasses.dataclass(frozen=True)
class PagedCache:
  """A paged pool of sequences. Build with `kvjax.paged.init`; fields other
  than `spec` are private. Array leaves only; `spec` is static metadata."""

  pages_k: Any
  pages_v: Any
  sink_k: Any
  sink_v: Any
  tail_k: Any
  tail_v: Any
  store_order: jax.Array
  page_table: jax.Array
  ref_count: jax.Array
  free_pages: jax.Array
  free_count: jax.Array
  length: jax.Array
  tail_count: jax.Array
  refused: jax.Array
  generation: jax.Array  # int32 [S]: times each slot was freed (prefix index checks it)
  bad_slots: jax.Array
  spec: PagedSpec = dataclasses.field(metadata=dict(static=True))

  def __repr__(self):
    s = self.spec
    try:
      used = int(jnp.sum(self.ref_count > 0))
      counts = (f"pages_used={used}/{s.num_pages}, "
                f"active_slots={int(jnp.sum(self.length > 0))}/{s.max_seqs}")
    except Exception:  # Traced.
      counts = "traced"
    return (f"PagedCache(store={s.store_name!r}, hot_dtype={s.hot_dtype!r}, "
            f"page_size={s.page_size}, H={s.num_kv_heads}, D={s.head_dim}; {counts})")


jax.tree_util.register_dataclass(PagedCache)


def slot_spec(spec: PagedSpec):
  """The spec the slots run the `KVCache` transforms with: the equivalent
  cache's, with overflow="slide" (the pool admits only appends that fit, so
  nothing ever slides; "error" would add a checkify effect to every call)."""
  return dataclasses.replace(spec.cache_spec(), overflow="slide")


def init(spec: PagedSpec) -> PagedCache:
  """An empty pool: every page free, every slot empty.

  Raises:
    ValueError: `spec` is not a `kvjax.PagedSpec`.
  """
  if not isinstance(spec, PagedSpec):
    raise ValueError(f"pspec: expected a kvjax.PagedSpec, got {type(spec).__name__}")
  cs = slot_spec(spec)
  s, h, d, n = spec.max_seqs, spec.num_kv_heads, spec.head_dim, spec.num_pages
  hot, (key, value) = _state.hot_format(cs), _state.store_formats(cs)
  zeros = lambda: jnp.zeros((s,), jnp.int32)  # one array per counter (donation)
  return PagedCache(
      pages_k=key.empty((n, h, spec.page_size), d),
      pages_v=value.empty((n, h, spec.page_size), d),
      sink_k=hot.empty((s, h, spec.sinks), d), sink_v=hot.empty((s, h, spec.sinks), d),
      tail_k=hot.empty((s, h, cs.tail_slots), d), tail_v=hot.empty((s, h, cs.tail_slots), d),
      store_order=jnp.tile(jnp.arange(d if _state.store_split(cs) else 0, dtype=jnp.int32),
                           (s, 2, h, 1)),
      page_table=jnp.full((s, spec.max_pages_per_seq), n, jnp.int32),
      ref_count=jnp.zeros((n,), jnp.int32),
      # Popped from the end: the first appends get pages 0, 1, 2, ...
      free_pages=jnp.arange(n - 1, -1, -1, dtype=jnp.int32),
      free_count=jnp.int32(n), length=zeros(), tail_count=zeros(), refused=zeros(),
      generation=zeros(), bad_slots=jnp.int32(0), spec=spec)


def require_pool(pool, fn_name: str) -> None:
  if not isinstance(pool, PagedCache):
    raise ValueError(f"pool: expected a kvjax.paged.PagedCache, got "
                     f"{type(pool).__name__} (in kvjax.paged.{fn_name})")


def check_slots(name: str, seq, spec: PagedSpec, *, scalar=False):
  """`seq` as int32 (`[B]`, or a scalar if `scalar`); concrete ids must be
  distinct slots. Traced ones are checked in `valid_slots`."""
  if isinstance(seq, (list, tuple)):
    seq = np.asarray(seq)
  shape = jnp.shape(seq)
  want = "an int32 scalar" if scalar else "an int32 array [B] of distinct slot ids"
  if (isinstance(seq, (bool, np.bool_)) or len(shape) != (0 if scalar else 1)
      or not jnp.issubdtype(jnp.result_type(seq), jnp.integer)):
    raise ValueError(f"{name}: expected {want}, got {_checks.describe(seq)}")
  if not isinstance(seq, jax.core.Tracer):
    ids = np.asarray(seq).reshape(-1)
    bad = ids[(ids < 0) | (ids >= spec.max_seqs)]
    if bad.size:
      raise ValueError(f"{name}: slot ids must be in [0, max_seqs={spec.max_seqs}), "
                       f"got {bad.tolist()}")
    if len(set(ids.tolist())) != ids.size:
      raise ValueError(f"{name}: slot ids must be distinct, got {ids.tolist()}")
  return jnp.asarray(seq, jnp.int32)


def valid_slots(seq, spec: PagedSpec):
  """Which entries of `seq: [B]` name a slot, once (traced ids are checked
  here: an id outside the slots or repeated is ignored and counted)."""
  ok = (seq >= 0) & (seq < spec.max_seqs)
  same = (seq[:, None] == seq[None, :]) & ~jnp.eye(seq.shape[0], dtype=bool)
  return ok & ~jnp.any(same, axis=1)


def slot_stack(pool: PagedCache) -> KVCache:
  """Every slot as one layer of a `KVCache` stack (no store): the `KVCache`
  transforms with `layer=slot` then update a slot's hot tiers in place."""
  zeros = jnp.zeros_like(pool.length)
  return KVCache(sink_k=pool.sink_k, sink_v=pool.sink_v, tail_k=pool.tail_k,
                 tail_v=pool.tail_v, store_k=None, store_v=None,
                 store_order=pool.store_order, length=pool.length, evicted=zeros,
                 tail_count=pool.tail_count, rejected=zeros, bad_layer_tokens=zeros,
                 spec=slot_spec(pool.spec))


def slot_view(pool: PagedCache, slot, store=None) -> KVCache:
  """Slot `slot` (int32 scalar) as a `KVCache` with the pool's hot tiers and
  counters; its store is `store` (None: not read)."""
  take = lambda tree: jax.tree.map(lambda a: a[slot], tree)
  zero = jnp.zeros((), jnp.int32)
  return KVCache(sink_k=take(pool.sink_k), sink_v=take(pool.sink_v),
                 tail_k=take(pool.tail_k), tail_v=take(pool.tail_v),
                 store_k=store and store[0], store_v=store and store[1],
                 store_order=pool.store_order[slot], length=pool.length[slot],
                 evicted=zero, tail_count=pool.tail_count[slot], rejected=zero,
                 bad_layer_tokens=zero, spec=slot_spec(pool.spec))


def _set_slots(pool: PagedCache, index, views: KVCache) -> PagedCache:
  """Writes batched slot views back at slots `index: [B]` (`max_seqs`: dropped)."""
  put = lambda dst, src: jax.tree.map(lambda a, b: a.at[index].set(b, mode="drop"), dst, src)
  return dataclasses.replace(
      pool, sink_k=put(pool.sink_k, views.sink_k), sink_v=put(pool.sink_v, views.sink_v),
      tail_k=put(pool.tail_k, views.tail_k), tail_v=put(pool.tail_v, views.tail_v),
      store_order=put(pool.store_order, views.store_order),
      length=put(pool.length, views.length), tail_count=put(pool.tail_count, views.tail_count))


def _pages_for(nonsink, page_size: int):
  """Pages that hold non-sink indices `[0, nonsink)`."""
  return -(-nonsink // page_size)


def append(pool: PagedCache, seq, k, v, n_valid=None) -> PagedCache:
  """Ragged append: sequence `seq[b]` appends its first `n_valid[b]` tokens.

  Args:
    pool: a `PagedCache`.
    seq: int32 `[B]`, distinct slot ids.
    k, v: `[B, n, H, D]`, any float dtype, `n >= 1` (static).
    n_valid: optional int `[B]` (may be traced, may be 0; clipped to
      `[0, n]`), default `n` for every sequence.

  Returns:
    The new pool. Positions continue each sequence's own count. All or
    nothing per sequence: a sequence whose tokens do not fit (free pages, or
    its page table) appends none of them and its refusal is recorded
    (`stats()["refused_tokens"]`, `check` raises); nothing else changes.

  Raises:
    ValueError: at trace time, for arguments of the wrong shape or dtype, or
      concrete slot ids that are out of range or repeated.
  """
  require_pool(pool, "append")
  spec = pool.spec
  seq = check_slots("seq", seq, spec)
  b = seq.shape[0]
  want = f"[B={b}, n, {spec.num_kv_heads}, {spec.head_dim}]"
  for name, x in (("k", k), ("v", v)):
    shape = getattr(x, "shape", None)
    if (shape is None or len(shape) != 4 or shape[0] != b or shape[1] < 1
        or tuple(shape[2:]) != (spec.num_kv_heads, spec.head_dim)):
      raise ValueError(f"{name}: expected shape {want} with n >= 1, got {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name}: expected a float dtype, got {x.dtype}")
  if k.shape != v.shape:
    raise ValueError(f"v: expected the same shape as k {k.shape}, got {v.shape}")
  if n_valid is not None:
    if isinstance(n_valid, (list, tuple)):
      n_valid = np.asarray(n_valid)
    if jnp.shape(n_valid) != (b,) or not jnp.issubdtype(jnp.result_type(n_valid),
                                                        jnp.integer):
      raise ValueError(f"n_valid: expected int32 [{b}], got {_checks.describe(n_valid)}")
  return _append(pool, seq, k, v, n_valid)


@jax.jit
def _append(pool: PagedCache, seq, k, v, n_valid) -> PagedCache:
  spec = pool.spec
  size, n = spec.page_size, k.shape[1]
  ok_slot = valid_slots(seq, spec)
  slot = jnp.where(ok_slot, seq, 0)
  n_valid = (jnp.full(seq.shape, n, jnp.int32) if n_valid is None
             else jnp.clip(jnp.asarray(n_valid, jnp.int32), 0, n))
  n_valid = jnp.where(ok_slot, n_valid, 0)
  length = pool.length[slot]
  end = jnp.maximum(length - spec.sinks, 0)
  new_end = jnp.maximum(length + n_valid - spec.sinks, 0)
  have = _pages_for(end, size)
  need = _pages_for(new_end, size) - have
  fits_table = new_end <= spec.max_tokens

  # First come, first served, one sequence at a time: whether each fits in
  # what the ones before it left, and where its pages start on the stack.
  def admit(free, x):
    fits, need = x
    ok = fits & (need <= free)
    return free - jnp.where(ok, need, 0), (ok, pool.free_count - free)

  free_left, (ok, taken_before) = jax.lax.scan(admit, pool.free_count, (fits_table, need))
  refused = jnp.where(ok, 0, n_valid)
  accepted = n_valid - refused

  # New pages: sequence b takes stack entries free_count - 1 - taken_before[b] - t.
  new_pages = -(-n // size)
  t = jnp.arange(new_pages, dtype=jnp.int32)
  taking = ok[:, None] & (t[None, :] < need[:, None])
  stack_pos = pool.free_count - 1 - taken_before[:, None] - t[None, :]
  pages = jnp.where(taking, pool.free_pages[jnp.clip(stack_pos, 0, spec.num_pages - 1)],
                    spec.num_pages)
  rows = jnp.where(ok_slot, seq, spec.max_seqs)
  column = jnp.where(taking, have[:, None] + t, spec.max_pages_per_seq)
  table = pool.page_table.at[rows[:, None], column].set(pages, mode="drop")
  ref_count = pool.ref_count.at[pages].set(1, mode="drop")

  # One sequence at a time, each writing only its own rows in place: the
  # KVCache append on its hot tiers and counters (the slots are the layers
  # of a stack), and its encoded rows into its pages (non-sink token j is
  # row j % P of page j // P).
  def one(b, carry):
    stack, pages_k, pages_v = carry
    stack, store_rows, j = _transforms.append_rows(stack, k[b], v[b], accepted[b], slot[b])
    page = jnp.where(j < spec.max_tokens,
                     table[slot[b], jnp.clip(j // size, 0, spec.max_pages_per_seq - 1)],
                     spec.num_pages)
    write = lambda dst, src: dst.at[page, :, jnp.mod(j, size)].set(jnp.swapaxes(src, 0, 1),
                                                                   mode="drop")
    return (stack, jax.tree.map(write, pages_k, store_rows[0]),
            jax.tree.map(write, pages_v, store_rows[1]))

  stack, pages_k, pages_v = jax.lax.fori_loop(
      0, seq.shape[0], one, (slot_stack(pool), pool.pages_k, pool.pages_v))
  return dataclasses.replace(
      pool, sink_k=stack.sink_k, sink_v=stack.sink_v, tail_k=stack.tail_k,
      tail_v=stack.tail_v, store_order=stack.store_order, length=stack.length,
      tail_count=stack.tail_count, pages_k=pages_k, pages_v=pages_v, page_table=table,
      ref_count=ref_count, free_count=free_left,
      refused=pool.refused.at[rows].add(refused, mode="drop"),
      bad_slots=pool.bad_slots + jnp.sum(~ok_slot).astype(jnp.int32))


def free(pool: PagedCache, seq) -> PagedCache:
  """Empties slots `seq` (int32 `[B]`): their pages go back to the pool (a
  page shared with another sequence stays until its last owner frees it)
  and their counters, refusal records included, restart at 0. Nothing of a
  freed sequence is read again (its rows stay until overwritten)."""
  require_pool(pool, "free")
  return _free(pool, check_slots("seq", seq, pool.spec))


@jax.jit
def _free(pool: PagedCache, seq) -> PagedCache:
  spec = pool.spec
  ok_slot = valid_slots(seq, spec)
  rows = jnp.where(ok_slot, seq, spec.max_seqs)
  owned = jnp.where(ok_slot[:, None], pool.page_table[jnp.where(ok_slot, seq, 0)],
                    spec.num_pages).reshape(-1)
  ref_count = pool.ref_count.at[owned].add(-1, mode="drop")
  # A page owned twice among `seq` is pushed once: keep its first entry.
  ordered = jnp.sort(owned)
  first = jnp.concatenate([jnp.ones((1,), bool), ordered[1:] != ordered[:-1]])
  released = first & (ordered < spec.num_pages) & (
      ref_count[jnp.clip(ordered, 0, spec.num_pages - 1)] == 0)
  at = pool.free_count + jnp.cumsum(released) - 1
  free_pages = pool.free_pages.at[jnp.where(released, at, spec.num_pages)].set(
      ordered, mode="drop")
  zero = jnp.zeros(seq.shape, jnp.int32)
  put = lambda a, x: a.at[rows].set(x, mode="drop")
  return dataclasses.replace(
      pool, ref_count=ref_count, free_pages=free_pages,
      free_count=pool.free_count + jnp.sum(released).astype(jnp.int32),
      page_table=pool.page_table.at[rows].set(spec.num_pages, mode="drop"),
      length=put(pool.length, zero), tail_count=put(pool.tail_count, zero),
      refused=put(pool.refused, zero),
      generation=pool.generation.at[rows].add(1, mode="drop"),
      bad_slots=pool.bad_slots + jnp.sum(~ok_slot).astype(jnp.int32))


def fork(pool: PagedCache, src, dst) -> PagedCache:
  """Slot `dst` (empty) becomes a copy of slot `src`: the same tokens,
  positions, hot tail and sinks, sharing `src`'s full pages by reference
  count; the page still being filled is copied, so appending to either never
  changes the other. A fork the pool cannot serve (no free page for that
  copy), or into a slot that is not empty, is refused and recorded on `dst`
  (`refused_tokens`: the tokens it did not receive)."""
  require_pool(pool, "fork")
  src = check_slots("src", src, pool.spec, scalar=True)
  dst = check_slots("dst", dst, pool.spec, scalar=True)
  if not isinstance(src, jax.core.Tracer) and not isinstance(dst, jax.core.Tracer) \
      and int(src) == int(dst):
    raise ValueError(f"dst: expected a slot other than src, got {int(dst)} for both")
  return _fork(pool, src, dst)


@jax.jit
def _fork(pool: PagedCache, src, dst) -> PagedCache:
  spec = pool.spec
  size, n = spec.page_size, spec.num_pages
  in_range = lambda s: (s >= 0) & (s < spec.max_seqs)
  ids_ok = in_range(src) & in_range(dst) & (src != dst)
  s, d = jnp.where(ids_ok, src, 0), jnp.where(ids_ok, dst, 0)
  end = jnp.maximum(pool.length[s] - spec.sinks, 0)
  full = end // size
  partial = (end % size) > 0
  dst_empty = (pool.length[d] == 0) & jnp.all(pool.page_table[d] == n)
  ok = ids_ok & dst_empty & (jnp.where(partial, 1, 0) <= pool.free_count)
  copying = ok & partial
  new_page = jnp.where(copying, pool.free_pages[jnp.clip(pool.free_count - 1, 0, n - 1)], n)
  col = jnp.arange(spec.max_pages_per_seq, dtype=jnp.int32)
  src_row = pool.page_table[s]
  shared = jnp.where(ok & (col < full), src_row, n)
  row = jnp.where(col < full, src_row, jnp.where(copying & (col == full), new_page, n))
  table = pool.page_table.at[jnp.where(ok, d, spec.max_seqs)].set(row, mode="drop")
  ref_count = pool.ref_count.at[shared].add(1, mode="drop").at[new_page].set(1, mode="drop")
  partial_page = src_row[jnp.clip(full, 0, spec.max_pages_per_seq - 1)]
  copy = lambda a: a.at[new_page].set(a[jnp.clip(partial_page, 0, n - 1)], mode="drop")
  target = jnp.where(ok, d, spec.max_seqs)[None]
  out = _set_slots(pool, target, jax.tree.map(lambda a: a[None], slot_view(pool, s)))
  refusal = jnp.where(ids_ok & ~ok, pool.length[s], 0)
  return dataclasses.replace(
      out, page_table=table, ref_count=ref_count,
      pages_k=jax.tree.map(copy, pool.pages_k), pages_v=jax.tree.map(copy, pool.pages_v),
      free_count=pool.free_count - copying.astype(jnp.int32),
      refused=out.refused.at[jnp.where(ids_ok, d, spec.max_seqs)].add(refusal, mode="drop"),
      bad_slots=pool.bad_slots + (~ids_ok).astype(jnp.int32))


def acknowledge(pool: PagedCache, seq) -> PagedCache:
  """The pool with the refusal records of slots `seq` (int32 `[B]`) reset
  to 0, after handling them (`check` raised): nothing else changes."""
  require_pool(pool, "acknowledge")
  return _acknowledge(pool, check_slots("seq", seq, pool.spec))


@jax.jit
def _acknowledge(pool: PagedCache, seq) -> PagedCache:
  rows = jnp.where(valid_slots(seq, pool.spec), seq, pool.spec.max_seqs)
  return dataclasses.replace(pool, refused=pool.refused.at[rows].set(0, mode="drop"))
