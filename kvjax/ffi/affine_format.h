// The q8 / q4 numerical contract (docs/formats.md, numerics.md rules 1-9) as
// scalar inline functions shared by every instruction-set variant. The SIMD
// variants vectorize the per-element steps; the per-group steps run here once
// per group, so every variant produces the same bits by construction.
#ifndef KVJAX_FFI_AFFINE_FORMAT_H_
#define KVJAX_FFI_AFFINE_FORMAT_H_

#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvjax {

inline uint32_t FloatBits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

inline float BitsFloat(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

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

// Rule 5 for one element. The reference rounds, then clips; clipping first
// gives the same code (rounding is monotone, 0 and L are integers, and t is
// never NaN in a finite group) and keeps t in [0, 255], where adding and
// subtracting 2^23 rounds half to even in the default rounding mode: no libm
// call, so the scalar reference runs at a useful speed.
inline uint8_t QuantizeElement(float x, const GroupAffine& g,
                               const AffineFormat& fmt) {
  const float levels = static_cast<float>(fmt.levels);
  float t = (x - g.zero) * g.inv_scale;
  t = t > 0.0f ? t : 0.0f;
  t = t < levels ? t : levels;
  return static_cast<uint8_t>((t + 8388608.0f) - 8388608.0f);
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
  for (int64_t i = begin; i < d; i += 2) {
    codes[i / 2] = static_cast<uint8_t>(QuantizeElement(x[i], g, fmt) |
                                        (QuantizeElement(x[i + 1], g, fmt) << 4));
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
  for (int64_t i = begin; i < d; i += 2) {
    const uint8_t byte = codes[i / 2];
    out[i] = DequantizeElement(byte & 0xF, scale, zero);
    out[i + 1] = DequantizeElement(byte >> 4, scale, zero);
  }
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
