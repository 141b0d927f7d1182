"""Asymmetric affine q8 / q4 in pure jnp, bit-exact per `numerics.md` rules 1-9.

A group is the last axis (the `D` values of one token in one head). Every
constant and every operation order here is part of the numerical contract
that the C++ kernels reproduce; see docs/formats.md.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FLT_MIN = np.float32(np.finfo(np.float32).tiny)
SCALE_FLOOR = np.float32(1e-8)
CANONICAL_NAN_BITS = np.uint32(0x7FC00000)


class AffineParams(NamedTuple):
  name: str  # "q8" or "q4"
  levels: int  # L: largest code
  scale_max: np.float32  # S_MAX, so that L * s stays finite
  keep_mask: np.uint32  # clears the scale's low mantissa bits (rule 3)
  kept_unit: np.uint32  # one kept-mantissa unit of the scale (rule 3b)
  codes_per_byte: int


Q8 = AffineParams("q8", 255, np.float32(2.0**119), np.uint32(0xFFFFFF00),
                  np.uint32(0x100), 1)
Q4 = AffineParams("q4", 15, np.float32(2.0**123), np.uint32(0xFFFFFFF0),
                  np.uint32(0x10), 2)


class AffineCodes(NamedTuple):
  """Encoded q8/q4 groups.

  codes: uint8 `[..., D]` (q8) or `[..., D // 2]` (q4: element 2i in the
    low nibble of byte i, element 2i+1 in the high nibble).
  scale: float32 `[...]`, the step `s`.
  zero: float32 `[...]`, the group minimum `mn`.

  `quantize` returns the subclass `Q8Codes` or `Q4Codes`, so `dequantize`
  can tell q8 codes given as "q4" (which have a valid q4 shape) from q4 ones;
  an `AffineCodes` built by hand is taken as the format it is given as.
  """
  codes: jax.Array
  scale: jax.Array
  zero: jax.Array


class Q8Codes(AffineCodes):
  """`AffineCodes` made by the q8 encoder."""
  __slots__ = ()


class Q4Codes(AffineCodes):
  """`AffineCodes` made by the q4 encoder."""
  __slots__ = ()


CODES_TYPES = {"q8": Q8Codes, "q4": Q4Codes}


def _bits(x):
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _float(bits):
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _flush_tiny(x):
  # Rule 1: -0.0, +0.0 and denormals all become +0.0.
  return jnp.where(jnp.abs(x) < FLT_MIN, jnp.float32(0.0), x)


def _tree_reduce(x, op):
  """`op`-reduction of the last axis as a tree of elementwise ops on halves:
  XLA:CPU fuses it into one loop, where a short `reduce` costs ~3x more.
  (min and max are exact, so the order changes no bit.)"""
  while x.shape[-1] > 1:
    half = x.shape[-1] // 2
    pairs = op(x[..., :half], x[..., half:2 * half])
    x = jnp.concatenate([pairs, x[..., 2 * half:]], -1) if x.shape[-1] % 2 else pairs
  return x[..., 0]


def encode(x: jax.Array, params: AffineParams) -> AffineCodes:
  """Encodes float32 groups `x: [..., D]` (rules 1-7 and 9)."""
  x = jnp.asarray(x, jnp.float32)
  levels = np.float32(params.levels)
  mn, mx = _tree_reduce(x, jnp.minimum), _tree_reduce(x, jnp.maximum)
  # XLA's min/max propagate NaN, so a group is finite iff its extremes are.
  finite = jnp.isfinite(mn) & jnp.isfinite(mx)
  mn, mx = _flush_tiny(mn), _flush_tiny(mx)
  s = (mx - mn) * np.float32(1.0 / params.levels)
  s = jnp.minimum(jnp.maximum(s, SCALE_FLOOR), params.scale_max)
  s = _float(_bits(s) & params.keep_mask)
  # Rule 3b: `levels * s` is exact, so this has one rounding, fused or not.
  top = levels * s + mn
  s = jnp.where(jnp.isinf(top), _float(_bits(s) - params.kept_unit), s)
  inv = jnp.float32(1.0) / s
  q = jnp.round((x - mn[..., None]) * inv[..., None])  # half to even
  q = jnp.clip(q, 0.0, levels)
  q = jnp.where(finite[..., None], q, 0.0).astype(jnp.uint8)
  if params.codes_per_byte == 2:
    q = q[..., 0::2] | (q[..., 1::2] << 4)
  nan = _float(jnp.full(finite.shape, CANONICAL_NAN_BITS))
  return CODES_TYPES[params.name](q, jnp.where(finite, s, nan),
                                  jnp.where(finite, mn, nan))


def unpack(codes: jax.Array, params: AffineParams):
  """Codes as uint8 `[..., D]` (q4 nibbles interleaved back)."""
  if params.codes_per_byte == 1:
    return codes
  low, high = codes & 0xF, codes >> 4
  return jnp.stack([low, high], axis=-1).reshape(*codes.shape[:-1],
                                                 2 * codes.shape[-1])


def decode(enc: AffineCodes, params: AffineParams) -> jax.Array:
  """Rule 8: `q * scale + zero`, exact products so fused or not agree."""
  q = unpack(enc.codes, params).astype(jnp.float32)
  return q * enc.scale[..., None] + enc.zero[..., None]


def code_planes(codes: jax.Array, params: AffineParams):
  """Codes split into planes of float32, no interleaving.

  q8 gives one plane `[..., D]`; q4 gives (even elements, odd elements), each
  `[..., D // 2]`, matching the low and high nibbles. Attention contracts each
  plane with the matching slice of the query, so nibbles are never shuffled.
  """
  if params.codes_per_byte == 1:
    return (codes.astype(jnp.float32),)
  return ((codes & 0xF).astype(jnp.float32), (codes >> 4).astype(jnp.float32))
