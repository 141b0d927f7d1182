"""TurboQuant store formats (Zandieh et al., arXiv 2504.19874): the jnp
reference, and the C++ kernels with the same bits on CPU (`backend`).

One *instance* quantizes a vector of `m` channels (m a power of two):

  norm  = ||x||                     exact products + fixed pairwise sum
  y     = R (x / norm)              R = fl32(1/sqrt(m)) H diag(signs)
  code  = #(boundaries < y_i)       Lloyd-Max codebook for the exact density
  decode: norm * R^T centroid[code]

`turboB` is one instance with B bits over all D channels; `turbo2.5` and
`turbo3.5` run two instances over D/2 channels each (outlier channels at one
bit more); `turboBp` is a (B-1)-bit instance plus a 1-bit QJL sketch of the
residual, `sign(S r)` with its norm, for unbiased inner products.

Bit-exactness (numerics.md): every sum is a fixed pairwise tree, and every
product that feeds an add is exact (12-bit operands), so XLA's FMA contraction
under `jit` cannot change a bit. Norms are stored as bfloat16 bits.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from kvjax import _backend
from kvjax import _turbo_codebooks
from kvjax import ffi

SEED = 0x6B766A78  # "kvjx": signs and QJL matrices derive from it
NORM_DTYPE = jnp.bfloat16
_HIGHEST = jax.lax.Precision.HIGHEST


class TurboCodes(NamedTuple):
  """Encoded TurboQuant vectors.

  codes: uint8 `[..., C]`, every instance's b-bit codes packed densely
    (8 codes in b bytes, code k at bits k*b of that little-endian group),
    then, for prod formats, the QJL sign bits (1 = non-negative).
  norms: uint16 `[..., K]`, bfloat16 bits: each instance's norm, then for
    prod formats the residual norm (as a fraction of the vector norm).
  """
  codes: jax.Array
  norms: jax.Array


# Tables made on the host from the seed (the same for every backend).

@functools.lru_cache(maxsize=None)
def signs(m: int) -> np.ndarray:
  rng = np.random.default_rng([SEED, m, 1])
  return np.where(rng.random(m) < 0.5, -1.0, 1.0).astype(np.float32)


def keep_significant_bits(x, bits: int):
  """Truncates float32 values to `bits` significant bits (so products with
  other values of at most 24 - bits significant bits are exact)."""
  mask = np.uint32((0xFFFFFFFF << (24 - bits)) & 0xFFFFFFFF)
  if isinstance(x, np.ndarray):
    return (x.view(np.uint32) & mask).view(np.float32)
  return jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(x, jnp.uint32) & mask, jnp.float32)


@functools.lru_cache(maxsize=None)
def qjl_matrix(m: int) -> np.ndarray:
  """`S`: one Gaussian m x m matrix per dimension, entries at 12 bits."""
  rng = np.random.default_rng([SEED, m, 2])
  return keep_significant_bits(rng.standard_normal((m, m)).astype(np.float32), 12)


@functools.lru_cache(maxsize=None)
def codebook(m: int, bits: int):
  """(centroids [2^b], boundaries [2^b - 1]) as float32."""
  c = np.asarray(_turbo_codebooks.CENTROIDS[m][bits], np.float32)
  return c, ((c[1:] + c[:-1]) * np.float32(0.5)).astype(np.float32)


# Exact building blocks.

def pairwise_sum(x):
  """Sum over the last axis (a power of two) in the fixed tree order: add the
  upper half to the lower half until one element remains."""
  while x.shape[-1] > 1:
    half = x.shape[-1] // 2
    x = x[..., :half] + x[..., half:]
  return x[..., 0]


def _split_hi_lo(x):
  hi = keep_significant_bits(x, 12)
  return hi, x - hi  # both have at most 12 significant bits


def exact_norm(x):
  """||x|| over the last axis: x^2 = hi^2 + 2 hi lo + lo^2, exact products."""
  hi, lo = _split_hi_lo(x)
  sq = (hi * hi + (2.0 * hi) * lo) + lo * lo
  return jnp.sqrt(pairwise_sum(sq))


def hadamard(x):
  """Unnormalized Walsh-Hadamard transform over the last axis: butterflies
  (a + b, a - b) for strides 1, 2, 4, ..."""
  m = x.shape[-1]
  lead = x.shape[:-1]
  h = 1
  while h < m:
    blocks = x.reshape(*lead, m // (2 * h), 2, h)
    a, b = blocks[..., 0, :], blocks[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, m)
    h *= 2
  return x


def rotate(x):
  """R x = fl32(1/sqrt(m)) H (signs * x)."""
  m = x.shape[-1]
  return hadamard(x * signs(m)) * np.float32(1.0 / math.sqrt(m))


def unrotate(y):
  """R^T y = signs * (fl32(1/sqrt(m)) H y)."""
  m = y.shape[-1]
  return (hadamard(y) * np.float32(1.0 / math.sqrt(m))) * signs(m)


def pack(codes, bits: int):
  """uint8 codes `[..., m]` (m % 8 == 0) -> `[..., m * bits // 8]` bytes."""
  lead, m = codes.shape[:-1], codes.shape[-1]
  if 8 % bits == 0:  # codes never straddle a byte: the same layout, cheaper
    per_byte = 8 // bits
    groups = codes.reshape(*lead, m // per_byte, per_byte)
    return functools.reduce(jnp.bitwise_or, [groups[..., j] << (j * bits)
                                             for j in range(per_byte)]).astype(jnp.uint8)
  groups = codes.reshape(*lead, m // 8, 8).astype(jnp.uint32)
  word = functools.reduce(jnp.bitwise_or, [groups[..., k] << (k * bits) for k in range(8)])
  out = jnp.stack([(word >> (8 * j)) & 0xFF for j in range(bits)], axis=-1)
  return out.astype(jnp.uint8).reshape(*lead, m * bits // 8)


def unpack(packed, bits: int, m: int):
  """Inverse of `pack`: `[..., m * bits // 8]` -> uint8 `[..., m]`."""
  lead = packed.shape[:-1]
  if 8 % bits == 0:  # codes never straddle a byte: the same layout, cheaper
    per_byte = 8 // bits
    codes = jnp.stack([(packed >> (j * bits)) & ((1 << bits) - 1)
                       for j in range(per_byte)], -1)
    return codes.astype(jnp.uint8).reshape(*lead, m)
  groups = packed.reshape(*lead, m // 8, bits).astype(jnp.uint32)
  word = functools.reduce(jnp.bitwise_or, [groups[..., j] << (8 * j) for j in range(bits)])
  codes = jnp.stack([(word >> (k * bits)) & ((1 << bits) - 1) for k in range(8)], -1)
  return codes.astype(jnp.uint8).reshape(*lead, m)


# Vectors far from unit scale are scaled by an exact power of two before their
# norm is taken, so squares neither overflow nor underflow.
_BIG, _SMALL = np.float32(2.0**60), np.float32(2.0**-60)
_DOWN, _UP = np.float32(2.0**-70), np.float32(2.0**70)
_NORM_MAX = np.float32(ml_dtypes.finfo(ml_dtypes.bfloat16).max)


def scaled_norm(v):
  """(v * f, ||v * f||, 1 / f) with f a power of two chosen from max |v|."""
  amax = jnp.max(jnp.abs(v), axis=-1)
  f = jnp.where(amax > _BIG, _DOWN, jnp.where(amax < _SMALL, _UP, np.float32(1)))
  v = v * f[..., None]
  return v, exact_norm(v), jnp.where(amax > _BIG, _UP, jnp.where(amax < _SMALL, _DOWN, np.float32(1)))


def _to_norm_bits(x):
  return jax.lax.bitcast_convert_type(x.astype(NORM_DTYPE), jnp.uint16)


def _from_norm_bits(bits):
  return jax.lax.bitcast_convert_type(bits, NORM_DTYPE).astype(jnp.float32)


# One instance.

def inverse_permutation(perm):
  """`inv` with `inv[perm[i]] = i` along the last axis (O(D^2), no sort)."""
  d = perm.shape[-1]
  hits = perm[..., None, :] == jnp.arange(d, dtype=perm.dtype)[:, None]
  return jnp.sum(jnp.where(hits, jnp.arange(d, dtype=jnp.int32), 0), axis=-1).astype(jnp.int32)


class _Instance(NamedTuple):
  start: int  # first channel (after the outlier ordering)
  size: int  # m
  bits: int  # mse bits (0 for turbo1p)


def _quantize_rotated(y, m, bits):
  _, bounds = codebook(m, bits)
  return jnp.sum(y[..., None] > bounds, axis=-1).astype(jnp.uint8)


def _centroids(codes, m, bits):
  return jnp.asarray(codebook(m, bits)[0])[codes.astype(jnp.int32)]


def _qjl_project(r, m, transpose=False):
  """S r (S^T r with `transpose`) with exact products and pairwise sums:
  `[..., m]` -> `[..., m]`. The same bits for every batch shape and
  sharding, which a dot (its summation order is XLA's, chosen per shape)
  does not give."""
  s = jnp.asarray(qjl_matrix(m).T if transpose else qjl_matrix(m))
  hi, lo = _split_hi_lo(r)
  prods = s * hi[..., None, :] + s * lo[..., None, :]  # [..., m(i), m(j)]
  return pairwise_sum(prods)


def _qjl_back(z, m):
  """S^T z for signs z in {-1, +1}: `[..., m]`, exact (sign flips) then pairwise."""
  s = jnp.asarray(qjl_matrix(m))
  return pairwise_sum(jnp.swapaxes(s * z[..., :, None], -1, -2))


def _qjl_scale(m):
  return np.float32(math.sqrt(math.pi / 2) / m)


class TurboFormat:
  """A TurboQuant store format; see the module docstring."""

  kernels = True  # C++ kernels exist (kvjax.ffi); `backend` picks them

  def __init__(self, name: str, bits: tuple, prod: bool = False,
               split: bool = False):
    self.name = name
    self.bits = bits  # per instance: (b,) or (b_outlier, b_regular)
    self.prod = prod
    self.split = split
    self._tables = {}

  # Geometry.

  def head_dim_problem(self, head_dim):
    m = head_dim // 2 if self.split else head_dim
    if head_dim < 16 or head_dim & (head_dim - 1) or m not in _turbo_codebooks.CENTROIDS:
      return ("must be a power of two from 16 to 512 (the Walsh-Hadamard "
              "rotation needs one)")
    return None

  def instances(self, head_dim):
    if self.split:
      half = head_dim // 2
      return (_Instance(0, half, self.bits[0]), _Instance(half, half, self.bits[1]))
    return (_Instance(0, head_dim, self.bits[0]),)

  def code_bytes(self, head_dim):
    total = sum(i.size * i.bits // 8 for i in self.instances(head_dim))
    return total + (head_dim // 8 if self.prod else 0)

  @property
  def norm_count(self):
    return len(self.bits) + (1 if self.prod else 0)

  def empty(self, prefix, head_dim) -> TurboCodes:
    return TurboCodes(jnp.zeros((*prefix, self.code_bytes(head_dim)), jnp.uint8),
                      jnp.zeros((*prefix, self.norm_count), jnp.uint16))

  # Per-head outlier channels (split formats).

  def default_order(self, head_dim):
    return np.arange(head_dim, dtype=np.int32)

  def kernel_tables(self, head_dim) -> np.ndarray:
    """The float32 table blob of the C++ kernels (turbo_format.h): per
    instance fl32(1/sqrt(m)), fl32(sqrt(pi/2)/m), the signs, the codebook's
    centroids and boundaries, and for prod formats S."""
    if head_dim not in self._tables:
      parts = []
      for inst in self.instances(head_dim):
        m = inst.size
        parts.append(np.array([1.0 / math.sqrt(m), _qjl_scale(m)], np.float32))
        parts.append(signs(m))
        if inst.bits:
          parts.extend(codebook(m, inst.bits))
        if self.prod:
          parts.append(qjl_matrix(m).reshape(-1))
      self._tables[head_dim] = np.concatenate(parts).astype(np.float32)
    return self._tables[head_dim]

  def choose_order(self, token, choose, previous, *, backend=None):
    """The channel order after an append: `outlier_order(token)` where
    `choose` (a bool scalar: this append holds the first non-sink token),
    else `previous`; token `[..., D]`, previous int32 `[..., D]`. The C++
    kernel sorts only where it chooses (under vmap too); the jnp path
    counts comparisons under a cond."""
    def reference(args):
      token, choose, previous = args
      return jax.lax.cond(choose, lambda: self.outlier_order(token), lambda: previous)

    def kernel(args):
      token, choose, previous = args
      return ffi.turbo_order(token, jnp.broadcast_to(choose, token.shape[:-1]), previous)

    return _backend.run(backend, reference, kernel, (token, choose, previous))

  @staticmethod
  def outlier_order(x):
    """Channel order from one token `x: [..., D]`: by decreasing magnitude
    (ties: lower channel first), so the first D/2 are the outlier channels.
    NaN counts as infinitely large (so NaN and +-Inf channels come first, in
    channel order): the keys form a strict total order and the result is
    always a permutation, whatever the input.
    Counting comparisons, O(D^2), is far cheaper than XLA's sort on CPU."""
    a = jnp.where(jnp.isnan(x), jnp.inf, jnp.abs(x))
    i = jnp.arange(x.shape[-1])
    above = (a[..., None, :] > a[..., :, None]) | (
        (a[..., None, :] == a[..., :, None]) & (i[None, :] < i[:, None]))
    rank = jnp.sum(above, axis=-1, dtype=jnp.int32)  # channels ahead of i
    return inverse_permutation(rank)

  # Encode / decode.

  def encode(self, x, order=None, *, backend=None) -> TurboCodes:
    """`x: [..., D]` float32; `order`: channel order `[..., D]` broadcastable
    (split formats; default: outliers are the first D/2 channels); `backend`
    as in `kvjax.quantize` (the same bits either way)."""
    x = jnp.asarray(x, jnp.float32)
    order = order if self.split else None
    d = x.shape[-1]

    def kernel(args):
      x, order = args
      return TurboCodes(*ffi.turbo_encode(
          x, order, self.kernel_tables(d), self.bits, self.prod,
          self.code_bytes(d), self.norm_count))

    return _backend.run(backend, lambda args: self._encode_jnp(*args), kernel, (x, order))

  def _encode_jnp(self, x, order) -> TurboCodes:
    d = x.shape[-1]
    if self.split and order is not None:
      x = jnp.take_along_axis(x, jnp.broadcast_to(order, x.shape), axis=-1)
    finite = jnp.all(jnp.isfinite(x), axis=-1)
    x = jnp.where(finite[..., None], x, 0.0)
    parts, norms = [], []
    for inst in self.instances(d):
      v, norm, undo = scaled_norm(x[..., inst.start:inst.start + inst.size])
      inv = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
      y = rotate(v * inv[..., None])
      # The stored norm saturates at bfloat16's largest finite value.
      norms.append(jnp.minimum(norm * undo, _NORM_MAX))
      if inst.bits:
        codes = _quantize_rotated(y, inst.size, inst.bits)
        parts.append(pack(codes, inst.bits))
        residual = y - _centroids(codes, inst.size, inst.bits)
      else:
        residual = y
      if self.prod:
        z = _qjl_project(residual, inst.size) >= 0
        parts.append(pack(z.astype(jnp.uint8), 1))
        norms.append(exact_norm(residual))
    nan = jnp.float32(jnp.nan)
    norms = jnp.stack([jnp.where(finite, n, nan) for n in norms], axis=-1)
    return TurboCodes(jnp.concatenate(parts, axis=-1), _to_norm_bits(norms))

  def encoded_problem(self, enc):
    """Why `enc` is not this format's encoding (None if it is)."""
    if not isinstance(enc, TurboCodes):
      return (f"expected kvjax.TurboCodes for {self.name!r}, got "
              f"{type(enc).__name__}")
    codes, norms = jnp.asarray(enc.codes), jnp.asarray(enc.norms)
    if codes.dtype != jnp.uint8 or norms.dtype != jnp.uint16 or codes.ndim < 1:
      return (f"expected uint8 codes [..., C] and uint16 norms [..., K], got "
              f"{codes.dtype} {codes.shape} and {norms.dtype} {norms.shape}")
    if norms.shape[-1:] != (self.norm_count,):
      return (f"expected {self.norm_count} norms per vector for {self.name!r}, "
              f"got norms of shape {norms.shape}")
    d = self.code_dim(enc)
    if self.head_dim_problem(d) or self.code_bytes(d) != codes.shape[-1]:
      valid = [f"{self.code_bytes(m)} (D={m})" for m in (16, 32, 64, 128, 256, 512)
               if not self.head_dim_problem(m)]
      return (f"{codes.shape[-1]} code bytes per vector is no head_dim of "
              f"{self.name!r}; expected one of {', '.join(valid)}")
    return None

  def _rotated_parts(self, enc: TurboCodes, d):
    """Per instance: (centroid values [..., m] or None, QJL signs or None,
    norm, QJL coefficient or None), float32, in the rotated domain."""
    norms = _from_norm_bits(enc.norms)
    offset, out = 0, []
    for i, inst in enumerate(self.instances(d)):
      values = None
      if inst.bits:
        width = inst.size * inst.bits // 8
        codes = unpack(enc.codes[..., offset:offset + width], inst.bits, inst.size)
        values = _centroids(codes, inst.size, inst.bits)
        offset += width
      z = kappa = None
      if self.prod:
        bits = unpack(enc.codes[..., offset:offset + inst.size // 8], 1, inst.size)
        z = jnp.where(bits > 0, 1.0, -1.0).astype(jnp.float32)
        offset += inst.size // 8
        # The QJL coefficient gamma * sqrt(pi/2) / m, kept at 12 bits so its
        # products are exact in `decode` (and attention uses the same value).
        kappa = keep_significant_bits(norms[..., i + 1] * _qjl_scale(inst.size), 12)
      out.append((values, z, norms[..., i], kappa))
    return out

  def decode(self, enc: TurboCodes, order=None, *, backend=None):
    """`encode`'s inverse: float32 `[..., D]` (`order` as given to encode)."""
    order = order if self.split else None
    d = self.code_dim(enc)
    enc = TurboCodes(jnp.asarray(enc.codes), jnp.asarray(enc.norms))

    def kernel(args):
      enc, order = args
      return ffi.turbo_decode(enc.codes, enc.norms, order, self.kernel_tables(d),
                              self.bits, self.prod, d)

    return _backend.run(backend, lambda args: self._decode_jnp(*args), kernel, (enc, order))

  def _decode_jnp(self, enc: TurboCodes, order):
    d = self.code_dim(enc)
    pieces = []
    for values, z, norm, kappa in self._rotated_parts(enc, d):
      m = (values if values is not None else z).shape[-1]
      y = values
      if z is not None:
        # y + kappa * S^T z with S^T z split in two 12-bit halves: both
        # products are exact, so fused or not they agree. (No `0 + ...` for
        # turbo1p: XLA folds it away under jit, which flips the sign of zeros.)
        hi, lo = _split_hi_lo(_qjl_back(z, m))
        sketch = kappa[..., None] * hi
        y = (sketch if y is None else y + sketch) + kappa[..., None] * lo
      pieces.append(unrotate(y) * norm[..., None])
    x = jnp.concatenate(pieces, axis=-1)
    if self.split and order is not None:
      inverse = jnp.broadcast_to(inverse_permutation(order), x.shape)
      x = jnp.take_along_axis(x, inverse, axis=-1)
    return x

  def code_dim(self, enc: TurboCodes):
    """D from the width of the packed codes."""
    bits_per_channel = sum(self.bits) / len(self.bits) + (1 if self.prod else 0)
    return int(round(enc.codes.shape[-1] * 8 / bits_per_channel))

  # Attention in the rotated domain.

  def prepare_query(self, q, order=None):
    """Rotates `q: [H, M, D]` once (per instance), and for prod formats also
    projects it with S, so blocks are scored without undoing any rotation."""
    if self.split and order is not None:
      q = jnp.take_along_axis(q, jnp.broadcast_to(order[:, None, :], q.shape), -1)
    prepared = []
    for inst in self.instances(q.shape[-1]):
      q_rot = rotate(q[..., inst.start:inst.start + inst.size])
      q_s = None
      if self.prod:
        q_s = _qjl_project(q_rot, inst.size)
      prepared.append((q_rot, q_s))
    return prepared

  def scores(self, prepared, block):
    """`block` leaves `[H, B, ...]` -> `[H, M, B]`."""
    total = 0.0
    d = self.code_dim(block)
    for (q_rot, q_s), (values, z, norm, kappa) in zip(
        prepared, self._rotated_parts(block, d)):
      s = 0.0
      if values is not None:
        s = jnp.einsum("hmd,hbd->hmb", q_rot, values, precision=_HIGHEST)
      if z is not None:
        s = s + jnp.einsum("hmd,hbd->hmb", q_s, z, precision=_HIGHEST) * kappa[:, None, :]
      total = total + s * norm[:, None, :]
    return total

  def kernel_layout(self, head_dim):
    """How the attention kernel reads this format: one segment of packed
    codes per instance (looked up in its codebook times the instance's
    norm) and, for prod formats, one of QJL sign bits (the table [-1, +1]
    times the norm and the 12-bit QJL coefficient), in the lane layout of
    `weighted_sum` / `finish`."""
    segments, kappas, tables = [], [], []
    code_offset = lane_offset = 0
    for i, inst in enumerate(self.instances(head_dim)):
      if inst.bits:
        segments.append([inst.bits, inst.size, code_offset, lane_offset,
                         sum(map(len, tables)), i, -1])
        kappas.append(0.0)
        tables.append(codebook(inst.size, inst.bits)[0])
        code_offset += inst.size * inst.bits // 8
      lane_offset += inst.size
      if self.prod:
        segments.append([1, inst.size, code_offset, lane_offset,
                         sum(map(len, tables)), i, i + 1])
        kappas.append(_qjl_scale(inst.size))
        tables.append(np.array([-1.0, 1.0], np.float32))
        code_offset += inst.size // 8
        lane_offset += inst.size
    return ffi.StoreLayout(4, np.array(segments, np.int32),
                           np.array(kappas, np.float32),
                           np.concatenate(tables).astype(np.float32), self.norm_count)

  @staticmethod
  def kernel_leaves(enc: TurboCodes):
    return (enc.codes, enc.norms, None)

  @staticmethod
  def flat_query(prepared):
    """`prepare_query`'s parts as one `[H, M, A]` array, in the lane layout
    of `weighted_sum` (per instance: rotated query, then S times it)."""
    return jnp.concatenate([x for pair in prepared for x in pair if x is not None], -1)

  def token_finite(self, block):
    """`[H, B]`: whether each token decodes to finite values (a non-finite
    vector has NaN norms)."""
    return jnp.all(jnp.isfinite(_from_norm_bits(block.norms)), axis=-1)

  def without_tokens(self, block, ok):
    """`block` with the tokens where `ok` is False made zero (norms 0)."""
    return block._replace(norms=jnp.where(ok[..., None], block.norms,
                                          jnp.zeros_like(block.norms)))

  def weighted_sum(self, p, block):
    """`p: [H, M, B]` -> the rotated-domain accumulator `[H, M, A]`."""
    d = self.code_dim(block)
    acc = []
    for values, z, norm, kappa in self._rotated_parts(block, d):
      pn = p * norm[:, None, :]
      if values is not None:
        acc.append(jnp.einsum("hmb,hbd->hmd", pn, values, precision=_HIGHEST))
      else:  # turbo1p: no mse codes
        acc.append(jnp.zeros(p.shape[:2] + z.shape[-1:], jnp.float32))
      if z is not None:
        acc.append(jnp.einsum("hmb,hbd->hmd", pn * kappa[:, None, :], z,
                              precision=_HIGHEST))
    return jnp.concatenate(acc, axis=-1)

  def accumulator_dim(self, head_dim):
    return head_dim * (2 if self.prod else 1)

  def finish(self, acc, order=None):
    """Rotated-domain accumulator `[H, M, A]` -> `[H, M, D]`, rotated back once."""
    pieces, offset = [], 0
    for inst in self.instances(acc.shape[-1] // (2 if self.prod else 1)):
      y = acc[..., offset:offset + inst.size]
      offset += inst.size
      if self.prod:
        w = acc[..., offset:offset + inst.size]
        offset += inst.size
        y = y + _qjl_project(w, inst.size, transpose=True)
      pieces.append(unrotate(y))
    out = jnp.concatenate(pieces, axis=-1)
    if self.split and order is not None:
      inverse = inverse_permutation(order)  # [H, D]
      out = jnp.take_along_axis(out, jnp.broadcast_to(inverse[:, None, :], out.shape), -1)
    return out


FORMATS = {f"turbo{b}": TurboFormat(f"turbo{b}", (b,)) for b in (1, 2, 3, 4)}
FORMATS["turbo2.5"] = TurboFormat("turbo2.5", (3, 2), split=True)
FORMATS["turbo3.5"] = TurboFormat("turbo3.5", (4, 3), split=True)
FORMATS.update({f"turbo{b}p": TurboFormat(f"turbo{b}p", (b - 1,), prod=True)
                for b in (1, 2, 3, 4)})
