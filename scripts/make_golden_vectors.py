"""Writes tests/golden/: adversarial and random groups, and what the jnp
reference (eager, backend="jax") makes of them. Run from the repo root:

  python scripts/make_golden_vectors.py

The files are versioned (`affine_v1_*`): a change to the numerics is a new
version, never an edit of these bytes.
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import kvjax  # pylint: disable=wrong-import-position
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


if __name__ == "__main__":
  main()
