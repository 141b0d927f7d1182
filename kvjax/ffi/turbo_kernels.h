// Raw-pointer TurboQuant kernels: one scalar reference and one variant per
// instruction set, all with the same signatures and the same bits (the
// contract is turbo_format.h). `SelectKernels` (kernels.h) picks one.
#ifndef KVJAX_FFI_TURBO_KERNELS_H_
#define KVJAX_FFI_TURBO_KERNELS_H_

#include <cstdint>

#include "turbo_format.h"

namespace kvjax {

// Encodes `n` vectors of `f.head_dim` floats: `f.code_bytes` codes and
// `f.norm_count` bfloat16 norms per vector. Split formats read vector i's
// channels in the order `orders + order_row[i] * head_dim` (`orders` null:
// the channels as they are).
using TurboEncodeFn = void (*)(const TurboLayout& f, const float* x, int64_t n,
                               const int32_t* orders, const int64_t* order_row,
                               uint8_t* codes, uint16_t* norms);
// The inverse: `n * head_dim` floats, channel c of an ordered vector written
// back to channel `order[c]`.
using TurboDecodeFn = void (*)(const TurboLayout& f, const uint8_t* codes,
                               const uint16_t* norms, int64_t n,
                               const int32_t* orders, const int64_t* order_row,
                               float* out);

struct TurboKernels {
  TurboEncodeFn encode;
  TurboDecodeFn decode;
};

namespace scalar { extern const TurboKernels kTurboKernels; }
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 { extern const TurboKernels kTurboKernels; }
namespace avx512 { extern const TurboKernels kTurboKernels; }
#endif
#if defined(__aarch64__)
namespace neon { extern const TurboKernels kTurboKernels; }
#endif

}  // namespace kvjax

#endif  // KVJAX_FFI_TURBO_KERNELS_H_
