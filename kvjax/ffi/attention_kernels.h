// Decode attention over one cache tier: the raw-pointer interface that the
// scalar reference and every SIMD variant implement, with no XLA types.
//
// A *run* is a span of tokens of one tier (sinks, store or tail) of one
// (sequence, layer, KV head), in contiguous ring slots, attended by every
// query row of that head. `AttendRun` folds it into a `Partial`: the online
// softmax state of each row (running max, denominator, accumulated values in
// the format's domain). The driver (attention_driver.cc) splits a call into
// runs, runs them on XLA's thread pool and merges the partials with a
// log-sum-exp (flash-decoding).
//
// Semantics (docs/api.md, non-finite values): a token outside a row's
// visible positions is never read for that row (select, never multiply by
// zero); a visible NaN or +Inf logit makes the row NaN; a row that sees
// tokens whose logits are all -Inf has denominator 0 (0/0 = NaN at the end);
// softmax weights are `SoftmaxWeight`s, so an infinite value stays infinite
// wherever float64's weight is not 0.
#ifndef KVJAX_FFI_ATTENTION_KERNELS_H_
#define KVJAX_FFI_ATTENTION_KERNELS_H_

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace kvjax {

// Below this gap exp(gap) is 0 in float64 too.
constexpr float kFloat64ExpFloor = -745.13f;
constexpr float kFloat32Min = 1.17549435e-38f;  // FLT_MIN, normal under FTZ/DAZ

// A softmax weight exp(gap), for gap = logit - max or a correction old max -
// new max (<= 0). Where float32's exp underflows but float64's does not
// (-745 < gap < -87), FLT_MIN instead of 0: an Inf value times it stays Inf,
// as in the float64 reference (0 * Inf would be NaN); a finite value v adds
// at most FLT_MIN * |v|.
inline float SoftmaxWeight(float gap) {
  const float p = std::exp(gap);
  return gap > kFloat64ExpFloor && p < kFloat32Min ? kFloat32Min : p;
}

// How a tier stores one token of one head (the kvjax/_formats.py formats).
enum class ValueKind : int32_t {
  kF32 = 0,   // float32 [D]
  kBF16 = 1,  // bfloat16 bits [D]
  kF16 = 2,   // float16 bits [D]
  kQ8 = 3,    // uint8 codes [D], float32 scale and zero: c * scale + zero
  kLut = 4,   // packed b-bit codes looked up in per-token tables (Segment)
};

// One run of lanes of a kLut format: `channels` codes of `bits` bits packed
// at byte `code_offset` of a token's code row (kvjax/_turbo.py `pack`: 8
// codes in `bits` bytes, code k at bits k*bits of that little-endian group;
// q4's nibbles are the same layout at 4 bits). A token's value of code i is
// `table[table_offset + i] * factor`, where the factor is
//   norm_index < 0: affine (q4): the table is 0..15 and the value is
//                   i * scale + zero;
//   otherwise:      bf16 norm `norm_index`, times, if kappa_index >= 0,
//                   Trunc12(norm `kappa_index` * kappa_scale) (the QJL
//                   coefficient of kvjax/_turbo.py, kept at 12 bits).
struct Segment {
  int32_t bits;          // 1, 2, 3 or 4
  int32_t channels;      // lanes of this segment (a multiple of 8)
  int32_t code_offset;   // byte offset in a token's code row
  int32_t lane_offset;   // offset in the query and accumulator lanes
  int32_t table_offset;  // offset of its 2^bits entries in `tables`
  int32_t norm_index;
  int32_t kappa_index;
  float kappa_scale;
};

constexpr int kMaxSegments = 4;

// Tokens per block of a SIMD run (a multiple of every variant's lanes): each
// block's fixed work (the rows' spans, the softmax's reductions and
// correction, the value accumulators' loads and stores) is about 560 cycles,
// so 64-token blocks spent 2 ns a token on it (Zen 4, AVX-512, one thread,
// 4k tokens: q4 25.6 -> 23.7 ns at 256, 23.4 at 512; 256 keeps a block's
// logits and weights of 4 rows in 8 KB for q4, one plane each).
constexpr int kAttendBlockTokens = 256;

// A tier's format. `lanes` is the accumulator width A (D, or 2D for the
// TurboQuant prod formats' QJL lanes).
struct TierFormat {
  ValueKind kind = ValueKind::kF32;
  int32_t lanes = 0;
  int32_t row_bytes = 0;   // bytes of one token's data or codes
  int32_t norm_count = 0;  // kLut with norms: bf16 norms per token
  int32_t num_segments = 0;
  Segment segments[kMaxSegments];
  const float* tables = nullptr;  // kLut codebooks
};

// One tier of one (sequence, layer, head), for K or for V: slot s holds its
// token's data at `data + s * row_bytes`; q8 and q4 have a scale and a zero
// per slot, TurboQuant `norm_count` bf16 norms.
struct TierData {
  const uint8_t* data = nullptr;
  const float* scale = nullptr;
  const float* zero = nullptr;
  const uint16_t* norms = nullptr;
};

struct RunArgs {
  // The tier's key and value formats (the same for the hot tiers; a store
  // may encode keys and values differently, e.g. q8 keys and q4 values).
  const TierFormat* key_format;
  const TierFormat* value_format;
  TierData k, v;
  int64_t first_slot;  // the run is slots [first_slot, first_slot + count)
  // A paged store (page_size > 0): the run is non-sink indices [first_slot,
  // first_slot + count) instead, index j in slot j % page_size of the page
  // whose tiers are page_k / page_v[j / page_size - first_slot / page_size]
  // (k and v are then unused).
  int64_t page_size = 0;
  const TierData* page_k = nullptr;
  const TierData* page_v = nullptr;
  int64_t count;
  int64_t first_pos;   // position of `first_slot`; positions rise by one
  int32_t rows;
  const float* q;       // [rows][key_format->lanes], scaled, the key format's domain
  const int64_t* lo;    // [rows]: row r sees positions [lo[r], hi[r]]
  const int64_t* hi;
  bool has_softcap;
  float softcap;
  // Working memory of at least RunScratchBytes(key, value, rows) bytes, 64-byte
  // aligned. (The SIMD variants take none from the heap: code compiled for
  // their instruction sets must not instantiate library templates that
  // baseline code could link to.)
  void* scratch;
};

// A block's planes of logits (keys) or weights (values) of a run in this
// format: one per kLut segment, at least one.
inline int BlockPlanes(const TierFormat& f) { return f.num_segments > 1 ? f.num_segments : 1; }

// Scratch bytes a run of `rows` rows over keys and values in these formats
// may use.
inline size_t RunScratchBytes(const TierFormat& key, const TierFormat& value, int rows) {
  const size_t block = kAttendBlockTokens, r = rows, lanes = key.lanes + value.lanes;
  const size_t planes = BlockPlanes(key) + BlockPlanes(value);
  const size_t floats = (r + 1) * lanes + r * block * planes + 2 * r + 2 * block * kMaxSegments;
  // Plus one block's preloaded value words (a vector of up to 64 bytes a token) and
  // 64 bytes of alignment for each of up to 16 arrays.
  return 4 * floats + 32 * r + 64 * block + 64 * 16;
}

// The online softmax state of `rows` rows, updated in place by AttendRun.
struct Partial {
  float* max;      // [rows], -inf before any finite logit
  float* denom;    // [rows]
  uint8_t* seen;   // [rows]: the row saw at least one token
  uint8_t* nan;    // [rows]: the row saw a NaN or +Inf logit
  float* acc;      // [rows][value lanes], natural lane order of the value format's domain
};

using AttendRunFn = void (*)(const RunArgs& args, const Partial& out);

// Where run token t is: its K and V tiers and slot (a ring slot, or a slot
// of its page), and how many tokens from t on are in the same tiers.
struct TokenPlace {
  TierData k, v;
  int64_t slot, contiguous;
};
inline TokenPlace Locate(const RunArgs& a, int64_t t) {
  if (a.page_size == 0) return {a.k, a.v, a.first_slot + t, a.count - t};
  const int64_t j = a.first_slot + t, page = j / a.page_size - a.first_slot / a.page_size;
  const int64_t slot = j % a.page_size;
  const int64_t left = a.count - t, in_page = a.page_size - slot;
  return {a.page_k[page], a.page_v[page], slot, left < in_page ? left : in_page};
}

// Visible tokens `[begin, end)` of a run (indices into the run) for a row
// that sees positions [lo, hi]: empty when they do not meet.
inline void VisibleSpan(const RunArgs& a, int r, int64_t* begin, int64_t* end) {
  // lo may be INT64_MIN (no window): compare before subtracting.
  int64_t b = a.lo[r] <= a.first_pos ? 0 : a.lo[r] - a.first_pos;
  int64_t e = a.hi[r] < a.first_pos ? 0 : a.hi[r] - a.first_pos + 1;
  b = b > a.count ? a.count : b;
  e = e > a.count ? a.count : e;
  *begin = b;
  *end = e > b ? e : b;
}

namespace scalar {
// The readable reference: token by token, natural lane order.
void AttendRun(const RunArgs& args, const Partial& out);
}  // namespace scalar

}  // namespace kvjax

#endif  // KVJAX_FFI_ATTENTION_KERNELS_H_
