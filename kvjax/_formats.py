"""Store formats: how a block of `[H, T, D]` float32 values is encoded.

Every format encodes groups along the last axis and keeps the token axis of
each leaf in the same place as the input's, so the cache can write, slice and
scatter encoded tokens leaf by leaf. Attention never decodes a block of an
affine format: `scores` and `weighted_sum` use the per-token affine algebra

    q . k_t = s_t (q . c_t) + z_t sum(q)
    sum_t p_t v_t = sum_t (p_t s_t) c_t + sum_t p_t z_t

so only the small integer codes are read.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import _affine
from kvjax import _backend
from kvjax import _turbo
from kvjax import ffi

_HIGHEST = jax.lax.Precision.HIGHEST


class RawValues(NamedTuple):
  """Unquantized values. `data: [..., D]` float32, or uint16 bits for the
  16-bit dtypes (XLA:CPU never updates a bfloat16 buffer in place)."""
  data: jax.Array


def _einsum(spec, a, b):
  return jnp.einsum(spec, a, b, precision=_HIGHEST,
                    preferred_element_type=jnp.float32)


class _PlainDomain:
  """Formats scored and accumulated in the original channel domain."""

  def prepare_query(self, q, order=None):
    del order
    return q

  def finish(self, acc, order=None):
    del order
    return acc

  def accumulator_dim(self, head_dim):
    return head_dim

  @staticmethod
  def flat_query(prepared):
    return prepared


class RawFormat(_PlainDomain):
  """An unquantized store or hot tier in float32, bfloat16 or float16."""

  def __init__(self, name: str, dtype):
    self.name = name
    self.dtype = jnp.dtype(dtype)
    self.storage_dtype = (jnp.dtype(jnp.float32) if self.dtype.itemsize == 4
                          else jnp.dtype(jnp.uint16))

  def head_dim_problem(self, head_dim):
    del head_dim
    return None

  split = False
  kernels = False

  def encode(self, x, order=None) -> RawValues:
    del order
    x = jnp.asarray(x, jnp.float32).astype(self.dtype)
    if self.storage_dtype != self.dtype:
      x = jax.lax.bitcast_convert_type(x, self.storage_dtype)
    return RawValues(x)

  def encoded_problem(self, enc):
    """Why `enc` is not this format's encoding (None if it is)."""
    if not isinstance(enc, RawValues):
      return f"expected kvjax.RawValues for {self.name!r}, got {type(enc).__name__}"
    if jnp.dtype(enc.data.dtype) != self.storage_dtype:
      return (f"expected RawValues.data of dtype {self.storage_dtype} for "
              f"{self.name!r} ({self.dtype} stored as {self.storage_dtype}), "
              f"got {enc.data.dtype}")
    return None

  def decode(self, enc: RawValues, order=None):
    del order
    x = enc.data
    if self.storage_dtype != self.dtype:
      x = jax.lax.bitcast_convert_type(x, self.dtype)
    return x.astype(jnp.float32)

  def empty(self, prefix, head_dim) -> RawValues:
    return RawValues(jnp.zeros((*prefix, head_dim), self.storage_dtype))

  def scores(self, q, block):
    """`q: [H, M, D]` float32, block leaves `[H, B, ...]` -> `[H, M, B]`."""
    return _einsum("hmd,hbd->hmb", q, self.decode(block))

  def weighted_sum(self, p, block):
    """`p: [H, M, B]` float32 -> `sum_b p[h, m, b] v[h, b]`: `[H, M, D]`."""
    return _einsum("hmb,hbd->hmd", p, self.decode(block))

  # Raw values can be non-finite channel by channel (an Inf in one channel).
  token_finite = None

  def kernel_layout(self, head_dim) -> ffi.StoreLayout:
    """How the attention kernel reads this format (ValueKind 0, 1 or 2)."""
    del head_dim
    kind = {4: 0, 2: 1 if self.dtype == jnp.bfloat16 else 2}[self.dtype.itemsize]
    return ffi.StoreLayout(kind, np.zeros((0, 7), np.int32), np.zeros(0, np.float32),
                           np.zeros(0, np.float32))

  @staticmethod
  def kernel_leaves(enc: RawValues):
    return (enc.data, None, None)


