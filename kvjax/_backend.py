"""Which implementation runs the quantization kernels (q8, q4, TurboQuant):
the jnp reference or C++.

`"auto"` (the default) runs the C++ kernels in computations placed on the CPU
when they loaded and the jnp reference elsewhere (`lax.platform_dependent`
picks per lowering platform, so one jitted function serves CPU and GPU). The
two give the same bits, so a cache built by either is identical.
"""

from __future__ import annotations

import os

import jax

from kvjax import _affine
from kvjax import ffi

BACKENDS = ("auto", "jax", "ffi")


def backend_info() -> dict:
  """What runs the C++ kernels, and why. Never raises: a bad environment
  variable is reported in `reason`.

  Returns:
    A dict: `ffi_loaded` (bool: the C++ kernels are registered with XLA),
    `isa` (the variant they run: "scalar", "avx2", "avx512" or "neon"),
    `isa_source` (why that variant), `reason` (why the kernels are not used,
    when they are not, or why `$KVJAX_BACKEND` is invalid),
    `compiled_isas` / `supported_isas` (built into the extension / runnable
    on this CPU), `default_backend` (`$KVJAX_BACKEND` or "auto"; None if it
    is invalid) and `platform` (JAX's default platform: the kernels serve
    computations on "cpu").
  """
  status = ffi.status()
  requested = status.requested_isa
  if status.loaded:
    isa_source = (f"forced by KVJAX_ISA={requested}" if requested != "auto"
                  else "the best variant this CPU supports")
  else:
    isa_source = None
  reasons = [status.reason] if status.reason else []
  try:
    default = default_backend()
  except ValueError as e:
    default = None
    reasons.append(str(e))
  return {"ffi_loaded": status.loaded, "isa": status.isa,
          "isa_source": isa_source,
          "reason": "; ".join(reasons) if reasons else None,
          "compiled_isas": list(status.compiled_isas),
          "supported_isas": list(status.supported_isas),
          "default_backend": default,
          "platform": jax.default_backend()}


def default_backend() -> str:
  """`$KVJAX_BACKEND`, where unset or empty means "auto" (as for
  `$KVJAX_ISA`)."""
  value = os.environ.get("KVJAX_BACKEND", "") or "auto"
  if value not in BACKENDS:
    raise ValueError(f"KVJAX_BACKEND: expected one of {BACKENDS} (or unset), "
                     f"got {value!r}")
  return value


def resolve(backend: str | None) -> str:
  """What runs: "jax", "ffi", or "auto" (ffi on CPU, jax elsewhere).

  Raises:
    ValueError: an unknown backend name.
    RuntimeError: "ffi" without loaded kernels, or any use of the kernels
      while `$KVJAX_ISA` names a variant that cannot run here (never a
      silent fallback).
  """
  backend = default_backend() if backend is None else backend
  if backend not in BACKENDS:
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
  if backend == "jax":
    return "jax"
  status = ffi.status()
  if status.loaded:
    return backend
  if backend == "ffi" or status.compiled_isas:
    # Either asked for explicitly, or the extension is there but KVJAX_ISA
    # forbids every variant it could run.
    raise RuntimeError(f"backend={backend!r}: the C++ kernels cannot run: "
                       f"{status.reason}")
  return "jax"


def _bits(params: _affine.AffineParams) -> int:
  return 8 // params.codes_per_byte


def run(backend, reference, kernel, operand):
  """`reference(operand)` or `kernel(operand)`, as `backend` resolves (under
  "auto", per lowering platform)."""
  mode = resolve(backend)
  if mode == "jax":
    return reference(operand)
  if mode == "ffi":
    return kernel(operand)
  return jax.lax.platform_dependent(operand, cpu=kernel, default=reference)


def affine_encode(x, params: _affine.AffineParams, backend=None):
  """`_affine.encode` by the selected backend (same bits either way)."""
  return run(backend, lambda x: _affine.encode(x, params),
              lambda x: _affine.CODES_TYPES[params.name](
                  *ffi.affine_encode(x, _bits(params))),
              x)


def affine_decode(enc: _affine.AffineCodes, params: _affine.AffineParams,
                  backend=None):
  """`_affine.decode` by the selected backend (same bits either way)."""
  return run(backend, lambda enc: _affine.decode(enc, params),
              lambda enc: ffi.affine_decode(*enc, _bits(params)), enc)
