"""Plain numpy models that the tests compare kvjax against.

Written from the spec (api.md, numerics.md), token by token and group by
group, sharing no code with kvjax.
"""

from __future__ import annotations

import collections

import ml_dtypes
import numpy as np

F32 = np.float32
FLT_MIN = np.finfo(F32).tiny
AFFINE = {  # name: (L, S_MAX, keep mask, kept unit, codes per byte)
    "q8": (255, F32(2.0**119), 0xFFFFFF00, 0x100, 1),
    "q4": (15, F32(2.0**123), 0xFFFFFFF0, 0x10, 2),
}
HOT = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
       "float16": np.float16}
STORE_DTYPES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16,
                "f16": np.float16}


def flush_denormals(x):
  """What XLA's denormals-are-zero mode makes of an input."""
  x = np.asarray(x, F32)
  return np.where(np.abs(x) < FLT_MIN, F32(0) * np.sign(x), x).astype(F32)


def affine_encode(x, name):
  """numerics.md rules 1-9, group = last axis. Returns (codes, scale, zero)."""
  levels, s_max, mask, unit, per_byte = AFFINE[name]
  x = np.asarray(x, F32)
  with np.errstate(all="ignore"):
    finite = np.isfinite(x).all(-1)
    xd = flush_denormals(x)
    mn = xd.min(-1)
    mx = xd.max(-1)
    mn = np.where(np.abs(mn) < FLT_MIN, F32(0), mn).astype(F32)
    mx = np.where(np.abs(mx) < FLT_MIN, F32(0), mx).astype(F32)
    s = ((mx - mn) * F32(1.0 / levels)).astype(F32)
    s = np.minimum(np.maximum(s, F32(1e-8)), s_max).astype(F32)
    s = (s.view(np.uint32) & np.uint32(mask)).view(F32)
    top = (F32(levels) * s + mn).astype(F32)
    s = np.where(np.isinf(top), (s.view(np.uint32) - np.uint32(unit)).view(F32),
                 s).astype(F32)
    inv = (F32(1.0) / s).astype(F32)
    q = np.rint(((xd - mn[..., None]).astype(F32) * inv[..., None]).astype(F32))
    q = np.clip(q, 0, levels)
    q = np.where(finite[..., None], q, 0).astype(np.uint8)
  if per_byte == 2:
    q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
  nan = np.array(0x7FC00000, np.uint32).view(F32)
  return q, np.where(finite, s, nan).astype(F32), np.where(finite, mn, nan).astype(F32)


def affine_decode(codes, scale, zero, name):
  per_byte = AFFINE[name][4]
  codes = np.asarray(codes)
  if per_byte == 2:
    q = np.stack([codes & 0xF, codes >> 4], -1).reshape(*codes.shape[:-1], -1)
  else:
    q = codes
  with np.errstate(all="ignore"):
    out = (q.astype(F32) * scale[..., None]).astype(F32) + zero[..., None]
  return flush_denormals(out.astype(F32))


def store_roundtrip(x, store):
  """What the store gives back for float32 tokens `x: [..., D]`."""
  if store in STORE_DTYPES:
    return np.asarray(x, F32).astype(STORE_DTYPES[store]).astype(F32)
  return affine_decode(*affine_encode(x, store), store)


