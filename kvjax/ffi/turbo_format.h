// The TurboQuant contract (numerics.md, "TurboQuant formats"), shared by the
// scalar reference and every SIMD variant: the format's geometry, the tables
// made on the Python side (`kvjax._turbo.kernel_tables`), and the scalar
// pieces whose bits every variant must reproduce. Nothing here knows about
// XLA or Python.
//
// Table blob (float32), per instance in order:
//   [0] rotate_scale = fl32(1 / sqrt(m))
//   [1] qjl_scale    = fl32(sqrt(pi / 2) / m)
//   signs[m], centroids[2^b], boundaries[2^b - 1]   (no codebook when b == 0)
//   S[m * m] (row-major, 12-bit entries)              (prod formats only)
#ifndef KVJAX_FFI_TURBO_FORMAT_H_
#define KVJAX_FFI_TURBO_FORMAT_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>

#include "float_bits.h"

namespace kvjax {

constexpr int kMaxTurboInstances = 2;
constexpr int kMaxTurboDim = 512;

struct TurboInstance {
  int start = 0;  // first channel after the outlier order
  int size = 0;   // m, a power of two
  int bits = 0;   // mse bits (0: turbo1p)
  float rotate_scale = 0, qjl_scale = 0;
  const float* signs = nullptr;
  const float* centroids = nullptr;   // [2^bits]
  const float* boundaries = nullptr;  // [2^bits - 1]
  const float* qjl = nullptr;         // S [m, m], prod only
};

struct TurboLayout {
  int head_dim = 0;
  int num_instances = 0;
  bool prod = false;
  bool split = false;  // instances over halves, channels in the outlier order
  int code_bytes = 0;  // per vector
  int norm_count = 0;  // bfloat16 norms per vector
  TurboInstance inst[kMaxTurboInstances];
};

// Floats the table blob holds for this geometry.
inline int64_t TurboTableSize(int head_dim, int num_instances, const int* bits, bool prod) {
  const int m = head_dim / num_instances;
  int64_t n = 0;
  for (int i = 0; i < num_instances; ++i) {
    n += 2 + m + (bits[i] ? 2 * (int64_t{1} << bits[i]) - 1 : 0) + (prod ? int64_t{m} * m : 0);
  }
  return n;
}

// Builds the layout over `tables` (TurboTableSize floats). Returns "" or why
// the geometry is invalid.
inline std::string MakeTurboLayout(int head_dim, int num_instances, const int* bits, bool prod,
                                   const float* tables, int64_t table_size, TurboLayout* out) {
  if (num_instances < 1 || num_instances > kMaxTurboInstances) {
    return "a turbo format has 1 or 2 instances, got " + std::to_string(num_instances);
  }
  const int m = head_dim / num_instances;
  if (head_dim < 16 || head_dim > kMaxTurboDim || (head_dim & (head_dim - 1)) ||
      m * num_instances != head_dim) {
    return "head_dim must be a power of two from 16 to 512, got " + std::to_string(head_dim);
  }
  for (int i = 0; i < num_instances; ++i) {
    if (bits[i] < 0 || bits[i] > 4 || (bits[i] == 0 && !prod)) {
      return "instance bits must be 1-4 (0 only for prod formats), got " + std::to_string(bits[i]);
    }
  }
  const int64_t want = TurboTableSize(head_dim, num_instances, bits, prod);
  if (table_size != want) {
    return "tables hold " + std::to_string(table_size) + " floats, expected " + std::to_string(want);
  }
  TurboLayout f;
  f.head_dim = head_dim;
  f.num_instances = num_instances;
  f.prod = prod;
  f.split = num_instances == 2;
  f.norm_count = num_instances + (prod ? 1 : 0);
  const float* t = tables;
  for (int i = 0; i < num_instances; ++i) {
    TurboInstance& in = f.inst[i];
    in.start = i * m;
    in.size = m;
    in.bits = bits[i];
    in.rotate_scale = t[0];
    in.qjl_scale = t[1];
    t += 2;
    in.signs = t;
    t += m;
    if (in.bits) {
      in.centroids = t;
      t += 1 << in.bits;
      in.boundaries = t;
      t += (1 << in.bits) - 1;
    }
    if (prod) {
      in.qjl = t;
      t += int64_t{m} * m;
    }
    f.code_bytes += m * in.bits / 8 + (prod ? m / 8 : 0);
  }
  *out = f;
  return "";
}

// x with its low mantissa bits cleared: 12 significant bits, so products of
// two such values (or with a 12-bit remainder) are exact.
constexpr uint32_t kTwelveBitMask = 0xFFFFF000u;
inline float KeepTwelveBits(float x) { return BitsFloat(FloatBits(x) & kTwelveBitMask); }

// float32 -> bfloat16 bits, round to nearest even (XLA's convert); NaN keeps
// its sign and top payload bits, made quiet.
inline uint16_t ToBfloat16Bits(float x) {
  const uint32_t u = FloatBits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float FromBfloat16Bits(uint16_t b) { return BitsFloat(uint32_t{b} << 16); }

// Vectors far from unit scale are scaled by an exact power of two before
// their norm is taken (`scaled_norm` in kvjax/_turbo.py).
constexpr float kScaleAbove = 0x1p60f, kScaleBelow = 0x1p-60f;
constexpr float kScaleDown = 0x1p-70f, kScaleUp = 0x1p70f;
constexpr float kNormMax = 0x1.FEp127f;  // bfloat16's largest finite value
inline float ScaleFor(float amax) {
  return amax > kScaleAbove ? kScaleDown : (amax < kScaleBelow ? kScaleUp : 1.0f);
}
inline float UndoFor(float amax) {
  return amax > kScaleAbove ? kScaleUp : (amax < kScaleBelow ? kScaleDown : 1.0f);
}

// A split format's channel order from one token (`outlier_order`): by
// decreasing magnitude, ties by lower channel, NaN as infinitely large; always
// a permutation. The same code serves every variant (one per sequence).
inline void OutlierOrder(const float* x, int d, int32_t* order) {
  float key[kMaxTurboDim];
  for (int i = 0; i < d; ++i) key[i] = std::isnan(x[i]) ? INFINITY : std::fabs(x[i]);
  std::iota(order, order + d, 0);
  std::stable_sort(order, order + d, [&](int32_t a, int32_t b) { return key[a] > key[b]; });
}

}  // namespace kvjax

#endif  // KVJAX_FFI_TURBO_FORMAT_H_
