"""The golden-vector file formats (docs/golden_vectors.md): read and write.

A groups file holds float32 groups; an encoded file holds what one format
makes of them (codes, scales, zeros, decoded values). tests/golden/ has both,
made by the jnp reference with `scripts/make_golden_vectors.py`.
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import numpy as np

GROUPS_MAGIC = b"KVJXGRP1"
ENCODED_MAGIC = b"KVJXENC1"
DIR = pathlib.Path(__file__).parent / "golden"
# Group sizes of the committed files: below, at and off every SIMD width.
GROUP_SIZES = {"q8": (6, 17, 34, 128, 130), "q4": (6, 34, 128, 130)}


class Encoded(NamedTuple):
  codes: np.ndarray  # uint8 [G, D / codes_per_byte]
  scale: np.ndarray  # float32 [G]
  zero: np.ndarray  # float32 [G]
  decoded: np.ndarray  # float32 [G, D]


def groups_path(d: int) -> pathlib.Path:
  return DIR / f"affine_v1_groups_d{d}.bin"


def encoded_path(fmt: str, d: int) -> pathlib.Path:
  return DIR / f"affine_v1_{fmt}_d{d}.bin"


def write_groups(path, x: np.ndarray) -> None:
  x = np.ascontiguousarray(x, "<f4")
  g, d = x.shape
  header = GROUPS_MAGIC + np.array([d, 0], "<u4").tobytes() + np.array([g], "<u8").tobytes()
  pathlib.Path(path).write_bytes(header + x.tobytes())


def read_groups(path) -> np.ndarray:
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == GROUPS_MAGIC, f"{path}: not a groups file"
  d, _ = np.frombuffer(data, "<u4", 2, 8)
  (g,) = np.frombuffer(data, "<u8", 1, 16)
  assert len(data) == 24 + 4 * int(g) * int(d), f"{path}: wrong size"
  return np.frombuffer(data, "<f4", offset=24).reshape(int(g), int(d)).astype(np.float32)


def write_encoded(path, fmt: str, enc: Encoded) -> None:
  g, d = enc.decoded.shape
  bits = 8 if fmt == "q8" else 4
  header = (ENCODED_MAGIC + np.array([bits, d], "<u4").tobytes()
            + np.array([g], "<u8").tobytes())
  body = b"".join(np.ascontiguousarray(a).tobytes() for a in (
      np.asarray(enc.codes, np.uint8), np.asarray(enc.scale, "<f4"),
      np.asarray(enc.zero, "<f4"), np.asarray(enc.decoded, "<f4")))
  pathlib.Path(path).write_bytes(header + body)


def read_encoded(path) -> tuple[str, Encoded]:
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == ENCODED_MAGIC, f"{path}: not an encoded file"
  bits, d = (int(v) for v in np.frombuffer(data, "<u4", 2, 8))
  g = int(np.frombuffer(data, "<u8", 1, 16)[0])
  width = d * bits // 8
  sizes = [g * width, 4 * g, 4 * g, 4 * g * d]
  assert len(data) == 24 + sum(sizes), f"{path}: wrong size"
  offsets = np.cumsum([24] + sizes)
  codes = np.frombuffer(data, np.uint8, sizes[0], offsets[0]).reshape(g, width)
  scale = np.frombuffer(data, "<f4", g, offsets[1])
  zero = np.frombuffer(data, "<f4", g, offsets[2])
  decoded = np.frombuffer(data, "<f4", g * d, offsets[3]).reshape(g, d)
  return ("q8" if bits == 8 else "q4"), Encoded(codes, scale, zero, decoded)


# TurboQuant (docs/golden_vectors.md): the kernels' tables pinned per format
# and head_dim, and what each format makes of the groups (split formats with
# each group's own outlier order, as a cache's first token decides it).
TURBO_TABLES_MAGIC = b"KVJXTBL1"
TURBO_ENCODED_MAGIC = b"KVJXTQE1"
TURBO_DIMS = (16, 128)


class TurboEncoded(NamedTuple):
  codes: np.ndarray  # uint8 [G, C]
  norms: np.ndarray  # uint16 [G, K]
  orders: np.ndarray  # int32 [G, D] (split formats; else [G, 0])
  decoded: np.ndarray  # float32 [G, D]


def turbo_groups_path(d: int) -> pathlib.Path:
  return DIR / f"turbo_v1_groups_d{d}.bin"


def turbo_tables_path(fmt: str, d: int) -> pathlib.Path:
  return DIR / f"turbo_v1_tables_{fmt}_d{d}.bin"


def turbo_encoded_path(fmt: str, d: int) -> pathlib.Path:
  return DIR / f"turbo_v1_{fmt}_d{d}.bin"


def write_turbo_tables(path, fmt, d: int) -> None:
  bits = list(fmt.bits) + [0] * (2 - len(fmt.bits))
  tables = np.asarray(fmt.kernel_tables(d), "<f4")
  header = (TURBO_TABLES_MAGIC
            + np.array([d, len(fmt.bits), int(fmt.prod), *bits, 0], "<u4").tobytes()
            + np.array([tables.size], "<u8").tobytes())
  pathlib.Path(path).write_bytes(header + tables.tobytes())


def read_turbo_tables(path) -> np.ndarray:
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == TURBO_TABLES_MAGIC, f"{path}: not a turbo tables file"
  (n,) = np.frombuffer(data, "<u8", 1, 32)
  assert len(data) == 40 + 4 * int(n), f"{path}: wrong size"
  return np.frombuffer(data, "<f4", offset=40)


def read_turbo_encoded(path) -> TurboEncoded:
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == TURBO_ENCODED_MAGIC, f"{path}: not a turbo encoded file"
  d, c, k, has_order = (int(v) for v in np.frombuffer(data, "<u4", 4, 8))
  g = int(np.frombuffer(data, "<u8", 1, 24)[0])
  o = d if has_order else 0
  sizes = [g * c, 2 * g * k, 4 * g * o, 4 * g * d]
  assert len(data) == 32 + sum(sizes), f"{path}: wrong size"
  at = np.cumsum([32] + sizes)
  return TurboEncoded(np.frombuffer(data, np.uint8, g * c, at[0]).reshape(g, c),
                      np.frombuffer(data, "<u2", g * k, at[1]).reshape(g, k),
                      np.frombuffer(data, "<i4", g * o, at[2]).reshape(g, o),
                      np.frombuffer(data, "<f4", g * d, at[3]).reshape(g, d))


def write_turbo_encoded(path, enc: TurboEncoded) -> None:
  g, d = enc.decoded.shape
  header = (TURBO_ENCODED_MAGIC
            + np.array([d, enc.codes.shape[1], enc.norms.shape[1], int(enc.orders.size > 0)],
                       "<u4").tobytes() + np.array([g], "<u8").tobytes())
  body = b"".join(np.ascontiguousarray(a).tobytes() for a in (
      np.asarray(enc.codes, np.uint8), np.asarray(enc.norms, "<u2"),
      np.asarray(enc.orders, "<i4"), np.asarray(enc.decoded, "<f4")))
  pathlib.Path(path).write_bytes(header + body)


def turbo_reference(x: np.ndarray, fmt) -> TurboEncoded:
  """What the jnp reference makes of groups `x` (split formats: each
  group's own outlier order)."""
  import jax  # pylint: disable=import-outside-toplevel

  @jax.jit  # the same bits as eager (tests/test_turbo.py), far faster
  def run(x):
    order = fmt.outlier_order(x) if fmt.split else None
    enc = fmt.encode(x, order, backend="jax")
    return enc, fmt.decode(enc, order, backend="jax"), order

  enc, decoded, order = run(np.asarray(x, np.float32))
  orders = np.asarray(order, np.int32) if fmt.split else np.zeros((x.shape[0], 0), np.int32)
  return TurboEncoded(np.asarray(enc.codes), np.asarray(enc.norms), orders,
                      np.asarray(decoded))
