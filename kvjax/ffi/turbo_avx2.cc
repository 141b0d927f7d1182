// TurboQuant, AVX2: 8 tokens per tile (turbo_simd.h).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#include "turbo_format.h"
#include "turbo_kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#endif

namespace kvjax::avx2 {
namespace {
constexpr int kLanes = 8;
#include "turbo_simd.h"
}  // namespace

const TurboKernels kTurboKernels = {Encode, Decode};

}  // namespace kvjax::avx2

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
