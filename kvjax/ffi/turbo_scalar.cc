// The TurboQuant scalar reference: one vector at a time, every operation in
// the order kvjax/_turbo.py writes it (numerics.md). The SIMD variants
// (turbo_simd.h) must give these bits.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "turbo_format.h"
#include "turbo_kernels.h"

namespace kvjax::scalar {
namespace {

// The fixed pairwise tree: add the upper half to the lower half until one
// element remains. Overwrites `x`.
float PairwiseSum(float* x, int n) {
  for (int half = n / 2; half >= 1; half /= 2) {
    for (int i = 0; i < half; ++i) x[i] = x[i] + x[i + half];
  }
  return x[0];
}

// ||v|| with exact products: v^2 = hi^2 + 2 hi lo + lo^2 (12-bit halves).
float ExactNorm(const float* v, int m) {
  float sq[kMaxTurboDim];
  for (int i = 0; i < m; ++i) {
    const float hi = KeepTwelveBits(v[i]), lo = v[i] - hi;
    sq[i] = (hi * hi + (2.0f * hi) * lo) + lo * lo;
  }
  return std::sqrt(PairwiseSum(sq, m));
}

// Unnormalized Walsh-Hadamard: butterflies (a + b, a - b), strides 1, 2, 4...
void Hadamard(float* y, int m) {
  for (int h = 1; h < m; h *= 2) {
    for (int s = 0; s < m; s += 2 * h) {
      for (int i = s; i < s + h; ++i) {
        const float a = y[i], b = y[i + h];
        y[i] = a + b;
        y[i + h] = a - b;
      }
    }
  }
}

// 8 codes of `bits` bits into `bits` bytes: code k at bit k * bits of the
// little-endian group.
void PackCodes(const uint8_t* code, int m, int bits, uint8_t* out) {
  for (int g = 0; g < m / 8; ++g) {
    uint32_t word = 0;
    for (int k = 0; k < 8; ++k) word |= uint32_t{code[8 * g + k]} << (k * bits);
    for (int b = 0; b < bits; ++b) out[g * bits + b] = static_cast<uint8_t>(word >> (8 * b));
  }
}

void UnpackCodes(const uint8_t* in, int m, int bits, uint8_t* code) {
  for (int g = 0; g < m / 8; ++g) {
    uint32_t word = 0;
    for (int b = 0; b < bits; ++b) word |= uint32_t{in[g * bits + b]} << (8 * b);
    for (int k = 0; k < 8; ++k) code[8 * g + k] = (word >> (k * bits)) & ((1u << bits) - 1);
  }
}

void EncodeOne(const TurboLayout& f, const float* x_in, const int32_t* order,
               uint8_t* codes, uint16_t* norms) {
  const int d = f.head_dim;
  float x[kMaxTurboDim];
  bool finite = true;
  for (int c = 0; c < d; ++c) {
    x[c] = x_in[order ? order[c] : c];
    finite = finite && std::isfinite(x[c]);
  }
  // A non-finite vector is encoded as zeros and marked by NaN norms.
  if (!finite) std::memset(x, 0, sizeof(float) * d);
  float norm_out[kMaxTurboInstances + 1];
  int k = 0;
  uint8_t* out = codes;
  for (int i = 0; i < f.num_instances; ++i) {
    const TurboInstance& in = f.inst[i];
    const int m = in.size;
    float v[kMaxTurboDim], y[kMaxTurboDim];
    float amax = 0.0f;
    for (int c = 0; c < m; ++c) amax = std::fmax(amax, std::fabs(x[in.start + c]));
    const float scale = ScaleFor(amax);
    for (int c = 0; c < m; ++c) v[c] = x[in.start + c] * scale;
    const float norm = ExactNorm(v, m);
    const float inv = norm > 0.0f ? 1.0f / norm : 0.0f;
    for (int c = 0; c < m; ++c) y[c] = (v[c] * inv) * in.signs[c];
    Hadamard(y, m);
    for (int c = 0; c < m; ++c) y[c] = y[c] * in.rotate_scale;
    const float stored = norm * UndoFor(amax);
    norm_out[k++] = stored < kNormMax ? stored : kNormMax;
    float residual[kMaxTurboDim];
    if (in.bits) {
      uint8_t code[kMaxTurboDim];
      const int levels = 1 << in.bits;
      for (int c = 0; c < m; ++c) {
        int count = 0;  // boundaries strictly below y
        for (int b = 0; b + 1 < levels; ++b) count += y[c] > in.boundaries[b];
        code[c] = static_cast<uint8_t>(count);
        residual[c] = y[c] - in.centroids[count];
      }
      PackCodes(code, m, in.bits, out);
      out += m * in.bits / 8;
    } else {
      std::memcpy(residual, y, sizeof(float) * m);
    }
    if (f.prod) {
      // sign(S r): per row, exact products s * hi + s * lo, pairwise over j.
      float hi[kMaxTurboDim], lo[kMaxTurboDim], prods[kMaxTurboDim];
      uint8_t sign[kMaxTurboDim];
      for (int j = 0; j < m; ++j) {
        hi[j] = KeepTwelveBits(residual[j]);
        lo[j] = residual[j] - hi[j];
      }
      for (int r = 0; r < m; ++r) {
        const float* s = in.qjl + static_cast<int64_t>(r) * m;
        for (int j = 0; j < m; ++j) prods[j] = s[j] * hi[j] + s[j] * lo[j];
        sign[r] = PairwiseSum(prods, m) >= 0.0f;
      }
      PackCodes(sign, m, 1, out);
      out += m / 8;
      norm_out[k++] = ExactNorm(residual, m);
    }
  }
  for (int j = 0; j < k; ++j) norms[j] = ToBfloat16Bits(finite ? norm_out[j] : NAN);
}

void DecodeOne(const TurboLayout& f, const uint8_t* codes, const uint16_t* norms,
               const int32_t* order, float* out) {
  float x[kMaxTurboDim];
  const uint8_t* in_codes = codes;
  int k = 0;
  for (int i = 0; i < f.num_instances; ++i) {
    const TurboInstance& in = f.inst[i];
    const int m = in.size;
    const float norm = FromBfloat16Bits(norms[k++]);
    float y[kMaxTurboDim];
    if (in.bits) {
      uint8_t code[kMaxTurboDim];
      UnpackCodes(in_codes, m, in.bits, code);
      in_codes += m * in.bits / 8;
      for (int c = 0; c < m; ++c) y[c] = in.centroids[code[c]];
    }
    if (f.prod) {
      // y + kappa * S^T z, S^T z split in 12-bit halves (exact products).
      uint8_t bit[kMaxTurboDim];
      UnpackCodes(in_codes, m, 1, bit);
      in_codes += m / 8;
      const float kappa = KeepTwelveBits(FromBfloat16Bits(norms[k++]) * in.qjl_scale);
      float prods[kMaxTurboDim];
      for (int j = 0; j < m; ++j) {
        for (int r = 0; r < m; ++r) {
          prods[r] = in.qjl[static_cast<int64_t>(r) * m + j] * (bit[r] ? 1.0f : -1.0f);
        }
        const float sketch = PairwiseSum(prods, m);
        const float hi = KeepTwelveBits(sketch), lo = sketch - hi;
        y[j] = in.bits ? (y[j] + kappa * hi) + kappa * lo : kappa * hi + kappa * lo;
      }
    }
    Hadamard(y, m);
    for (int c = 0; c < m; ++c) x[in.start + c] = ((y[c] * in.rotate_scale) * in.signs[c]) * norm;
  }
  for (int c = 0; c < f.head_dim; ++c) out[order ? order[c] : c] = x[c];
}

void Encode(const TurboLayout& f, const float* x, int64_t n, const int32_t* orders,
            const int64_t* order_row, uint8_t* codes, uint16_t* norms) {
  for (int64_t t = 0; t < n; ++t) {
    EncodeOne(f, x + t * f.head_dim, orders ? orders + order_row[t] * f.head_dim : nullptr,
              codes + t * f.code_bytes, norms + t * f.norm_count);
  }
}

void Decode(const TurboLayout& f, const uint8_t* codes, const uint16_t* norms, int64_t n,
            const int32_t* orders, const int64_t* order_row, float* out) {
  for (int64_t t = 0; t < n; ++t) {
    DecodeOne(f, codes + t * f.code_bytes, norms + t * f.norm_count,
              orders ? orders + order_row[t] * f.head_dim : nullptr, out + t * f.head_dim);
  }
}

}  // namespace

const TurboKernels kTurboKernels = {Encode, Decode};

}  // namespace kvjax::scalar
