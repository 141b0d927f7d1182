// Decode attention, AVX2 + FMA + F16C: 8 lanes. kLut formats spread their
// packed codes as in attention_format.h (LutGeometry, 8 words per chunk) and
// look them up in the 16-entry table with two vpermps and a blend on bit 3,
// or, for a symmetric table, one vpermps and a sign flip (LutSymmetric).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>

#include "attention_format.h"
#include "attention_kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#endif

#define KVJAX_ISA_INLINE inline __attribute__((always_inline))

namespace kvjax::avx2 {
namespace {

struct Isa {
  static constexpr int kLanes = 8;
  // Tokens per key tile of `rows` rows: one vector of dots, but 3 rows
  // (GQA 3, SmolLM2) take 4 tokens (12 accumulators) rather than 2, which
  // left the tile's reduction and bookkeeping a third of the key pass; and 4
  // rows of raw or q8 keys take 3 (12 accumulators, FMA chains with slack:
  // Zen 3 f32 -5.5%, q8 -2.5%), where looked-up keys, short of registers,
  // lose 2-5%.
  static constexpr int TileTokens(int rows, bool lut) {
    return rows == 3 ? 4 : rows == 4 && !lut ? 3 : kLanes / rows;
  }
  // q4 codes below a word's top one are masked in place (c 2^s; LutMaskedCodes),
  // keys and values: no shift, which shares a port with the FMAs (Zen 3).
  static constexpr bool kMaskedCodes = true;
  // q8 keys zero-extended (KeyPass::MaskBytes measured 26.3 -> 29.3 ns a
  // token here, Zen 4: 4 x 3 tiles and their words overflow 16 registers).
  static constexpr bool kMaskedBytes = false;
  // Symmetric 16-entry tables in one permute (LutSymmetric): a permute takes
  // an FMA slot on Zen 3 (1.3 cycles each beside FMAs, measured).
  static constexpr bool kSymmetricLookup = true;
  // Value chunks per tile: with 16 registers, 4 rows x 4 chunks spill accumulators
  // (measured 5-10% slower on Zen 3 than 4 x 2).
  static constexpr int kValueChunks = 2;
  using V = __m256;
  using Mask = __m256;  // all-ones lanes

