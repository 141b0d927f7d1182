// Raw-pointer q8 / q4 kernels: one scalar reference and one variant per
// instruction set, all with the same signatures and the same bits. Nothing
// here knows about XLA or Python; `SelectKernels` (kernels.h) is the one
// dispatch point.
#ifndef KVJAX_FFI_AFFINE_KERNELS_H_
#define KVJAX_FFI_AFFINE_KERNELS_H_

#include <cstdint>

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

// Each variant's q8 and q4 kernels (the dispatch table is in kernels.h).
namespace scalar { extern const FormatKernels kQ8Kernels, kQ4Kernels; }
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 { extern const FormatKernels kQ8Kernels, kQ4Kernels; }
namespace avx512 { extern const FormatKernels kQ8Kernels, kQ4Kernels; }
#endif
#if defined(__aarch64__)
namespace neon { extern const FormatKernels kQ8Kernels, kQ4Kernels; }
#endif

}  // namespace kvjax

#endif  // KVJAX_FFI_AFFINE_KERNELS_H_
