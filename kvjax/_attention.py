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

import numpy as np

from kvjax import _backend
from kvjax import _checks
from kvjax import _layers
from kvjax import _state
from kvjax import ffi
from kvjax._state import KVCache

DEFAULT_BLOCK_SIZE = 1024


class _Softmax(NamedTuple):
  """Running state of the online softmax, per query row `m` of `[H, M]`.

  Hot tiers accumulate values in the channel domain (`acc`), the store in
  its format's domain (`store_acc`, rotated for TurboQuant), so a rotation is
  undone once at the end, never per token. `seen` marks rows that have seen a
  key (the rest return zeros); `nan` rows that have seen a NaN or +Inf logit,
  which makes every softmax weight NaN (the rest of the row is not needed).
  """
  max: jax.Array  # [H, M]
  denom: jax.Array  # [H, M]
  acc: jax.Array  # [H, M, D]
  store_acc: jax.Array  # [H, M, A]
  seen: jax.Array  # [H, M] bool
  nan: jax.Array  # [H, M] bool


class _Query(NamedTuple):
  q: jax.Array  # [H, M, D] float32, already scaled
  pos: jax.Array  # [M] int32 absolute positions
  window: jax.Array | None
  softcap: jax.Array | None


def visible_keys(query: _Query, key_pos, key_ok):
  """`[M, B]`: which keys each query row sees (causal, window)."""
  visible = key_ok[None, :] & (key_pos[None, :] <= query.pos[:, None])
  if query.window is not None:
    # p - w < pos, without int32 overflow for huge windows.
    lowest = jnp.iinfo(jnp.int32).min
    start = jnp.where(query.pos < lowest + query.window, lowest,
                      query.pos - query.window)
    visible &= key_pos[None, :] > start[:, None]
  return visible


def empty_softmax(h: int, rows: int, d: int, store_lanes: int) -> _Softmax:
  """The state before any key."""
  return _Softmax(jnp.full((h, rows), -jnp.inf, jnp.float32),
                  jnp.zeros((h, rows), jnp.float32), jnp.zeros((h, rows, d), jnp.float32),
                  jnp.zeros((h, rows, store_lanes), jnp.float32),
                  jnp.zeros((h, rows), bool), jnp.zeros((h, rows), bool))


# Below this gap exp(gap) is 0 in float64 too.
_FLOAT64_EXP_FLOOR = -745.13


def softmax_weight(gap):
  """A softmax weight `exp(gap)` (gap = logit - max, or a correction old max
  - new max). Where float32's exp underflows but float64's does not (-745 <
  gap < -87) it is float32's smallest normal instead of 0: an Inf value times
  it stays Inf, as in the float64 reference (0 * Inf would be NaN), and a
  finite value v adds at most 1.2e-38 |v|. The kernel's `SoftmaxWeight`."""
  p = jnp.exp(gap)
  tiny = jnp.finfo(jnp.float32).tiny
  return jnp.where(gap > _FLOAT64_EXP_FLOOR, jnp.maximum(p, tiny), p)


def merge_softmax(a: _Softmax, b: _Softmax, into=None) -> _Softmax:
  """The state of the keys of `a` and of `b` together (log-sum-exp). With
  `into` (int `[W]`), `a` is a batch `[B, ...]` and `b` a batch `[W, ...]`
  whose entry `w` merges into `a[into[w]]` (several may share one)."""
  if into is None:
    gather = lambda x: x
    add = lambda dst, x: dst + x
    new_max, nan = jnp.maximum(a.max, b.max), a.nan | b.nan
  else:
    gather = lambda x: x[into]
    add = lambda dst, x: dst.at[into].add(x)
    new_max = a.max.at[into].max(b.max)
    nan = a.nan.at[into].max(b.nan)
  # As in `fold_block`: a row without a finite logit shifts by 0, and a NaN
  # row's values no longer matter.
  shift = jnp.where((new_max == -jnp.inf) | nan, 0.0, new_max)
  scale_a = softmax_weight(jnp.where(nan, 0.0, a.max - shift))
  scale_b = softmax_weight(jnp.where(gather(nan), 0.0, b.max - gather(shift)))
  return _Softmax(
      max=new_max, denom=add(a.denom * scale_a, b.denom * scale_b),
      acc=add(a.acc * scale_a[..., None], b.acc * scale_b[..., None]),
      store_acc=add(a.store_acc * scale_a[..., None], b.store_acc * scale_b[..., None]),
      seen=a.seen.at[into].max(b.seen) if into is not None else a.seen | b.seen, nan=nan)


