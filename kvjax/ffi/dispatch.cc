// The one runtime dispatch point: CPU detection and KVJAX_ISA.
#include <string>
#include <vector>

#include "kernels.h"

namespace kvjax {

std::vector<const KernelSet*> CompiledKernels() {
  // Built on first use: the variants' tables live in their own files.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(KVJAX_NO_AVX512_ATTENTION)
  const AttendRunFn avx512_attend = nullptr;  // a test build that left it out (CMakeLists.txt)
#else
  const AttendRunFn avx512_attend = avx512::AttendRun;
#endif
  static const KernelSet avx512_set{"avx512", avx512::kQ8Kernels, avx512::kQ4Kernels, avx512::kTurboKernels, avx512_attend};
  static const KernelSet avx2_set{"avx2", avx2::kQ8Kernels, avx2::kQ4Kernels, avx2::kTurboKernels, avx2::AttendRun};
#endif
#if defined(__aarch64__)
  static const KernelSet neon_set{"neon", neon::kQ8Kernels, neon::kQ4Kernels, neon::kTurboKernels, neon::AttendRun};
#endif
  static const KernelSet scalar_set{"scalar", scalar::kQ8Kernels, scalar::kQ4Kernels, scalar::kTurboKernels, scalar::AttendRun};
  return {
#if defined(__x86_64__) || defined(_M_X64)
      &avx512_set, &avx2_set,
#endif
#if defined(__aarch64__)
      &neon_set,
#endif
      &scalar_set,
  };
}

bool CpuSupports(const std::string& isa) {
  if (isa == "scalar") return true;
#if defined(__x86_64__) || defined(_M_X64)
  // libgcc's checks include the OS enabling the register state (XCR0).
  __builtin_cpu_init();
  if (isa == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  if (isa == "avx512") {
#if defined(KVJAX_AVX512_VIA_SIMDE)
    return true;  // the AVX-512 source runs on SIMDe's portable intrinsics
#endif
    return __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
#endif
#if defined(__aarch64__)
  if (isa == "neon") return true;  // Advanced SIMD is baseline on AArch64.
#endif
  return false;
}

const KernelSet* SelectKernels(const std::string& requested,
                               const std::string& source, std::string* error) {
  const std::vector<const KernelSet*> compiled = CompiledKernels();
  std::string names;
  for (const KernelSet* k : compiled) {
    if (!names.empty()) names += ", ";
    names += k->isa;
  }
  if (requested.empty() || requested == "auto") {
    for (const KernelSet* k : compiled) {
      if (CpuSupports(k->isa)) return k;
    }
  }
  for (const KernelSet* k : compiled) {
    if (requested != k->isa) continue;
    if (CpuSupports(k->isa)) return k;
    *error = source + "=" + requested +
             ": this CPU does not support it (variants built here: " + names +
             ")";
    return nullptr;
  }
  *error = source + "=" + requested + ": unknown or not built for this " +
           "platform; expected auto or one of: " + names;
  return nullptr;
}

}  // namespace kvjax
