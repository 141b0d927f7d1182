// AVX2 + FMA variant: 8 floats per vector, scalar tail from affine_format.h.
// Functions carry a target attribute instead of the file a -mavx2 flag, so
// no inline function shared with the baseline build is compiled for AVX2.
#include <immintrin.h>

#include "affine_format.h"
#include "affine_kernels.h"

#define KVJAX_AVX2 __attribute__((target("avx2,fma")))

namespace kvjax::avx2 {
namespace {

KVJAX_AVX2 float HorizontalMin(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

KVJAX_AVX2 float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

KVJAX_AVX2 uint32_t HorizontalMaxU32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v),
                            _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

KVJAX_AVX2 GroupRange Range(const float* x, int64_t d) {
  if (d < 8) return RangeTail(x, 0, d, {x[0], x[0], 0});
  const __m256i abs_mask = _mm256_set1_epi32(static_cast<int>(kAbsMask));
  __m256 lo = _mm256_loadu_ps(x), hi = lo;
  __m256i abs_bits = _mm256_and_si256(_mm256_castps_si256(lo), abs_mask);
  int64_t i = 8;
  for (; i + 8 <= d; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    lo = _mm256_min_ps(lo, v);
    hi = _mm256_max_ps(hi, v);
    abs_bits = _mm256_max_epu32(
        abs_bits, _mm256_and_si256(_mm256_castps_si256(v), abs_mask));
  }
  return RangeTail(x, i, d,
                   {HorizontalMin(lo), HorizontalMax(hi),
                    HorizontalMaxU32(abs_bits)});
}

// Codes of 8 elements as int32 lanes: rint((x - zero) * inv) clipped.
KVJAX_AVX2 __m256i QuantizeVector(__m256 x, __m256 zero, __m256 inv,
                                  __m256 levels) {
  __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(x, zero), inv),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm256_min_ps(_mm256_max_ps(q, _mm256_setzero_ps()), levels);
  return _mm256_cvttps_epi32(q);
}

// 32 codes in element order, one byte each.
KVJAX_AVX2 __m256i Quantize32(const float* x, __m256 zero, __m256 inv,
                              __m256 levels) {
  const __m256i a = _mm256_packus_epi32(
      QuantizeVector(_mm256_loadu_ps(x), zero, inv, levels),
      QuantizeVector(_mm256_loadu_ps(x + 8), zero, inv, levels));
  const __m256i b = _mm256_packus_epi32(
      QuantizeVector(_mm256_loadu_ps(x + 16), zero, inv, levels),
      QuantizeVector(_mm256_loadu_ps(x + 24), zero, inv, levels));
  // The packs work per 128-bit lane; put the 4-byte runs back in order.
  return _mm256_permutevar8x32_epi32(_mm256_packus_epi16(a, b),
                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

template <const AffineFormat& kFmt>
KVJAX_AVX2 void EncodeGroup(const float* x, int64_t d, uint8_t* codes,
                            float* scale, float* zero) {
  const GroupAffine g = StartGroup(Range(x, d), d, kFmt, codes, scale, zero);
  if (!g.finite) return;
  const __m256 zero_v = _mm256_set1_ps(g.zero);
  const __m256 inv_v = _mm256_set1_ps(g.inv_scale);
  const __m256 levels_v = _mm256_set1_ps(static_cast<float>(kFmt.levels));
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    const __m256i bytes = Quantize32(x + i, zero_v, inv_v, levels_v);
    if constexpr (kFmt.codes_per_byte == 1) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i), bytes);
    } else {
      // Byte pairs (even, odd) become even | odd << 4.
      const __m256i low = _mm256_and_si256(bytes, _mm256_set1_epi16(0xFF));
      const __m256i high = _mm256_srli_epi16(bytes, 8);
      const __m256i nibbles = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
      const __m256i packed = _mm256_permute4x64_epi64(
          _mm256_packus_epi16(nibbles, nibbles), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i / 2),
                       _mm256_castsi256_si128(packed));
    }
  }
  EncodeTail(x, i, d, g, kFmt, codes);
}

template <const AffineFormat& kFmt>
KVJAX_AVX2 void Encode(const float* x, int64_t num_groups, int64_t group_size,
                       uint8_t* codes, float* scale, float* zero) {
  const int64_t width = group_size / kFmt.codes_per_byte;
  for (int64_t g = 0; g < num_groups; ++g) {
    EncodeGroup<kFmt>(x + g * group_size, group_size, codes + g * width,
                      scale + g, zero + g);
  }
}

// Eight codes (uint8 in the low bytes of `bytes`) to q * scale + zero.
KVJAX_AVX2 void Dequantize8(__m128i bytes, __m256 scale, __m256 zero,
                            float* out) {
  const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_mul_ps(q, scale), zero));
}

template <const AffineFormat& kFmt>
KVJAX_AVX2 void Decode(const uint8_t* codes, const float* scale,
                       const float* zero, int64_t num_groups,
                       int64_t group_size, float* out) {
  const int64_t width = group_size / kFmt.codes_per_byte;
  for (int64_t g = 0; g < num_groups; ++g) {
    const uint8_t* c = codes + g * width;
    float* o = out + g * group_size;
    const __m256 s = _mm256_set1_ps(scale[g]), z = _mm256_set1_ps(zero[g]);
    int64_t i = 0;
    for (; i + 16 <= group_size; i += 16) {
      __m128i bytes;
      if constexpr (kFmt.codes_per_byte == 1) {
        bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + i));
      } else {
        const __m128i packed =
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i / 2));
        const __m128i mask = _mm_set1_epi8(0x0F);
        bytes = _mm_unpacklo_epi8(_mm_and_si128(packed, mask),
                                  _mm_and_si128(_mm_srli_epi16(packed, 4), mask));
      }
      Dequantize8(bytes, s, z, o + i);
      Dequantize8(_mm_srli_si128(bytes, 8), s, z, o + i + 8);
    }
    DecodeTail(c, scale[g], zero[g], i, group_size, kFmt, o);
  }
}

}  // namespace

const FormatKernels kQ8Kernels{Encode<kQ8>, Decode<kQ8>};
const FormatKernels kQ4Kernels{Encode<kQ4>, Decode<kQ4>};

}  // namespace kvjax::avx2
