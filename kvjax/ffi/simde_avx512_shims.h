// Test support only (KVJAX_AVX512_VIA_SIMDE): Intel's definitions of the four
// AVX-512F intrinsics that affine_avx512.cc uses and SIMDe 0.7.4 (Debian 12)
// lacks, written element by element. Everything else comes from SIMDe.
#ifndef KVJAX_FFI_SIMDE_AVX512_SHIMS_H_
#define KVJAX_FFI_SIMDE_AVX512_SHIMS_H_

#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvjax::simde_shims {

// vcvttps2dq: truncate; NaN and out-of-range give 0x80000000.
inline __m512i cvttps_epi32(__m512 a) {
  float in[16];
  int32_t out[16];
  std::memcpy(in, &a, sizeof(in));
  for (int i = 0; i < 16; ++i) {
    const bool fits = !std::isnan(in[i]) && in[i] > -2147483904.0f && in[i] < 2147483648.0f;
    out[i] = fits ? static_cast<int32_t>(in[i]) : INT32_MIN;
  }
  __m512i r;
  std::memcpy(&r, out, sizeof(out));
  return r;
}

// vpmovdb: keep the low byte of each 32-bit lane.
inline __m128i cvtepi32_epi8(__m512i a) {
  uint32_t in[16];
  uint8_t out[16];
  std::memcpy(in, &a, sizeof(in));
  for (int i = 0; i < 16; ++i) out[i] = static_cast<uint8_t>(in[i]);
  __m128i r;
  std::memcpy(&r, out, sizeof(out));
  return r;
}

// vpmovzxbd: zero-extend 16 bytes to 32-bit lanes.
inline __m512i cvtepu8_epi32(__m128i a) {
  uint8_t in[16];
  int32_t out[16];
  std::memcpy(in, &a, sizeof(in));
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  __m512i r;
  std::memcpy(&r, out, sizeof(out));
  return r;
}

// vcvtdq2ps: int32 to float, rounded in the current mode.
inline __m512 cvtepi32_ps(__m512i a) {
  int32_t in[16];
  float out[16];
  std::memcpy(in, &a, sizeof(in));
  for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(in[i]);
  __m512 r;
  std::memcpy(&r, out, sizeof(out));
  return r;
}

}  // namespace kvjax::simde_shims

#define _mm512_cvttps_epi32 kvjax::simde_shims::cvttps_epi32
#define _mm512_cvtepi32_epi8 kvjax::simde_shims::cvtepi32_epi8
#define _mm512_cvtepu8_epi32 kvjax::simde_shims::cvtepu8_epi32
#define _mm512_cvtepi32_ps kvjax::simde_shims::cvtepi32_ps

#endif  // KVJAX_FFI_SIMDE_AVX512_SHIMS_H_
