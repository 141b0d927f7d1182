"""Writes tests/golden/: adversarial and random groups, and what the jnp
reference (eager, backend="jax") makes of them. Run from the repo root:

  python scripts/make_golden_vectors.py

The files are versioned (`affine_v1_*`, `turbo_v1_*`): a change to the numerics is a new
version, never an edit of these bytes.
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import kvjax  # pylint: disable=wrong-import-position
from kvjax import _turbo  # pylint: disable=wrong-import-position
from tests import golden  # pylint: disable=wrong-import-position
from tests.affine_inputs import adversarial_groups, random_groups  # pylint: disable=wrong-import-position


def main():
  golden.DIR.mkdir(exist_ok=True)
  sizes = sorted(set(golden.GROUP_SIZES["q8"]) | set(golden.GROUP_SIZES["q4"]))
  for d in sizes:
    x = np.concatenate([adversarial_groups(d), random_groups(128, d, seed=1000 + d)])
    golden.write_groups(golden.groups_path(d), x)
    for fmt, fmt_sizes in golden.GROUP_SIZES.items():
      if d not in fmt_sizes:
        continue
      enc = kvjax.quantize(x, fmt, backend="jax")
      decoded = kvjax.dequantize(enc, fmt, backend="jax")
      golden.write_encoded(golden.encoded_path(fmt, d), fmt, golden.Encoded(
          *(np.asarray(a) for a in enc), np.asarray(decoded)))
      print(golden.encoded_path(fmt, d), x.shape)
  for d in golden.TURBO_DIMS:
    x = turbo_groups(d)
    golden.write_groups(golden.turbo_groups_path(d), x)
    for name, fmt in _turbo.FORMATS.items():
      golden.write_turbo_tables(golden.turbo_tables_path(name, d), fmt, d)
      golden.write_turbo_encoded(golden.turbo_encoded_path(name, d),
                                 golden.turbo_reference(x, fmt))
      print(golden.turbo_encoded_path(name, d), x.shape)


def turbo_groups(d):
  """Adversarial groups, groups with outlier channels, random groups."""
  rng = np.random.default_rng(2000 + d)
  outliers = rng.normal(size=(32, d)) * np.where(rng.random(d) < 0.1, 30.0, 1.0)
  return np.concatenate([adversarial_groups(d), outliers, random_groups(64, d, seed=3000 + d)]
                        ).astype(np.float32)


if __name__ == "__main__":
  main()
