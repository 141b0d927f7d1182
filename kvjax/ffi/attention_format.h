// Scalar helpers that read one token of a tier: exact conversions of the
// 16-bit dtypes, the per-token value tables of kLut formats, and a token
// decoded to floats in natural lane order. The scalar reference uses them for
// every token; the SIMD variants for the per-token tables and lane orders.
#ifndef KVJAX_FFI_ATTENTION_FORMAT_H_
#define KVJAX_FFI_ATTENTION_FORMAT_H_

#include <cstdint>
#include <cstring>

#include "attention_kernels.h"

namespace kvjax {

inline float BitsToFloat(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t FloatToBits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

inline float BF16ToFloat(uint16_t bits) { return BitsToFloat(uint32_t{bits} << 16); }

// Exact: every float16 (denormals, +-Inf, NaN payloads) is a float32.
inline float F16ToFloat(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t exponent = (h >> 10) & 0x1F;
  uint32_t mantissa = h & 0x3FF;
  if (exponent == 0x1F) return BitsToFloat(sign | 0x7F800000u | (mantissa << 13));
  if (exponent != 0) {
    return BitsToFloat(sign | ((exponent + 112) << 23) | (mantissa << 13));
  }
  if (mantissa == 0) return BitsToFloat(sign);
  // A denormal: 2^-24 * mantissa, exact in float32.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

// The float with only its 12 most significant mantissa bits (kvjax/_turbo.py
// keep_significant_bits(x, 12)).
inline float Trunc12(float x) { return BitsToFloat(FloatToBits(x) & 0xFFFFF000u); }

// Code of `channel` (natural order) of a segment in a token's code row.
inline uint32_t CodeAt(const uint8_t* row, const Segment& seg, int channel) {
  const uint8_t* codes = row + seg.code_offset;
  const uint32_t mask = (1u << seg.bits) - 1;
  if (8 % seg.bits == 0) {
    const int bit = channel * seg.bits;
    return (codes[bit / 8] >> (bit % 8)) & mask;
  }
  // 3 bits: 8 codes in 3 little-endian bytes, code k at bits 3k.
  const uint8_t* group = codes + 3 * (channel / 8);
  const uint32_t word = group[0] | (uint32_t{group[1]} << 8) | (uint32_t{group[2]} << 16);
  return (word >> (3 * (channel % 8))) & mask;
}

// The factor of a segment's values for the token in `slot` (kLut with norms).
inline float SegmentFactor(const TierFormat& f, const TierData& d, int64_t slot,
                           const Segment& seg) {
  const uint16_t* norms = d.norms + slot * f.norm_count;
  float factor = BF16ToFloat(norms[seg.norm_index]);
  if (seg.kappa_index >= 0) {
    factor *= Trunc12(BF16ToFloat(norms[seg.kappa_index]) * seg.kappa_scale);
  }
  return factor;
}

// The values of codes 0 .. 15 of a segment for the token in `slot`; a table
// of 2^bits < 16 entries repeats, so that index bits above `bits` select the
// same value.
inline void SegmentTable(const TierFormat& f, const TierData& d, int64_t slot,
                         const Segment& seg, float out[16]) {
  const int entries = 1 << seg.bits;
  if (seg.norm_index < 0) {  // affine q4: i * scale + zero
    const float scale = d.scale[slot], zero = d.zero[slot];
    for (int i = 0; i < 16; ++i) out[i] = static_cast<float>(i % entries) * scale + zero;
    return;
  }
  const float factor = SegmentFactor(f, d, slot, seg);
  for (int i = 0; i < 16; ++i) out[i] = f.tables[seg.table_offset + i % entries] * factor;
}

// The lane order of kLut formats in the SIMD variants. A segment's packed
// codes are read as 32-bit words that each hold whole codes: for 1, 2 and 4
// bits the little-endian dwords of the code row (32 / bits codes each), for
// 3 bits each 3-byte group of 8 codes moved into a dword of its own. A chunk
// of `lanes` lanes takes `lanes` such words (or fewer, repeated to fill the
// vector) and lane l shifts its word right to its code; a table lookup then
// reads the low 4 bits, which is why value tables repeat to 16 entries.
struct LutGeometry {
  int words;       // words in the segment
  int per_word;    // codes per word
  int chunk_words; // distinct words per chunk (repeated lanes / chunk_words times)
  int iterations;  // chunks per `chunk_words` words
};

inline LutGeometry LutGeometryOf(const Segment& seg, int lanes) {
  LutGeometry g;
  g.words = seg.bits == 3 ? seg.channels / 8 : seg.channels * seg.bits / 32;
  g.per_word = seg.bits == 3 ? 8 : 32 / seg.bits;
  g.chunk_words = g.words < lanes ? g.words : lanes;
  g.iterations = g.chunk_words > 0 ? g.per_word / (lanes / g.chunk_words) : 0;
  return g;
}

// Whether a variant of `lanes` lanes reads this segment with whole chunks.
inline bool LutFits(const Segment& seg, int lanes) {
  if (seg.bits < 1 || seg.bits > 4 || seg.channels % lanes != 0) return false;
  if (seg.bits == 3 ? seg.channels % 8 != 0 : (seg.channels * seg.bits) % 32 != 0) return false;
  const LutGeometry g = LutGeometryOf(seg, lanes);
  if (g.words < 1) return false;
  if (g.words >= lanes ? g.words % lanes != 0 : lanes % g.words != 0) return false;
  return g.per_word >= lanes / g.chunk_words;  // enough codes for the repeats
}

// Lane l = r * chunk_words + w of chunk c = block * iterations + it reads
// word lanes * block + w, code it * repeats + r (repeats = lanes /
// chunk_words). Filled by loops, without a division a lane: plans are made
// per run, and the divisions were half of a short q4 run's setup.

// The code (within its word) that each lane of iteration `it` reads: codes[lanes].
inline void LutLaneCodes(const Segment& seg, int lanes, int it, int* codes) {
  const LutGeometry g = LutGeometryOf(seg, lanes);
  const int repeats = lanes / g.chunk_words;
  for (int r = 0, l = 0; r < repeats; ++r) {
    for (int w = 0; w < g.chunk_words; ++w) codes[l++] = it * repeats + r;
  }
}

// The natural channel (within its segment) of each of its kernel lanes:
// channel[seg.channels].
inline void LutChannels(const Segment& seg, int lanes, int* channel) {
  const LutGeometry g = LutGeometryOf(seg, lanes);
  const int repeats = lanes / g.chunk_words, blocks = seg.channels / lanes / g.iterations;
  int i = 0;
  for (int block = 0; block < blocks; ++block) {
    for (int it = 0; it < g.iterations; ++it) {
      for (int r = 0; r < repeats; ++r) {
        for (int w = 0; w < g.chunk_words; ++w) {
          channel[i++] = (lanes * block + w) * g.per_word + it * repeats + r;
        }
      }
    }
  }
}

// One token of a tier decoded to `f.lanes` floats in natural lane order.
inline void DecodeToken(const TierFormat& f, const TierData& d, int64_t slot, float* out) {
  const uint8_t* row = d.data + slot * f.row_bytes;
  switch (f.kind) {
    case ValueKind::kF32:
      std::memcpy(out, row, sizeof(float) * f.lanes);
      return;
    case ValueKind::kBF16:
    case ValueKind::kF16:
      for (int i = 0; i < f.lanes; ++i) {
        uint16_t bits;
        std::memcpy(&bits, row + 2 * i, sizeof bits);
        out[i] = f.kind == ValueKind::kBF16 ? BF16ToFloat(bits) : F16ToFloat(bits);
      }
      return;
    case ValueKind::kQ8: {
      const float scale = d.scale[slot], zero = d.zero[slot];
      for (int i = 0; i < f.lanes; ++i) out[i] = static_cast<float>(row[i]) * scale + zero;
      return;
    }
    case ValueKind::kLut:
      for (int i = 0; i < f.lanes; ++i) out[i] = 0.0f;  // lanes no segment covers
      for (int s = 0; s < f.num_segments; ++s) {
        const Segment& seg = f.segments[s];
        float table[16];
        SegmentTable(f, d, slot, seg, table);
        for (int c = 0; c < seg.channels; ++c) {
          out[seg.lane_offset + c] = table[CodeAt(row, seg, c)];
        }
      }
      return;
  }
}

}  // namespace kvjax

#endif  // KVJAX_FFI_ATTENTION_FORMAT_H_
