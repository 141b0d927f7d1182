"""The standalone golden-vector program (kvjax/ffi/golden_tool.cc), built
here with CMake: every variant against the committed golden files and against
the jnp reference on 2^20 random values plus the adversarial groups, built
with -fsanitize=address,undefined; the AVX-512 source also under SIMDe
emulation (for CPUs without AVX-512) and NEON cross-compiled for AArch64 and
run under qemu-aarch64."""

import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

import kvjax
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


def check_variant(command_prefix, tool, isa, random_cases, tmp_path):
  """Golden files byte for byte, then 2^20+ random values bit for bit."""
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
def test_native_variant_sanitized(isa, sanitized_build, random_cases, tmp_path):
  tool = sanitized_build / "kvjax_golden"
  listing = subprocess.run([str(tool), "--list"], capture_output=True, text=True).stdout
  if f"{isa} supported" not in listing:
    pytest.skip(f"this machine does not run {isa} natively ({listing.split()})")
  check_variant([], tool, isa, random_cases, tmp_path)


def test_avx512_source_under_simde(sanitized_build, random_cases, tmp_path):
  """The AVX-512 kernels' source on SIMDe's portable intrinsics: the same
  bits on any x86-64 CPU (hardware AVX-512 runs in the test above when the
  CPU has it)."""
  if not SIMDE_HEADER.exists():
    missing("SIMDe headers are not installed (package libsimde-dev)")
  check_variant([], sanitized_build / "kvjax_golden_simde", "avx512",
                random_cases, tmp_path)


def test_neon_under_qemu(aarch64_build, random_cases, tmp_path):
  tool = aarch64_build / "kvjax_golden"
  listing = subprocess.run(["qemu-aarch64", str(tool), "--list"],
                           capture_output=True, text=True).stdout
  assert "neon supported" in listing, listing
  check_variant(["qemu-aarch64"], tool, "neon", random_cases, tmp_path)


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
      (["--format", "q3", str(groups_file), out], "--format: expected q8 or q4"),
      (["--format", "q4", str(groups_file), out], "q4 needs an even group_size"),
      (["--format", "q8", "--isa", "sse9", str(groups_file), out], "--isa=sse9: unknown"),
      (["--format", "q8", str(bad_magic), out], "not a kvjax groups file"),
      (["--format", "q8", str(truncated), out], "fewer values than the header"),
      (["--format", "q8", str(groups_file)], "usage:"),
  ]:
    proc = subprocess.run([tool, *args], capture_output=True, text=True)
    assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
