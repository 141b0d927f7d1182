// TurboQuant encode / decode written once for every SIMD variant.
//
// Included by turbo_avx512.cc, turbo_avx2.cc and turbo_neon.cc inside their
// own namespace after defining `kLanes` and under their target options. The
// vectors are GCC vector extensions of kLanes floats, and lanes are *tokens*:
// a tile holds kLanes vectors transposed, one register per channel. Then the
// Walsh-Hadamard butterflies, the pairwise trees and the code counts are the
// scalar reference's operations (turbo_scalar.cc) in the same order, lane by
// lane, with no shuffles, so the bits agree by construction. Only moving
// vectors into and out of a tile is scalar (with the outlier order applied
// there).
#ifndef KVJAX_FFI_TURBO_SIMD_H_
#define KVJAX_FFI_TURBO_SIMD_H_

// Includes first in the including file: turbo_format.h, turbo_kernels.h,
// <cmath>, <cstdint>, <cstring>, <memory>.

using F = float __attribute__((vector_size(4 * kLanes)));
using I = int32_t __attribute__((vector_size(4 * kLanes)));

inline F Splat(float x) { return F{} + x; }
inline F Abs(F x) { return reinterpret_cast<F>(reinterpret_cast<I>(x) & 0x7FFFFFFF); }
inline F Select(I mask, F a, F b) {
  return reinterpret_cast<F>((reinterpret_cast<I>(a) & mask) | (reinterpret_cast<I>(b) & ~mask));
}
inline F KeepTwelveBits(F x) {
  return reinterpret_cast<F>(reinterpret_cast<I>(x) & static_cast<int32_t>(kTwelveBitMask));
}

inline F PairwiseSum(F* x, int n) {
  for (int half = n / 2; half >= 1; half /= 2) {
    for (int i = 0; i < half; ++i) x[i] = x[i] + x[i + half];
  }
  return x[0];
}

inline F ExactNorm(const F* v, int m, F* sq) {
  for (int i = 0; i < m; ++i) {
    const F hi = KeepTwelveBits(v[i]), lo = v[i] - hi;
    sq[i] = (hi * hi + (2.0f * hi) * lo) + lo * lo;
  }
  F s = PairwiseSum(sq, m);
  for (int l = 0; l < kLanes; ++l) s[l] = std::sqrt(s[l]);
  return s;
}

inline void Hadamard(F* y, int m) {
  for (int h = 1; h < m; h *= 2) {
    for (int s = 0; s < m; s += 2 * h) {
      for (int i = s; i < s + h; ++i) {
        const F a = y[i], b = y[i + h];
        y[i] = a + b;
        y[i + h] = a - b;
      }
    }
  }
}

// Scratch per tile: 4 * head_dim vectors (input, rotated, temporary, the
// rows of a QJL product).
struct TileScratch {
  std::unique_ptr<F[]> data;
  explicit TileScratch(int head_dim) : data(new F[4 * head_dim]) {}
};

// codes of `bits` bits, one I per channel: groups of 8 into `bits` bytes per
// lane at `out + lane * stride`.
inline void PackLanes(const I* code, int m, int bits, int lanes, uint8_t* out, int64_t stride) {
  for (int g = 0; g < m / 8; ++g) {
    I word = code[8 * g];
    for (int k = 1; k < 8; ++k) word |= code[8 * g + k] << (k * bits);
    for (int l = 0; l < lanes; ++l) {
      const uint32_t w = static_cast<uint32_t>(word[l]);
      uint8_t* dst = out + l * stride + g * bits;
      for (int b = 0; b < bits; ++b) dst[b] = static_cast<uint8_t>(w >> (8 * b));
    }
  }
}

// Per lane, the codes of `bits` bits from `in + lane * stride`, as I per
// channel. The words are gathered with scalar stores first and loaded as
// vectors afterwards (loading each right after its stores would stall).
inline void UnpackLanes(const uint8_t* in, int64_t stride, int m, int bits, int lanes, I* code) {
  const int32_t mask = (1 << bits) - 1;
  const int groups = m / 8;
  int32_t* words = reinterpret_cast<int32_t*>(code + m - groups);  // the last channels' slots
  for (int l = 0; l < kLanes; ++l) {
    for (int g = 0; g < groups; ++g) {
      uint32_t w = 0;
      if (l < lanes) {
        const uint8_t* src = in + l * stride + g * bits;
        for (int b = 0; b < bits; ++b) w |= uint32_t{src[b]} << (8 * b);
      }
      words[g * kLanes + l] = static_cast<int32_t>(w);
    }
  }
  // Group g's word sits in slot m - groups + g >= 8 g, so it is read before
  // channels 8 g .. 8 g + 7 overwrite it.
  for (int g = 0; g < groups; ++g) {
    I word;
    std::memcpy(&word, words + g * kLanes, sizeof(I));
    for (int k = 0; k < 8; ++k) code[8 * g + k] = (word >> (k * bits)) & mask;
  }
}

