"""q8 / q4 numerics: the jnp reference against an independent numpy model,
bit for bit, eagerly and under jit, on random and adversarial groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from tests import reference
from tests.affine_inputs import adversarial_groups, random_groups, tie_groups

F32 = np.float32
FORMATS = ("q8", "q4")


def bits(x):
  return np.asarray(x, F32).view(np.uint32)


def check_bit_exact(x, fmt):
  want = reference.affine_encode(x, fmt)
  eager = kvjax.quantize(jnp.asarray(x), fmt, backend="jax")
  jitted = jax.jit(lambda a: kvjax.quantize(a, fmt, backend="jax"))(x)
  for got in (eager, jitted):
    np.testing.assert_array_equal(np.asarray(got.codes), want[0])
    np.testing.assert_array_equal(bits(got.scale), bits(want[1]))
    np.testing.assert_array_equal(bits(got.zero), bits(want[2]))
  decoded_want = reference.affine_decode(*want, fmt)
  eager_d = kvjax.dequantize(eager, fmt, backend="jax")
  jit_d = jax.jit(lambda e: kvjax.dequantize(e, fmt, backend="jax"))(eager)
  for got in (eager_d, jit_d):
    np.testing.assert_array_equal(bits(got), bits(decoded_want))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("d", [2, 6, 34, 128, 130])
def test_random_groups_bit_exact(fmt, d):
  check_bit_exact(random_groups(512, d, seed=d), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("d", [8, 128, 130])
def test_adversarial_groups_bit_exact(fmt, d):
  check_bit_exact(adversarial_groups(d), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_leading_axes_are_batches_of_groups(fmt):
  x = random_groups(24, 16, seed=3).reshape(2, 3, 4, 16)
  enc = kvjax.quantize(x, fmt)
  flat = kvjax.quantize(x.reshape(24, 16), fmt)
  chex_shapes = (enc.codes.shape, enc.scale.shape, enc.zero.shape)
  assert chex_shapes == ((2, 3, 4, 16 // (2 if fmt == "q4" else 1)), (2, 3, 4),
                         (2, 3, 4))
  np.testing.assert_array_equal(np.asarray(enc.codes).reshape(flat.codes.shape),
                                flat.codes)


def test_q4_packing_layout():
  x = np.array([[0, 15, 1, 14, 2, 13, 3, 12]], F32)  # min 0, step 1
  enc = kvjax.quantize(x, "q4")
  assert enc.codes.dtype == jnp.uint8 and enc.codes.shape == (1, 4)
  assert [int(b) for b in np.asarray(enc.codes)[0]] == [
      0 | 15 << 4, 1 | 14 << 4, 2 | 13 << 4, 3 | 12 << 4]
  assert float(enc.scale[0]) == 1.0 and float(enc.zero[0]) == 0.0


def test_non_finite_groups_decode_to_canonical_nan():
  x = np.array([[1.0, np.nan, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]], F32)
  for fmt in FORMATS:
    enc = kvjax.quantize(x, fmt)
    assert bits(enc.scale)[0] == 0x7FC00000 and bits(enc.zero)[0] == 0x7FC00000
    assert not np.asarray(enc.codes)[0].any()
    out = np.asarray(kvjax.dequantize(enc, fmt))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


@pytest.mark.parametrize("fmt,levels", [("q8", 255), ("q4", 15)])
def test_error_within_half_a_step(fmt, levels):
  x = random_groups(2048, 64, seed=11)
  enc = kvjax.quantize(x, fmt)
  out = np.asarray(kvjax.dequantize(enc, fmt))
  err = np.abs(out.astype(np.float64) - x)
  step = np.asarray(enc.scale, np.float64)[:, None]
  # Half a step from rounding, plus the scale truncation (<= 2^-15 relative).
  span = (x.max(-1) - x.min(-1)).astype(np.float64)[:, None]
  assert (err <= 0.5 * step + span * 2.0**-14 + 1e-30).all()
  codes = reference.affine_decode(np.asarray(enc.codes), np.asarray(enc.scale),
                                  np.asarray(enc.zero), fmt)
  assert np.isfinite(codes).all()
  assert float(np.max(np.asarray(enc.scale) * levels)) > 0


def test_finite_group_never_decodes_to_infinity():
  big = np.finfo(F32).max
  x = np.array([[-big, big, 0.0, 1.0], [big, big * 0.99, 0, 0]], F32)
  for fmt in FORMATS:
    out = np.asarray(kvjax.dequantize(kvjax.quantize(x, fmt), fmt))
    assert np.isfinite(out).all()


def test_bad_input():
  with pytest.raises(ValueError, match="fmt: unknown store format 'q3'"):
    kvjax.quantize(np.zeros((2, 4), F32), "q3")
  with pytest.raises(ValueError, match=r"x: last axis \(D=5\) must be a multiple of 2"):
    kvjax.quantize(np.zeros((2, 5), F32), "q4")
  with pytest.raises(ValueError, match="backend: expected one of"):
    kvjax.quantize(np.zeros((2, 4), F32), "q8", backend="cuda")
  with pytest.raises(ValueError, match=r"x: the last axis \(D\) must not be empty"):
    kvjax.quantize(np.zeros((2, 0), F32), "q8")


def test_tie_groups_land_exactly_on_half_steps():
  """The adversarial set really holds exact .5 ties for each format."""
  groups = np.stack(tie_groups(40)).astype(F32)  # 3 for q8, then 3 for q4
  for fmt, own in (("q8", slice(0, 3)), ("q4", slice(3, 6))):
    enc = kvjax.quantize(groups[own], fmt, backend="jax")
    scale = np.asarray(enc.scale, np.float64)
    assert np.all(np.log2(scale) == np.round(np.log2(scale)))  # powers of two
    steps = (groups[own] - np.asarray(enc.zero)[:, None]) / scale[:, None]
    assert (np.mod(steps[:, 1:-1], 1.0) == 0.5).all()
