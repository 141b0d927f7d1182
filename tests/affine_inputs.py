"""Inputs for the q8/q4 bit-exactness tests: adversarial and random groups.

Shared by the tests and `scripts/make_golden_vectors.py` (the golden files in
tests/golden/ are these groups encoded by the jnp reference).
"""

import numpy as np

F32 = np.float32


def tie_groups(d):
  """Groups where (x - mn) / s lands exactly on k + 0.5 for q8 and for q4.

  With mn = -m * 2^e and mx = mn + L * 2^e, the truncated scale is exactly
  2^e (checked in the test), so mn + (j + 0.5) * 2^e are exact ties.
  """
  groups = []
  for levels in (255, 15):
    for e, m in ((-3, 0), (0, 5), (4, 1)):
      step = 2.0**e
      mn = -m * step
      ties = mn + (np.arange(d) % levels + 0.5) * step
      ties[0], ties[-1] = mn, mn + levels * step
      groups.append(ties)
  return groups


def adversarial_groups(d):
  """Groups of `d` float32 values that stress every rule of numerics.md."""
  rng = np.random.default_rng(7)
  tiny = np.finfo(F32).tiny
  big = np.finfo(F32).max
  groups = [
      np.zeros(d), np.full(d, -0.0), np.full(d, 3.25), np.full(d, -7.0),
      np.where(np.arange(d) % 2, 0.0, -0.0),  # +0 / -0 mix
      np.full(d, tiny / 4), np.where(np.arange(d) % 2, tiny / 3, -tiny / 5),
      np.linspace(-1, 1, d) * tiny * 8, np.r_[1e-30, np.zeros(d - 1)],
      np.r_[big, np.zeros(d - 1)], np.r_[-big, np.full(d - 1, big)],
      np.full(d, big), np.linspace(-1, 1, d) * big, np.r_[3e38, -3e38, np.ones(d - 2)],
      np.r_[1000.0, rng.normal(size=d - 1) * 1e-6],  # one outlier
      np.r_[-1e20, rng.normal(size=d - 1) * 1e-20],
      np.arange(d) * 1.0,  # exact .5 ties after scaling: (x - 0) / s
      (np.arange(d) % 16) * 1.0, (np.arange(d) % 16) * 1.0 + 0.5,
      np.arange(d) * 17.0 / 255.0 * 255.0 / 17.0, rng.normal(size=d) * 1e-38,
      np.r_[np.nan, np.ones(d - 1)], np.r_[np.ones(d - 1), np.inf],
      np.r_[-np.inf, np.zeros(d - 1)], np.full(d, np.nan),
  ]
  groups += tie_groups(d)
  g = np.stack([np.asarray(x, F32)[:d] for x in groups])
  # NaN payloads and a signalling NaN.
  payload = g[0].copy().view(np.uint32)
  payload[1] = 0x7FC12345
  snan = g[0].copy().view(np.uint32)
  snan[d - 1] = 0x7F800001
  neg_nan = g[0].copy().view(np.uint32)
  neg_nan[0] = 0xFFC00000
  return np.concatenate([g, np.stack([payload, snan, neg_nan]).view(F32)])


def random_groups(n, d, seed):
  rng = np.random.default_rng(seed)
  scales = 10.0 ** rng.uniform(-6, 6, size=(n, 1))
  offsets = rng.normal(size=(n, 1)) * scales * rng.integers(0, 3, size=(n, 1))
  return (rng.normal(size=(n, d)) * scales + offsets).astype(F32)


