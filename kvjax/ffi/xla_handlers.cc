// XLA FFI handlers: shape checks, vmap broadcasting and XLA's thread pool
// around the raw-pointer kernels picked once by `ActiveKernels`.
#include "xla_handlers.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace kvjax {

const Selection& ActiveKernels() {
  static const Selection selection = [] {
    Selection s;
    const char* env = std::getenv("KVJAX_ISA");
    s.kernels = SelectKernels(env ? env : "", "KVJAX_ISA", &s.error);
    return s;
  }();
  return selection;
}

namespace {

// Below this many elements a call runs on the calling thread only.
constexpr int64_t kElementsPerChunk = 1 << 16;

const FormatKernels& KernelsFor(const KernelSet& set, int bits) {
  return bits == 8 ? set.q8 : set.q4;
}

ffi::Error CheckLoaded() {
  if (!ActiveKernels().kernels) {
    return ffi::Error::Internal("kvjax kernels not selected: " + ActiveKernels().error);
  }
  return ffi::Error::Success();
}

std::string ShapeString(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

template <int kBits>
ffi::Error EncodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                      ffi::ResultBuffer<ffi::U8> codes,
                      ffi::ResultBuffer<ffi::F32> scale,
                      ffi::ResultBuffer<ffi::F32> zero) {
  if (ffi::Error e = CheckLoaded(); e.failure()) return e;
  const auto dims = x.dimensions();
  const int codes_per_byte = kBits == 8 ? 1 : 2;
  if (dims.size() == 0 || dims.back() <= 0 || dims.back() % codes_per_byte != 0) {
    return ffi::Error::InvalidArgument(
        "kvjax encode: x must be [..., D] with D > 0" +
        std::string(kBits == 4 ? " and even" : "") + ", got " + ShapeString(dims));
  }
  const int64_t d = dims.back();
  const int64_t width = d / codes_per_byte;
  const int64_t groups = static_cast<int64_t>(x.element_count()) / d;
  if (static_cast<int64_t>(codes->element_count()) != groups * width ||
      static_cast<int64_t>(scale->element_count()) != groups ||
      static_cast<int64_t>(zero->element_count()) != groups) {
    return ffi::Error::InvalidArgument("kvjax encode: output sizes do not match x " +
                                       ShapeString(dims));
  }
  const EncodeFn encode = KernelsFor(*ActiveKernels().kernels, kBits).encode;
  const float* in = x.typed_data();
  uint8_t* c = codes->typed_data();
  float* s = scale->typed_data();
  float* z = zero->typed_data();
  ParallelFor(pool, groups, std::max<int64_t>(1, kElementsPerChunk / d),
              [=](int64_t begin, int64_t end) {
                encode(in + begin * d, end - begin, d, c + begin * width,
                       s + begin, z + begin);
              });
  return ffi::Error::Success();
}

// Under vmap(method="expand_dims") an unbatched operand arrives with size-1
// leading axes. Returns, for each output group, the operand's group index.
std::vector<int64_t> BroadcastIndex(ffi::Span<const int64_t> operand,
                                    ffi::Span<const int64_t> out) {
  int64_t total = 1;
  for (int64_t d : out) total *= d;
  std::vector<int64_t> index(total);
  std::vector<int64_t> counter(out.size(), 0);
  for (int64_t g = 0; g < total; ++g) {
    int64_t offset = 0;
    for (size_t a = 0; a < out.size(); ++a) {
      offset = offset * operand[a] + (operand[a] == 1 ? 0 : counter[a]);
    }
    index[g] = offset;
    for (size_t a = out.size(); a-- > 0;) {
      if (++counter[a] < out[a]) break;
      counter[a] = 0;
    }
  }
  return index;
}

bool Broadcastable(ffi::Span<const int64_t> operand,
                   ffi::Span<const int64_t> out) {
  if (operand.size() != out.size()) return false;
  for (size_t a = 0; a < out.size(); ++a) {
    if (operand[a] != out[a] && operand[a] != 1) return false;
  }
  return true;
}

// `data` as `lead` groups of `width` elements: itself when its leading shape
// is `lead` already, else a copy into `buffer` with size-1 axes repeated.
template <typename T>
const T* Broadcast(const T* data, ffi::Span<const int64_t> dims,
                   ffi::Span<const int64_t> lead, int64_t width,
                   std::vector<T>* buffer) {
  if (std::equal(dims.begin(), dims.end(), lead.begin(), lead.end())) return data;
  const std::vector<int64_t> index = BroadcastIndex(dims, lead);
  buffer->resize(index.size() * width);
  for (size_t g = 0; g < index.size(); ++g) {
    std::copy_n(data + index[g] * width, width, buffer->data() + g * width);
  }
  return buffer->data();
}

template <int kBits>
ffi::Error DecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> codes,
                      ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> zero,
                      ffi::ResultBuffer<ffi::F32> out) {
  if (ffi::Error e = CheckLoaded(); e.failure()) return e;
  const auto out_dims = out->dimensions();
  const auto code_dims = codes.dimensions();
  const int codes_per_byte = kBits == 8 ? 1 : 2;
  if (out_dims.size() == 0 || code_dims.size() != out_dims.size() ||
      code_dims.back() * codes_per_byte != out_dims.back() || out_dims.back() <= 0) {
    return ffi::Error::InvalidArgument(
        "kvjax decode: codes " + ShapeString(code_dims) +
        " do not match the output " + ShapeString(out_dims));
  }
  const ffi::Span<const int64_t> lead(out_dims.begin(), out_dims.size() - 1);
  const ffi::Span<const int64_t> code_lead(code_dims.begin(), code_dims.size() - 1);
  if (!Broadcastable(code_lead, lead) || !Broadcastable(scale.dimensions(), lead) ||
      !Broadcastable(zero.dimensions(), lead)) {
    return ffi::Error::InvalidArgument(
        "kvjax decode: codes " + ShapeString(code_dims) + ", scale " +
        ShapeString(scale.dimensions()) + " and zero " +
        ShapeString(zero.dimensions()) + " do not broadcast to " +
        ShapeString(lead));
  }
  const int64_t d = out_dims.back();
  const int64_t width = d / codes_per_byte;
  const int64_t groups = static_cast<int64_t>(out->element_count()) / d;
  const uint8_t* c = codes.typed_data();
  const float* s = scale.typed_data();
  const float* z = zero.typed_data();
  // Under vmap, materialize broadcast operands (at most the output's size).
  std::vector<uint8_t> codes_b;
  std::vector<float> scale_b, zero_b;
  c = Broadcast(c, code_lead, lead, width, &codes_b);
  s = Broadcast(s, scale.dimensions(), lead, 1, &scale_b);
  z = Broadcast(z, zero.dimensions(), lead, 1, &zero_b);
  const DecodeFn decode = KernelsFor(*ActiveKernels().kernels, kBits).decode;
  float* o = out->typed_data();
  ParallelFor(pool, groups, std::max<int64_t>(1, kElementsPerChunk / d),
              [=](int64_t begin, int64_t end) {
                decode(c + begin * width, s + begin, z + begin, end - begin, d,
                       o + begin * d);
              });
  return ffi::Error::Success();
}

}  // namespace