def _nonfinite_part(p, visible, x):
  """What the non-finite values of `x: [H, B, D]` add to `sum_b p x` for the
  visible keys, as the reference's products do (`0 * Inf` is NaN, a +Inf and
  a -Inf cancel to NaN): `[H, M, D]` of 0, NaN or +-Inf. Masked keys add
  nothing."""
  def part():
    vis = jnp.broadcast_to(visible[None], p.shape)
    count = lambda w, ind: _einsum_f32("hmb,hbd->hmd", w, ind)
    nan = count(vis, jnp.isnan(x)) + count(vis & (p == 0), jnp.isinf(x))
    pos = count(vis & (p > 0), x == jnp.inf)
    neg = count(vis & (p > 0), x == -jnp.inf)
    return jnp.where((nan > 0) | ((pos > 0) & (neg > 0)), jnp.nan,
                     jnp.where(pos > 0, jnp.inf, jnp.where(neg > 0, -jnp.inf, 0.0)))
  zeros = lambda: jnp.zeros(p.shape[:2] + x.shape[-1:], jnp.float32)
  # Only blocks that hold a non-finite value pay for it (under vmap both run).
  return jax.lax.cond(jnp.all(jnp.isfinite(x)), zeros, part)


def _einsum_f32(spec, a, b):
  return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32),
                    preferred_element_type=jnp.float32)


def _weighted_values(fmt, p, visible, values):
  """`sum_b p[m, b] v[b]` over the visible keys only, and the rows where a
  visible key's values are all NaN (per-token formats): (`[H, M, A]`,
  `[H, M]` bool). A masked key never contributes, whatever its values:
  the kernel selects, it never multiplies by zero."""
  if fmt.token_finite is None:  # per-channel values (raw formats)
    x = fmt.decode(values)
    clean = jnp.where(jnp.isfinite(x), x, 0.0)
    acc = jnp.einsum("hmb,hbd->hmd", p, clean, precision=jax.lax.Precision.HIGHEST,
                     preferred_element_type=jnp.float32)
    return acc + _nonfinite_part(p, visible, x), jnp.zeros(p.shape[:2], bool)
  ok = fmt.token_finite(values)  # [H, B]
  nan = jnp.any(visible[None] & ~ok[:, None, :], axis=-1)
  return fmt.weighted_sum(p, fmt.without_tokens(values, ok)), nan


