// XLA FFI handlers: shape checks, vmap broadcasting and XLA's thread pool
// around the raw-pointer kernels picked once by `ActiveKernels`.
#include "xla_handlers.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels.h"
#include "parallel_for.h"
#include "turbo_format.h"
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


// The format of a turbo call from its attributes and table operand.
ffi::Error TurboLayoutOf(int64_t head_dim, ffi::Span<const int32_t> bits, int32_t prod,
                         const ffi::Buffer<ffi::F32>& tables, TurboLayout* layout) {
  const std::string error = MakeTurboLayout(
      static_cast<int>(head_dim), static_cast<int>(bits.size()), bits.begin(), prod != 0,
      tables.typed_data(), static_cast<int64_t>(tables.element_count()), layout);
  if (!error.empty()) return ffi::Error::InvalidArgument("kvjax turbo: " + error);
  return ffi::Error::Success();
}

// For each vector of `lead`, its row in `order` (leading axes of size 1
// broadcast); empty when the call has no order.
ffi::Error OrderRows(const ffi::Buffer<ffi::S32>& order, int32_t has_order,
                     ffi::Span<const int64_t> lead, int64_t head_dim,
                     std::vector<int64_t>* rows) {
  if (!has_order) return ffi::Error::Success();
  const auto dims = order.dimensions();
  const ffi::Span<const int64_t> order_lead(dims.begin(), dims.size() - 1);
  if (dims.size() == 0 || dims.back() != head_dim || !Broadcastable(order_lead, lead)) {
    return ffi::Error::InvalidArgument("kvjax turbo: order " + ShapeString(dims) +
                                       " does not broadcast to " + ShapeString(lead) +
                                       " x " + std::to_string(head_dim));
  }
  *rows = BroadcastIndex(order_lead, lead);
  return ffi::Error::Success();
}

ffi::Error TurboEncodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::S32> order, ffi::Buffer<ffi::F32> tables,
                           ffi::ResultBuffer<ffi::U8> codes, ffi::ResultBuffer<ffi::U16> norms,
                           ffi::Span<const int32_t> bits, int32_t prod, int32_t has_order) {
  if (ffi::Error e = CheckLoaded(); e.failure()) return e;
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("kvjax turbo encode: x must be [..., D]");
  TurboLayout f;
  if (ffi::Error e = TurboLayoutOf(dims.back(), bits, prod, tables, &f); e.failure()) return e;
  const int64_t d = f.head_dim;
  const int64_t n = static_cast<int64_t>(x.element_count()) / d;
  if (static_cast<int64_t>(codes->element_count()) != n * f.code_bytes ||
      static_cast<int64_t>(norms->element_count()) != n * f.norm_count) {
    return ffi::Error::InvalidArgument("kvjax turbo encode: output sizes do not match x " +
                                       ShapeString(dims));
  }
  std::vector<int64_t> rows;
  const ffi::Span<const int64_t> lead(dims.begin(), dims.size() - 1);
  if (ffi::Error e = OrderRows(order, has_order, lead, d, &rows); e.failure()) return e;
  const TurboEncodeFn encode = ActiveKernels().kernels->turbo.encode;
  const float* in = x.typed_data();
  const int32_t* orders = has_order ? order.typed_data() : nullptr;
  const int64_t* row = rows.data();
  uint8_t* c = codes->typed_data();
  uint16_t* z = norms->typed_data();
  // A vector costs about as much as 16 q4 elements per channel.
  ParallelFor(pool, n, std::max<int64_t>(1, kElementsPerChunk / (16 * d)),
              [=, &f](int64_t begin, int64_t end) {
                encode(f, in + begin * d, end - begin, orders, orders ? row + begin : nullptr,
                       c + begin * f.code_bytes, z + begin * f.norm_count);
              });
  return ffi::Error::Success();
}

