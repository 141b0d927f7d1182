// TurboQuant, AArch64 Advanced SIMD: 4 tokens per tile (turbo_simd.h).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#include "turbo_format.h"
#include "turbo_kernels.h"

namespace kvjax::neon {
namespace {
constexpr int kLanes = 4;
#include "turbo_simd.h"
}  // namespace

const TurboKernels kTurboKernels = {Encode, Decode};

}  // namespace kvjax::neon