  // Asm statements: GCC deletes loops of __builtin_prefetch alone. Near:
  // into L1; far: into L2 (see AheadRows).
  static void PrefetchNear(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p))); }
  static void PrefetchFar(const void* p) { asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p))); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V Zero() { return _mm256_setzero_ps(); }
  static V Set1(float x) { return _mm256_set1_ps(x); }
  static V Add(V a, V b) { return _mm256_add_ps(a, b); }
  static V Sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V Div(V a, V b) { return _mm256_div_ps(a, b); }
  static V Max(V a, V b) { return _mm256_max_ps(a, b); }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V Select(Mask m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
  static V Fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V Round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n for integer n in [-126, 127] (Exp's range), NaN p stays NaN.
  static V Ldexp(V p, V n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static Mask Less(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static V Abs(V x) { return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }
  static V CopySign(V magnitude, V sign) {
    return _mm256_or_ps(magnitude, _mm256_and_ps(sign, _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MIN))));
  }
  static Mask RowMask(bool on) { return _mm256_castsi256_ps(_mm256_set1_epi32(on ? -1 : 0)); }

  static Mask SpanMask(int t, int vb, int ve) {
    const __m256i lane = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_epi32(t));
    const __m256i ge = _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(vb - 1));
    const __m256i lt = _mm256_cmpgt_epi32(_mm256_set1_epi32(ve), lane);
    return _mm256_castsi256_ps(_mm256_and_si256(ge, lt));
  }
  // acc, plus the lanes of m where x is NaN or +Inf (not less than +Inf).
  static Mask FlagNanOrPosInf(V x, Mask m, Mask acc) {
    const V bad = _mm256_cmp_ps(x, Set1(__builtin_inff()), _CMP_NLT_UQ);
    return _mm256_or_ps(acc, _mm256_and_ps(bad, m));
  }
  static bool AnyLane(Mask m) { return _mm256_movemask_ps(m) != 0; }
  static V LoadPartial(const float* p, int n) {
    if (n >= 8) return _mm256_loadu_ps(p);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_ps(p, mask);
  }

  static float ReduceAdd(V v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  }
  static float ReduceMax(V v) {
    __m128 q = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_max_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_max_ss(q, _mm_movehdup_ps(q)));
  }
  // Lane i of the result: the sum of the lanes of x[i]. Unpacks and
  // shuffles (one uop each) rather than hadd (2 cycles each on Zen 3).
  static KVJAX_ISA_INLINE V ReduceTile(V* x) {
    V pair[4];
    for (int i = 0; i < 4; ++i) {  // x[2i] lanes 0+2, 1+3 beside x[2i+1]'s, per half
      pair[i] = _mm256_add_ps(_mm256_unpacklo_ps(x[2 * i], x[2 * i + 1]),
                              _mm256_unpackhi_ps(x[2 * i], x[2 * i + 1]));
    }
    V quad[2];
    for (int i = 0; i < 2; ++i) {  // x[4i .. 4i + 3], one sum of half a half each
      quad[i] = _mm256_add_ps(_mm256_shuffle_ps(pair[2 * i], pair[2 * i + 1], 0x44),
                              _mm256_shuffle_ps(pair[2 * i], pair[2 * i + 1], 0xEE));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(quad[0], quad[1], 0x20),
                         _mm256_permute2f128_ps(quad[0], quad[1], 0x31));
  }

  static V LoadF32(const uint8_t* row, int c) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + 8 * c);
  }
  static V LoadBF16(const uint8_t* row, int c) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * c));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // Lane j: bfloat16 number `which` (0 or 1) of the pair at p + 2 j.
  static V LoadBF16OfPairs(const uint16_t* p, int which) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm256_castsi256_ps(which == 0 ? _mm256_slli_epi32(w, 16)
                                          : _mm256_and_si256(w, _mm256_set1_epi32(-65536)));
  }
  static V LoadF16(const uint8_t* row, int c) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * c)));
  }
  static V LoadU8(const uint8_t* row, int c) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * c));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  }

  // kLut lanes (attention_format.h, LutGeometry): 8 words per chunk.
  using Words = __m256i;
  struct LutBlock {
    int32_t byte_offset;
    int32_t words;
    bool three_bit;
    // A whole 3-bit block (8 groups, 24 bytes) is one 32-byte load from
    // load_offset, inside the row; else load_offset is -1.
    int32_t load_offset;
    // Dwords to lanes: a whole block's load to groups 0-3 and 4-7 in the two
    // 128-bit lanes; fewer words, lane l from word l % words.
    __m256i permute;
  };
  static void PlanBlock(const Segment& seg, int b, int64_t row_bytes, LutBlock* block) {
    const LutGeometry g = LutGeometryOf(seg, 8);
    block->words = g.chunk_words;
    block->three_bit = seg.bits == 3;
    block->byte_offset = seg.code_offset + 8 * b * (seg.bits == 3 ? 3 : 4);
    // From the block's start where 32 bytes fit in the row, else ending at
    // its end (a row shorter than 32 bytes keeps the exact loads).
    const int32_t begin = block->byte_offset, end = begin + 24;
    block->load_offset = !block->three_bit || g.chunk_words != 8 ? -1
                         : begin + 32 <= row_bytes ? begin
                         : end >= 32 ? end - 32 : -1;
    const int32_t skip = block->load_offset < 0 ? 0 : (begin - block->load_offset) / 4;
    alignas(32) int32_t permute[8];  // whole block: lanes 3 and 7 repeat 2 and 6 (unused)
    for (int l = 0; l < 8; ++l) {
      permute[l] = block->load_offset >= 0 ? skip + 3 * (l / 4) + (l % 4 < 2 ? l % 4 : 2)
                                           : l % g.chunk_words;
    }
    block->permute = _mm256_load_si256(reinterpret_cast<const __m256i*>(permute));
  }
  static Words PlanShift(const Segment& seg, int it) {
    alignas(32) int32_t shift[8];
    int codes[8];
    LutLaneCodes(seg, 8, it, codes);
    for (int l = 0; l < 8; ++l) shift[l] = codes[l] * seg.bits;
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(shift));
  }
  enum { kFullWords, kRepeatedWords, kThreeBitWords };
  template <int kMode>
  static KVJAX_ISA_INLINE Words LutWords(const uint8_t* row, const LutBlock& p) {
    const uint8_t* src = row + p.byte_offset;
    if (kMode == kFullWords) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    if (kMode == kRepeatedWords) {  // lane l: word l % words, by broadcast loads
      switch (p.words) {
        case 4: return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
        case 2: return _mm256_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
        default: {
          int32_t word;
          std::memcpy(&word, src, sizeof word);
          return _mm256_set1_epi32(word);
        }
      }
    }
    // 3-byte groups, 4 per 128-bit lane (12 bytes: 3 dwords, loaded exactly),
    // each into a dword. 2 groups (6 bytes) are copied byte-wise: a dword
    // load could read past the end of the last row.
    __m256i v;
    if (p.load_offset >= 0) {  // a whole block: dwords 0-2 and 3-5 to the two lanes
      v = _mm256_permutevar8x32_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + p.load_offset)), p.permute);
    } else if (p.words >= 4) {  // in registers (a store and a wider reload would stall)
      const __m128i three = _mm_setr_epi32(-1, -1, -1, 0);
      const __m128i low = _mm_maskload_epi32(reinterpret_cast<const int*>(src), three);
      const __m128i high = p.words == 8
          ? _mm_maskload_epi32(reinterpret_cast<const int*>(src + 12), three) : _mm_setzero_si128();
      v = _mm256_set_m128i(high, low);
    } else {
      alignas(32) uint8_t bytes[32] = {};
      std::memcpy(bytes, src, 3 * p.words);
      v = _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes));
    }
    const __m128i pattern = _mm_setr_epi8(0, 1, 2, -128, 3, 4, 5, -128, 6, 7, 8, -128, 9, 10, 11, -128);
    const __m256i groups = _mm256_shuffle_epi8(v, _mm256_broadcastsi128_si256(pattern));
    return p.words == 8 ? groups : _mm256_permutevar8x32_epi32(groups, p.permute);
  }
  // A 16-entry table is two permutes and a blend on index bit 3; tables of
  // up to 8 entries repeat, so one permute (of the low 3 bits) reads them.
  struct Table {
    V low, high;  // entries 0-7 and 8-15
  };
  static Table LoadTable(const float* entries) {
    return {_mm256_loadu_ps(entries), _mm256_loadu_ps(entries + 8)};
  }
  static Table ScaleTable(const Table& table, V factor) {
    return {_mm256_mul_ps(table.low, factor), _mm256_mul_ps(table.high, factor)};
  }
  static KVJAX_ISA_INLINE V LutLookup(Words words, Words shift, const Table& table) {
    const __m256i index = _mm256_srlv_epi32(words, shift);
    const V low = _mm256_permutevar8x32_ps(table.low, index);
    const V high = _mm256_permutevar8x32_ps(table.high, index);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
  }
  // A symmetric table (entry 15 - c = -entry c) in one permute of entries
  // 0-7, 4 operations a chunk. Words are folded as they load
  // (SymmetricWords: a code c >= 8 keeps bit 3 and holds 15 - c in bits
  // 0-2), so a chunk's shifted word indexes entries 0-7 directly, and its
  // bits 0-3 shifted to 28-31 both flip the sign (bit 3) and undo a key
  // xored into the table (entry k ^ k << 28). Unfolded, the index needed a
  // flip and the sign a mask of its own: 7 operations (turbo4 7% slower).
  static KVJAX_ISA_INLINE Words SymmetricWords(Words w) {
    const __m256i upper = _mm256_and_si256(_mm256_srli_epi32(w, 3), _mm256_set1_epi32(0x11111111));
    return _mm256_xor_si256(w, _mm256_sub_epi32(_mm256_slli_epi32(upper, 3), upper));  // 7 x bit 3
  }
  static KVJAX_ISA_INLINE V LutSymmetric(Words folded, Words shift, const Table& table) {
    const __m256i entry_keys = _mm256_setr_epi32(0, 1 << 28, 2 << 28, 3 << 28, 4 << 28, 5 << 28,
                                                 6 << 28, 7 << 28);
    const V keyed = _mm256_xor_ps(table.low, _mm256_castsi256_ps(entry_keys));
    const __m256i index = _mm256_srlv_epi32(folded, shift);
    return _mm256_xor_ps(_mm256_permutevar8x32_ps(keyed, index),
                         _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
  }
  // 3-bit tables have 8 entries: one permute reads them.
  static KVJAX_ISA_INLINE V LutLookup8(Words words, Words shift, const Table& table) {
    return _mm256_permutevar8x32_ps(table.low, _mm256_srlv_epi32(words, shift));
  }
  static Words SetWords(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  // A q4 code in place: c 2^s, exact (mask and convert, 2 ops).
  static KVJAX_ISA_INLINE V LutMaskedCodes(Words words, Words mask) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(words, mask));
  }
  // A word's top q4 code: the shift alone isolates it (2 ops).
  static KVJAX_ISA_INLINE V LutTopCodes(Words words, Words shift) {
    return _mm256_cvtepi32_ps(_mm256_srlv_epi32(words, shift));
  }
  // q4's table is 0..15: mask and convert (3 ops) beats the 16-entry lookup.
  static KVJAX_ISA_INLINE V LutCodes(Words words, Words shift, const Table&) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(words, shift),
                                               _mm256_set1_epi32(15)));
  }
};

#include "attention_simd.h"

}  // namespace

void AttendRun(const RunArgs& a, const Partial& out) { SimdAttendRun(a, out); }

}  // namespace kvjax::avx2

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#elif defined(__clang__)
#pragma clang attribute pop
#endif
