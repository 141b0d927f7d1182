// float32 <-> its IEEE bits, shared by the kernel families' contracts.
#ifndef KVJAX_FFI_FLOAT_BITS_H_
#define KVJAX_FFI_FLOAT_BITS_H_

#include <cstdint>
#include <cstring>

namespace kvjax {

inline uint32_t FloatBits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

inline float BitsFloat(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

}  // namespace kvjax

#endif  // KVJAX_FFI_FLOAT_BITS_H_
