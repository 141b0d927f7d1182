// AVX-512F variant: 16 floats per vector, scalar tail from affine_format.h.
// Built with -DKVJAX_AVX512_VIA_SIMDE, the same source runs on SIMDe's
// portable implementations of these intrinsics (four of them from
// simde_avx512_shims.h): that is how the tests check its bits on a CPU
// without AVX-512 (tests/test_ffi_kernels.py).
#include "affine_format.h"
#include "affine_kernels.h"

#if defined(KVJAX_AVX512_VIA_SIMDE)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include "simde_avx512_shims.h"
#define KVJAX_AVX512
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif
#else
#include <immintrin.h>
#define KVJAX_AVX512 __attribute__((target("avx512f,avx2,fma")))
#endif

namespace kvjax::avx512 {
namespace {

// Horizontal reductions from AVX-512F and SSE only (the _mm512_reduce_*
// sequences are not in every intrinsics header).
KVJAX_AVX512 float HorizontalMin(__m512 v) {
  const __m256 half = _mm256_min_ps(
      _mm512_castps512_ps256(v),
      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_min_ss(m, _mm_shuffle_ps(m, m, 1)));
}

KVJAX_AVX512 float HorizontalMax(__m512 v) {
  const __m256 half = _mm256_max_ps(
      _mm512_castps512_ps256(v),
      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

KVJAX_AVX512 uint32_t HorizontalMaxU32(__m512i v) {
  const __m256i half = _mm256_max_epu32(_mm512_castsi512_si256(v),
                                        _mm512_extracti64x4_epi64(v, 1));
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(half),
                            _mm256_extracti128_si256(half, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

KVJAX_AVX512 GroupRange Range(const float* x, int64_t d) {
  if (d < 16) return RangeTail(x, 0, d, {x[0], x[0], 0});
  const __m512i abs_mask = _mm512_set1_epi32(static_cast<int>(kAbsMask));
  __m512 lo = _mm512_loadu_ps(x), hi = lo;
  __m512i abs_bits = _mm512_and_si512(_mm512_castps_si512(lo), abs_mask);
  int64_t i = 16;
  for (; i + 16 <= d; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    lo = _mm512_min_ps(lo, v);
    hi = _mm512_max_ps(hi, v);
    abs_bits = _mm512_max_epu32(
        abs_bits, _mm512_and_si512(_mm512_castps_si512(v), abs_mask));
  }
  return RangeTail(x, i, d,
                   {HorizontalMin(lo), HorizontalMax(hi), HorizontalMaxU32(abs_bits)});
}

// 16 codes in element order, one byte each.
KVJAX_AVX512 __m128i Quantize16(const float* x, __m512 zero, __m512 inv,
                                __m512 levels) {
  __m512 q = _mm512_roundscale_ps(
      _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x), zero), inv),
      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm512_min_ps(_mm512_max_ps(q, _mm512_setzero_ps()), levels);
  return _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(q));
}

template <const AffineFormat& kFmt>
KVJAX_AVX512 void EncodeGroup(const float* x, int64_t d, uint8_t* codes,
                              float* scale, float* zero) {
  const GroupAffine g = StartGroup(Range(x, d), d, kFmt, codes, scale, zero);
  if (!g.finite) return;
  const __m512 zero_v = _mm512_set1_ps(g.zero);
  const __m512 inv_v = _mm512_set1_ps(g.inv_scale);
  const __m512 levels_v = _mm512_set1_ps(static_cast<float>(kFmt.levels));
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const __m128i bytes = Quantize16(x + i, zero_v, inv_v, levels_v);
    if constexpr (kFmt.codes_per_byte == 1) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), bytes);
    } else {
      // Byte pairs (even, odd) become even | odd << 4.
      const __m128i low = _mm_and_si128(bytes, _mm_set1_epi16(0xFF));
      const __m128i high = _mm_srli_epi16(bytes, 8);
      const __m128i nibbles = _mm_or_si128(low, _mm_slli_epi16(high, 4));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i / 2),
                       _mm_packus_epi16(nibbles, nibbles));
    }
  }
  EncodeTail(x, i, d, g, kFmt, codes);
}

template <const AffineFormat& kFmt>
KVJAX_AVX512 void Encode(const float* x, int64_t num_groups,
                         int64_t group_size, uint8_t* codes, float* scale,
                         float* zero) {
  const int64_t width = group_size / kFmt.codes_per_byte;
  for (int64_t g = 0; g < num_groups; ++g) {
    EncodeGroup<kFmt>(x + g * group_size, group_size, codes + g * width,
                      scale + g, zero + g);
  }
}

template <const AffineFormat& kFmt>
KVJAX_AVX512 void Decode(const uint8_t* codes, const float* scale,
                         const float* zero, int64_t num_groups,
                         int64_t group_size, float* out) {
  const int64_t width = group_size / kFmt.codes_per_byte;
  for (int64_t g = 0; g < num_groups; ++g) {
    const uint8_t* c = codes + g * width;
    float* o = out + g * group_size;
    const __m512 s = _mm512_set1_ps(scale[g]), z = _mm512_set1_ps(zero[g]);
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
      const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
      _mm512_storeu_ps(o + i, _mm512_add_ps(_mm512_mul_ps(q, s), z));
    }
    DecodeTail(c, scale[g], zero[g], i, group_size, kFmt, o);
  }
}

}  // namespace

const FormatKernels kQ8Kernels{Encode<kQ8>, Decode<kQ8>};
const FormatKernels kQ4Kernels{Encode<kQ4>, Decode<kQ4>};

}  // namespace kvjax::avx512
