"""kvjax's C++ kernels on CPU: loading the extension and calling its targets.

`_kvjax_ffi` is the nanobind module built by CMake (`kvjax/ffi/CMakeLists.txt`)
when kvjax is installed. Loading registers its XLA FFI handlers with
`jax.ffi` for the CPU platform; `status()` says what loaded, which
instruction-set variant runs and, when nothing does, why.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.ffi._per_shard import Axes
from kvjax.ffi._per_shard import per_shard


@dataclasses.dataclass(frozen=True)
class Status:
  loaded: bool  # the extension imported and its targets are registered
  isa: str | None  # the variant the handlers run
  reason: str | None  # why the kernels cannot run, when they cannot
  compiled_isas: tuple[str, ...] = ()
  supported_isas: tuple[str, ...] = ()
  requested_isa: str = "auto"  # $KVJAX_ISA when the extension loaded


_LOCK = threading.Lock()
_STATUS: list[Status] = []  # filled once


def status() -> Status:
  """Loads the extension once (thread-safe) and registers its handlers."""
  with _LOCK:
    if not _STATUS:
      _STATUS.append(_load())
    return _STATUS[0]


def _require_loaded() -> None:
  if not status().loaded:
    raise RuntimeError(f"kvjax's C++ kernels cannot run: {status().reason}")


def _load() -> Status:
  try:
    from kvjax.ffi import _kvjax_ffi  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return Status(False, None,
                  "kvjax's C++ extension is not installed (it is built by "
                  "`pip install` when a C++ compiler is present): "
                  f"{type(e).__name__}: {e}")
  compiled = tuple(_kvjax_ffi.compiled_isas())
  supported = tuple(_kvjax_ffi.supported_isas())
  # The extension reads $KVJAX_ISA once, on this first selection.
  requested = os.environ.get("KVJAX_ISA", "auto") or "auto"
  try:
    isa = _kvjax_ffi.selected_isa()
  except RuntimeError as e:
    return Status(False, None, str(e), compiled, supported, requested)
  for name, capsule in _kvjax_ffi.handlers().items():
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
  return Status(True, isa, None, compiled, supported, requested)


def affine_encode(x: jax.Array, bits: int):
  """q8 / q4 encode of float32 `x: [..., D]` by the C++ kernels."""
  _require_loaded()

  def call(x):
    lead, d = x.shape[:-1], x.shape[-1]
    out_types = (jax.ShapeDtypeStruct((*lead, d * bits // 8), jnp.uint8),
                 jax.ShapeDtypeStruct(lead, jnp.float32),
                 jax.ShapeDtypeStruct(lead, jnp.float32))
    return jax.ffi.ffi_call(f"kvjax_q{bits}_encode", out_types,
                            vmap_method="expand_dims")(x)

  every_group = Axes(batch=x.ndim - 1)
  return per_shard(call, (x.astype(jnp.float32),), (every_group,), (every_group,) * 3)


def affine_decode(codes: jax.Array, scale: jax.Array, zero: jax.Array,
                  bits: int) -> jax.Array:
  """The inverse: float32 `[..., D]` from codes, scale and zero."""
  _require_loaded()
  codes, scale, zero = (jnp.asarray(a) for a in (codes, scale, zero))
  # The handler broadcasts size-1 leading axes (vmap's "expand_dims"); give
  # every operand the output's rank.
  rank = len(np.broadcast_shapes(codes.shape[:-1], scale.shape, zero.shape))
  codes, scale, zero = (_with_rank(codes, rank + 1), _with_rank(scale, rank),
                        _with_rank(zero, rank))

  def call(codes, scale, zero):
    lead = np.broadcast_shapes(codes.shape[:-1], scale.shape, zero.shape)
    out_type = jax.ShapeDtypeStruct((*lead, codes.shape[-1] * 8 // bits), jnp.float32)
    return (jax.ffi.ffi_call(f"kvjax_q{bits}_decode", out_type,
                             vmap_method="expand_dims")(codes, scale, zero),)

  every_group = Axes(batch=rank)
  return per_shard(call, (codes.astype(jnp.uint8), scale.astype(jnp.float32),
                          zero.astype(jnp.float32)), (every_group,) * 3, (every_group,))[0]


def _with_rank(a: jax.Array, rank: int) -> jax.Array:
  """`a` with size-1 leading axes up to `rank` (the handlers broadcast them,
  as vmap's "expand_dims" passes unbatched operands)."""
  return a.reshape((1,) * (rank - a.ndim) + a.shape)


def _turbo_attrs(bits, prod, order):
  return dict(bits=np.asarray(bits, np.int32), prod=np.int32(prod),
              has_order=np.int32(order is not None))


def turbo_encode(x: jax.Array, order, tables: np.ndarray, bits, prod: bool,
                 code_bytes: int, norm_count: int):
  """TurboQuant encode of float32 `x: [..., D]` by the C++ kernels.

  `order`: None, or int32 channel orders `[..., D]` broadcastable to `x`
  (split formats); `tables`: `kvjax._turbo.TurboFormat.kernel_tables`;
  `bits`: the instances' mse bits. Returns (codes uint8 `[..., code_bytes]`,
  norms uint16 `[..., norm_count]`).
  """
  _require_loaded()
  order_operand = (jnp.zeros((1,) * x.ndim, jnp.int32) if order is None
                   else _with_rank(jnp.asarray(order, jnp.int32), x.ndim))

  def call(x, order_operand, tables):
    lead = x.shape[:-1]
    out_types = (jax.ShapeDtypeStruct((*lead, code_bytes), jnp.uint8),
                 jax.ShapeDtypeStruct((*lead, norm_count), jnp.uint16))
    return jax.ffi.ffi_call("kvjax_turbo_encode", out_types, vmap_method="expand_dims")(
        x, order_operand, tables, **_turbo_attrs(bits, prod, order))

  every_group = Axes(batch=x.ndim - 1)
  return per_shard(call, (x.astype(jnp.float32), order_operand,
                          jnp.asarray(tables, jnp.float32)),
                   (every_group, every_group, Axes()), (every_group,) * 2)


def turbo_decode(codes: jax.Array, norms: jax.Array, order, tables: np.ndarray,
                 bits, prod: bool, head_dim: int) -> jax.Array:
  """The inverse: float32 `[..., head_dim]`, channel c of an ordered vector
  back at `order[c]`."""
  _require_loaded()
  codes, norms = jnp.asarray(codes, jnp.uint8), jnp.asarray(norms, jnp.uint16)
  rank = len(np.broadcast_shapes(codes.shape[:-1], norms.shape[:-1])) + 1
  order_operand = (jnp.zeros((1,) * rank, jnp.int32) if order is None
                   else _with_rank(jnp.asarray(order, jnp.int32), rank))

  def call(codes, norms, order_operand, tables):
    lead = np.broadcast_shapes(codes.shape[:-1], norms.shape[:-1], order_operand.shape[:-1])
    out_type = jax.ShapeDtypeStruct((*lead, head_dim), jnp.float32)
    return (jax.ffi.ffi_call("kvjax_turbo_decode", out_type, vmap_method="expand_dims")(
        codes, norms, order_operand, tables, **_turbo_attrs(bits, prod, order)),)

  every_group = Axes(batch=rank - 1)
  return per_shard(call, (_with_rank(codes, rank), _with_rank(norms, rank), order_operand,
                          jnp.asarray(tables, jnp.float32)),
                   (every_group,) * 3 + (Axes(),), (every_group,))[0]


def turbo_order(token: jax.Array, choose: jax.Array, previous: jax.Array) -> jax.Array:
  """A split format's channel orders `[..., D]`: chosen from `token` (by
  decreasing magnitude, NaN first, ties by channel) where `choose` (bool
  `[...]`) is set, `previous` kept elsewhere."""
  _require_loaded()
  rank = len(np.broadcast_shapes(token.shape, previous.shape))

  def call(token, choose, previous):
    shape = np.broadcast_shapes(token.shape, previous.shape, (*choose.shape, 1))
    return (jax.ffi.ffi_call("kvjax_turbo_order", jax.ShapeDtypeStruct(shape, jnp.int32),
                             vmap_method="expand_dims")(token, choose, previous),)

  every_vector = Axes(batch=rank - 1)
  return per_shard(call, (_with_rank(token.astype(jnp.float32), rank),
                          _with_rank(jnp.asarray(choose).astype(jnp.int32), rank - 1),
                          _with_rank(previous.astype(jnp.int32), rank)),
                   (every_vector,) * 3, (every_vector,))[0]


class StoreLayout(NamedTuple):
  """How the attention kernel reads a tier's format (attention_kernels.h).

  kind: ValueKind (0 f32, 1 bf16 bits, 2 f16 bits, 3 q8, 4 packed codes
    looked up in per-token tables); segments: int32 `[n, 7]` rows of (bits,
    channels, code_offset, lane_offset, table_offset, norm_index,
    kappa_index); kappa_scales: float32 `[n]`; tables: float32 codebooks;
    norm_count: bfloat16 norms per token (TurboQuant).
  """
  kind: int
  segments: np.ndarray
  kappa_scales: np.ndarray
  tables: np.ndarray
  norm_count: int = 0


def attend(q_hot, q_store, row_pos, counters, layer, window, softcap,
           hot_leaves, store_k, store_v, hot: StoreLayout, key: StoreLayout,
           value: StoreLayout, value_lanes: int, page_table=None):
  """One decode-attention kernel call (the `kvjax_attend` target).

  Args:
    q_hot: float32 `[H, R, D]`, scaled queries; `q_store`: `[H, R, A_k]`, the
      same in the store key format's domain (`prepare_query`).
    row_pos: int32 `[R]` positions of the rows.
    counters: (length, evicted, tail_count), each int32 `[L]` for a stack of
      L layer caches (`layer` selects one), or scalars for one cache.
    layer: int32 scalar, or None for one cache; window (int32) and softcap
      (float32): scalars or None.
    hot_leaves: (sink_k, sink_v, tail_k, tail_v), `[L, H, slots, D]` (no L
      for one cache).
    store_k, store_v: (data or codes, scale or norms, zero) of the store,
      `[L, H, slots, ...]`, unused ones None.
    hot, key, value: how the kernel reads the hot tiers, the store's keys and
      its values; value_lanes: A_v, the value format's accumulator width.
    page_table: for a paged pool, its int32 `[S, max_pages]` page tables:
      then `store_k`, `store_v` are its pages `[N, H, page_size, ...]`, the
      counters and hot leaves its slots' (`[S, ...]`, as a stack of S
      layers), `layer` is int32 `[B]` (the slot of each batch entry), and the
      queries and outputs have a leading batch axis `B`.

  Returns:
    (out_hot `[H, R, D]`, out_store `[H, R, A_v]`): the softmax-weighted sums
    of the hot tiers and of the store (in the value format's domain), each
    already divided by the common denominator; NaN rows and zero rows as
    docs/api.md says.
  """
  _require_loaded()
  *batch, h, r, d = q_hot.shape
  if page_table is not None and (len(batch) != 1 or jnp.shape(layer) != tuple(batch)):
    raise ValueError("a paged attend takes one batch axis and a slot per entry")
  batch = tuple(batch)
  dummy = jnp.zeros((1,), jnp.float32)
  fill = lambda leaves: tuple(dummy if x is None else x for x in leaves)
  scalar = lambda x: jnp.reshape(x, (1,) * len(batch))  # broadcast over the batch
  # One table buffer: the value segments' offsets move past the key tables.
  value_segments = np.array(value.segments, np.int32).reshape(-1, 7)
  value_segments[:, 4] += len(key.tables)
  tables = np.concatenate([np.asarray(key.tables, np.float32),
                           np.asarray(value.tables, np.float32)])
  side = lambda prefix, layout, segments: {
      f"{prefix}_kind": np.int32(layout.kind),
      f"{prefix}_norm_count": np.int32(layout.norm_count),
      f"{prefix}_segments": np.asarray(segments, np.int32).reshape(-1),
      f"{prefix}_kappa_scales": np.asarray(layout.kappa_scales, np.float32).reshape(-1)}
  attributes = dict(
      hot_kind=np.int32(hot.kind),
      **side("key", key, key.segments), **side("value", value, value_segments),
      has_window=np.int32(window is not None),
      has_softcap=np.int32(softcap is not None),
      has_layers=np.int32(layer is not None),
      page_size=np.int32(0 if page_table is None else jax.tree.leaves(store_k)[0].shape[2]))

  def call(q_hot, *operands):
    *lead, h, r, d = q_hot.shape
    out_types = (jax.ShapeDtypeStruct((*lead, h, r, d), jnp.float32),
                 jax.ShapeDtypeStruct((*lead, h, r, value_lanes), jnp.float32))
    return jax.ffi.ffi_call("kvjax_attend", out_types, vmap_method="expand_dims")(
        q_hot, *operands, **attributes)

  store = (*fill(store_k), *fill(store_v))
  operands = (
      q_hot, q_store, row_pos, *counters,
      (layer if page_table is not None
       else scalar(jnp.asarray(0 if layer is None else layer, jnp.int32))),
      scalar(jnp.asarray(0 if window is None else window, jnp.int32)),
      scalar(jnp.asarray(0.0 if softcap is None else softcap, jnp.float32)),
      *hot_leaves, *store,
      jnp.asarray(tables if len(tables) else np.zeros(1, np.float32)),
      jnp.zeros((1,), jnp.int32) if page_table is None else page_table)
  # Independent per batch entry and per KV head: the queries' and outputs'
  # head axis follows the batch, the tiers' follows a stack's layer axis
  # (a pool's slot or page axis).
  nb = len(batch)
  rows, tier_head = Axes(nb, head=nb), 1 if (layer is not None or page_table is not None) else 0
  tier = lambda x: Axes(head=tier_head if x.ndim > 1 else None)
  in_axes = (rows, rows, Axes(nb), *(Axes() for _ in counters), Axes(nb), Axes(nb), Axes(nb),
             *(tier(x) for x in (*hot_leaves, *store)), Axes(), Axes())
  return per_shard(call, operands, in_axes, (rows, rows))
