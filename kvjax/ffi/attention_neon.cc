// Decode attention, AArch64 Advanced SIMD: 4 lanes. kLut formats gather each
// chunk's words with one byte table lookup (vqtbl1q: the 3-byte groups of
// 3-bit codes into dwords, fewer words repeated) and look the codes up in the
// 16-entry value table with vqtbl4q, bytes 4i .. 4i+3 of entry i.
#include <arm_neon.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>

#include "attention_format.h"
#include "attention_kernels.h"

namespace kvjax::neon {
namespace {

struct Isa {
  static constexpr int kLanes = 4;
  // Tokens per key tile of `rows` rows: one vector of dots.
  static constexpr int TileTokens(int rows, bool /*lut*/) { return kLanes / rows; }
  static constexpr bool kMaskedCodes = false;
  static constexpr bool kMaskedBytes = false;
  static constexpr bool kSymmetricLookup = false;  // one tbl reads 16 entries
  // Value chunks per tile: 4 rows x 4 chunks of accumulators fit its 32 registers.
  static constexpr int kValueChunks = 4;
  using V = float32x4_t;
  using Mask = uint32x4_t;

  // Asm statements: GCC deletes loops of __builtin_prefetch alone. Near:
  // into L1; far: into L2 (see AheadRows).
  static void PrefetchNear(const void* p) { asm volatile("prfm pldl1keep, %0" : : "Q"(*static_cast<const char*>(p))); }
  static void PrefetchFar(const void* p) { asm volatile("prfm pldl2keep, %0" : : "Q"(*static_cast<const char*>(p))); }
  static V Load(const float* p) { return vld1q_f32(p); }
  static void Store(float* p, V v) { vst1q_f32(p, v); }
  static V Zero() { return vdupq_n_f32(0.0f); }
  static V Set1(float x) { return vdupq_n_f32(x); }
  static V Add(V a, V b) { return vaddq_f32(a, b); }
  static V Sub(V a, V b) { return vsubq_f32(a, b); }
  static V Mul(V a, V b) { return vmulq_f32(a, b); }
  static V Div(V a, V b) { return vdivq_f32(a, b); }
  static V Max(V a, V b) { return vmaxq_f32(a, b); }
  static V Fma(V a, V b, V c) { return vfmaq_f32(c, a, b); }
  static V Select(Mask m, V a, V b) { return vbslq_f32(m, a, b); }
  static V Fnma(V a, V b, V c) { return vfmsq_f32(c, a, b); }
  static V Round(V x) { return vrndnq_f32(x); }
  static V Ldexp(V p, V n) {
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
  }
  static Mask Less(V a, V b) { return vcltq_f32(a, b); }
  static V Abs(V x) { return vabsq_f32(x); }
  static V CopySign(V magnitude, V sign) {
    const uint32x4_t bit = vandq_u32(vreinterpretq_u32_f32(sign), vdupq_n_u32(0x80000000u));
    return vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(magnitude), bit));
  }
  static Mask RowMask(bool on) { return vdupq_n_u32(on ? 0xFFFFFFFFu : 0u); }

  static Mask SpanMask(int t, int vb, int ve) {
    const int32_t iota[4] = {0, 1, 2, 3};
    const int32x4_t lane = vaddq_s32(vld1q_s32(iota), vdupq_n_s32(t));
    return vandq_u32(vcgeq_s32(lane, vdupq_n_s32(vb)), vcltq_s32(lane, vdupq_n_s32(ve)));
  }
  // acc, plus the lanes of m where x is NaN or +Inf (not less than +Inf).
  static Mask FlagNanOrPosInf(V x, Mask m, Mask acc) {
    const uint32x4_t bad = vmvnq_u32(vcltq_f32(x, vdupq_n_f32(__builtin_inff())));
    return vorrq_u32(acc, vandq_u32(bad, m));
  }
  static bool AnyLane(Mask m) { return vmaxvq_u32(m) != 0; }
  static V LoadPartial(const float* p, int n) {
    if (n >= 4) return vld1q_f32(p);
    float tmp[4] = {0, 0, 0, 0};
    for (int i = 0; i < n; ++i) tmp[i] = p[i];
    return vld1q_f32(tmp);
  }
  static float ReduceAdd(V v) { return vaddvq_f32(v); }
  static float ReduceMax(V v) { return vmaxvq_f32(v); }
  static V ReduceTile(V* x) {
    return vpaddq_f32(vpaddq_f32(x[0], x[1]), vpaddq_f32(x[2], x[3]));
  }

