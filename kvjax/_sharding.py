"""Shardings for caches: batch (sequence) and KV-head axes over a mesh.

Every cache leaf keeps its KV-head axis right after its leading axes
(`[lead..., H, ...]`, a split format's `store_order` `[lead..., 2, H, D]`), so
one rule places them all: the leading batch axis over `batch_axis`, the head
axis over `head_axis`, everything else (tokens, channels, a stack's layer
axis, a pool's pages) whole on each device. Counters follow the batch.

The transforms need nothing else: the jnp path partitions as XLA sees fit,
and the C++ kernels run per shard (`kvjax/ffi/_per_shard.py`), so a step
moves no cache data between devices.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from kvjax._layers import ModelCache
from kvjax._pool import PagedCache
from kvjax._state import KVCache


def cache_sharding(cache, mesh: Mesh, *, batch_axis=None, head_axis=None):
  """`NamedSharding`s for every leaf of `cache`, shaped like it.

  Args:
    cache: a `KVCache` (one, a batch `init(spec, batch=B)`, or a batch of
      layer stacks `batch=(B, L)`), a `ModelCache`, or a `PagedCache`.
    mesh: a `jax.sharding.Mesh`.
    batch_axis: a mesh axis name (or a tuple of them) for the sequences: a
      batch's leading axis. A `KVCache` with one leading axis is read as a
      batch; a lone stack of layers has none to shard (pass None), and a
      paged pool's pages are shared between its sequences, so it takes none.
    head_axis: a mesh axis name (or tuple) for the KV heads.

  Returns:
    A pytree of `NamedSharding` with `cache`'s structure (for `jax.jit`'s
    `in_shardings` / `out_shardings`, or `jax.device_put`).

  Raises:
    ValueError: not a cache, not a mesh, an axis the mesh lacks, a batch
      axis for a cache without one, or a batch or head count the mesh axis
      does not divide.
  """
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
  explicit = [a for a, t in zip(mesh.axis_names, mesh.axis_types)
              if t == jax.sharding.AxisType.Explicit]
  if explicit:
    # jax.vmap over a batch of caches refuses explicitly sharded axes.
    raise ValueError(f"mesh: axes {tuple(explicit)} are Explicit; kvjax's caches are "
                     "batched with jax.vmap, which needs Auto axes: build the mesh "
                     "with axis_types=(jax.sharding.AxisType.Auto,) * ndim")
  for name, axis in (("batch_axis", batch_axis), ("head_axis", head_axis)):
    for a in _names(axis):
      if a not in mesh.shape:
        raise ValueError(f"{name}: {a!r} is not an axis of the mesh "
                         f"(axes {tuple(mesh.axis_names)})")
  if batch_axis is not None and head_axis is not None and set(_names(batch_axis)) & set(
      _names(head_axis)):
    raise ValueError(f"batch_axis and head_axis share mesh axes: {batch_axis!r}, {head_axis!r}")
  if isinstance(cache, ModelCache):
    lead = cache.runs[0].length.ndim - 1  # each run's leaves: [B?, layers, ...]
    return jax.tree.map(lambda run: _kv_sharding(run, mesh, batch_axis, head_axis, lead),
                        cache, is_leaf=lambda x: isinstance(x, KVCache))
  if isinstance(cache, KVCache):
    return _kv_sharding(cache, mesh, batch_axis, head_axis, min(cache.length.ndim, 1))
  if isinstance(cache, PagedCache):
    if batch_axis is not None:
      raise ValueError("batch_axis: a paged pool's pages are shared between its "
                       "sequences (prefixes, forks), so it shards over KV heads only; "
                       "pass head_axis, or give each device its own pool")
    return _paged_sharding(cache, mesh, head_axis)
  raise ValueError("cache: expected a kvjax.KVCache, ModelCache or PagedCache, got "
                   f"{type(cache).__name__}")


def shard(cache, mesh: Mesh, *, batch_axis=None, head_axis=None):
  """`cache` placed on `mesh` as `cache_sharding` says (on every host of a
  multi-process mesh, each process passing the same cache)."""
  shardings = cache_sharding(cache, mesh, batch_axis=batch_axis, head_axis=head_axis)
  return jax.tree.map(_place, cache, shardings)


def _place(x, sharding: NamedSharding):
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  host = np.asarray(x)  # Each process builds its own shards from the whole.
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _names(axis) -> tuple:
  if axis is None:
    return ()
  names = axis if isinstance(axis, tuple) else (axis,)
  if not names or not all(isinstance(a, str) for a in names):
    raise ValueError(f"expected a mesh axis name or a tuple of them, got {axis!r}")
  return names


def _axis_size(mesh: Mesh, axis) -> int:
  return int(np.prod([mesh.shape[a] for a in _names(axis)]))


def _require_divides(what: str, count: int, mesh: Mesh, axis, arg: str) -> None:
  size = _axis_size(mesh, axis)
  if count % size:
    raise ValueError(f"{arg}: {count} {what} cannot be split evenly over mesh axis "
                     f"{axis!r} of size {size}")


def _kv_sharding(cache: KVCache, mesh: Mesh, batch_axis, head_axis, batch_dims: int):
  """A `KVCache`'s leaves: `[lead..., H, ...]` tiers, `[lead..., 2, H, D]`
  channel orders, `[lead...]` counters; the batch is leading axis 0 when
  `batch_dims` is 1."""
  lead = cache.length.ndim
  if batch_axis is not None:
    if not batch_dims:
      raise ValueError("batch_axis: this cache has no batch axis to shard (one "
                       f"sequence{', a stack of layers' if lead else ''}); build a batch "
                       "with kvjax.init(spec, batch=B) or init_layers(specs, batch=B)")
    _require_divides("sequences", cache.length.shape[0], mesh, batch_axis, "batch_axis")
  if head_axis is not None:
    _require_divides("KV heads", cache.spec.num_kv_heads, mesh, head_axis, "head_axis")
  prefix = [batch_axis] * batch_dims + [None] * (lead - batch_dims)

  def leaf_sharding(path, x):
    name = path[0].name
    head_at = None if x.ndim == lead else (lead + 1 if name == "store_order" else lead)
    spec = prefix + [None] * (x.ndim - lead)
    if head_at is not None and head_axis is not None:
      spec[head_at] = head_axis
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree_util.tree_map_with_path(leaf_sharding, cache)


def _paged_sharding(pool: PagedCache, mesh: Mesh, head_axis):
  """Pages `[N, H, ...]`, slot tiers `[S, H, ...]`, orders `[S, 2, H, D]`
  over heads; tables, reference counts and slot counters whole."""
  if head_axis is not None:
    _require_divides("KV heads", pool.spec.num_kv_heads, mesh, head_axis, "head_axis")
  with_heads = {"pages_k": 1, "pages_v": 1, "sink_k": 1, "sink_v": 1, "tail_k": 1,
                "tail_v": 1, "store_order": 2}

  def leaf_sharding(path, x):
    spec: list[Any] = [None] * x.ndim
    at = with_heads.get(path[0].name)
    if at is not None and head_axis is not None:
      spec[at] = head_axis
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree_util.tree_map_with_path(leaf_sharding, pool)
