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

import jax
import jax.numpy as jnp
import numpy as np


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
  lead, d = x.shape[:-1], x.shape[-1]
  out_types = (jax.ShapeDtypeStruct((*lead, d * bits // 8), jnp.uint8),
               jax.ShapeDtypeStruct(lead, jnp.float32),
               jax.ShapeDtypeStruct(lead, jnp.float32))
  call = jax.ffi.ffi_call(f"kvjax_q{bits}_encode", out_types,
                          vmap_method="expand_dims")
  return call(x.astype(jnp.float32))


def affine_decode(codes: jax.Array, scale: jax.Array, zero: jax.Array,
                  bits: int) -> jax.Array:
  """The inverse: float32 `[..., D]` from codes, scale and zero."""
  _require_loaded()
  lead = np.broadcast_shapes(codes.shape[:-1], scale.shape, zero.shape)
  out_type = jax.ShapeDtypeStruct((*lead, codes.shape[-1] * 8 // bits),
                                  jnp.float32)
  codes, scale, zero = (jnp.asarray(a) for a in (codes, scale, zero))
  # The handler broadcasts size-1 leading axes (vmap's "expand_dims"); give
  # every operand the output's rank.
  rank = len(lead)
  codes = codes.reshape((1,) * (rank + 1 - codes.ndim) + codes.shape)
  scale = scale.reshape((1,) * (rank - scale.ndim) + scale.shape)
  zero = zero.reshape((1,) * (rank - zero.ndim) + zero.shape)
  call = jax.ffi.ffi_call(f"kvjax_q{bits}_decode", out_type,
                          vmap_method="expand_dims")
  return call(codes.astype(jnp.uint8), scale.astype(jnp.float32),
              zero.astype(jnp.float32))