// Boundaries strictly below each y[c], four channels at a time (independent
// chains, each boundary broadcast once per four).
inline void CountBelow(const F* y, int m, const float* boundaries, int count, I* code) {
  for (int c = 0; c < m; c += 4) {
    I n0{}, n1{}, n2{}, n3{};
    const F y0 = y[c], y1 = y[c + 1], y2 = y[c + 2], y3 = y[c + 3];
    for (int b = 0; b < count; ++b) {
      const F bound = Splat(boundaries[b]);
      n0 -= y0 > bound;
      n1 -= y1 > bound;
      n2 -= y2 > bound;
      n3 -= y3 > bound;
    }
    code[c] = n0;
    code[c + 1] = n1;
    code[c + 2] = n2;
    code[c + 3] = n3;
  }
}

// `lanes` (<= kLanes) vectors from x + t * head_dim.
inline void EncodeTile(const TurboLayout& f, const float* x, int lanes, const int32_t* orders,
                       const int64_t* order_row, uint8_t* codes, uint16_t* norms, F* scratch) {
  const int d = f.head_dim;
  F* xt = scratch;
  F* y = scratch + d;
  F* tmp = scratch + 2 * d;
  // Transpose in with scalar stores; lanes past `lanes` are zeros.
  float* xf = reinterpret_cast<float*>(xt);
  for (int l = 0; l < kLanes; ++l) {
    const float* row = x + l * d;
    const int32_t* order = orders && l < lanes ? orders + order_row[l] * d : nullptr;
    if (l >= lanes) {
      for (int c = 0; c < d; ++c) xf[c * kLanes + l] = 0.0f;
    } else if (order) {
      for (int c = 0; c < d; ++c) xf[c * kLanes + l] = row[order[c]];
    } else {
      for (int c = 0; c < d; ++c) xf[c * kLanes + l] = row[c];
    }
  }
  I bad{};
  for (int c = 0; c < d; ++c) bad |= reinterpret_cast<I>(Abs(xt[c])) >= 0x7F800000;  // NaN, Inf
  // A lane holding a non-finite vector encodes zeros and gets NaN norms.
  for (int c = 0; c < d; ++c) xt[c] = Select(bad, F{}, xt[c]);
  F norm_out[kMaxTurboInstances + 1];
  int k = 0;
  int64_t offset = 0;
  for (int i = 0; i < f.num_instances; ++i) {
    const TurboInstance& in = f.inst[i];
    const int m = in.size;
    const F* v = xt + in.start;
    F amax{};
    for (int c = 0; c < m; ++c) {
      const F a = Abs(v[c]);
      amax = Select(a > amax, a, amax);
    }
    const I above = amax > kScaleAbove, below = amax < kScaleBelow;
    const F scale = Select(above, Splat(kScaleDown), Select(below, Splat(kScaleUp), Splat(1.0f)));
    const F undo = Select(above, Splat(kScaleUp), Select(below, Splat(kScaleDown), Splat(1.0f)));
    for (int c = 0; c < m; ++c) y[c] = v[c] * scale;
    const F norm = ExactNorm(y, m, tmp);
    const I positive = norm > 0.0f;
    const F inv = Select(positive, 1.0f / Select(positive, norm, Splat(1.0f)), F{});
    for (int c = 0; c < m; ++c) y[c] = (y[c] * inv) * in.signs[c];
    Hadamard(y, m);
    for (int c = 0; c < m; ++c) y[c] = y[c] * in.rotate_scale;
    const F stored = norm * undo;
    norm_out[k++] = Select(stored < kNormMax, stored, Splat(kNormMax));
    F* residual = tmp;  // the norm's squares are no longer needed
    if (in.bits) {
      I* code = reinterpret_cast<I*>(xt + in.start);  // this instance's input is consumed
      CountBelow(y, m, in.boundaries, (1 << in.bits) - 1, code);
      if (f.prod) {
        for (int c = 0; c < m; ++c) {
          F centroid;
          for (int l = 0; l < kLanes; ++l) centroid[l] = in.centroids[code[c][l]];
          residual[c] = y[c] - centroid;
        }
      }
      PackLanes(code, m, in.bits, lanes, codes + offset, f.code_bytes);
      offset += m * in.bits / 8;
    } else {
      for (int c = 0; c < m; ++c) residual[c] = y[c];
    }
    if (f.prod) {
      // sign(S r): y holds hi, the instance's input slots hold lo.
      F* hi = y;
      F* lo = xt + in.start;
      for (int j = 0; j < m; ++j) {
        hi[j] = KeepTwelveBits(residual[j]);
        lo[j] = residual[j] - hi[j];
      }
      norm_out[k] = ExactNorm(residual, m, residual);  // residual is consumed
      I* sign = reinterpret_cast<I*>(residual);
      F* acc = scratch + 3 * d;
      for (int r = 0; r < m; ++r) {
        const float* s = in.qjl + static_cast<int64_t>(r) * m;
        for (int j = 0; j < m; ++j) acc[j] = s[j] * hi[j] + s[j] * lo[j];
        sign[r] = (PairwiseSum(acc, m) >= 0.0f) & 1;
      }
      PackLanes(sign, m, 1, lanes, codes + offset, f.code_bytes);
      offset += m / 8;
      ++k;
    }
  }
  for (int j = 0; j < k; ++j) {
    const F n = Select(bad, Splat(NAN), norm_out[j]);
    for (int l = 0; l < lanes; ++l) norms[l * f.norm_count + j] = ToBfloat16Bits(n[l]);
  }
}