class AffineFormat(_PlainDomain):
  """Per-token asymmetric affine codes (q8, q4); see `_affine`."""

  def __init__(self, name: str, params: _affine.AffineParams):
    self.name = name
    self.params = params

  def head_dim_problem(self, head_dim):
    if head_dim % self.params.codes_per_byte:
      return f"must be a multiple of {self.params.codes_per_byte}"
    return None

  split = False
  kernels = True  # C++ kernels exist (kvjax.ffi); `backend` picks them

  def encode(self, x, order=None, *, backend=None) -> _affine.AffineCodes:
    del order
    return _backend.affine_encode(x, self.params, backend)

  def encoded_problem(self, enc):
    """Why `enc` is not this format's encoding (None if it is)."""
    if not isinstance(enc, _affine.AffineCodes):
      return (f"expected kvjax.AffineCodes for {self.name!r}, got "
              f"{type(enc).__name__}")
    for name, tagged in _affine.CODES_TYPES.items():
      if name != self.name and isinstance(enc, tagged):
        return (f"these are {name} codes (kvjax.quantize(x, {name!r})); "
                f"dequantize them as {name!r}, not {self.name!r}")
    codes = jnp.asarray(enc.codes)
    if codes.dtype != jnp.uint8 or codes.ndim < 1:
      return (f"expected uint8 codes of shape [..., D / {self.params.codes_per_byte}]"
              f", got {codes.dtype} {codes.shape}")
    return None

  def decode(self, enc, order=None, *, backend=None):
    del order
    return _backend.affine_decode(enc, self.params, backend)

  def empty(self, prefix, head_dim) -> _affine.AffineCodes:
    width = head_dim // self.params.codes_per_byte
    return _affine.CODES_TYPES[self.name](jnp.zeros((*prefix, width), jnp.uint8),
                               jnp.ones(prefix, jnp.float32),
                               jnp.zeros(prefix, jnp.float32))

  def _query_planes(self, q):
    if self.params.codes_per_byte == 1:
      return (q,)
    return (q[..., 0::2], q[..., 1::2])

  def kernel_layout(self, head_dim) -> ffi.StoreLayout:
    """q8: ValueKind 3 (codes, scale, zero). q4: packed 4-bit codes read
    through a per-token table 0..15 * scale + zero (ValueKind 4)."""
    if self.params.codes_per_byte == 1:
      return ffi.StoreLayout(3, np.zeros((0, 7), np.int32), np.zeros(0, np.float32),
                             np.zeros(0, np.float32))
    segment = np.array([[4, head_dim, 0, 0, 0, -1, -1]], np.int32)
    return ffi.StoreLayout(4, segment, np.zeros(1, np.float32),
                           np.arange(16, dtype=np.float32))

  @staticmethod
  def kernel_leaves(enc):
    return (enc.codes, enc.scale, enc.zero)

  def token_finite(self, block):
    """`[H, B]`: whether each token decodes to finite values (a non-finite
    group has NaN scale and zero, so all of its values are NaN)."""
    return jnp.isfinite(block.scale) & jnp.isfinite(block.zero)

  def without_tokens(self, block, ok):
    """`block` with the tokens where `ok` is False made zero (finite)."""
    return block._replace(scale=jnp.where(ok, block.scale, 0.0),
                          zero=jnp.where(ok, block.zero, 0.0))

  def scores(self, q, block):
    planes = _affine.code_planes(block.codes, self.params)
    dots = sum(_einsum("hmd,hbd->hmb", qp, cp)
               for qp, cp in zip(self._query_planes(q), planes))
    q_sum = jnp.sum(q, axis=-1)[..., None]  # [H, M, 1]
    return dots * block.scale[:, None, :] + q_sum * block.zero[:, None, :]

  def weighted_sum(self, p, block):
    planes = _affine.code_planes(block.codes, self.params)
    ps = p * block.scale[:, None, :]
    parts = [_einsum("hmb,hbd->hmd", ps, cp) for cp in planes]
    coded = parts[0] if len(parts) == 1 else jnp.stack(parts, -1).reshape(
        *parts[0].shape[:-1], -1)
    offset = _einsum("hmb,hb->hm", p, block.zero)
    return coded + offset[..., None]


FORMATS = {
    "f32": RawFormat("f32", jnp.float32),
    "bf16": RawFormat("bf16", jnp.bfloat16),
    "f16": RawFormat("f16", jnp.float16),
    "q8": AffineFormat("q8", _affine.Q8),
    "q4": AffineFormat("q4", _affine.Q4),
    **_turbo.FORMATS,
}

HOT_FORMATS = {"float32": FORMATS["f32"], "bfloat16": FORMATS["bf16"],
               "float16": FORMATS["f16"]}


def get(fmt):
  """The format object for a name (or a format object itself)."""
  if isinstance(fmt, (RawFormat, AffineFormat, _turbo.TurboFormat)):
    return fmt
  if isinstance(fmt, str) and fmt in FORMATS:
    return FORMATS[fmt]
  raise ValueError(
      f"fmt: unknown store format {fmt!r}; expected one of {tuple(FORMATS)}")

