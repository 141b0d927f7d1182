"""The standalone golden-vector program (kvjax/ffi/golden_tool.cc), built
here with CMake: every variant against the committed golden files and against
the jnp reference on 2^20 random values plus the adversarial groups, built
with -fsanitize=address,undefined; the AVX-512 source also under SIMDe
emulation (for CPUs without AVX-512) and NEON cross-compiled for AArch64 and
run under qemu-aarch64; and the decode-attention checker, sanitized and
under qemu (tests/test_attention_kernel.py tests the kernel in process)."""

import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

import kvjax
from kvjax import _turbo
from tests import golden
from tests import reference
from tests.affine_inputs import adversarial_groups, random_groups

from tests.conftest import SIMDE_HEADER, missing

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def random_cases(tmp_path_factory):
  """(format, groups file, expected encoded) for 2^20 random values plus
  adversarial groups, the expectation made by the jnp reference (jit)."""
  directory = tmp_path_factory.mktemp("random")
  cases = []
  for d in (128, 130, 40):
    parts = [adversarial_groups(d)]
    if d == 128:
      parts.append(random_groups(8192, d, seed=9))
    x = np.concatenate(parts)
    path = directory / f"groups_d{d}.bin"
    golden.write_groups(path, x)
    for fmt in ("q8", "q4"):
      enc = kvjax.quantize(x, fmt, backend="jax")
      decoded = kvjax.dequantize(enc, fmt, backend="jax")
      cases.append((fmt, path, golden.Encoded(*(np.asarray(a) for a in enc),
                                              np.asarray(decoded))))
  return cases


@pytest.fixture(scope="session")
def turbo_random_cases(tmp_path_factory):
  """(tables file, groups file, expected) per turbo format: 1024 random and
  outlier-channel vectors and the adversarial groups at D=128 (1.4M values
  over the formats; one input, so one jnp compile per format), expected from
  the jnp reference."""
  directory = tmp_path_factory.mktemp("turbo")
  rng = np.random.default_rng(11)
  inputs = {128: np.concatenate([
      rng.normal(size=(768, 128)) * 2,
      rng.normal(size=(256, 128)) * np.where(rng.random(128) < 0.1, 25.0, 1.0),
      adversarial_groups(128)])}
  cases = []
  for d, x in inputs.items():
    x = x.astype(np.float32)
    groups_file = directory / f"groups_d{d}.bin"
    golden.write_groups(groups_file, x)
    for name, fmt in _turbo.FORMATS.items():
      tables_file = directory / f"tables_{name}_d{d}.bin"
      golden.write_turbo_tables(tables_file, fmt, d)
      cases.append((f"{name}/d{d}", tables_file, groups_file, golden.turbo_reference(x, fmt)))
  return cases


def turbo_golden_cases():
  return [(golden.turbo_tables_path(name, d), golden.turbo_groups_path(d),
           golden.turbo_encoded_path(name, d))
          for name in _turbo.FORMATS for d in golden.TURBO_DIMS]


