"""Backend selection for the low-level ops: the jnp reference or C++ kernels.

The C++ kernels (jax.ffi custom calls) are not part of this build yet, so
`"auto"` always resolves to the jnp reference and `"ffi"` raises.
"""

from __future__ import annotations

import os

BACKENDS = ("auto", "jax", "ffi")
_FFI_MISSING = ("kvjax was built without its C++ kernels (kvjax.ffi is not "
                "part of this version); the pure-jnp reference runs")


def backend_info() -> dict:
  """What runs the quantization kernels.

  Returns:
    `{"ffi_loaded": bool, "isa": str | None, "reason": str | None,
    "default_backend": str}`; `reason` says why the FFI is not used.
  """
  return {"ffi_loaded": False, "isa": None, "reason": _FFI_MISSING,
          "default_backend": default_backend()}


def default_backend() -> str:
  value = os.environ.get("KVJAX_BACKEND", "auto")
  if value not in BACKENDS:
    raise ValueError(f"KVJAX_BACKEND: expected one of {BACKENDS}, got {value!r}")
  return value


def resolve(backend: str | None) -> str:
  """The backend that runs: "jax" or "ffi"."""
  backend = default_backend() if backend is None else backend
  if backend not in BACKENDS:
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
  if backend == "ffi":
    raise RuntimeError(f"backend='ffi' was requested but {_FFI_MISSING}")
  return "jax"
