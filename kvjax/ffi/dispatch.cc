// The one runtime dispatch point: CPU detection and KVJAX_ISA.
#include <string>
#include <vector>

#include "affine_kernels.h"

namespace kvjax {

std::vector<const KernelSet*> CompiledKernels() {
  return {
#if defined(__x86_64__) || defined(_M_X64)
      &avx512::kKernels, &avx2::kKernels,
#endif
#if defined(__aarch64__)
      &neon::kKernels,
#endif
      &scalar::kKernels,
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
