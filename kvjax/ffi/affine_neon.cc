// NEON variant (AArch64): 4 floats per vector, scalar tail from
// affine_format.h. NEON is baseline on AArch64, so no target attribute.
#include <arm_neon.h>

#include "affine_format.h"
#include "affine_kernels.h"

namespace kvjax::neon {
namespace {

GroupRange Range(const float* x, int64_t d) {
  if (d < 4) return RangeTail(x, 0, d, {x[0], x[0], 0});
  const uint32x4_t abs_mask = vdupq_n_u32(kAbsMask);
  float32x4_t lo = vld1q_f32(x), hi = lo;
  uint32x4_t abs_bits = vandq_u32(vreinterpretq_u32_f32(lo), abs_mask);
  int64_t i = 4;
  for (; i + 4 <= d; i += 4) {
    const float32x4_t v = vld1q_f32(x + i);
    lo = vminq_f32(lo, v);
    hi = vmaxq_f32(hi, v);
    abs_bits = vmaxq_u32(abs_bits, vandq_u32(vreinterpretq_u32_f32(v), abs_mask));
  }
  return RangeTail(x, i, d, {vminvq_f32(lo), vmaxvq_f32(hi), vmaxvq_u32(abs_bits)});
}

// Codes of 4 elements: rint_half_even((x - zero) * inv) clipped, as uint16.
uint16x4_t QuantizeVector(const float* x, float32x4_t zero, float32x4_t inv,
                          float32x4_t levels) {
  float32x4_t q = vrndnq_f32(vmulq_f32(vsubq_f32(vld1q_f32(x), zero), inv));
  q = vminq_f32(vmaxq_f32(q, vdupq_n_f32(0.0f)), levels);
  return vmovn_u32(vcvtq_u32_f32(q));
}

// 16 codes in element order, one byte each.
uint8x16_t Quantize16(const float* x, float32x4_t zero, float32x4_t inv,
                      float32x4_t levels) {
  const uint16x8_t a = vcombine_u16(QuantizeVector(x, zero, inv, levels),
                                    QuantizeVector(x + 4, zero, inv, levels));
  const uint16x8_t b = vcombine_u16(QuantizeVector(x + 8, zero, inv, levels),
                                    QuantizeVector(x + 12, zero, inv, levels));
  return vcombine_u8(vmovn_u16(a), vmovn_u16(b));
}

template <const AffineFormat& kFmt>
void EncodeGroup(const float* x, int64_t d, uint8_t* codes, float* scale,
                 float* zero) {
  const GroupAffine g = StartGroup(Range(x, d), d, kFmt, codes, scale, zero);
  if (!g.finite) return;
  const float32x4_t zero_v = vdupq_n_f32(g.zero);
  const float32x4_t inv_v = vdupq_n_f32(g.inv_scale);
  const float32x4_t levels_v = vdupq_n_f32(static_cast<float>(kFmt.levels));
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const uint8x16_t bytes = Quantize16(x + i, zero_v, inv_v, levels_v);
    if constexpr (kFmt.codes_per_byte == 1) {
      vst1q_u8(codes + i, bytes);
    } else {
      // Byte pairs (even, odd) become even | odd << 4.
      const uint16x8_t pairs = vreinterpretq_u16_u8(bytes);
      const uint16x8_t nibbles = vorrq_u16(vandq_u16(pairs, vdupq_n_u16(0xFF)),
                                           vshlq_n_u16(vshrq_n_u16(pairs, 8), 4));
      vst1_u8(codes + i / 2, vmovn_u16(nibbles));
    }
  }
  EncodeTail(x, i, d, g, kFmt, codes);
}

template <const AffineFormat& kFmt>
void Encode(const float* x, int64_t num_groups, int64_t group_size,
            uint8_t* codes, float* scale, float* zero) {
  const int64_t width = group_size / kFmt.codes_per_byte;
  for (int64_t g = 0; g < num_groups; ++g) {
    EncodeGroup<kFmt>(x + g * group_size, group_size, codes + g * width,
                      scale + g, zero + g);
  }
}

// Eight codes to q * scale + zero; mul then add, as -ffp-contract=off keeps.
void Dequantize8(uint8x8_t bytes, float32x4_t scale, float32x4_t zero,
                 float* out) {
  const uint16x8_t wide = vmovl_u8(bytes);
  const float32x4_t lo = vcvtq_f32_u32(vmovl_u16(vget_low_u16(wide)));
  const float32x4_t hi = vcvtq_f32_u32(vmovl_u16(vget_high_u16(wide)));
  vst1q_f32(out, vaddq_f32(vmulq_f32(lo, scale), zero));
  vst1q_f32(out + 4, vaddq_f32(vmulq_f32(hi, scale), zero));
}

template <const AffineFormat& kFmt>
void Decode(const uint8_t* codes, const float* scale, const float* zero,
            int64_t num_groups, int64_t group_size, float* out) {
  const int64_t width = group_size / kFmt.codes_per_byte;
  for (int64_t g = 0; g < num_groups; ++g) {
    const uint8_t* c = codes + g * width;
    float* o = out + g * group_size;
    const float32x4_t s = vdupq_n_f32(scale[g]), z = vdupq_n_f32(zero[g]);
    int64_t i = 0;
    for (; i + 16 <= group_size; i += 16) {
      uint8x8_t first, second;
      if constexpr (kFmt.codes_per_byte == 1) {
        first = vld1_u8(c + i);
        second = vld1_u8(c + i + 8);
      } else {
        const uint8x8_t packed = vld1_u8(c + i / 2);
        const uint8x8x2_t codes16 =
            vzip_u8(vand_u8(packed, vdup_n_u8(0x0F)), vshr_n_u8(packed, 4));
        first = codes16.val[0];
        second = codes16.val[1];
      }
      Dequantize8(first, s, z, o + i);
      Dequantize8(second, s, z, o + i + 8);
    }
    DecodeTail(c, scale[g], zero[g], i, group_size, kFmt, o);
  }
}

}  // namespace

const FormatKernels kQ8Kernels{Encode<kQ8>, Decode<kQ8>};
const FormatKernels kQ4Kernels{Encode<kQ4>, Decode<kQ4>};

}  // namespace kvjax::neon