def fold_block(state: _Softmax, query: _Query, formats, prepared_q, keys, values,
            key_pos, key_ok, *, store: bool):
  """Folds one block (`keys`, `values` encoded as `formats`, a (keys,
  values) pair, leaves `[H, B, ...]`; `key_pos`, `key_ok`: `[B]`;
  `prepared_q` from the key format's `prepare_query`) into `state`,
  accumulating into `store_acc` if `store` else `acc`."""
  key_format, value_format = formats
  s = key_format.scores(prepared_q, keys)  # [H, M, B]
  if query.softcap is not None:
    s = query.softcap * jnp.tanh(s / query.softcap)
  visible = visible_keys(query, key_pos, key_ok)
  s = jnp.where(visible[None], s, -jnp.inf)
  nan = state.nan | jnp.any(jnp.isnan(s) | (s == jnp.inf), axis=-1)
  new_max = jnp.maximum(state.max, jnp.max(s, axis=-1))
  # A row that has seen no finite logit keeps max = -inf; shift it by 0
  # instead (and a NaN row's values no longer matter).
  shift = jnp.where((new_max == -jnp.inf) | nan, 0.0, new_max)
  p = softmax_weight(s - shift[..., None])
  correction = softmax_weight(jnp.where(nan, 0.0, state.max - shift))[..., None]
  acc, store_acc = state.acc * correction, state.store_acc * correction
  weighted, bad_values = _weighted_values(value_format, p, visible, values)
  if store:
    store_acc = store_acc + weighted
  else:
    acc = acc + weighted
  return _Softmax(max=new_max,
                  denom=state.denom * correction[..., 0] + jnp.sum(p, axis=-1),
                  acc=acc, store_acc=store_acc,
                  seen=state.seen | jnp.any(visible, axis=-1)[None],
                  nan=nan | bad_values)


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
                       f"{_checks.describe(q_pos)}")


def _options(scale, window, softcap, block_size):
  """Validated `scale`, `window`, `softcap` (traced or concrete scalars)."""
  if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
    raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
  if scale is not None:
    scale = _checks.float_scalar("scale", scale)
  if window is not None:
    # A traced window <= 0 sees no key (nothing can be raised under jit).
    window = _checks.positive_int_scalar("window", window)
  if softcap is not None:
    concrete = not isinstance(softcap, jax.core.Tracer)
    value = softcap
    softcap = _checks.float_scalar("softcap", softcap)
    if concrete and not float(value) > 0:
      raise ValueError(f"softcap: expected a number > 0, got {float(value)!r}")
  return scale, window, softcap


def attend(cache: KVCache, q, *, q_pos=None, scale=None, window=None,
           softcap=None, layer=None, block_size: int = DEFAULT_BLOCK_SIZE,
           implementation=None):
  """Softmax attention of queries over the retained tokens.

  Args:
    cache: a `KVCache` (one sequence; `jax.vmap` for a batch); with `layer`,
      a stack of per-layer caches or a `ModelCache`.
    q: `[n_q, Hq, D]` queries; query head `h` reads kv head `h // (Hq // H)`.
    q_pos: int `[n_q]` absolute positions (an array or a list); default the
      last `n_q` appended.
    scale: logit scale, default `1/sqrt(D)`. Python number or traced scalar.
    window: if set, a query at `p` sees keys with `p - window < pos <= p`.
      An int >= 1 (a traced value <= 0 sees no key).
    softcap: if set (> 0), logits become `softcap * tanh(logits / softcap)`.
    layer: optional int scalar (may be traced): attend over this layer of a
      stack of caches (see `append`), reading its blocks in place. A traced
      index outside the stack gives NaN.
    block_size: store tokens read per step by the jnp path (bounds its
      temporary memory).
    implementation: None (pick per call: the C++ kernel on CPU when it is
      loaded and `n_q` fits it, else the jnp path), "ffi" (the kernel; an
      error if it cannot run) or "xla" (the jnp path). See docs/attention.md.

  Returns:
    `[n_q, Hq, D]` in `q.dtype`, accumulated in float32. A query that sees no
    key gets zeros; one that sees a non-finite key or value gets non-finite
    values where the reference (softmax over `materialize`) has them, and a
    masked, evicted, cleared or padding token never contributes.

  Raises:
    ValueError: at trace time, for a `q`, `q_pos`, `scale`, `window`,
      `softcap` or `layer` of the wrong kind.
  """
  if isinstance(cache, _layers.ModelCache):
    return _layers.read_layer(cache, layer, "attend", lambda stack, i: attend(
        stack, q, q_pos=q_pos, scale=scale, window=window, softcap=softcap, layer=i,
        block_size=block_size, implementation=implementation))
  if q_pos is not None and not isinstance(q_pos, (jax.Array, jax.core.Tracer)):
    q_pos = np.asarray(q_pos)
  _check_query(cache, q, q_pos, layer)
  scale, window, softcap = _options(scale, window, softcap, block_size)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}")
  return _attend(cache, q, q_pos, scale, window, softcap, layer,
                 block_size=block_size, implementation=implementation)


