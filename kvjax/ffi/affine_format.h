// The q8 / q4 numerical contract (docs/formats.md, numerics.md rules 1-9) as
// scalar inline functions shared by every instruction-set variant. The SIMD
// variants vectorize the per-element steps; the per-group steps run here once
// per group, so every variant produces the same bits by construction.
#ifndef KVJAX_FFI_AFFINE_FORMAT_H_
#define KVJAX_FFI_AFFINE_FORMAT_H_

#include <cmath>
#include <cstdint>
#include <climits>
#include <cstring>

#include "float_bits.h"

namespace kvjax {

constexpr uint32_t kCanonicalNanBits = 0x7FC00000u;
constexpr uint32_t kExponentMask = 0x7F800000u;  // all ones: Inf or NaN
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr float kFltMin = 1.17549435e-38f;  // smallest normal float
constexpr float kScaleFloor = 1e-8f;

// One format's constants. `scale_max_bits` is S_MAX (2^119 for q8, 2^123 for
// q4) so that levels * s stays finite.
struct AffineFormat {
  int levels;
  float rcp_levels;  // fl32(1 / levels), a constant: never divide per group
  uint32_t scale_max_bits;
  uint32_t keep_mask;  // rule 3: q * s exact for every code
  uint32_t kept_unit;  // rule 3b: one kept-mantissa unit of s
  int codes_per_byte;
};

inline constexpr AffineFormat kQ8{255, static_cast<float>(1.0 / 255.0),
                                  0x7B000000u, 0xFFFFFF00u, 0x100u, 1};
inline constexpr AffineFormat kQ4{15, static_cast<float>(1.0 / 15.0),
                                  0x7D000000u, 0xFFFFFFF0u, 0x10u, 2};

// What a group's extremes determine: its scale s, zero mn and 1/s.
struct GroupAffine {
  float scale;
  float zero;
  float inv_scale;
  bool finite;
};

// A group's range as the SIMD reductions deliver it: min, max, and the
// largest `bits & 0x7FFFFFFF` (>= 0x7F800000 iff some element is Inf/NaN, so
// min/max never need to propagate NaN).
struct GroupRange {
  float min;
  float max;
  uint32_t max_abs_bits;
};

inline float FlushTiny(float x) {  // rule 1: +-0 and denormals become +0
  return std::fabs(x) < kFltMin ? 0.0f : x;
}

// Rules 1-4 and 9 for one group.
inline GroupAffine AffineFromRange(const GroupRange& range,
                                   const AffineFormat& fmt) {
  if (range.max_abs_bits >= kExponentMask) {
    const float nan = BitsFloat(kCanonicalNanBits);
    return {nan, nan, 0.0f, false};
  }
  const float mn = FlushTiny(range.min);
  const float mx = FlushTiny(range.max);
  float s = (mx - mn) * fmt.rcp_levels;
  const float scale_max = BitsFloat(fmt.scale_max_bits);
  s = s > kScaleFloor ? s : kScaleFloor;  // s is never NaN here
  s = s < scale_max ? s : scale_max;
  s = BitsFloat(FloatBits(s) & fmt.keep_mask);
  // levels * s is exact, so this sum has one rounding, fused or not.
  const float top = static_cast<float>(fmt.levels) * s + mn;
  if (std::isinf(top)) s = BitsFloat(FloatBits(s) - fmt.kept_unit);
  return {s, mn, 1.0f / s, true};
}

// A group's parameters from its range, with its scale and zero written out
// and, for a non-finite group (rule 9), its codes zeroed: the caller encodes
// the elements only when the result is `finite`.
inline GroupAffine StartGroup(const GroupRange& range, int64_t d,
                              const AffineFormat& fmt, uint8_t* codes,
                              float* scale, float* zero) {
  const GroupAffine g = AffineFromRange(range, fmt);
  *scale = g.scale;
  *zero = g.zero;
  if (!g.finite) std::memset(codes, 0, d / fmt.codes_per_byte);
  return g;
}

// Rule 5 for one element, without branches or libm. t = (x - mn) / s is
// >= 0, or above -2^-99 when mn was a flushed denormal, and never NaN in a
// finite group. Adding 2^23 rounds t half to even (the default rounding
// mode; exact integers from 2^23 on), and the sum's bits minus 2^23's are
// then round(t) for t < 2^23 and grow with t beyond: so clipping that
// integer to L gives clip(round(t), 0, L), the reference's code.
inline uint8_t QuantizeElement(float x, const GroupAffine& g,
                               const AffineFormat& fmt) {
  const float t = (x - g.zero) * g.inv_scale;
  const int32_t q = static_cast<int32_t>(FloatBits(t + 8388608.0f) -
                                         FloatBits(8388608.0f));
  return static_cast<uint8_t>(q < fmt.levels ? q : fmt.levels);
}

// Rule 8: q * s is exact (rule 3), so fused and unfused agree.
inline float DequantizeElement(uint8_t q, float scale, float zero) {
  return static_cast<float>(q) * scale + zero;
}

// Rules 5-7 for a finite group, element by element from index `begin`: the
// reference, and the tail of the SIMD variants.
inline void EncodeTail(const float* x, int64_t begin, int64_t d,
                       const GroupAffine& g, const AffineFormat& fmt,
                       uint8_t* codes) {
  if (fmt.codes_per_byte == 1) {
    for (int64_t i = begin; i < d; ++i) codes[i] = QuantizeElement(x[i], g, fmt);
    return;
  }
  for (int64_t j = begin / 2; j < d / 2; ++j) {  // byte j: elements 2j, 2j+1
    codes[j] = static_cast<uint8_t>(QuantizeElement(x[2 * j], g, fmt) |
                                    (QuantizeElement(x[2 * j + 1], g, fmt) << 4));
  }
}

inline void DecodeTail(const uint8_t* codes, float scale, float zero,
                       int64_t begin, int64_t d, const AffineFormat& fmt,
                       float* out) {
  if (fmt.codes_per_byte == 1) {
    for (int64_t i = begin; i < d; ++i)
      out[i] = DequantizeElement(codes[i], scale, zero);
    return;
  }
  for (int64_t j = begin / 2; j < d / 2; ++j) {
    out[2 * j] = DequantizeElement(codes[j] & 0xF, scale, zero);
    out[2 * j + 1] = DequantizeElement(codes[j] >> 4, scale, zero);
  }
}

// An int32 key ordered like the float it encodes (-0 < +0), and back: the
// scalar reference reduces keys, which compilers vectorize, where float
// min/max (with their NaN rules) stay scalar without fast-math.
inline int32_t OrderedKey(uint32_t bits) {
  return static_cast<int32_t>(bits ^ ((0u - (bits >> 31)) & kAbsMask));
}

inline float KeyFloat(int32_t key) {
  const uint32_t bits = static_cast<uint32_t>(key);
  return BitsFloat(bits ^ ((0u - (bits >> 31)) & kAbsMask));
}

// The range of a whole group (non-finite values included in any order:
// max_abs_bits flags them).
inline GroupRange ScalarRange(const float* x, int64_t d) {
  int32_t lo = INT32_MAX, hi = INT32_MIN;
  uint32_t max_abs_bits = 0;
  for (int64_t i = 0; i < d; ++i) {
    const uint32_t bits = FloatBits(x[i]);
    const int32_t key = OrderedKey(bits);
    lo = key < lo ? key : lo;
    hi = key > hi ? key : hi;
    const uint32_t abs_bits = bits & kAbsMask;
    max_abs_bits = abs_bits > max_abs_bits ? abs_bits : max_abs_bits;
  }
  return {KeyFloat(lo), KeyFloat(hi), max_abs_bits};
}

inline GroupRange RangeTail(const float* x, int64_t begin, int64_t d,
                            GroupRange r) {
  for (int64_t i = begin; i < d; ++i) {
    // NaN ordering does not matter: max_abs_bits flags non-finite groups.
    r.min = x[i] < r.min ? x[i] : r.min;
    r.max = x[i] > r.max ? x[i] : r.max;
    const uint32_t abs_bits = FloatBits(x[i]) & kAbsMask;
    if (abs_bits > r.max_abs_bits) r.max_abs_bits = abs_bits;
  }
  return r;
}

}  // namespace kvjax

#endif  // KVJAX_FFI_AFFINE_FORMAT_H_