def run_turbo_tool(command_prefix, tool, isa, tables_file, groups_file, out_file):
  proc = subprocess.run([*command_prefix, str(tool), "--format", "turbo", "--tables",
                         str(tables_file), "--isa", isa, str(groups_file), str(out_file)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "runtime error" not in proc.stderr and "Sanitizer" not in proc.stderr, proc.stderr
  return golden.read_turbo_encoded(out_file)


def golden_cases():
  return [(fmt, golden.groups_path(d), golden.encoded_path(fmt, d))
          for fmt, sizes in golden.GROUP_SIZES.items() for d in sizes]


def run_tool(command_prefix, tool, fmt, isa, groups_file, out_file):
  proc = subprocess.run([*command_prefix, str(tool), "--format", fmt, "--isa", isa,
                         str(groups_file), str(out_file)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "runtime error" not in proc.stderr and "Sanitizer" not in proc.stderr, proc.stderr
  return golden.read_encoded(out_file)[1]


def check_variant(command_prefix, tool, isa, random_cases, tmp_path, turbo_cases=()):
  """Golden files byte for byte, then 2^20+ random values bit for bit (q8 and
  q4, then every turbo format)."""
  for tables_file, groups_file, encoded_file in turbo_golden_cases():
    out = tmp_path / encoded_file.name
    run_turbo_tool(command_prefix, tool, isa, tables_file, groups_file, out)
    assert out.read_bytes() == encoded_file.read_bytes(), (isa, encoded_file.name)
  turbo_values = 0
  for name, tables_file, groups_file, want in turbo_cases:
    got = run_turbo_tool(command_prefix, tool, isa, tables_file, groups_file,
                         tmp_path / "turbo_out.bin")
    for field, g, w in zip(golden.TurboEncoded._fields, got, want):
      mismatched = np.sum(g.view(np.uint8) != w.view(np.uint8))
      assert mismatched == 0, f"{isa} {name} {field}: {mismatched} bytes differ"
    turbo_values += want.decoded.size
  assert not turbo_cases or turbo_values >= 2**20
  values = 0
  for fmt, groups_file, encoded_file in golden_cases():
    out = tmp_path / f"{fmt}_{groups_file.name}"
    run_tool(command_prefix, tool, fmt, isa, groups_file, out)
    assert out.read_bytes() == encoded_file.read_bytes(), (isa, encoded_file.name)
  for fmt, groups_file, want in random_cases:
    got = run_tool(command_prefix, tool, fmt, isa, groups_file, tmp_path / "out.bin")
    for name, g, w in zip(golden.Encoded._fields, got, want):
      mismatched = np.sum(g.view(np.uint8) != w.view(np.uint8))
      assert mismatched == 0, f"{isa} {fmt} {groups_file.name} {name}: {mismatched} bytes differ"
    values += want.decoded.size
  assert values >= 2 * 2**20


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_native_variant_sanitized(isa, sanitized_build, random_cases, turbo_random_cases,
                                  tmp_path):
  tool = sanitized_build / "kvjax_golden"
  listing = subprocess.run([str(tool), "--list"], capture_output=True, text=True).stdout
  if f"{isa} supported" not in listing:
    pytest.skip(f"this machine does not run {isa} natively ({listing.split()})")
  check_variant([], tool, isa, random_cases, tmp_path, turbo_random_cases)


def test_avx512_source_under_simde(sanitized_build, random_cases, turbo_random_cases,
                                   tmp_path):
  """The AVX-512 kernels' source on SIMDe's portable intrinsics: the same
  bits on any x86-64 CPU (hardware AVX-512 runs in the test above when the
  CPU has it). The turbo AVX-512 source has no intrinsics: there it is the
  same 16-lane vector code built for the baseline target."""
  if not SIMDE_HEADER.exists():
    missing("SIMDe headers are not installed (package libsimde-dev)")
  check_variant([], sanitized_build / "kvjax_golden_simde", "avx512",
                random_cases, tmp_path, turbo_random_cases)


def test_neon_under_qemu(aarch64_build, random_cases, turbo_random_cases, tmp_path):
  tool = aarch64_build / "kvjax_golden"
  listing = subprocess.run(["qemu-aarch64", str(tool), "--list"],
                           capture_output=True, text=True).stdout
  assert "neon supported" in listing, listing
  check_variant(["qemu-aarch64"], tool, "neon", random_cases, tmp_path, turbo_random_cases)


def test_golden_files_match_the_numpy_model():
  """The committed outputs agree with tests/reference.py (written from the
  spec, sharing no code with kvjax), not only with kvjax's jnp path."""
  for fmt, groups_file, encoded_file in golden_cases():
    x = golden.read_groups(groups_file)
    codes, scale, zero = reference.affine_encode(x, fmt)
    _, file = golden.read_encoded(encoded_file)
    np.testing.assert_array_equal(file.codes, codes)
    np.testing.assert_array_equal(file.scale.view(np.uint32), scale.view(np.uint32))
    np.testing.assert_array_equal(file.zero.view(np.uint32), zero.view(np.uint32))
    decoded = reference.affine_decode(codes, scale, zero, fmt)
    np.testing.assert_array_equal(file.decoded.view(np.uint32),
                                  np.asarray(decoded, np.float32).view(np.uint32))


def test_program_rejects_bad_input(sanitized_build, tmp_path):
  tool = str(sanitized_build / "kvjax_golden")
  groups_file = golden.groups_path(17)
  bad_magic = tmp_path / "bad.bin"
  bad_magic.write_bytes(b"NOTKVJAX" + groups_file.read_bytes()[8:])
  truncated = tmp_path / "short.bin"
  truncated.write_bytes(groups_file.read_bytes()[:-3])
  out = str(tmp_path / "out.bin")
  for args, message in [
      (["--format", "q3", str(groups_file), out], "--format: expected q8, q4 or turbo"),
      (["--format", "turbo", str(groups_file), out], "--tables: required"),
      (["--format", "turbo", "--tables", str(groups_file), str(groups_file), out],
       "not a kvjax turbo tables file"),
      (["--format", "turbo", "--tables", str(golden.turbo_tables_path("turbo4", 16)),
        str(golden.groups_path(17)), out], "the groups have 17 values, the tables are for 16"),
      (["--format", "q4", str(groups_file), out], "q4 needs an even group_size"),
      (["--format", "q8", "--isa", "sse9", str(groups_file), out], "--isa=sse9: unknown"),
      (["--format", "q8", str(bad_magic), out], "not a kvjax groups file"),
      (["--format", "q8", str(truncated), out], "fewer values than the header"),
      (["--format", "q8", str(groups_file)], "usage:"),
  ]:
    proc = subprocess.run([tool, *args], capture_output=True, text=True)
    assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)


def test_turbo_golden_files_pin_the_tables_and_the_reference():
  """The committed tables are the ones kvjax hands the kernels, and the
  committed outputs are what the jnp reference makes of the groups now."""
  for name, fmt in _turbo.FORMATS.items():
    for d in golden.TURBO_DIMS:
      np.testing.assert_array_equal(
          golden.read_turbo_tables(golden.turbo_tables_path(name, d)).view(np.uint32),
          fmt.kernel_tables(d).view(np.uint32))
  for name in ("turbo4", "turbo3.5", "turbo2p"):
    x = golden.read_groups(golden.turbo_groups_path(128))
    want = golden.read_turbo_encoded(golden.turbo_encoded_path(name, 128))
    for g, w in zip(golden.turbo_reference(x, _turbo.FORMATS[name]), want):
      np.testing.assert_array_equal(np.asarray(g).view(np.uint8), np.asarray(w).view(np.uint8))


# The decode-attention checker (kvjax/ffi/attention_check.cc): every variant
# against the scalar reference on random caches with NaN and Inf.

def test_standalone_checker_sanitized(sanitized_build):
  """Every variant against the scalar reference on random caches with NaN and
  Inf, built with -fsanitize=address,undefined."""
  proc = subprocess.run([str(sanitized_build / "kvjax_attention_check"), "--cases", "300"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  listing = subprocess.run([str(sanitized_build / "kvjax_golden"), "--list"],
                           capture_output=True, text=True).stdout
  for isa in ("scalar", "avx2", "avx512"):
    if f"{isa} supported" in listing:  # every variant this CPU runs, ran
      assert f"{isa}: 300 cases, 0 mismatched" in proc.stdout, proc.stdout


def test_standalone_checker_neon_under_qemu(aarch64_build):
  proc = subprocess.run(["qemu-aarch64", str(aarch64_build / "kvjax_attention_check"),
                         "--cases", "200"], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "neon: 200 cases, 0 mismatched" in proc.stdout


def test_attention_bench_runs_every_variant_sanitized(sanitized_build):
  """The per-token cost tool (built on request) reads every format through
  every variant this CPU runs without a sanitizer report."""
  build = subprocess.run(["cmake", "--build", str(sanitized_build), "--target",
                          "kvjax_attention_bench"], capture_output=True, text=True, timeout=600)
  assert build.returncode == 0, build.stdout + build.stderr
  proc = subprocess.run([str(sanitized_build / "kvjax_attention_bench"), "--tokens", "200",
                         "--reps", "1"], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and not proc.stderr, proc.stdout + proc.stderr
  listing = subprocess.run([str(sanitized_build / "kvjax_golden"), "--list"],
                           capture_output=True, text=True).stdout
  lines = proc.stdout.splitlines()
  for isa in ("scalar", "avx2", "avx512"):
    if f"{isa} supported" in listing:
      ran = [line for line in lines if line.startswith(isa + " ")]
      assert len(ran) == 8 and all(float(line.split()[2]) > 0 for line in ran), proc.stdout
  # SmolLM2's shape (3-row tiles, split halves of 32 lanes), two formats.
  proc = subprocess.run([str(sanitized_build / "kvjax_attention_bench"), "--tokens", "100",
                         "--reps", "1", "--dim", "64", "--rows", "3", "--formats", "q4,turbo3.5"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and not proc.stderr, proc.stdout + proc.stderr
  names = sorted({line.split()[1] for line in proc.stdout.splitlines()})
  assert names == ["q4:", "turbo3.5:"], proc.stdout
  bad = subprocess.run([str(sanitized_build / "kvjax_attention_bench"), "--dim", "48"],
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and "--dim" in bad.stderr, bad.stderr