IMPLEMENTATIONS = (None, "ffi", "xla")


@functools.partial(jax.jit, static_argnames=("block_size", "implementation"))
def _attend(cache, q, q_pos, scale, window, softcap, layer, *, block_size,
            implementation):
  stack, cache = cache, _state.layer_view(cache, layer)
  spec = cache.spec
  query = query_rows(spec, cache.length, q, q_pos, scale, window, softcap)
  order = _state.small_leaf(stack.store_order, layer) if _state.store_split(spec) else None
  args = (stack, cache, layer, query, order, block_size)
  mode = _resolve_implementation(implementation, q.shape[0])
  if mode == "xla":
    out = attend_xla(*args)
  elif mode == "ffi":
    out = _attend_kernel(*args)
  else:  # the kernel in computations lowered for CPU, the jnp path elsewhere
    out = jax.lax.platform_dependent(cpu=lambda: _attend_kernel(*args),
                                     default=lambda: attend_xla(*args))
  out = jnp.where(~_state.layer_in_range(stack, layer), jnp.nan, out)
  return output_rows(out, q)


def query_rows(spec, length, q, q_pos, scale, window, softcap) -> _Query:
  """The softmax rows of `q: [n_q, Hq, D]` (`q_pos` default: the last `n_q`
  of `length` positions): `[H, G * n_q, D]`, row `m` is query `m % n_q` of
  group member `m // n_q`."""
  n_q, hq, d = q.shape
  h = spec.num_kv_heads
  group = hq // h
  if q_pos is None:
    q_pos = length - n_q + jnp.arange(n_q, dtype=jnp.int32)
  if scale is None:
    scale = 1.0 / math.sqrt(d)
  qh = jnp.transpose(q.astype(jnp.float32).reshape(n_q, h, group, d),
                     (1, 2, 0, 3)).reshape(h, group * n_q, d)
  return _Query(q=qh * jnp.asarray(scale, jnp.float32),
                pos=jnp.tile(jnp.asarray(q_pos, jnp.int32), group),
                window=window, softcap=softcap)


