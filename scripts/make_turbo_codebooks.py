"""Generates kvjax/_turbo_codebooks.py: Lloyd-Max codebooks for TurboQuant.

After a random rotation, each coordinate of a unit vector in R^d follows

    f(t) = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) (1 - t^2)^((d-3)/2),  t in [-1, 1].

For b = 1..4 bits this finds the 2^b centroids that minimise E[(t - c(t))^2]
(Lloyd's algorithm on a fine grid of the exact density) for every dimension
kvjax uses, and writes them as float32 values. Boundaries are the float32
midpoints of adjacent centroids, computed when the table is loaded.

    python scripts/make_turbo_codebooks.py            # rewrites the module
    python scripts/make_turbo_codebooks.py --check    # exit 1 if it differs
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import numpy as np

DIMS = (8, 16, 32, 64, 128, 256, 512)
BITS = (1, 2, 3, 4)
GRID = 200_001
TARGET = pathlib.Path(__file__).resolve().parent.parent / "kvjax" / "_turbo_codebooks.py"


def density_grid(d: int):
  """Points and probability weights of the coordinate density (in units of
  1/sqrt(d), where it is close to a standard normal)."""
  # Beyond 12 standard deviations the mass is below 1e-30: negligible.
  limit = min(math.sqrt(d), 12.0)
  s = np.linspace(-limit, limit, GRID)
  t = s / math.sqrt(d)
  with np.errstate(divide="ignore"):
    log_f = (d - 3) / 2 * np.log1p(-t * t)
  w = np.exp(log_f - log_f.max())
  return s, w / w.sum()


def lloyd_max(d: int, bits: int, iters: int = 100_000):
  """Positive-half centroids * sqrt(d) and the unit-vector MSE d * E[err^2].

  Cell masses and first moments come from cumulative integrals interpolated
  at the (continuous) cell edges, so Lloyd's fixed point is the density's,
  not the grid's.
  """
  s, w = density_grid(d)
  mass_below = np.concatenate([[0.0], np.cumsum((w[1:] + w[:-1]) / 2)])
  ws = w * s
  moment_below = np.concatenate([[0.0], np.cumsum((ws[1:] + ws[:-1]) / 2)])
  total, second = mass_below[-1], np.sum(w * s * s)
  k = 2 ** bits
  c = np.interp((np.arange(k) + 0.5) / k, mass_below / total, s)  # start: quantiles
  for _ in range(iters):
    edges = np.concatenate([[s[0]], (c[1:] + c[:-1]) / 2, [s[-1]]])
    mass = np.diff(np.interp(edges, s, mass_below))
    new = np.diff(np.interp(edges, s, moment_below)) / mass
    new = (new - new[::-1]) / 2  # keep it exactly symmetric
    done = np.max(np.abs(new - c)) < 1e-13
    c = new
    if done:
      break
  # Centroids are conditional means: E[err^2] = E[s^2] - sum_k P_k c_k^2. In
  # units of 1/sqrt(d) that is the unit vector's whole squared error.
  return c, float(second / np.sum(w) - np.sum(mass / total * c * c))


def render() -> str:
  lines = [
      '"""Lloyd-Max codebooks for TurboQuant (generated; do not edit).',
      "",
      "Written by scripts/make_turbo_codebooks.py. CENTROIDS[d][b] are the 2^b",
      "centroids of one rotated coordinate of a unit vector in R^d, ascending,",
      "as float32; D_MSE[d][b] is the expected squared error of a unit vector.",
      '"""',
      "",
      "CENTROIDS = {",
  ]
  mse_lines = ["D_MSE = {"]
  for d in DIMS:
    lines.append(f"    {d}: {{")
    mse_lines.append(f"    {d}: {{")
    for b in BITS:
      c, mse = lloyd_max(d, b)
      values = np.float32(c / math.sqrt(d))
      lines.append(f"        {b}: ({', '.join(repr(float(v)) for v in values)}),")
      mse_lines.append(f"        {b}: {mse:.6g},")
    lines.append("    },")
    mse_lines.append("    },")
  lines.append("}")
  mse_lines.append("}")
  return "\n".join(lines + [""] + mse_lines) + "\n"


def main() -> int:
  p = argparse.ArgumentParser()
  p.add_argument("--check", action="store_true", help="compare, do not write")
  args = p.parse_args()
  text = render()
  if args.check:
    same = TARGET.exists() and TARGET.read_text() == text
    print("codebooks match" if same else "codebooks differ from the shipped table")
    return 0 if same else 1
  TARGET.write_text(text)
  print(f"wrote {TARGET}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