ffi::Error TurboDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> codes,
                           ffi::Buffer<ffi::U16> norms, ffi::Buffer<ffi::S32> order,
                           ffi::Buffer<ffi::F32> tables, ffi::ResultBuffer<ffi::F32> out,
                           ffi::Span<const int32_t> bits, int32_t prod, int32_t has_order) {
  if (ffi::Error e = CheckLoaded(); e.failure()) return e;
  const auto out_dims = out->dimensions();
  const auto code_dims = codes.dimensions();
  const auto norm_dims = norms.dimensions();
  if (out_dims.size() == 0) return ffi::Error::InvalidArgument("kvjax turbo decode: out must be [..., D]");
  TurboLayout f;
  if (ffi::Error e = TurboLayoutOf(out_dims.back(), bits, prod, tables, &f); e.failure()) return e;
  const ffi::Span<const int64_t> lead(out_dims.begin(), out_dims.size() - 1);
  const ffi::Span<const int64_t> code_lead(code_dims.begin(), code_dims.size() - 1);
  const ffi::Span<const int64_t> norm_lead(norm_dims.begin(), norm_dims.size() - 1);
  if (code_dims.size() != out_dims.size() || norm_dims.size() != out_dims.size() ||
      code_dims.back() != f.code_bytes || norm_dims.back() != f.norm_count ||
      !Broadcastable(code_lead, lead) || !Broadcastable(norm_lead, lead)) {
    return ffi::Error::InvalidArgument(
        "kvjax turbo decode: codes " + ShapeString(code_dims) + " and norms " +
        ShapeString(norm_dims) + " do not match the output " + ShapeString(out_dims) +
        " (" + std::to_string(f.code_bytes) + " code bytes, " +
        std::to_string(f.norm_count) + " norms per vector)");
  }
  const int64_t d = f.head_dim;
  const int64_t n = static_cast<int64_t>(out->element_count()) / d;
  std::vector<int64_t> rows;
  if (ffi::Error e = OrderRows(order, has_order, lead, d, &rows); e.failure()) return e;
  std::vector<uint8_t> codes_b;
  std::vector<uint16_t> norms_b;
  const uint8_t* c = Broadcast(codes.typed_data(), code_lead, lead, f.code_bytes, &codes_b);
  const uint16_t* z = Broadcast(norms.typed_data(), norm_lead, lead, f.norm_count, &norms_b);
  const TurboDecodeFn decode = ActiveKernels().kernels->turbo.decode;
  const int32_t* orders = has_order ? order.typed_data() : nullptr;
  const int64_t* row = rows.data();
  float* o = out->typed_data();
  ParallelFor(pool, n, std::max<int64_t>(1, kElementsPerChunk / (4 * d)),
              [=, &f](int64_t begin, int64_t end) {
                decode(f, c + begin * f.code_bytes, z + begin * f.norm_count, end - begin,
                       orders, orders ? row + begin : nullptr, o + begin * d);
              });
  return ffi::Error::Success();
}

// A split format's channel order: where `choose` is set, chosen from `token`
// (OutlierOrder); elsewhere `previous` kept. All three broadcast to the
// output's leading axes.
ffi::Error TurboOrderImpl(ffi::Buffer<ffi::F32> token, ffi::Buffer<ffi::S32> choose,
                          ffi::Buffer<ffi::S32> previous, ffi::ResultBuffer<ffi::S32> out) {
  const auto out_dims = out->dimensions();
  const auto token_dims = token.dimensions();
  const auto previous_dims = previous.dimensions();
  if (out_dims.size() == 0 || out_dims.back() > kMaxTurboDim || out_dims.back() < 1 ||
      token_dims.size() != out_dims.size() || previous_dims.size() != out_dims.size() ||
      token_dims.back() != out_dims.back() || previous_dims.back() != out_dims.back()) {
    return ffi::Error::InvalidArgument("kvjax turbo order: token " + ShapeString(token_dims) +
                                       " and previous " + ShapeString(previous_dims) +
                                       " do not match " + ShapeString(out_dims));
  }
  const int64_t d = out_dims.back();
  const ffi::Span<const int64_t> lead(out_dims.begin(), out_dims.size() - 1);
  const ffi::Span<const int64_t> token_lead(token_dims.begin(), token_dims.size() - 1);
  const ffi::Span<const int64_t> previous_lead(previous_dims.begin(), previous_dims.size() - 1);
  if (!Broadcastable(token_lead, lead) || !Broadcastable(previous_lead, lead) ||
      !Broadcastable(choose.dimensions(), lead)) {
    return ffi::Error::InvalidArgument("kvjax turbo order: operands do not broadcast to " +
                                       ShapeString(lead));
  }
  const std::vector<int64_t> token_row = BroadcastIndex(token_lead, lead);
  const std::vector<int64_t> previous_row = BroadcastIndex(previous_lead, lead);
  const std::vector<int64_t> choose_row = BroadcastIndex(choose.dimensions(), lead);
  int32_t* o = out->typed_data();
  for (size_t r = 0; r < token_row.size(); ++r) {
    if (choose.typed_data()[choose_row[r]]) {
      OutlierOrder(token.typed_data() + token_row[r] * d, static_cast<int>(d), o + r * d);
    } else {
      std::copy_n(previous.typed_data() + previous_row[r] * d, d, o + r * d);
    }
  }
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(TurboEncode, TurboEncodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::S32>>()  // order
                                  .Arg<ffi::Buffer<ffi::F32>>()  // tables
                                  .Ret<ffi::Buffer<ffi::U8>>()   // codes
                                  .Ret<ffi::Buffer<ffi::U16>>()  // norms
                                  .Attr<ffi::Span<const int32_t>>("bits")
                                  .Attr<int32_t>("prod")
                                  .Attr<int32_t>("has_order"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(TurboDecode, TurboDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()   // codes
                                  .Arg<ffi::Buffer<ffi::U16>>()  // norms
                                  .Arg<ffi::Buffer<ffi::S32>>()  // order
                                  .Arg<ffi::Buffer<ffi::F32>>()  // tables
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int32_t>>("bits")
                                  .Attr<int32_t>("prod")
                                  .Attr<int32_t>("has_order"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(TurboOrder, TurboOrderImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // token
                                  .Arg<ffi::Buffer<ffi::S32>>()  // choose
                                  .Arg<ffi::Buffer<ffi::S32>>()  // previous
                                  .Ret<ffi::Buffer<ffi::S32>>());

}  // namespace kvjax
