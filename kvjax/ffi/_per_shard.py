"""Running the C++ custom calls per shard when their operands are sharded.

XLA cannot partition a custom call: left alone, it gathers every operand onto
every device (a cache-sized all-gather per decode step). Each kvjax kernel is
independent across its leading batch axes and across KV heads, so it can run
on each device's shard as it is. `per_shard` says so to the partitioner with
`custom_partitioning` and a Shardy rule: the batch and head factors may be
sharded, every other axis (tokens, channels, tables) is replicated, and the
per-device function is the same kernel call on the local shapes.

`custom_partitioning` has no batching rule, so `custom_vmap` wraps it: under
`vmap` the kernel call is batched first (`vmap_method="expand_dims"`) and the
new leading axis becomes one more batch factor, shared by the batched
operands and every result. With one CPU device nothing is wrapped.
"""

from __future__ import annotations

import itertools
from typing import Callable, NamedTuple, Sequence

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec


class Axes(NamedTuple):
  """The axes of one operand or result that may be sharded.

  batch: its leading axes `0 .. batch - 1` are batch axes, shared by position
    with the other operands' batch axes of the same size; head: the index of
    its KV-head axis, or None.
  """
  batch: int = 0
  head: int | None = None


_FRESH = itertools.count()


def per_shard(call: Callable, operands: Sequence[jax.Array], in_axes: Sequence[Axes],
              out_axes: Sequence[Axes]):
  """`call(*operands)` (a tuple of arrays, shapes derived from the operands'),
  run per shard over the axes `in_axes` / `out_axes` mark."""
  if jax.device_count("cpu") == 1:
    return call(*operands)
  out_shapes = jax.eval_shape(call, *operands)
  in_labels, out_labels, free = _labels([o.shape for o in operands], in_axes,
                                        [o.shape for o in out_shapes], out_axes)
  return _batchable(call, in_labels, out_labels, free)(*operands)


def _batchable(call, in_labels, out_labels, free):
  @jax.custom_batching.custom_vmap
  def run(*operands):
    return _partitioned(call, in_labels, out_labels, free)(*operands)

  @run.def_vmap
  def rule(axis_size, in_batched, *operands):
    del axis_size
    name = f"vmap{next(_FRESH)}"
    batched = jax.vmap(call, in_axes=tuple(0 if b else None for b in in_batched))
    labels = tuple((name, *l) if b else l for l, b in zip(in_labels, in_batched))
    outs = tuple((name, *l) for l in out_labels)
    return (_batchable(batched, labels, outs, free | {name})(*operands),
            (True,) * len(out_labels))

  return run


def _labels(in_shapes, in_axes, out_shapes, out_axes):
  """Shardy factor names per axis: batch factors `b{i}` (an axis of size 1
  where the results have more is broadcast, so its own factor), `h` for the
  heads, a factor of its own for every other axis."""
  lead = []  # the batch axes' sizes, from the results first (never broadcast)
  for shape, axes in zip([*out_shapes, *in_shapes], [*out_axes, *in_axes]):
    lead += list(shape[len(lead):axes.batch])
  counter = itertools.count()

  def label(shape, axes):
    names = []
    for i, size in enumerate(shape):
      if i < axes.batch and size == lead[i]:
        names.append(f"b{i}")
      elif i == axes.head:
        names.append("h")
      else:
        names.append(f"r{next(counter)}")
    return tuple(names)

  in_labels = tuple(label(s, a) for s, a in zip(in_shapes, in_axes))
  out_labels = tuple(label(s, a) for s, a in zip(out_shapes, out_axes))
  free = {f"b{i}" for i in range(len(lead))} | {"h"}
  return in_labels, out_labels, free


def _partitioned(call, in_labels, out_labels, free):
  factors = list(dict.fromkeys(f for l in (*in_labels, *out_labels) for f in l))
  rule = (", ".join(" ".join(l) for l in in_labels) + " -> " +
          ", ".join(" ".join(l) for l in out_labels))
  local = lambda *operands: tuple(call(*operands))
  fn = custom_partitioning(local)

  def partition(mesh, arg_shapes, result_shape):
    return (mesh, local, tuple(r.sharding for r in result_shape),
            tuple(a.sharding for a in arg_shapes))

  def infer_sharding(mesh, arg_shapes, result_shape):
    # Only without Shardy (which propagates with the rule): replicate.
    del arg_shapes
    return tuple(NamedSharding(mesh, PartitionSpec()) for _ in result_shape)

  fn.def_partition(partition=partition, infer_sharding_from_operands=infer_sharding,
                   sharding_rule=rule,
                   need_replication_factors=tuple(f for f in factors if f not in free))
  return fn
