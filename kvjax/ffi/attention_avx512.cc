// Decode attention, AVX-512 (F, BW, DQ, VL): 16 lanes. kLut formats look a
// token's codes up in its 16-entry value table with one permute per 16 lanes
// (vpermps), after one variable shift puts each lane's code in the low bits
// of its word (attention_format.h, LutGeometry; PlanBlock, PlanShift); q4's
// codes are masked in place instead, as with AVX2 (UniformMask; 2 operations
// a chunk, as the lookup; the lookup had been measured against shift, mask
// and convert, 3): on Zen 4, one thread, q4 26.8 -> 25.9 ns a token.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>

#include "attention_format.h"
#include "attention_kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), apply_to = function)
#endif

#define KVJAX_ISA_INLINE inline __attribute__((always_inline))

namespace kvjax::avx512 {
namespace {

struct Isa {
  static constexpr int kLanes = 16;
  // Tokens per key tile of `rows` rows: one vector of dots.
  static constexpr int TileTokens(int rows, bool /*lut*/) { return kLanes / rows; }
  static constexpr bool kMaskedCodes = true;  // q4: mask and convert, 2 ops as the lookup
  static constexpr bool kMaskedBytes = true;  // q8 keys: KeyPass::MaskBytes
  static constexpr bool kSymmetricLookup = false;  // one permute reads 16 entries
  // Value chunks per tile: 4 rows x 4 chunks of accumulators fit its 32 registers.
  static constexpr int kValueChunks = 4;
  using V = __m512;
  using Mask = __mmask16;

