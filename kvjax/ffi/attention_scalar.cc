// The scalar reference of decode attention over one run: token by token,
// each token decoded to floats in natural lane order, an online softmax per
// row. Written for reading, not speed; every SIMD variant is tested against
// it, and runs it for shapes its vectors do not fit.
#include <cmath>
#include <limits>
#include <vector>

#include "attention_format.h"
#include "attention_kernels.h"

namespace kvjax::scalar {

void AttendRun(const RunArgs& a, const Partial& out) {
  const TierFormat& key = *a.key_format;
  const TierFormat& value = *a.value_format;
  std::vector<float> k(key.lanes), v(value.lanes);
  for (int64_t t = 0; t < a.count; ++t) {
    const int64_t pos = a.first_pos + t;
    const TokenPlace place = Locate(a, t);
    bool decoded = false;
    for (int r = 0; r < a.rows; ++r) {
      if (pos < a.lo[r] || pos > a.hi[r]) continue;  // never read, for this row
      out.seen[r] = 1;
      if (out.nan[r]) continue;  // the row is NaN whatever else it sees
      if (!decoded) {
        DecodeToken(key, place.k, place.slot, k.data());
        DecodeToken(value, place.v, place.slot, v.data());
        decoded = true;
      }
      const float* q = a.q + static_cast<int64_t>(r) * key.lanes;
      float s = 0.0f;
      for (int i = 0; i < key.lanes; ++i) s += q[i] * k[i];
      if (a.has_softcap) s = a.softcap * std::tanh(s / a.softcap);
      if (std::isnan(s) || s == std::numeric_limits<float>::infinity()) {
        out.nan[r] = 1;
        continue;
      }
      const float old_max = out.max[r];
      const float new_max = s > old_max ? s : old_max;
      // Until a finite logit arrives the max is -inf: shift by 0 instead.
      const float shift = new_max == -std::numeric_limits<float>::infinity() ? 0.0f : new_max;
      const float correction = SoftmaxWeight(old_max - shift);
      const float p = SoftmaxWeight(s - shift);
      out.max[r] = new_max;
      out.denom[r] = out.denom[r] * correction + p;
      float* acc = out.acc + static_cast<int64_t>(r) * value.lanes;
      for (int i = 0; i < value.lanes; ++i) acc[i] = acc[i] * correction + p * v[i];
    }
  }
}

}  // namespace kvjax::scalar
