"""The C++ kernels through jax.ffi: every variant this CPU runs gives the jnp
reference's bits (eagerly and under jit), under vmap and scan too; a cache
built with either backend is identical; the fallback is honest."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import ffi as kvjax_ffi
from tests.affine_inputs import adversarial_groups, random_groups

ROOT = pathlib.Path(__file__).resolve().parent.parent
INFO = kvjax.backend_info()
# CI sets this so that a missing extension or tool fails instead of skipping.
REQUIRE_ALL = os.environ.get("KVJAX_REQUIRE_ALL_CHECKS") == "1"
FORMATS = ("q8", "q4")

needs_ffi = pytest.mark.skipif(
    not INFO["ffi_loaded"] and not REQUIRE_ALL,
    reason=f"C++ kernels not loaded: {INFO['reason']}")


def bits(a):
  a = np.asarray(a)
  return a.view(np.uint32) if a.dtype == np.float32 else a


def assert_same_bits(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(bits(g), bits(w))


def run_python(code_or_module, env_extra, module=False, args=()):
  env = {**os.environ, **env_extra}
  args = ["-m" if module else "-c", code_or_module, *args]
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_extension_loaded_and_reports_its_isa():
  if not INFO["ffi_loaded"]:
    message = f"the C++ kernels did not load: {INFO['reason']}"
    if REQUIRE_ALL:
      pytest.fail(message)
    pytest.skip(message)
  assert INFO["isa"] in INFO["supported_isas"] and INFO["reason"] is None
  assert INFO["isa"] == INFO["supported_isas"][0]  # the best one by default
  assert "scalar" in INFO["compiled_isas"] and INFO["isa_source"]


@pytest.fixture(scope="session")
def isa_reference(tmp_path_factory):
  """The jnp reference of tests/ffi_isa_check.py, computed once."""
  from tests import ffi_isa_check
  path = tmp_path_factory.mktemp("isa") / "reference.npz"
  ffi_isa_check.save_reference(path)
  return path


@needs_ffi
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "neon"])
def test_each_isa_matches_reference_bit_for_bit(isa, isa_reference):
  """Golden files, adversarial groups at 7 sizes and 2^20 random values,
  encode and decode, eagerly and under jit (tests/ffi_isa_check.py)."""
  if isa not in INFO["compiled_isas"]:
    pytest.skip(f"{isa} is not built on this platform (NEON: "
                "test_ffi_native.py runs it under qemu-aarch64)")
  if isa not in INFO["supported_isas"]:
    pytest.skip(f"this CPU cannot run {isa} (its source is checked under "
                "SIMDe emulation in test_ffi_native.py)")
  proc = run_python("tests.ffi_isa_check", {"KVJAX_ISA": isa}, module=True,
                    args=["--reference", str(isa_reference)])
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["isa"] == isa and result["mismatched"] == {}
  assert result["values_per_source"] > 2_000_000


@needs_ffi
@pytest.mark.parametrize("isa", ["bogus", "avx512", "neon"])
def test_forcing_a_variant_that_cannot_run_is_an_error(isa):
  if isa in INFO["supported_isas"]:
    pytest.skip(f"{isa} runs here")
  proc = run_python(
      "import kvjax, numpy as np\n"
      "info = kvjax.backend_info()\n"
      "assert not info['ffi_loaded'] and info['isa'] is None, info\n"
      f"assert 'KVJAX_ISA={isa}' in info['reason'], info\n"
      "x = np.ones((2, 8), np.float32)\n"
      "kvjax.quantize(x, 'q8', backend='jax')  # the reference still runs\n"
      "for backend in ('auto', 'ffi'):\n"
      "  try:\n"
      "    kvjax.quantize(x, 'q8', backend=backend)\n"
      "  except RuntimeError as e:\n"
      f"    assert 'KVJAX_ISA={isa}' in str(e), e\n"
      "  else:\n"
      "    raise SystemExit(f'{backend} fell back silently')\n"
      "print('ok')\n", {"KVJAX_ISA": isa})
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def test_missing_extension_falls_back_to_jnp_and_says_why():
  proc = run_python(
      "import sys\n"
      "sys.modules['kvjax.ffi._kvjax_ffi'] = None  # as if never built\n"
      "import kvjax, numpy as np\n"
      "info = kvjax.backend_info()\n"
      "assert not info['ffi_loaded'] and 'not installed' in info['reason'], info\n"
      "x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)\n"
      "a = kvjax.quantize(x, 'q4')\n"
      "b = kvjax.quantize(x, 'q4', backend='jax')\n"
      "assert all((np.asarray(u) == np.asarray(v)).all() for u, v in zip(a, b))\n"
      "try:\n"
      "  kvjax.quantize(x, 'q4', backend='ffi')\n"
      "except RuntimeError as e:\n"
      "  assert 'not installed' in str(e), e\n"
      "else:\n"
      "  raise SystemExit('ffi did not raise')\n"
      "print('ok')\n", {"KVJAX_ISA": "auto"})
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


@needs_ffi
@pytest.mark.parametrize("fmt", FORMATS)
def test_vmap_including_unbatched_scale_and_zero(fmt):
  x = random_groups(6 * 5, 34, seed=1).reshape(6, 5, 34)
  ref = kvjax.quantize(x, fmt, backend="jax")
  enc_ffi = lambda a: kvjax.quantize(a, fmt, backend="ffi")
  dec_ffi = lambda c, s, z: kvjax.dequantize(kvjax.AffineCodes(c, s, z), fmt,
                                             backend="ffi")
  dec_ref = lambda c, s, z: kvjax.dequantize(kvjax.AffineCodes(c, s, z), fmt,
                                             backend="jax")
  assert_same_bits(jax.vmap(enc_ffi)(x), ref)
  assert_same_bits(jax.jit(jax.vmap(enc_ffi, in_axes=1, out_axes=1))(x), ref)
  assert_same_bits(jax.vmap(jax.vmap(enc_ffi))(x), ref)
  # Batch entries that differ, so a handler that misread the batch index of
  # a broadcast operand would show.
  other = kvjax.quantize(x[1] * 3 + 1, fmt, backend="jax")
  for in_axes in [(0, None, None), (None, 0, 0), (0, 0, None), (None, None, 0)]:
    args = [a if ax is None else jnp.stack([a, b]) for a, b, ax in
            zip((ref.codes[0], ref.scale[0], ref.zero[0]), other, in_axes)]
    got = jax.jit(jax.vmap(dec_ffi, in_axes=in_axes, axis_size=2))(*args)
    want = jax.vmap(dec_ref, in_axes=in_axes, axis_size=2)(*args)
    assert got.shape == (2, 5, 34)
    assert_same_bits(got, want)


@needs_ffi
@pytest.mark.parametrize("fmt", FORMATS)
def test_scan_encodes_like_one_batch(fmt):
  x = jnp.asarray(adversarial_groups(40))

  def step(carry, row):
    enc = kvjax.quantize(row, fmt, backend="ffi")
    return carry + kvjax.dequantize(enc, fmt, backend="ffi").sum(), enc

  _, per_row = jax.lax.scan(step, jnp.float32(0), x)
  assert_same_bits(per_row, kvjax.quantize(x, fmt, backend="jax"))


def _filled_cache(fmt):
  spec = kvjax.CacheSpec(num_kv_heads=2, head_dim=40, capacity=48, tail=4,
                         migrate_batch=4, store=fmt, sinks=2)
  cache = kvjax.init(spec, batch=2)
  rng = np.random.default_rng(3)
  for n in (7, 1, 12, 1, 3):
    k, v = (jnp.asarray(rng.normal(size=(2, n, 2, 40)) * 10, jnp.float32)
            for _ in range(2))
    cache = jax.vmap(kvjax.append)(cache, k, v)  # vmap over the kernel call too
  return jax.vmap(kvjax.migrate)(cache)


@needs_ffi
@pytest.mark.parametrize("fmt", FORMATS)
def test_cache_is_identical_with_either_backend(fmt, monkeypatch):
  caches = {}
  for backend in ("jax", "ffi"):
    monkeypatch.setenv("KVJAX_BACKEND", backend)
    jax.clear_caches()  # the backend is read when a function is traced
    caches[backend] = _filled_cache(fmt)
  jax.clear_caches()
  assert_same_bits(caches["ffi"], caches["jax"])
  store = np.asarray(caches["ffi"].store_k.scale)
  assert (store != 1).sum() > 0  # tokens really reached the store


@needs_ffi
def test_cache_append_calls_the_kernel_on_cpu():
  spec = kvjax.CacheSpec(num_kv_heads=2, head_dim=32, capacity=16, tail=4,
                         migrate_batch=4, store="q4")
  cache = kvjax.init(spec)
  kv = jnp.ones((1, 2, 32), jnp.float32)
  hlo = jax.jit(kvjax.append).lower(cache, kv, kv).compile().as_text()
  assert "kvjax_q4_encode" in hlo


@needs_ffi
@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_batches(fmt):
  enc = kvjax.quantize(np.zeros((0, 3, 8), np.float32), fmt, backend="ffi")
  assert enc.codes.shape[:2] == enc.scale.shape == (0, 3)
  assert kvjax.dequantize(enc, fmt, backend="ffi").shape == (0, 3, 8)


@needs_ffi
def test_handlers_reject_bad_shapes_clearly():
  with pytest.raises(Exception, match=r"kvjax encode: x must be \[\.\.\., D\] "
                     r"with D > 0 and even, got \[2, 5\]"):
    jax.block_until_ready(kvjax_ffi.affine_encode(jnp.zeros((2, 5)), 4))


def test_ffi_backend_only_for_formats_with_kernels():
  with pytest.raises(ValueError, match="C\\+\\+ kernels for q8, q4 and the turbo "
                     "formats, not for 'bf16'"):
    kvjax.quantize(np.zeros((2, 64), np.float32), "bf16", backend="ffi")


@needs_ffi
def test_other_platforms_lower_to_the_jnp_path():
  """"auto" picks per lowering platform: for a GPU the kernels' CPU-only
  custom calls are never emitted (exported here without a GPU)."""
  x = jnp.ones((4, 8, 32), jnp.float32)
  encode = jax.jit(lambda a: kvjax.quantize(a, "q8"))
  on_gpu = jax.export.export(encode, platforms=["cuda"])(x).mlir_module()
  assert "kvjax_q8_encode" not in on_gpu and "round_nearest_even" in on_gpu
  spec = kvjax.CacheSpec(num_kv_heads=8, head_dim=32, capacity=64, tail=8,
                         migrate_batch=8, store="q4")
  append = jax.export.export(jax.jit(kvjax.append), platforms=["cuda"])(
      kvjax.init(spec), x[:1], x[:1]).mlir_module()
  assert "kvjax_q4_encode" not in append
  turbo_append = jax.export.export(jax.jit(kvjax.append), platforms=["cuda"])(
      kvjax.init(dataclasses.replace(spec, store="turbo3.5")), x[:1], x[:1]).mlir_module()
  assert "kvjax_turbo" not in turbo_append
  assert "kvjax_q8_encode" in encode.lower(x).as_text()  # and on CPU it is


@needs_ffi
@pytest.mark.parametrize("groups,d", [(9, 65536), (8193, 128), (300, 1000)])
def test_thread_pool_split_covers_every_group(groups, d):
  """Calls big enough for XLA's pool, split into uneven chunks."""
  x = random_groups(groups, d, seed=groups)
  for fmt in FORMATS:
    if d % 2 and fmt == "q4":
      continue
    got = jax.jit(lambda a, f=fmt: kvjax.quantize(a, f, backend="ffi"))(x)
    assert_same_bits(got, kvjax.quantize(x, fmt, backend="jax"))
    assert_same_bits(kvjax.dequantize(got, fmt, backend="ffi"),
                     kvjax.dequantize(got, fmt, backend="jax"))
