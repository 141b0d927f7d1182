// Raw-pointer q8 / q4 kernels: one scalar reference and one variant per
// instruction set, all with the same signatures and the same bits. Nothing
// here knows about XLA or Python; `SelectKernels` is the one dispatch point.
#ifndef KVJAX_FFI_AFFINE_KERNELS_H_
#define KVJAX_FFI_AFFINE_KERNELS_H_

#include <cstdint>
#include <string>
#include <vector>

namespace kvjax {

// Encodes `num_groups` contiguous groups of `group_size` floats: codes
// (`group_size / codes_per_byte` bytes per group), one scale and one zero per
// group. q4 needs an even group_size.
using EncodeFn = void (*)(const float* x, int64_t num_groups,
                          int64_t group_size, uint8_t* codes, float* scale,
                          float* zero);
// The inverse: `num_groups * group_size` floats from codes, scale and zero.
using DecodeFn = void (*)(const uint8_t* codes, const float* scale,
                          const float* zero, int64_t num_groups,
                          int64_t group_size, float* out);

struct FormatKernels {
  EncodeFn encode;
  DecodeFn decode;
};

struct KernelSet {
  const char* isa;
  FormatKernels q8;
  FormatKernels q4;
};

namespace scalar { extern const KernelSet kKernels; }
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 { extern const KernelSet kKernels; }
namespace avx512 { extern const KernelSet kKernels; }
#endif
#if defined(__aarch64__)
namespace neon { extern const KernelSet kKernels; }
#endif

// Variants built into this binary, in order of preference.
std::vector<const KernelSet*> CompiledKernels();

// Whether this CPU can run `isa` (and the OS saves its registers).
bool CpuSupports(const std::string& isa);

// The variant to run: `requested` ("" or "auto" for the best this CPU
// supports; otherwise a name from CompiledKernels). Returns nullptr and sets
// `error` (which names the request as `source`, e.g. "KVJAX_ISA") for an
// unknown name, a variant not built here, or one this CPU cannot run: never
// a silent fallback.
const KernelSet* SelectKernels(const std::string& requested,
                               const std::string& source, std::string* error);

}  // namespace kvjax

#endif  // KVJAX_FFI_AFFINE_KERNELS_H_
