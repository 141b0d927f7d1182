"""`quantize` / `dequantize`: the store formats as standalone ops."""

from __future__ import annotations

import jax.numpy as jnp

from kvjax import _backend, _formats


def quantize(x, fmt, *, backend=None):
  """Encodes `x: [..., D]` (cast to float32) with a store format.

  Args:
    x: `[..., D]`; every leading axis is a batch of groups.
    fmt: a store format name ("q8", "q4", "turbo3.5", "f32", ...).
    backend: "jax" (the jnp reference), "ffi" (the C++ kernels: q8, q4 and
      every turbo format),
      or "auto" (the kernels on CPU when loaded, else jnp: the same bits);
      default `$KVJAX_BACKEND` or "auto".

  Returns:
    The format's NamedTuple: `AffineCodes(codes, scale, zero)` for q8/q4,
    `TurboCodes(codes, norms)` for turbo formats (outlier channels of the
    split formats: the first D/2), `RawValues(data)` for the unquantized ones.
  """
  fmt = _formats.get(fmt)
  kwargs = _backend_kwargs(fmt, backend)
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError(f"x: expected shape [..., D], got {x.shape}")
  if x.shape[-1] == 0:
    raise ValueError(f"x: the last axis (D) must not be empty, got {x.shape}")
  problem = fmt.head_dim_problem(x.shape[-1])
  if problem:
    raise ValueError(f"x: last axis (D={x.shape[-1]}) {problem} for {fmt.name!r}")
  return fmt.encode(x.astype(jnp.float32), **kwargs)


def dequantize(encoded, fmt, *, backend=None):
  """Decodes what `quantize` returned to float32 `[..., D]`.

  Raises:
    ValueError: `encoded` is not an encoding of `fmt` (another format's
      NamedTuple, q8 codes given as "q4", turbo codes of a width that no
      head_dim has, the wrong dtypes), or an unknown format or backend.
  """
  fmt = _formats.get(fmt)
  kwargs = _backend_kwargs(fmt, backend)
  problem = fmt.encoded_problem(encoded)
  if problem:
    raise ValueError(f"encoded: {problem}")
  return fmt.decode(encoded, **kwargs)


def _backend_kwargs(fmt, backend) -> dict:
  """Validates `backend` for `fmt`; the arguments its encode/decode take."""
  if _backend.resolve(backend) == "ffi" and not fmt.kernels:
    raise ValueError(
        f"backend='ffi': kvjax has C++ kernels for q8, q4 and the turbo "
        f"formats, not for {fmt.name!r}; use backend='jax' or 'auto'")
  return {"backend": backend} if fmt.kernels else {}