inline void DecodeTile(const TurboLayout& f, const uint8_t* codes, const uint16_t* norms,
                       int lanes, const int32_t* orders, const int64_t* order_row, float* out,
                       F* scratch) {
  const int d = f.head_dim;
  F* xt = scratch;
  F* y = scratch + d;
  F* tmp = scratch + 2 * d;
  int k = 0;
  int64_t offset = 0;
  for (int i = 0; i < f.num_instances; ++i) {
    const TurboInstance& in = f.inst[i];
    const int m = in.size;
    F norm{};
    for (int l = 0; l < lanes; ++l) norm[l] = FromBfloat16Bits(norms[l * f.norm_count + k]);
    ++k;
    if (in.bits) {
      I* code = reinterpret_cast<I*>(tmp);
      UnpackLanes(codes + offset, f.code_bytes, m, in.bits, lanes, code);
      offset += m * in.bits / 8;
      for (int c = 0; c < m; ++c) {
        F value;
        for (int l = 0; l < kLanes; ++l) value[l] = in.centroids[code[c][l]];
        y[c] = value;
      }
    }
    if (f.prod) {
      I* bit = reinterpret_cast<I*>(tmp);
      UnpackLanes(codes + offset, f.code_bytes, m, 1, lanes, bit);
      offset += m / 8;
      F kappa{};
      for (int l = 0; l < lanes; ++l) {
        kappa[l] = kvjax::KeepTwelveBits(FromBfloat16Bits(norms[l * f.norm_count + k]) *
                                         in.qjl_scale);
      }
      ++k;
      F* z = xt + in.start;  // decoded channels of this instance are written last
      for (int r = 0; r < m; ++r) z[r] = Select(bit[r] != 0, Splat(1.0f), Splat(-1.0f));
      F* acc = scratch + 3 * d;
      for (int j = 0; j < m; ++j) {
        for (int r = 0; r < m; ++r) acc[r] = in.qjl[static_cast<int64_t>(r) * m + j] * z[r];
        const F sketch = PairwiseSum(acc, m);
        const F hi = KeepTwelveBits(sketch), lo = sketch - hi;
        y[j] = in.bits ? (y[j] + kappa * hi) + kappa * lo : kappa * hi + kappa * lo;
      }
    }
    Hadamard(y, m);
    for (int c = 0; c < m; ++c) xt[in.start + c] = ((y[c] * in.rotate_scale) * in.signs[c]) * norm;
  }
  const float* xf = reinterpret_cast<const float*>(xt);
  for (int l = 0; l < lanes; ++l) {
    float* row = out + l * d;
    if (orders) {
      const int32_t* order = orders + order_row[l] * d;
      for (int c = 0; c < d; ++c) row[order[c]] = xf[c * kLanes + l];
    } else {
      for (int c = 0; c < d; ++c) row[c] = xf[c * kLanes + l];
    }
  }
}

void Encode(const TurboLayout& f, const float* x, int64_t n, const int32_t* orders,
            const int64_t* order_row, uint8_t* codes, uint16_t* norms) {
  TileScratch scratch(f.head_dim);
  for (int64_t t = 0; t < n; t += kLanes) {
    const int lanes = static_cast<int>(n - t < kLanes ? n - t : kLanes);
    EncodeTile(f, x + t * f.head_dim, lanes, orders, orders ? order_row + t : nullptr,
               codes + t * f.code_bytes, norms + t * f.norm_count, scratch.data.get());
  }
}

void Decode(const TurboLayout& f, const uint8_t* codes, const uint16_t* norms, int64_t n,
            const int32_t* orders, const int64_t* order_row, float* out) {
  TileScratch scratch(f.head_dim);
  for (int64_t t = 0; t < n; t += kLanes) {
    const int lanes = static_cast<int>(n - t < kLanes ? n - t : kLanes);
    DecodeTile(f, codes + t * f.code_bytes, norms + t * f.norm_count, lanes, orders,
               orders ? order_row + t : nullptr, out + t * f.head_dim, scratch.data.get());
  }
}

#endif  // KVJAX_FFI_TURBO_SIMD_H_