class CacheModel:
  """The cache as the spec describes it: a list of tokens, moved one by one."""

  def __init__(self, spec):
    self.spec = spec
    self.clear()

  def clear(self):
    self.length = self.evicted = self.tail_count = self.rejected = 0
    self.sinks = []  # (pos, k, v) rounded to the hot dtype, as float32
    self.nonsink = collections.deque()

  @property
  def retained(self):
    return len(self.sinks) + len(self.nonsink)

  def append(self, k, v, n_valid=None):
    spec = self.spec
    hot = HOT[spec.hot_dtype]
    n_valid = len(k) if n_valid is None else max(0, min(int(n_valid), len(k)))
    for i in range(n_valid):
      if spec.overflow == "error" and self.retained >= spec.capacity:
        self.rejected += n_valid - i
        return
      token = (self.length, np.asarray(k[i], F32).astype(hot).astype(F32),
               np.asarray(v[i], F32).astype(hot).astype(F32))
      self.length += 1
      if token[0] < spec.sinks:
        self.sinks.append(token)
        continue
      self.nonsink.append(token)
      self.tail_count += 1
      if self.tail_count >= spec.tail + spec.migrate_batch:
        self.tail_count -= spec.migrate_batch
      if spec.overflow == "slide" and len(self.nonsink) > spec.capacity - spec.sinks:
        self.nonsink.popleft()
        self.evicted += 1
        self.tail_count = min(self.tail_count, len(self.nonsink))

  def migrate(self):
    self.tail_count = min(self.tail_count, self.spec.tail)

  def evict(self, n):
    n = max(0, min(int(n), len(self.nonsink)))
    for _ in range(n):
      self.nonsink.popleft()
    self.evicted += n
    self.tail_count = min(self.tail_count, len(self.nonsink))

  def materialize(self):
    """(k, v, pos, valid) as api.md defines them."""
    spec = self.spec
    shape = (spec.capacity, spec.num_kv_heads, spec.head_dim)
    k, v = np.zeros(shape, F32), np.zeros(shape, F32)
    pos, valid = np.full(spec.capacity, -1, np.int32), np.zeros(spec.capacity, bool)
    n_store = len(self.nonsink) - self.tail_count
    rows = list(self.sinks) + list(self.nonsink)
    for r, (p, tk, tv) in enumerate(rows):
      if len(self.sinks) <= r < len(self.sinks) + n_store:
        tk, tv = store_roundtrip(tk, spec.key_store), store_roundtrip(tv, spec.value_store)
      k[r], v[r], pos[r], valid[r] = tk, tv, p, True
    return k, v, pos, valid

  def counts(self):
    return dict(length=self.length, sink_tokens=len(self.sinks),
                tail_tokens=self.tail_count,
                store_tokens=len(self.nonsink) - self.tail_count,
                evicted_tokens=self.evicted, rejected_tokens=self.rejected,
                overflow=self.rejected > 0)


def attention(q, k, v, key_pos, key_valid, q_pos, *, scale=None, window=None,
              softcap=None):
  """Softmax attention in float64. q: [n_q, Hq, D]; k, v: [T, H, D]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  n_q, hq, d = q.shape
  group = hq // k.shape[1]
  scale = 1.0 / np.sqrt(d) if scale is None else scale
  out = np.zeros_like(q)
  for i in range(n_q):
    visible = key_valid & (key_pos <= q_pos[i])
    if window is not None:
      visible &= key_pos > q_pos[i] - window
    if not visible.any():
      continue
    for h in range(hq):
      logits = scale * (k[visible, h // group] @ q[i, h])
      if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
      p = np.exp(logits - logits.max())
      out[i, h] = (p / p.sum()) @ v[visible, h // group]
  return out


def pairwise_sum(x):
  """numerics.md's reduction order: upper half onto lower half, repeatedly."""
  x = np.asarray(x, F32)
  while x.shape[-1] > 1:
    h = x.shape[-1] // 2
    x = (x[..., :h] + x[..., h:]).astype(F32)
  return x[..., 0]


def keep_bits(x, bits):
  mask = np.uint32((0xFFFFFFFF << (24 - bits)) & 0xFFFFFFFF)
  return (np.asarray(x, F32).view(np.uint32) & mask).view(F32)


def turbo_mse_encode(x, bits, signs, centroids):
  """TurboQuant-mse of `x: [n, m]` per numerics.md, in float32 numpy.

  Returns (codes uint8 [n, m], norm float32 [n]). The sign table and the
  codebook are the format's published tables.
  """
  x = np.asarray(x, F32)
  m = x.shape[-1]
  amax = np.abs(x).max(-1)
  f = np.where(amax > 2.0**60, 2.0**-70, np.where(amax < 2.0**-60, 2.0**70, 1)).astype(F32)
  x = (x * f[:, None]).astype(F32)  # exact: a power of two
  hi = keep_bits(x, 12)
  lo = (x - hi).astype(F32)
  sq = ((hi * hi + (F32(2) * hi) * lo).astype(F32) + lo * lo).astype(F32)
  norm = np.sqrt(pairwise_sum(sq)).astype(F32)
  with np.errstate(divide="ignore"):
    inv = np.where(norm > 0, (F32(1) / np.where(norm > 0, norm, 1)).astype(F32), 0)
  u = (x * inv[:, None].astype(F32) * signs).astype(F32)
  h = 1
  while h < m:  # in-place butterflies (a + b, a - b)
    u = u.reshape(len(u), m // (2 * h), 2, h)
    u = np.stack([u[:, :, 0] + u[:, :, 1], u[:, :, 0] - u[:, :, 1]], 2).astype(F32)
    u = u.reshape(len(u), m)
    h *= 2
  y = (u * F32(1 / np.sqrt(m))).astype(F32)
  c = np.asarray(centroids, F32)
  bounds = ((c[1:] + c[:-1]) * F32(0.5)).astype(F32)
  bf16_max = F32(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
  return ((y[..., None] > bounds).sum(-1).astype(np.uint8),
          np.minimum((norm / f).astype(F32), bf16_max))
