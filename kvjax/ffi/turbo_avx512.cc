// TurboQuant, AVX-512F: 16 tokens per tile (turbo_simd.h). The source uses
// no intrinsics, only vector extensions: with -DKVJAX_AVX512_VIA_SIMDE (the
// test build for CPUs without AVX-512) the same 16-lane code is compiled for
// the baseline target, so its bits are checked on any x86-64 CPU.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#include "turbo_format.h"
#include "turbo_kernels.h"

#if !defined(KVJAX_AVX512_VIA_SIMDE)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx2")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2"))), apply_to = function)
#endif
#endif

namespace kvjax::avx512 {
namespace {
constexpr int kLanes = 16;
#include "turbo_simd.h"
}  // namespace

const TurboKernels kTurboKernels = {Encode, Decode};

}  // namespace kvjax::avx512

#if !defined(KVJAX_AVX512_VIA_SIMDE)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
#endif
