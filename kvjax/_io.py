"""`save` and `load`: a cache on disk, byte for byte.

The file is a safetensors file (https://github.com/huggingface/safetensors:
an 8-byte little-endian header size, a JSON header, then the raw tensor
bytes), written and read here with the standard library and numpy, so kvjax
needs no new dependency while any safetensors reader (the `safetensors`
package, MLX, Rust) can open it. Unlike `.npz` (a zip with timestamps), the
same cache gives the same bytes on every machine: tensors are named by their
pytree path and written in sorted order, little-endian, and the header is
canonical JSON. docs/layers.md ("Saving caches") describes the format (version 1):

  __metadata__: {"format": "kvjax", "version": "1", "kind": "KVCache" |
                 "ModelCache" | "PagedCache", "specs": JSON [CacheSpec fields,
                 one per run; a PagedCache: its PagedSpec fields],
                 "run_layers": JSON [layers per run] (ModelCache),
                 "batch": JSON batch shape, "sha256": hex digest,
                 "user.<key>": the caller's metadata}
  one tensor per array leaf, e.g. "runs.0.store_k.codes"

The digest covers the header without it (canonical JSON) and every tensor's
bytes, so a truncated file, a flipped byte or an edited header is an error,
never a wrong cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import _layers
from kvjax import _pool
from kvjax import _state
from kvjax._spec import CacheSpec
from kvjax._spec import PagedSpec
from kvjax._state import KVCache

FORMAT = "kvjax"
VERSION = "1"
_DTYPES = {"float32": "F32", "uint8": "U8", "uint16": "U16", "int32": "I32",
           "bool": "BOOL"}
_NUMPY = {v: np.dtype(k) for k, v in _DTYPES.items()}
_ALIGN = 8  # tensor data starts on an 8-byte boundary (the header is padded)
_USER = "user."  # prefix of the caller's metadata keys


class CacheFileError(ValueError):
  """A cache file that cannot be loaded: not a kvjax file, another version,
  truncated or altered (checksum), or holding a different spec than asked."""


def _spec_to_json(spec: CacheSpec) -> dict:
  fields = dataclasses.asdict(spec)
  fields["store"] = spec.store if isinstance(spec.store, str) else list(spec.store)
  return fields


def _spec_from_json(fields: dict, cls=CacheSpec):
  fields = dict(fields)
  if isinstance(fields.get("store"), list):
    fields["store"] = tuple(fields["store"])
  return cls(**fields)


def _describe(cache):
  """(kind, specs per run, run_layers, batch shape) of a cache."""
  if isinstance(cache, KVCache):
    return "KVCache", [cache.spec], None, tuple(cache.length.shape)
  if isinstance(cache, _layers.ModelCache):
    return ("ModelCache", [run.spec for run in cache.runs], list(cache.run_layers),
            tuple(cache.runs[0].length.shape[:-1]))
  if isinstance(cache, _pool.PagedCache):
    return "PagedCache", [cache.spec], None, ()
  raise ValueError(f"cache: expected a kvjax.KVCache, kvjax.ModelCache or "
                   f"kvjax.paged.PagedCache, got {type(cache).__name__}")


def _template(kind, specs, run_layers, batch):
  """Shapes and dtypes of every leaf of such a cache (nothing allocated)."""
  if kind == "KVCache":
    make = lambda: _state.init(specs[0], batch=batch if batch else None)
  elif kind == "PagedCache":
    make = lambda: _pool.init(specs[0])
  else:
    def make():
      runs = tuple(_state.init(spec, batch=(*batch, n))
                   for spec, n in zip(specs, run_layers))
      return _layers.ModelCache(runs=runs, run_layers=tuple(run_layers))
  return jax.eval_shape(make)


def _leaf_name(path) -> str:
  parts = []
  for key in path:
    for attr in ("name", "idx", "key"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return ".".join(parts)


def _canonical(obj) -> bytes:
  return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(header: dict, blobs) -> str:
  h = hashlib.sha256(_canonical(header))
  for blob in blobs:
    h.update(blob)
  return h.hexdigest()


def save(path, cache, *, metadata=None) -> None:
  """Writes `cache` to `path` (a safetensors file; see docs/layers.md, "Saving caches").

  Args:
    path: a file path (str or os.PathLike); overwritten if it exists. Written
      to a temporary file first and renamed, so a crash never leaves half a
      file under `path`.
    cache: a `KVCache` (one, a batch or a layer stack), a `ModelCache` or
      a paged pool (`kvjax.paged.PagedCache`: pages, page tables, free list
      and reference counts, all of it).
    metadata: optional `{str: str}` kept with the cache (under the checksum),
      e.g. which model and prompt it holds; `load(..., metadata=)` checks it.

  The same cache gives byte-identical files on every machine and ISA (the
  encoders are bit-exact). A host function: call it outside `jit`.
  """
  kind, specs, run_layers, batch = _describe(cache)
  user_metadata, metadata = metadata, None
  leaves = jax.tree_util.tree_flatten_with_path(cache)[0]
  tensors = {}
  for leaf_path, leaf in leaves:
    a = np.asarray(jax.device_get(leaf))
    if a.dtype.name not in _DTYPES:
      raise ValueError(f"cache: leaf {_leaf_name(leaf_path)} has dtype {a.dtype}, which "
                       "kvjax files do not hold")
    # (np.ascontiguousarray would make a 0-d counter 1-d.)
    tensors[_leaf_name(leaf_path)] = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")
  names = sorted(tensors)
  header, offset, blobs = {}, 0, []
  for name in names:
    blob = tensors[name].tobytes()
    header[name] = {"dtype": _DTYPES[tensors[name].dtype.name],
                    "shape": list(tensors[name].shape),
                    "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  metadata = {"format": FORMAT, "version": VERSION, "kind": kind,
              "specs": json.dumps([_spec_to_json(s) for s in specs], sort_keys=True),
              "batch": json.dumps(list(batch))}
  if run_layers is not None:
    metadata["run_layers"] = json.dumps(run_layers)
  for key, value in (user_metadata or {}).items():
    if not isinstance(key, str) or not isinstance(value, str):
      raise ValueError(f"metadata: expected str keys and values, got {key!r}: {value!r}")
    metadata[_USER + key] = value
  header["__metadata__"] = metadata
  metadata["sha256"] = _digest(header, blobs)
  text = _canonical(header)
  text += b" " * (-(8 + len(text)) % _ALIGN)
  tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for blob in blobs:
      f.write(blob)
  os.replace(tmp, path)


def _fail(path, message):
  raise CacheFileError(f"kvjax.load: {os.fspath(path)}: {message}")


def _read_header(path, data: bytes):
  if len(data) < 8:
    _fail(path, f"{len(data)} bytes, too short for a cache file (truncated?)")
  (size,) = struct.unpack("<Q", data[:8])
  if size > len(data) - 8:
    _fail(path, f"the header claims {size} bytes but the file has {len(data) - 8} after "
          "the size field (truncated, or not a kvjax file)")
  try:
    header = json.loads(data[8:8 + size])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    _fail(path, f"the header is not valid JSON ({e}); the file is altered or not a kvjax "
          "file")
  if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
    _fail(path, "no __metadata__ in the header: not a kvjax cache file")
  return header, 8 + size


def load(path, spec=None, *, metadata=None):
  """Reads a cache written by `save`.

  Args:
    path: the file.
    spec: optional: the `CacheSpec` the cache must have (for a `ModelCache`,
      a sequence with one spec per layer; for a pool, its `PagedSpec`). A file with another spec is an
      error naming the fields that differ.
    metadata: optional `{str: str}` that the file's `save(..., metadata=)`
      must include (e.g. the prompt's hash: a cache of another prompt is an
      error, never reused).

  Returns:
    The cache (`KVCache` or `ModelCache`, batched or stacked as saved), its
    leaves bit-identical to the saved ones, on the default device.

  Raises:
    CacheFileError (a ValueError): not a kvjax file, another format version,
      truncated, altered (checksum mismatch) or a spec other than `spec`.
  """
  with open(path, "rb") as f:
    data = f.read()
  header, start = _read_header(path, data)
  meta = dict(header["__metadata__"])
  if meta.get("format") != FORMAT:
    _fail(path, f"format {meta.get('format')!r}, expected {FORMAT!r}: not a kvjax "
          "cache file")
  if meta.get("version") != VERSION:
    _fail(path, f"format version {meta.get('version')!r}; this kvjax reads version "
          f"{VERSION!r}")
  digest = meta.pop("sha256", None)
  tensors = {k: v for k, v in header.items() if k != "__metadata__"}
  blobs = []
  for name in sorted(tensors):
    begin, end = tensors[name]["data_offsets"]
    if end > len(data) - start or begin > end:
      _fail(path, f"tensor {name} ends at byte {end} of {len(data) - start}: the file is "
            "truncated")
    blobs.append(data[start + begin:start + end])
  if _digest({**tensors, "__metadata__": meta}, blobs) != digest:
    _fail(path, "checksum mismatch: the file was altered or damaged")
  try:
    kind = meta["kind"]
    cls = PagedSpec if kind == "PagedCache" else CacheSpec
    specs = [_spec_from_json(s, cls) for s in json.loads(meta["specs"])]
    batch = tuple(json.loads(meta["batch"]))
    run_layers = json.loads(meta["run_layers"]) if kind == "ModelCache" else None
  except (KeyError, TypeError, ValueError) as e:
    _fail(path, f"unreadable metadata ({e})")
  if spec is not None:
    _check_spec(path, kind, specs, run_layers, spec)
  for key, want in (metadata or {}).items():
    have = meta.get(_USER + key)
    if have != want:
      _fail(path, f"metadata {key!r} is {have!r}, expected {want!r} (a cache of "
            "something else)")
  template = _template(kind, specs, run_layers, batch)
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for leaf_path, want in paths:
    name = _leaf_name(leaf_path)
    entry = tensors.get(name)
    if entry is None:
      _fail(path, f"no tensor {name}")
    dtype = _NUMPY.get(entry["dtype"])
    if dtype != want.dtype or tuple(entry["shape"]) != tuple(want.shape):
      _fail(path, f"tensor {name} is {entry['dtype']} {entry['shape']}, expected "
            f"{want.dtype} {list(want.shape)} for its spec")
    begin, end = entry["data_offsets"]
    a = np.frombuffer(data, dtype.newbyteorder("<"), count=int(np.prod(want.shape)),
                      offset=start + begin).reshape(want.shape)
    leaves.append(jnp.asarray(a.astype(dtype)))
  if len(paths) != len(tensors):
    _fail(path, f"{len(tensors)} tensors, expected {len(paths)}")
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _check_spec(path, kind, specs, run_layers, spec):
  if kind in ("KVCache", "PagedCache"):
    want = PagedSpec if kind == "PagedCache" else CacheSpec
    if not isinstance(spec, want):
      raise ValueError(f"spec: this file holds a {kind}; expected a kvjax.{want.__name__}, "
                       f"got {type(spec).__name__}")
    _compare(path, specs[0], spec, "")
    return
  if isinstance(spec, CacheSpec):
    raise ValueError("spec: this file holds a ModelCache; expected one CacheSpec per "
                     "layer (a sequence)")
  layers = [s for s, n in zip(specs, run_layers) for _ in range(n)]
  spec = list(spec)
  if len(spec) != len(layers):
    _fail(path, f"the file holds {len(layers)} layers, spec= has {len(spec)}")
  for i, (have, want) in enumerate(zip(layers, spec)):
    _compare(path, have, want, f"layer {i}: ")


def _compare(path, have: CacheSpec, want: CacheSpec, where: str):
  if have == want:
    return
  diff = [f"{f.name}={getattr(have, f.name)!r} (spec= has {getattr(want, f.name)!r})"
          for f in dataclasses.fields(have) if getattr(have, f.name) != getattr(want, f.name)]
  _fail(path, f"{where}the file's spec differs from spec=: {', '.join(diff)}")


def file_metadata(path) -> dict:
  """The caller's metadata of a cache file (`save(..., metadata=)`), read
  without loading or checking the cache."""
  with open(path, "rb") as f:
    head = f.read(8)
    size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    data = head + f.read(size)
  header, _ = _read_header(path, data)
  return {k[len(_USER):]: v for k, v in header["__metadata__"].items() if k.startswith(_USER)}