#define KVJAX_DEFINE_ENCODE(name, bits)                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, EncodeImpl<bits>,                   \
                                ffi::Ffi::Bind()                          \
                                    .Ctx<ffi::ThreadPool>()               \
                                    .Arg<ffi::Buffer<ffi::F32>>()         \
                                    .Ret<ffi::Buffer<ffi::U8>>()          \
                                    .Ret<ffi::Buffer<ffi::F32>>()         \
                                    .Ret<ffi::Buffer<ffi::F32>>());
#define KVJAX_DEFINE_DECODE(name, bits)                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, DecodeImpl<bits>,                   \
                                ffi::Ffi::Bind()                          \
                                    .Ctx<ffi::ThreadPool>()               \
                                    .Arg<ffi::Buffer<ffi::U8>>()          \
                                    .Arg<ffi::Buffer<ffi::F32>>()         \
                                    .Arg<ffi::Buffer<ffi::F32>>()         \
                                    .Ret<ffi::Buffer<ffi::F32>>());

KVJAX_DEFINE_ENCODE(Q8Encode, 8)
KVJAX_DEFINE_ENCODE(Q4Encode, 4)
KVJAX_DEFINE_DECODE(Q8Decode, 8)
KVJAX_DEFINE_DECODE(Q4Decode, 4)

}  // namespace kvjax
