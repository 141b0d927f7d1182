// The scalar reference: rules 1-9 element by element, in plain C++.
#include "affine_format.h"
#include "affine_kernels.h"

namespace kvjax::scalar {
namespace {

template <const AffineFormat& kFmt>
void Encode(const float* x, int64_t num_groups, int64_t group_size,
            uint8_t* codes, float* scale, float* zero) {
  const int64_t width = group_size / kFmt.codes_per_byte;
  for (int64_t g = 0; g < num_groups; ++g) {
    const float* group = x + g * group_size;
    const GroupAffine affine =
        StartGroup(ScalarRange(group, group_size),
                   group_size, kFmt, codes + g * width, scale + g, zero + g);
    if (affine.finite) EncodeTail(group, 0, group_size, affine, kFmt, codes + g * width);
  }
}

template <const AffineFormat& kFmt>
void Decode(const uint8_t* codes, const float* scale, const float* zero,
            int64_t num_groups, int64_t group_size, float* out) {
  const int64_t width = group_size / kFmt.codes_per_byte;
  for (int64_t g = 0; g < num_groups; ++g) {
    DecodeTail(codes + g * width, scale[g], zero[g], 0, group_size, kFmt,
               out + g * group_size);
  }
}

}  // namespace

const FormatKernels kQ8Kernels{Encode<kQ8>, Decode<kQ8>};
const FormatKernels kQ4Kernels{Encode<kQ4>, Decode<kQ4>};

}  // namespace kvjax::scalar
