"""Fixtures shared by the test modules: the standalone C++ programs built once
per session with CMake (sanitized natively, and cross-compiled for AArch64
to run under qemu-aarch64). Their tests live in tests/test_ffi_native.py:
pytest-xdist (`--dist=loadscope`) runs a module on one worker, so each
program is built once."""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "kvjax" / "ffi"
REQUIRE_ALL = os.environ.get("KVJAX_REQUIRE_ALL_CHECKS") == "1"
SIMDE_HEADER = pathlib.Path("/usr/include/simde/x86/avx512.h")
CROSS_CXX = "aarch64-linux-gnu-g++"


def missing(what: str):
  """Skips, or fails in CI (KVJAX_REQUIRE_ALL_CHECKS=1), naming the tool."""
  message = f"{what} (Debian: see .ci/run)"
  if REQUIRE_ALL:
    pytest.fail(message)
  pytest.skip(message)


def cpu_has_avx512() -> bool:
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  return cpuinfo.exists() and " avx512f " in cpuinfo.read_text().replace("\n", " ")


def cmake_build(build_dir: pathlib.Path, *defines: str) -> pathlib.Path:
  if not shutil.which("cmake"):
    missing("cmake is not installed")
  generator = ["-G", "Ninja"] if shutil.which("ninja") else []
  for command in (["cmake", "-S", str(SOURCE), "-B", str(build_dir), *generator,
                   "-DKVJAX_BUILD_PYTHON=OFF", *defines],
                  ["cmake", "--build", str(build_dir), "--parallel"]):
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
  return build_dir


@pytest.fixture(scope="session")
def sanitized_build(tmp_path_factory):
  # -O1: the sanitized programs build in a third of -O3's time and still
  # inline the SIMD helpers (CMakeLists.txt builds the attention family at
  # -O0 when sanitized).
  defines = ["-DKVJAX_SANITIZE=ON", "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG"]
  if SIMDE_HEADER.exists():
    defines.append("-DKVJAX_AVX512_VIA_SIMDE=ON")
  if not cpu_has_avx512():
    # Its checker could not run it here; instrumenting it is a third of the build.
    defines.append("-DKVJAX_ATTENTION_AVX512=OFF")
  return cmake_build(tmp_path_factory.mktemp("native"), *defines)


@pytest.fixture(scope="session")
def aarch64_build(tmp_path_factory):
  if not shutil.which(CROSS_CXX):
    missing(f"{CROSS_CXX} is not installed (package g++-aarch64-linux-gnu)")
  if not shutil.which("qemu-aarch64"):
    missing("qemu-aarch64 is not installed (package qemu-user)")
  return cmake_build(tmp_path_factory.mktemp("aarch64"),
                     "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                     f"-DCMAKE_CXX_COMPILER={CROSS_CXX}",
                     "-DCMAKE_EXE_LINKER_FLAGS=-static")


