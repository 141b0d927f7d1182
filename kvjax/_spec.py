"""`CacheSpec`: the static configuration of a cache, validated at construction."""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from kvjax import _formats

HOT_DTYPES = ("float32", "bfloat16", "float16")
OVERFLOW_MODES = ("slide", "error")
# Positions, counters and ring indices are int32.
MAX_CAPACITY = 2**31 - 1

# Every spelling of a hot dtype that a user may reasonably pass, by its
# canonical name: the names, the store formats' short names, and numpy/jnp
# dtype objects and scalar types (normalized through `np.dtype` below).
_HOT_ALIASES = {"float32": "float32", "f32": "float32",
                "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "f16": "float16"}


def _require(ok: bool, field: str, rule: str, value) -> None:
  if not ok:
    raise ValueError(f"CacheSpec.{field}: {rule} (got {value!r})")


def canonical_hot_dtype(value):
  """The canonical name ("float32", "bfloat16", "float16") of `value`, or
  None if it names no hot dtype."""
  if isinstance(value, str):
    return _HOT_ALIASES.get(value)
  try:
    name = np.dtype(value).name
  except TypeError:
    return None
  return name if name in HOT_DTYPES else None


def _store_names(store):
  """(key format, value format) names of a `store` value, or None."""
  if isinstance(store, str):
    store = tuple(store.split("/")) if "/" in store else (store, store)
  if (not isinstance(store, (tuple, list)) or len(store) != 2
      or not all(isinstance(n, str) and n in _formats.FORMATS for n in store)):
    return None
  return tuple(store)


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """Static configuration of a `KVCache`. Frozen and hashable.

  Attributes:
    num_kv_heads: H, the number of key/value heads.
    head_dim: D, the size of one head's key or value vector.
    capacity: most tokens retained and attended over (sinks included).
    tail: newest tokens always kept in `hot_dtype`.
    migrate_batch: tokens moved from the tail into the store at once.
    sinks: first tokens of the sequence kept in `hot_dtype` forever.
    hot_dtype: "float32" | "bfloat16" | "float16", the dtype of tail and
      sinks; also accepted: "f32" / "bf16" / "f16" and numpy or jnp dtypes
      (stored as the canonical name, so equal specs hash equally).
    store: store format name ("q8", "q4", "turbo3.5", "f32", ...;
      docs/formats.md) for keys and values alike, or a `(keys, values)` pair
      such as `("q8", "q4")` (also written "q8/q4"). A pair of equal names is
      stored as the one name, so equal caches have equal specs.
    overflow: "slide" drops the oldest non-sink tokens when full; "error"
      rejects new tokens and records how many (see `kvjax.check`).

  Sizes may be any integer type (numpy integers included); they are stored
  as Python ints.

  Raises:
    ValueError: naming the field and the rule, for any invalid combination.
  """

  num_kv_heads: int = 8
  head_dim: int = 128
  capacity: int = 4096
  tail: int = 256
  migrate_batch: int = 64
  sinks: int = 0
  hot_dtype: str = "bfloat16"
  store: str | tuple[str, str] = "q4"
  overflow: str = "slide"

  def __post_init__(self):
    for name in ("num_kv_heads", "head_dim", "capacity", "tail",
                 "migrate_batch", "sinks"):
      value = getattr(self, name)
      _require(_is_int(value), name, "must be an int", value)
      object.__setattr__(self, name, int(value))
      _require(int(value) <= MAX_CAPACITY, name,
               f"must be at most 2**31 - 1 (int32 positions and counters)", value)
    _require(self.num_kv_heads >= 1, "num_kv_heads", "must be >= 1",
             self.num_kv_heads)
    _require(self.head_dim >= 1, "head_dim", "must be >= 1", self.head_dim)
    _require(self.tail >= 0, "tail", "must be >= 0", self.tail)
    _require(self.migrate_batch >= 1, "migrate_batch", "must be >= 1",
             self.migrate_batch)
    _require(self.sinks >= 0, "sinks", "must be >= 0", self.sinks)
    hot = canonical_hot_dtype(self.hot_dtype)
    _require(hot is not None, "hot_dtype",
             f"must be one of {HOT_DTYPES} (or f32/bf16/f16, or a numpy/jnp "
             "dtype of those)", self.hot_dtype)
    object.__setattr__(self, "hot_dtype", hot)
    _require(isinstance(self.overflow, str) and self.overflow in OVERFLOW_MODES,
             "overflow", f"must be one of {OVERFLOW_MODES}", self.overflow)
    names = _store_names(self.store)
    _require(names is not None, "store",
             f"must be one of {tuple(_formats.FORMATS)}, or a (keys, values) "
             "pair of them such as ('q8', 'q4') or 'q8/q4'", self.store)
    object.__setattr__(self, "store", names[0] if names[0] == names[1] else names)
    for role, name in zip(("keys", "values"), names):
      problem = _formats.FORMATS[name].head_dim_problem(self.head_dim)
      where = (f"store={name!r}" if names[0] == names[1]
               else f"the {role}' store format {name!r}")
      _require(problem is None, "head_dim", f"{problem} for {where}", self.head_dim)
    needed = self.sinks + self.tail + self.migrate_batch
    _require(self.capacity >= needed, "capacity",
             f"must be >= sinks + tail + migrate_batch = {needed}",
             self.capacity)

  @property
  def key_store(self) -> str:
    """The keys' store format name."""
    return self.store if isinstance(self.store, str) else self.store[0]

  @property
  def value_store(self) -> str:
    """The values' store format name."""
    return self.store if isinstance(self.store, str) else self.store[1]

  @property
  def store_name(self) -> str:
    """The store format as one name: "q4", or "keys/values" such as "q8/q4"."""
    return self.store if isinstance(self.store, str) else "/".join(self.store)

  @property
  def store_slots(self) -> int:
    """Ring size of the store: every retained non-sink token has a slot."""
    return self.capacity - self.sinks

  @property
  def tail_slots(self) -> int:
    """Ring size of the tail: it never holds `tail + migrate_batch` tokens."""
    return self.tail + self.migrate_batch


@dataclasses.dataclass(frozen=True)
class PagedSpec:
  """Static configuration of a paged pool (`kvjax.paged`). Frozen and hashable.

  Attributes:
    num_kv_heads, head_dim: per-token shape `[H, D]`.
    page_size: tokens per page.
    num_pages: pages in the pool (one layer).
    max_seqs: sequence slots `0 .. max_seqs - 1`.
    max_pages_per_seq: page-table width; a sequence retains at most
      `max_pages_per_seq * page_size` non-sink tokens (no sliding: `free`
      is how memory comes back).
    tail, sinks, hot_dtype, store: as in `CacheSpec`; the tail migrates a
      page at a time (`migrate_batch = page_size`).
  """

  num_kv_heads: int
  head_dim: int
  page_size: int = 64
  num_pages: int = 1024
  max_seqs: int = 32
  max_pages_per_seq: int = 128
  tail: int = 64
  sinks: int = 0
  hot_dtype: str = "bfloat16"
  store: str | tuple[str, str] = "q4"

  def __post_init__(self):
    def require(ok, field, rule, value):
      if not ok:
        raise ValueError(f"PagedSpec.{field}: {rule} (got {value!r})")
    for name in ("page_size", "num_pages", "max_seqs", "max_pages_per_seq"):
      value = getattr(self, name)
      require(_is_int(value), name, "must be an int", value)
      require(1 <= int(value) <= MAX_CAPACITY, name, "must be >= 1 and < 2**31",
              value)
      object.__setattr__(self, name, int(value))
    sinks = int(self.sinks) if _is_int(self.sinks) and self.sinks > 0 else 0
    require(sinks + self.max_pages_per_seq * self.page_size <= MAX_CAPACITY,
            "max_pages_per_seq", "sinks + max_pages_per_seq * page_size must fit "
            "int32 positions (< 2**31)", self.max_pages_per_seq)
    if _is_int(self.tail) and self.tail >= 0:
      need = -(-(int(self.tail) + self.page_size) // self.page_size)
      require(self.max_pages_per_seq >= need, "max_pages_per_seq",
              f"must hold tail + page_size tokens: >= {need} pages", self.max_pages_per_seq)
    try:
      equivalent = self.cache_spec()
    except ValueError as e:  # the shared fields' messages, under this class's name
      raise ValueError(str(e).replace("CacheSpec.", "PagedSpec.", 1)) from None
    for name in ("num_kv_heads", "head_dim", "tail", "sinks", "hot_dtype", "store"):
      object.__setattr__(self, name, getattr(equivalent, name))

  def cache_spec(self) -> CacheSpec:
    """The `CacheSpec` of a `KVCache` equivalent to one sequence of the pool
    (docs/serving.md): same bits in `materialize`, same `attend`."""
    return CacheSpec(num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                     capacity=self.sinks + self.max_pages_per_seq * self.page_size,
                     tail=self.tail, migrate_batch=self.page_size, sinks=self.sinks,
                     hot_dtype=self.hot_dtype, store=self.store, overflow="error")

  @property
  def store_name(self) -> str:
    """The store format as one name, as `CacheSpec.store_name`."""
    return self.cache_spec().store_name

  @property
  def max_tokens(self) -> int:
    """Non-sink tokens one sequence can hold."""
    return self.max_pages_per_seq * self.page_size