  static V LoadF32(const uint8_t* row, int c) {
    return vld1q_f32(reinterpret_cast<const float*>(row) + 4 * c);
  }
  static V LoadBF16(const uint8_t* row, int c) {
    const uint16x4_t h = vld1_u16(reinterpret_cast<const uint16_t*>(row) + 4 * c);
    return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
  }
  // Lane j: bfloat16 number `which` (0 or 1) of the pair at p + 2 j.
  static V LoadBF16OfPairs(const uint16_t* p, int which) {
    const uint32x4_t w = vreinterpretq_u32_u8(vld1q_u8(reinterpret_cast<const uint8_t*>(p)));
    return vreinterpretq_f32_u32(which == 0 ? vshlq_n_u32(w, 16)
                                            : vandq_u32(w, vdupq_n_u32(0xFFFF0000u)));
  }
  static V LoadF16(const uint8_t* row, int c) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(row) + 4 * c)));
  }
  static V LoadU8(const uint8_t* row, int c) {
    uint32_t word;
    std::memcpy(&word, row + 4 * c, 4);
    const uint8x8_t b = vreinterpret_u8_u32(vdup_n_u32(word));
    return vcvtq_f32_u32(vmovl_u16(vget_low_u16(vmovl_u8(b))));
  }

  // kLut lanes (attention_format.h, LutGeometry): 4 words per chunk.
  using Words = uint32x4_t;
  struct LutBlock {
    int32_t byte_offset;
    int32_t bytes;       // code bytes of the block's words
    uint8x16_t gather;   // word bytes -> lane dwords (255: zero)
  };
  static void PlanBlock(const Segment& seg, int b, int64_t /*row_bytes*/, LutBlock* block) {
    const LutGeometry g = LutGeometryOf(seg, 4);
    const int word_bytes = seg.bits == 3 ? 3 : 4;
    uint8_t gather[16];
    for (int l = 0; l < 4; ++l) {
      for (int k = 0; k < 4; ++k) {
        gather[4 * l + k] = k < word_bytes ? static_cast<uint8_t>((l % g.chunk_words) * word_bytes + k) : 255;
      }
    }
    block->byte_offset = seg.code_offset + 4 * b * word_bytes;
    block->bytes = g.chunk_words * word_bytes;
    block->gather = vld1q_u8(gather);
  }
  static Words PlanShift(const Segment& seg, int it) {
    uint32_t shift[4];
    int codes[4];
    LutLaneCodes(seg, 4, it, codes);
    for (int l = 0; l < 4; ++l) shift[l] = static_cast<uint32_t>(-codes[l] * seg.bits);  // vshlq: negative = right
    return vld1q_u32(shift);
  }
  enum { kFullWords, kRepeatedWords, kThreeBitWords };  // one gather for all
  template <int kMode>
  static Words LutWords(const uint8_t* row, const LutBlock& p) {
    uint8_t bytes[16] = {};
    std::memcpy(bytes, row + p.byte_offset, p.bytes);  // never past the row
    return vreinterpretq_u32_u8(vqtbl1q_u8(vld1q_u8(bytes), p.gather));
  }
  using Table = uint8x16x4_t;  // the 16 entries' bytes
  static Table LoadTable(const float* entries) {
    return vld1q_u8_x4(reinterpret_cast<const uint8_t*>(entries));
  }
  static Table ScaleTable(const Table& table, V factor) {
    Table out;
    for (int i = 0; i < 4; ++i) {
      out.val[i] = vreinterpretq_u8_f32(vmulq_f32(vreinterpretq_f32_u8(table.val[i]), factor));
    }
    return out;
  }
  static V LutLookup(Words words, Words shift, const Table& table) {
    const uint32x4_t index = vandq_u32(vshlq_u32(words, vreinterpretq_s32_u32(shift)),
                                       vdupq_n_u32(15));
    // Byte k of lane l: byte k of entry index[l].
    const uint32x4_t lookup = vaddq_u32(vmulq_n_u32(index, 0x04040404u), vdupq_n_u32(0x03020100u));
    return vreinterpretq_f32_u8(vqtbl4q_u8(table, vreinterpretq_u8_u32(lookup)));
  }
  static V LutCodes(Words words, Words shift, const Table& table) {
    return LutLookup(words, shift, table);
  }
  static V LutLookup8(Words words, Words shift, const Table& table) {
    return LutLookup(words, shift, table);
  }
};

#include "attention_simd.h"

}  // namespace

void AttendRun(const RunArgs& a, const Partial& out) { SimdAttendRun(a, out); }

}  // namespace kvjax::neon
