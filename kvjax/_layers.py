"""`ModelCache`: the caches of every layer of a model in one pytree.

Consecutive layers that share a `CacheSpec` form a *run*, stored as one
stacked `KVCache` (leaves with a leading layer axis), so a `lax.scan` or
`fori_loop` over the layers of a run reads and writes them in place. The
transforms take `layer=i` on a `ModelCache`: a Python int selects any layer
(its run and its index in the run are static); a traced index is allowed when
every layer shares one spec (a single run), since which run a traced index
falls in cannot be known while tracing.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax

from kvjax import _state
from kvjax._spec import CacheSpec
from kvjax._state import KVCache


@dataclasses.dataclass(frozen=True)
class ModelCache:
  """One cache per layer of a model (build with `kvjax.init_layers`).

  Attributes:
    runs: one stacked `KVCache` per run of consecutive layers sharing a spec
      (its leaves have a leading axis of that run's layers, after any batch
      axes).
    run_layers: static: the number of layers of each run.
  """

  runs: tuple
  run_layers: tuple = dataclasses.field(metadata=dict(static=True))

  @property
  def num_layers(self) -> int:
    return sum(self.run_layers)

  @property
  def specs(self) -> tuple:
    """The spec of every layer, in order."""
    return tuple(run.spec for run, n in zip(self.runs, self.run_layers) for _ in range(n))

  def replace_run(self, run: int, stack: KVCache) -> "ModelCache":
    """This cache with run `run` replaced by `stack` (e.g. after a
    `fori_loop` over that run's layers with a traced `layer`)."""
    if not 0 <= run < len(self.runs):
      raise ValueError(f"run: expected 0 <= run < {len(self.runs)}, got {run!r}")
    if not isinstance(stack, KVCache) or stack.spec != self.runs[run].spec:
      raise ValueError(f"stack: expected a KVCache stack with run {run}'s spec")
    runs = list(self.runs)
    runs[run] = stack
    return dataclasses.replace(self, runs=tuple(runs))

  def __repr__(self):
    parts = ", ".join(f"{n} x {run.spec.store_name}" for run, n in zip(self.runs, self.run_layers))
    return f"ModelCache({self.num_layers} layers: {parts})"


jax.tree_util.register_dataclass(ModelCache)


def init_layers(specs: Sequence[CacheSpec], batch=None) -> ModelCache:
  """Empty caches for every layer of a model, layer `i` with `specs[i]`.

  Args:
    specs: one `CacheSpec` per layer (e.g. `[spec] * num_layers`, or a
      per-layer policy such as q8 for the first and last layers and q4 in
      between). Consecutive equal specs are stacked into one run.
    batch: None for one sequence, or B for a batch of B sequences (each
      run's leaves get a leading B axis; `jax.vmap` over the cache then
      sees one sequence's `ModelCache`).

  Raises:
    ValueError: `specs` is empty or holds something other than `CacheSpec`s.
  """
  specs = list(specs) if not isinstance(specs, CacheSpec) else None
  if not specs or not all(isinstance(s, CacheSpec) for s in specs):
    raise ValueError("specs: expected a non-empty sequence of kvjax.CacheSpec, one per "
                     "layer")
  runs, sizes = [], []
  for spec in specs:
    if sizes and runs[-1] == spec:
      sizes[-1] += 1
    else:
      runs.append(spec)
      sizes.append(1)
  if batch is not None and not _state._positive_int(batch):
    raise ValueError(f"batch: expected a positive int (sequences), got {batch!r}")
  caches = tuple(_state.init(spec, batch=n if batch is None else (int(batch), n))
                 for spec, n in zip(runs, sizes))
  return ModelCache(runs=caches, run_layers=tuple(sizes))


def require_model(cache: ModelCache, fn_name: str) -> None:
  """A `ModelCache` of one sequence (a batch goes through `jax.vmap`)."""
  batch = cache.runs[0].length.shape[:-1]
  if batch:
    raise ValueError(
        f"cache: {fn_name} takes one sequence's ModelCache, got a batch of shape "
        f"{batch}; use jax.vmap(kvjax.{fn_name})")


def locate(cache: ModelCache, layer, fn_name: str):
  """`(run index, index within the run)` of `layer` (a static int, or a traced
  index when the cache has a single run)."""
  if layer is None:
    raise ValueError(f"layer: kvjax.{fn_name} on a ModelCache needs layer=i "
                     f"(0 <= i < {cache.num_layers})")
  if isinstance(layer, jax.core.Tracer):
    if len(cache.runs) != 1:
      raise ValueError(
          f"layer: a traced layer index needs every layer to share one spec; this "
          f"ModelCache has {len(cache.runs)} runs of layers with different specs "
          f"({cache.run_layers}). Pass a Python int, or loop over each run's layers "
          "(kvjax.layer_runs) with a static start")
    return 0, layer
  try:
    index = int(layer)
  except TypeError:
    raise ValueError(f"layer: expected an int, got {layer!r}") from None
  if isinstance(layer, bool) or not 0 <= index < cache.num_layers:
    raise ValueError(f"layer: expected 0 <= layer < {cache.num_layers} (the model's "
                     f"layers), got {layer!r}")
  for run, n in enumerate(cache.run_layers):
    if index < n:
      return run, index
    index -= n
  raise AssertionError("unreachable")


def on_layer(cache: ModelCache, layer, fn_name: str, fn: Callable) -> ModelCache:
  """`cache` with `fn(stack, index)` applied to the run holding `layer`."""
  require_model(cache, fn_name)
  run, index = locate(cache, layer, fn_name)
  return cache.replace_run(run, fn(cache.runs[run], index))


def read_layer(cache: ModelCache, layer, fn_name: str, fn: Callable):
  """`fn(stack, index)` on the run holding `layer` (attend, materialize)."""
  require_model(cache, fn_name)
  run, index = locate(cache, layer, fn_name)
  return fn(cache.runs[run], index)


def every_run(cache: ModelCache, fn: Callable) -> ModelCache:
  """`cache` with `fn(stack)` applied to every run (clear, acknowledge_overflow)."""
  return dataclasses.replace(cache, runs=tuple(fn(run) for run in cache.runs))


def every_layer(cache: ModelCache, fn_name: str, fn: Callable) -> ModelCache:
  """`cache` with `fn(one_layer_cache)` applied to every layer (migrate, evict)."""
  require_model(cache, fn_name)
  return every_run(cache, jax.vmap(fn))


def layer_runs(cache: ModelCache):
  """`[(first_layer, num_layers, spec), ...]`: the runs of layers sharing a
  spec, in order. Within a run, a traced `layer` works on that run's stack:
  `stack = cache.runs[r]`, a `fori_loop` / `scan` over its layers `0 ..
  num_layers - 1` with `layer=i`, then `cache.replace_run(r, stack)`."""
  if not isinstance(cache, ModelCache):
    raise ValueError(f"cache: expected a kvjax.ModelCache, got {type(cache).__name__}")
  out, first = [], 0
  for run, n in zip(cache.runs, cache.run_layers):
    out.append((first, n, run.spec))
    first += n
  return out


def length(cache) -> jax.Array:
  """Positions handed out so far (int32; `[B]` for a batch): the position the
  next appended token gets, e.g. for RoPE in a decoding loop. For a
  `ModelCache`, layer 0's (a model appends the same tokens to every layer)."""
  if isinstance(cache, ModelCache):
    return cache.runs[0].length[..., 0]
  _state.require_cache(cache, "length")
  return cache.length