  // Asm statements: GCC deletes loops of __builtin_prefetch alone. Near:
  // into L1; far: into L2 (see AheadRows).
  static void PrefetchNear(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p))); }
  static void PrefetchFar(const void* p) { asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p))); }
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V Zero() { return _mm512_setzero_ps(); }
  static V Set1(float x) { return _mm512_set1_ps(x); }
  static V Add(V a, V b) { return _mm512_add_ps(a, b); }
  static V Sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V Div(V a, V b) { return _mm512_div_ps(a, b); }
  static V Max(V a, V b) { return _mm512_max_ps(a, b); }
  static V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V Select(Mask m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
  static V Fnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V Round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V Ldexp(V p, V n) { return _mm512_scalef_ps(p, n); }
  static Mask Less(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static V Abs(V x) { return _mm512_abs_ps(x); }
  static V CopySign(V magnitude, V sign) {
    const __m512i bit = _mm512_and_si512(_mm512_castps_si512(sign), _mm512_set1_epi32(INT32_MIN));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(magnitude), bit));
  }
  static Mask RowMask(bool on) { return static_cast<Mask>(on ? 0xFFFF : 0); }

  // Lanes j with vb <= t + j < ve.
  static Mask SpanMask(int t, int vb, int ve) {
    int lo = vb - t, hi = ve - t;
    lo = lo < 0 ? 0 : lo > 16 ? 16 : lo;
    hi = hi < 0 ? 0 : hi > 16 ? 16 : hi;
    const uint32_t bits = ((1u << hi) - 1) & ~((1u << lo) - 1);
    return static_cast<Mask>(bits);
  }
  // acc, plus the lanes of m where x is NaN or +Inf (not less than +Inf).
  static Mask FlagNanOrPosInf(V x, Mask m, Mask acc) {
    return acc | _mm512_mask_cmp_ps_mask(m, x, Set1(__builtin_inff()), _CMP_NLT_UQ);
  }
  static bool AnyLane(Mask m) { return m != 0; }
  static V LoadPartial(const float* p, int n) {
    if (n >= 16) return _mm512_loadu_ps(p);
    return _mm512_maskz_loadu_ps(static_cast<Mask>((1u << n) - 1), p);
  }

  static float ReduceAdd(V v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  }
  static float ReduceMax(V v) {
    const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 q = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_max_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_max_ss(q, _mm_movehdup_ps(q)));
  }
  // Lane i of the result: the sum of the lanes of x[i].
  static KVJAX_ISA_INLINE V ReduceTile(V* x) {
    V a[8], b[4];
    for (int i = 0; i < 8; ++i) {
      a[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]),
                           _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
    }
    for (int i = 0; i < 4; ++i) {
      const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
      const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]));
      b[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    const V u = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88), _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
    const V w = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88), _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u, w, 0x88), _mm512_shuffle_f32x4(u, w, 0xDD));
  }

  static V LoadF32(const uint8_t* row, int c) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + 16 * c);
  }
  static V LoadBF16(const uint8_t* row, int c) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * c));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // Lane j: bfloat16 number `which` (0 or 1) of the pair at p + 2 j.
  static V LoadBF16OfPairs(const uint16_t* p, int which) {
    const __m512i w = _mm512_loadu_si512(p);
    return _mm512_castsi512_ps(which == 0 ? _mm512_slli_epi32(w, 16)
                                          : _mm512_and_si512(w, _mm512_set1_epi32(-65536)));
  }
  static V LoadF16(const uint8_t* row, int c) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * c)));
  }
  static V LoadU8(const uint8_t* row, int c) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * c));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
  }

  // kLut lanes (attention_format.h, LutGeometry): 16 words per chunk.
  using Words = __m512i;
  struct LutBlock {
    int32_t byte_offset;  // of the block's first word in the code row
    int32_t words;        // distinct words (16, or fewer repeated)
    bool three_bit;
    __m512i spread;       // lane l reads word spread[l] of the block
    // 3-bit words in whole 128-bit lanes of 4 (words a multiple of 4): the
    // block's 3 * words bytes in one masked load, then dwords `gather` put
    // each lane's 12 bytes in place for one byte shuffle.
    bool whole_lanes;
    __mmask64 byte_mask;
    __m512i gather;
  };
  static void PlanBlock(const Segment& seg, int b, int64_t /*row_bytes*/, LutBlock* block) {
    const LutGeometry g = LutGeometryOf(seg, 16);
    alignas(64) int32_t spread[16];
    for (int l = 0; l < 16; ++l) spread[l] = l % g.chunk_words;
    block->words = g.chunk_words;
    block->three_bit = seg.bits == 3;
    block->byte_offset = seg.code_offset + 16 * b * (seg.bits == 3 ? 3 : 4);
    block->spread = _mm512_load_si512(spread);
    alignas(64) int32_t gather[16];
    for (int l = 0; l < 16; ++l) {
      const int first = spread[l - l % 4];  // the first group of l's 128-bit lane
      gather[l] = 3 * first / 4 + (l % 4 < 3 ? l % 4 : 2);
    }
    block->whole_lanes = seg.bits == 3 && g.chunk_words % 4 == 0;
    block->byte_mask = block->whole_lanes ? ~0ull >> (64 - 3 * g.chunk_words) : 0;
    block->gather = _mm512_load_si512(gather);
  }
  static Words PlanShift(const Segment& seg, int it) {
    alignas(64) int32_t shift[16];
    int codes[16];
    LutLaneCodes(seg, 16, it, codes);
    for (int l = 0; l < 16; ++l) shift[l] = codes[l] * seg.bits;
    return _mm512_load_si512(shift);
  }
  enum { kFullWords, kRepeatedWords, kThreeBitWords };
  template <int kMode>
  static KVJAX_ISA_INLINE Words LutWords(const uint8_t* row, const LutBlock& p) {
    const uint8_t* src = row + p.byte_offset;
    if (kMode == kFullWords) return _mm512_loadu_si512(src);
    if (kMode == kRepeatedWords) {  // lane l: word l % words, by broadcast loads
      switch (p.words) {
        case 8: return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
        case 4: return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
        case 2: return _mm512_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
        default: {
          int32_t word;
          std::memcpy(&word, src, sizeof word);
          return _mm512_set1_epi32(word);
        }
      }
    }
    const __m512i group_bytes = _mm512_broadcast_i32x4(_mm_setr_epi8(
        0, 1, 2, -128, 3, 4, 5, -128, 6, 7, 8, -128, 9, 10, 11, -128));
    if (p.whole_lanes) {
      const __m512i raw = _mm512_maskz_loadu_epi8(p.byte_mask, src);
      return _mm512_shuffle_epi8(_mm512_permutexvar_epi32(p.gather, raw), group_bytes);
    }
    // Groups of 3 bytes, 4 per 128-bit lane, then each into a dword.
    const int bytes = 3 * p.words;
    __m128i part[4];
    for (int q = 0; q < 4; ++q) {
      const int n = bytes - 12 * q < 0 ? 0 : bytes - 12 * q < 12 ? bytes - 12 * q : 12;
      part[q] = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << n) - 1), src + 12 * q);
    }
    const __m512i v = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_inserti128_si256(_mm256_castsi128_si256(part[0]), part[1], 1)),
        _mm256_inserti128_si256(_mm256_castsi128_si256(part[2]), part[3], 1), 1);
    const __m512i groups = _mm512_shuffle_epi8(v, group_bytes);
    return p.words == 16 ? groups : _mm512_permutexvar_epi32(p.spread, groups);
  }
  using Table = V;  // the 16 entries
  static V LoadTable(const float* entries) { return _mm512_loadu_ps(entries); }
  static V ScaleTable(V table, V factor) { return _mm512_mul_ps(table, factor); }
  static KVJAX_ISA_INLINE V LutLookup(Words words, Words shift, Table table) {
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(words, shift), table);
  }
  static Words LoadWords(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static Words SetWords(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  // A q4 code in place: c 2^s, exact (mask and convert, 2 ops).
  static KVJAX_ISA_INLINE V LutMaskedCodes(Words words, Words mask) {
    return _mm512_cvtepi32_ps(_mm512_and_si512(words, mask));
  }
  // A word's top q4 code: the shift alone isolates it (2 ops).
  static KVJAX_ISA_INLINE V LutTopCodes(Words words, Words shift) {
    return _mm512_cvtepi32_ps(_mm512_srlv_epi32(words, shift));
  }
  static KVJAX_ISA_INLINE V LutCodes(Words words, Words shift, Table table) {
    return LutLookup(words, shift, table);  // one permute beats mask and convert
  }
  static KVJAX_ISA_INLINE V LutLookup8(Words words, Words shift, Table table) {
    return LutLookup(words, shift, table);
  }
};

#include "attention_simd.h"

}  // namespace

void AttendRun(const RunArgs& a, const Partial& out) { SimdAttendRun(a, out); }

}  // namespace kvjax::avx512

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