def output_rows(out, q):
  """`[H, G * n_q, D]` rows back to `q`'s `[n_q, Hq, D]` and dtype."""
  n_q, hq, d = q.shape
  h = out.shape[0]
  out = jnp.transpose(out.reshape(h, hq // h, n_q, d), (2, 0, 1, 3))
  return out.reshape(n_q, hq, d).astype(q.dtype)


# The kernel attends up to this many queries per call (each row of the
# softmax is a query of one query head: R = n_q * Hq / H); more run the jnp
# path. Prefill chunks of 128 and 512 queries run faster in the kernel than
# in the jnp path (benchmarks/bench_attend.py).
MAX_KERNEL_QUERIES = 1024


def _resolve_implementation(implementation, n_q: int) -> str:
  """"xla", "ffi", or "auto" (the kernel on CPU, the jnp path elsewhere)."""
  if implementation == "xla":
    return "xla"
  backend = _backend.default_backend()
  if implementation == "ffi":
    if n_q > MAX_KERNEL_QUERIES:
      raise ValueError(f"implementation='ffi': the kernel attends at most "
                       f"{MAX_KERNEL_QUERIES} queries per call, got n_q={n_q}; use "
                       "implementation=None (the jnp path runs then) or 'xla'")
    _backend.resolve("ffi")
    return "ffi"
  if backend == "jax" or n_q > MAX_KERNEL_QUERIES:
    return "xla"
  if backend == "ffi":
    return _backend.resolve("ffi")  # raises if the kernels cannot run
  # "auto" when the kernels loaded, "jax" (here: "xla") when they are absent.
  return "auto" if _backend.resolve("auto") == "auto" else "xla"


def _attend_kernel(stack, cache, layer, query, order, block_size):
  """The C++ kernel: `[H, M, D]` attention output of the scaled query rows."""
  del cache, block_size
  spec = stack.spec
  d = spec.head_dim
  hot, (key, value) = _state.hot_format(spec), _state.store_formats(spec)
  # The kernel reads the leaves as they are (a stack's with its layer axis).
  counters = (stack.length, stack.evicted, stack.tail_count)
  hot_leaves = tuple(x.data for x in (stack.sink_k, stack.sink_v, stack.tail_k, stack.tail_v))
  q_store = key.flat_query(_prepare_query(key, query.q, order))
  out_hot, out_store = ffi.attend(
      query.q, q_store, query.pos, counters, layer,
      query.window, query.softcap, hot_leaves, key.kernel_leaves(stack.store_k),
      value.kernel_leaves(stack.store_v), hot.kernel_layout(d), key.kernel_layout(d),
      value.kernel_layout(d), value.accumulator_dim(d))
  return out_hot + _finish(value, out_store, order)


def _prepare_query(key_format, q, order):
  """`q` in the key format's domain (with the keys' channel order if split)."""
  return key_format.prepare_query(q, order[0] if key_format.split else None)


def _finish(value_format, acc, order):
  """The value format's accumulator back in the channel domain."""
  return value_format.finish(acc, order[1] if value_format.split else None)


def attend_xla(stack, cache, layer, query, order, block_size, fold_store=None):
  """The jnp path: `[H, M, D]` attention output of the scaled query rows.

  `fold_store(state, store_q) -> state` reads the store tier (default: the
  ring of `stack`, `block_size` tokens a step); the paged pool reads pages."""
  spec = cache.spec
  h, rows, d = query.q.shape
  hot, (key, value) = _state.hot_format(spec), _state.store_formats(spec)
  state = empty_softmax(h, rows, d, value.accumulator_dim(d))
  end = _state.nonsink_count(cache)
  if spec.sinks:
    slot = jnp.arange(spec.sinks, dtype=jnp.int32)
    sink_k, sink_v = (jax.tree.map(lambda a: _state.small_leaf(a, layer), x)
                      for x in (stack.sink_k, stack.sink_v))
    state = fold_block(state, query, (hot, hot), query.q, sink_k, sink_v, slot,
                    slot < _state.sink_count(cache), store=False)
  store_q = _prepare_query(key, query.q, order)
  if fold_store is None:
    state = _attend_store(stack, cache, layer, query, store_q, state, block_size)
  else:
    state = fold_store(state, store_q)
  slot = jnp.arange(spec.tail_slots, dtype=jnp.int32)
  j = _state.ring_index(slot, end, spec.tail_slots)
  tail_k, tail_v = (jax.tree.map(lambda a: _state.small_leaf(a, layer), x)
                    for x in (stack.tail_k, stack.tail_v))
  state = fold_block(state, query, (hot, hot), query.q, tail_k, tail_v,
                  spec.sinks + j, j >= end - cache.tail_count, store=False)

  acc = state.acc + _finish(value, state.store_acc, order)
  # A row that saw keys whose logits are all -inf has denom 0: 0/0 is NaN, as
  # in the reference.
  out = jnp.where(state.seen[..., None], acc / state.denom[..., None], 0.0)
  return jnp.where(state.nan[..., None], jnp.nan, out)


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
  formats = _state.store_formats(spec)

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
    return i + 1, fold_block(st, query, formats, store_q, keys, values,
                          spec.sinks + j, ok, store=True)

  _, state = jax.lax.while_loop(lambda c: c[0] < steps, body,
                                (jnp.int32(0), state))
  return state
