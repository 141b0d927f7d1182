// Decode attention over one run, written once for every SIMD variant.
//
// Included by attention_avx512.cc, attention_avx2.cc and attention_neon.cc
// inside their own namespace, after defining `Isa`: a struct of static vector
// operations (kLanes floats per vector V) and of value decoders that produce
// one chunk of kLanes lanes of a token in the variant's own lane order (see
// `LaneOrder`). The algorithm, per block of kBlock tokens:
//
//   1. the visible span of every row in the block (positions; rows that see
//      nothing or are already NaN skip the block);
//   2. kLut formats: each token's value table per segment (dequantized: the
//      codebook times its norm, or q4's 0..15 * scale + zero);
//   3. logits of every row for every token, in tiles of kRows rows x
//      KeyPass::TileTokens(kRows) tokens (mostly kLanes / kRows): the decoded
//      chunk of a token is loaded once for all rows of the tile, and the
//      tile's dot products reduce kLanes at a time in a transpose-and-add;
//   4. per row: softcap, the mask (select), NaN / +Inf detection, the block
//      max, the softmax weights;
//   5. values: tiles of 4 rows x Isa::kValueChunks chunks of accumulators
//      in registers over the block's tokens (each visible token decoded once
//      for the tile), added to the running accumulator with the row's
//      correction (two-level summation keeps long runs accurate).
//
// Keys and values may have different formats (`KeyPass` reads the keys for
// steps 2-3, `ValuePass` the values for step 5; each is instantiated once per
// format kind). Lanes never cross tokens, and a row never reads a token
// outside its span.

#ifndef KVJAX_FFI_ATTENTION_SIMD_H_
#define KVJAX_FFI_ATTENTION_SIMD_H_

// This header is included inside a namespace; its includes come first in
// the including file: attention_format.h, attention_kernels.h, <cstdint>,
// <cstring>, <limits>, <new>. It uses no library templates (see RunArgs::scratch).

// Carves 64-byte aligned arrays out of a run's scratch memory.
class Arena {
 public:
  explicit Arena(void* base) : next_(static_cast<char*>(base)) {}
  template <typename T>
  T* Take(size_t count) {
    T* out = reinterpret_cast<T*>(next_);
    next_ += (count * sizeof(T) + 63) / 64 * 64;
    return out;
  }

 private:
  char* next_;
};

#define KVJAX_INLINE inline __attribute__((always_inline))

// exp(x) for x <= 0, about 1 ulp: -inf (and anything below -87.3, whose exp
// is under FLT_MIN) gives 0, NaN gives NaN. Cody-Waite reduction by ln 2,
// then the Taylor series to degree 7 on |r| <= ln(2) / 2.
KVJAX_INLINE typename Isa::V VecExp(typename Isa::V x) {
  using V = typename Isa::V;
  const V xc = Isa::Max(Isa::Set1(-87.3f), x);  // a NaN x stays NaN
  const V n = Isa::Round(Isa::Mul(xc, Isa::Set1(1.44269504088896341f)));
  V r = Isa::Fnma(n, Isa::Set1(0.693359375f), xc);
  r = Isa::Fnma(n, Isa::Set1(-2.12194440e-4f), r);
  V p = Isa::Set1(1.0f / 5040);
  const float coefficients[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  for (float c : coefficients) p = Isa::Fma(p, r, Isa::Set1(c));
  return Isa::Select(Isa::Less(x, Isa::Set1(-87.3f)), Isa::Zero(), Isa::Ldexp(p, n));
}

// SoftmaxWeight (attention_kernels.h) on every lane: FLT_MIN where float32's
// exp underflows and float64's would not.
KVJAX_INLINE typename Isa::V VecSoftmaxWeight(typename Isa::V gap) {
  const typename Isa::V p = VecExp(gap);
  return Isa::Select(Isa::Less(Isa::Set1(kFloat64ExpFloor), gap),
                     Isa::Max(p, Isa::Set1(kFloat32Min)), p);
}

// tanh(x) = -expm1(-2|x|) / (2 + expm1(-2|x|)) with the sign of x; expm1 by
// its series below 0.625, so small logits keep their relative precision;
// +-Inf give +-1 and NaN gives NaN.
KVJAX_INLINE typename Isa::V VecTanh(typename Isa::V x) {
  using V = typename Isa::V;
  const V ny = Isa::Mul(Isa::Abs(x), Isa::Set1(-2.0f));
  V series = Isa::Set1(1.0f / 40320);
  const float coefficients[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f};
  for (float c : coefficients) series = Isa::Fma(series, ny, Isa::Set1(c));
  series = Isa::Mul(series, ny);
  const V em = Isa::Select(Isa::Less(Isa::Set1(-0.625f), ny), series,
                           Isa::Sub(VecExp(ny), Isa::Set1(1.0f)));
  const V t = Isa::Div(Isa::Sub(Isa::Zero(), em), Isa::Add(Isa::Set1(2.0f), em));
  return Isa::CopySign(t, x);
}

constexpr int kMaxLutBlocks = 16;
constexpr int kMaxLutIterations = 32;  // chunks per word block: 1-bit codes
// Added to a segment's word mode when its table is 0..15 (q4).
constexpr int kAffineMode = 4;
// q4 in full words where the variant masks codes in place
// (Isa::kMaskedCodes): lanes below a word's top code hold c 2^s, their
// query lanes (keys) or their sums (values) scaled by 2^-s; the top code is
// shifted down as in kAffineMode.
constexpr int kMaskedMode = Isa::kFullWords + 2 * kAffineMode;
// Values: a masked value tile that holds a word's top code (its last chunk;
// its words load as kMaskedMode's, in full: the mode modulo kAffineMode).
constexpr int kMaskedTopMode = kMaskedMode + kAffineMode;
// Masked values sum c 2^s w over a block: exact, and without overflow while
// every scale of the block is below this (256 x 15 x 2^28 x 2^86 < 2^127;
// kBlock is defined below, and checked against this there).
constexpr float kMaskedScaleLimit = 0x1p86f;
// 2^(-4 it): what a masked code of iteration it is multiplied by.
constexpr float MaskedUnit(int it) { return it == 0 ? 1.0f : 0.0625f * MaskedUnit(it - 1); }
// Added to a 4-bit segment's word mode (full or repeated words) where
// the variant reads symmetric tables with one 8-entry lookup
// (Isa::kSymmetricLookup) and the table is symmetric: entry 15 - c is
// -entry c, as in every TurboQuant codebook, and so (round to nearest, NaN
// aside) in any multiple of one.
constexpr int kSymmetricMode = 16;
// Iterations of a kMaskedMode word block (a full word's 8 codes): a constant,
// so that the loop over them unrolls. Only masked q4 keys unroll: unrolled,
// the lookups' tables spill (AVX2, Zen 3: turbo3 24% more instructions).
constexpr int kMaskedIterations = 8;

// I::LutMaskedCodes (I = Isa), named through a template so that only a
// variant that masks codes instantiates it.
template <typename I>
KVJAX_INLINE typename I::V MaskedCodes(typename I::Words words, typename I::Words mask) {
  return I::LutMaskedCodes(words, mask);
}
// The top code of a q4 word: a logical shift alone isolates it.
template <typename I>
KVJAX_INLINE typename I::V TopCodes(typename I::Words words, typename I::Words shift) {
  return I::LutTopCodes(words, shift);
}
// Iteration `it` of a masked segment reads code `it` of every word (full
// words: LutLaneCodes' code is the iteration), so its mask, 15 << 4 it, and the
// top code's shift are the same in every lane and in every such segment.
// In the key tiles, whose loop over the iterations unrolls, a constant
// rather than a copy in the tile's view (7 masks beside 16 accumulators
// spilled more: AVX-512 q4 26.0 -> 25.6 ns a token, Zen 4).
template <typename I>
KVJAX_INLINE typename I::Words UniformMask(int it) {
  return I::SetWords(it + 1 == kMaskedIterations ? 4u * it : 15u << (4 * it));
}

// kSymmetricMode words are folded as they load (I::SymmetricWords, once
// per token and word block), then every chunk is looked up from them
// (I::LutSymmetric). Through templates on I = Isa: only a variant with
// symmetric lookups instantiates them.
template <int kMode, typename I>
KVJAX_INLINE typename I::Words LoadedWords(typename I::Words words) {
  if constexpr (kMode >= kSymmetricMode) return I::SymmetricWords(words);
  return words;
}
template <typename I>
KVJAX_INLINE typename I::V SymmetricValues(typename I::Words folded, typename I::Words shift,
                                           const typename I::Table& table) {
  return I::LutSymmetric(folded, shift, table);
}

// Chunk of a kLut segment: the codes as numbers (q4) or looked up.
template <int kMode>
KVJAX_INLINE typename Isa::V LutValues(typename Isa::Words words, typename Isa::Words shift,
                                       const typename Isa::Table& table) {
  if constexpr (kMode >= kSymmetricMode) return SymmetricValues<Isa>(words, shift, table);
  if (kMode >= kAffineMode) return Isa::LutCodes(words, shift, table);
  if (kMode == Isa::kThreeBitWords) return Isa::LutLookup8(words, shift, table);
  return Isa::LutLookup(words, shift, table);
}

// A kLut segment in the kernel's lane order: `blocks` groups of words,
// each read once per token and looked up `iterations` times (one chunk of
// L lanes each, with that iteration's shifts).
struct LutSegment {
  int first_chunk, blocks, iterations;
  int mode;  // how its words load: Isa::kFullWords, kRepeatedWords, kThreeBitWords
  typename Isa::LutBlock block[kMaxLutBlocks];
  typename Isa::Words shift[kMaxLutIterations];
};

constexpr int kBlock = kAttendBlockTokens;
static_assert(kBlock <= 256, "kMaskedScaleLimit bounds sums of 256 tokens");

// A kLut segment's word mode as a type, for one instantiation per mode.
template <int kMode>
struct WordMode {
  static constexpr int value = kMode;
};

// fn(WordMode<mode>{}) for every mode a segment can have.
template <typename Fn>
KVJAX_INLINE void WithWordMode(int mode, const Fn& fn) {
  switch (mode) {
    case Isa::kFullWords: fn(WordMode<Isa::kFullWords>{}); return;
    case Isa::kRepeatedWords: fn(WordMode<Isa::kRepeatedWords>{}); return;
    case Isa::kFullWords + kAffineMode: fn(WordMode<Isa::kFullWords + kAffineMode>{}); return;
    case Isa::kRepeatedWords + kAffineMode:
      fn(WordMode<Isa::kRepeatedWords + kAffineMode>{});
      return;
    case kMaskedMode:
      if constexpr (Isa::kMaskedCodes) fn(WordMode<kMaskedMode>{});
      return;
    case Isa::kFullWords + kSymmetricMode:
      if constexpr (Isa::kSymmetricLookup) fn(WordMode<Isa::kFullWords + kSymmetricMode>{});
      return;
    case Isa::kRepeatedWords + kSymmetricMode:
      if constexpr (Isa::kSymmetricLookup) fn(WordMode<Isa::kRepeatedWords + kSymmetricMode>{});
      return;
    default: fn(WordMode<Isa::kThreeBitWords>{}); return;
  }
}

// How the kernel reads one tier format (the keys' or the values'): its lane
// order, and for kLut formats each segment's word plan and codebook.
template <ValueKind kKind>
struct TierPlan {
  using V = typename Isa::V;
  static constexpr int L = Isa::kLanes;

  const TierFormat* f = nullptr;
  int lanes = 0, chunks = 0;
  int* perm = nullptr;  // lane i of the kernel holds natural lane perm[i]
  static constexpr bool kNaturalOrder = kKind != ValueKind::kLut;  // perm[i] == i
  bool affine = false;  // q8, q4: values c * scale + zero (q4's table is 0..15)
  LutSegment segs[kMaxSegments];
  float base[kMaxSegments][16] = {};

  void Plan(const TierFormat& format, Arena* arena) {
    f = &format;
    lanes = format.lanes;
    chunks = lanes / L;
    perm = arena->Take<int>(lanes);
    for (int i = 0; i < lanes; ++i) perm[i] = i;
    affine = kKind == ValueKind::kQ8;
    if (kKind != ValueKind::kLut) return;
    affine = format.segments[0].norm_index < 0;
    for (int s = 0; s < format.num_segments; ++s) {
      const Segment& seg = format.segments[s];
      LutChannels(seg, L, perm + seg.lane_offset);
      for (int i = 0; i < seg.channels; ++i) perm[seg.lane_offset + i] += seg.lane_offset;
      const LutGeometry g = LutGeometryOf(seg, L);
      LutSegment& ls = segs[s];
      ls.first_chunk = seg.lane_offset / L;
      ls.iterations = g.iterations;
      ls.blocks = seg.channels / L / g.iterations;
      ls.mode = seg.bits == 3 ? Isa::kThreeBitWords
                : g.chunk_words == L ? Isa::kFullWords : Isa::kRepeatedWords;
      // q4's table is 0..15: a variant may read the codes as numbers.
      if (seg.norm_index < 0) ls.mode += kAffineMode;
      for (int b = 0; b < ls.blocks; ++b) Isa::PlanBlock(seg, b, format.row_bytes, &ls.block[b]);
      for (int it = 0; it < g.iterations; ++it) ls.shift[it] = Isa::PlanShift(seg, it);
      // The codebook repeated to 16 entries (q4: 0 .. 15).
      for (int i = 0; i < 16; ++i) {
        base[s][i] = seg.norm_index < 0 ? static_cast<float>(i % 16)
                                        : format.tables[seg.table_offset + i % (1 << seg.bits)];
      }
    }
  }

  // `lanes` floats from natural order into the kernel's (as a run starts)
  // and back plus `add` (as it ends): copies where the order is natural.
  void ToKernelOrder(const float* natural, float* kernel) const {
    if constexpr (kNaturalOrder) {
      std::memcpy(kernel, natural, sizeof(float) * lanes);
      return;
    }
    for (int i = 0; i < lanes; ++i) kernel[i] = natural[perm[i]];
  }
  void ToNaturalOrder(const float* kernel, float add, float* natural) const {
    if constexpr (kNaturalOrder) {
      for (int i = 0; i < lanes; ++i) natural[i] = kernel[i] + add;
      return;
    }
    for (int i = 0; i < lanes; ++i) natural[perm[i]] = kernel[i] + add;
  }

  // Entry 15 - c is entry c with its sign bit flipped, for every c: so
  // also in the table times any factor (a product's sign is the factors',
  // rounding to nearest), except where the product is NaN, whose sign no
  // result depends on.
  static bool Symmetric(const float* table) {
    for (int c = 0; c < 8; ++c) {
      uint32_t low, high;
      std::memcpy(&low, &table[c], sizeof low);
      std::memcpy(&high, &table[15 - c], sizeof high);
      if ((low ^ high) != 0x80000000u) return false;
    }
    return true;
  }

  // Whether segment s can read its codes masked in place (kMaskedMode):
  // q4 in full words, a word's 8 codes a word block.
  bool Maskable(int s) const {
    return segs[s].mode == Isa::kFullWords + kAffineMode && f->segments[s].bits == 4 &&
           segs[s].iterations == kMaskedIterations;
  }

  // 4-bit segments with norms whose table is symmetric read it in one
  // 8-entry lookup (kSymmetricMode); whether any does.
  bool MarkSymmetric() {
    bool any = false;
    if constexpr (kKind != ValueKind::kLut) return any;
    for (int s = 0; s < f->num_segments; ++s) {
      LutSegment& ls = segs[s];
      const bool words = ls.mode == Isa::kFullWords || ls.mode == Isa::kRepeatedWords;
      if (words && f->segments[s].bits == 4 && Symmetric(base[s])) {
        ls.mode += kSymmetricMode;
        any = true;
      }
    }
    return any;
  }

  const uint8_t* RowOf(const TierData& d, int64_t slot) const {
    return d.data + slot * f->row_bytes;
  }

  // Chunk `c` of a token of a raw or q8 tier, as floats (q8: its codes; the
  // scale and zero apply per token, to the dot or the weight, as for q4).
  KVJAX_INLINE V Direct(const TierData& d, int64_t slot, int c) const {
    const uint8_t* row = RowOf(d, slot);
    if (kKind == ValueKind::kF32) return Isa::LoadF32(row, c);
    if (kKind == ValueKind::kBF16) return Isa::LoadBF16(row, c);
    if (kKind == ValueKind::kF16) return Isa::LoadF16(row, c);
    return Isa::LoadU8(row, c);
  }

  // Per-token factors of each kLut segment's values (norms, QJL
  // coefficients; q4: the scales), out[s * kBlock + t].
  void Factors(const TierData& d, int64_t slot0, int n, float* out) const {
    if (kKind != ValueKind::kLut) return;
    for (int s = 0; s < f->num_segments; ++s) {
      const Segment& seg = f->segments[s];
      float* factor = out + s * kBlock;
      int t = 0;
      if (seg.norm_index < 0) {
        for (; t + L <= n; t += L) Isa::Store(factor + t, Isa::Load(d.scale + slot0 + t));
        for (; t < n; ++t) factor[t] = d.scale[slot0 + t];
      } else if (seg.kappa_index < 0 && f->norm_count <= 2) {
        // The norms as vectors: one or two bf16 per token (bits << 16).
        const uint16_t* norms = d.norms + slot0 * f->norm_count;
        for (; t + L <= n; t += L) {
          Isa::Store(factor + t, f->norm_count == 1
                                     ? Isa::LoadBF16(reinterpret_cast<const uint8_t*>(norms + t), 0)
                                     : Isa::LoadBF16OfPairs(norms + 2 * t, seg.norm_index));
        }
      }
      for (; t < n; ++t) factor[t] = SegmentFactor(*f, d, slot0 + t, seg);
    }
  }
};

// Per-row state of a run during one block.
struct RowSpan {
  int vb, ve;        // visible tokens of the current block, [vb, ve)
  bool active;       // updates this block
  float correction;  // of the accumulator, this block
};

// What a run's key pass and value pass share for one block: the rows'
// spans, the logits (per kLut key segment) and the softmax weights (per kLut
// value segment), each [segment][row][kBlock].
struct BlockState {
  int rows;
  RowSpan* row;
  float* scores;
  float* weights;
};

// Out of cache, the hardware prefetchers fall behind: each key tile asks
// for its tokens kAhead later (K and V rows), spread over the block rather
// than in bursts that fill every line-fill buffer; where those tokens are
// (the run's end, a paged run's page) is found once per block, with their
// scales, zeros and norms (a few lines), into L1. Rows of up to
// kNearRowBytes go into L1, wider ones into L2: kAhead tokens of float32
// rows (128 KB of K and V at 128 lanes) thrash L1 (Zen 4, 128k tokens out
// of cache: f32 with AVX2 120 ns a token into L1, 67 into L2), while q4's
// 16 KB gain there (AVX-512: 29.3 -> 27.7 ns).
constexpr int kAhead = 128;  // tokens, whatever kBlock is
constexpr int64_t kNearRowBytes = 128;
class AheadRows {
 public:
  // The tokens kAhead after a block's first (run index t0, ring slot slot0).
  AheadRows(const RunArgs& a, int64_t t0, int64_t slot0) {
    const int64_t t = t0 + kAhead;
    if (t >= a.count) return;
    TierData tiers[2] = {a.k, a.v};
    int64_t slot = slot0 + kAhead, available = a.count - t;
    if (a.page_size > 0) {
      const TokenPlace place = Locate(a, t);
      tiers[0] = place.k;
      tiers[1] = place.v;
      slot = place.slot;
      available = place.contiguous;
    }
    tokens_ = static_cast<int>(available < kBlock ? available : kBlock);
    const TierFormat* formats[2] = {a.key_format, a.value_format};
    for (int i = 0; i < 2; ++i) {
      const TierData& d = tiers[i];
      row_bytes_[i] = formats[i]->row_bytes;
      rows_[i] = reinterpret_cast<const char*>(d.data + slot * row_bytes_[i]);
      if (d.scale) {
        Lines(d.scale + slot, tokens_ * sizeof(float));
        Lines(d.zero + slot, tokens_ * sizeof(float));
      }
      const int norms = formats[i]->norm_count;
      if (d.norms) Lines(d.norms + slot * norms, tokens_ * norms * sizeof(uint16_t));
    }
  }

  // The K and V rows of block tokens [tt, tt + count), kAhead on, those in the run.
  KVJAX_INLINE void Rows(int tt, int count) const {
    if (tt + count > tokens_) count = tokens_ - tt;
    if (count <= 0) return;
    for (int i = 0; i < 2; ++i) {
      // From the first row's start: where rows are not line-aligned the
      // last line may be left out, and the next tile, starting in it, asks.
      const int64_t begin = tt * row_bytes_[i], end = (tt + count) * row_bytes_[i];
      if (row_bytes_[i] <= kNearRowBytes) {
        for (int64_t b = begin; b < end; b += 64) Isa::PrefetchNear(rows_[i] + b);
      } else {
        for (int64_t b = begin; b < end; b += 64) Isa::PrefetchFar(rows_[i] + b);
      }
    }
  }

 private:
  // Every 64-byte line that [p, p + bytes) touches.
  static KVJAX_INLINE void Lines(const void* p, int64_t bytes) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
    for (uintptr_t line = begin & ~uintptr_t{63}; line < begin + bytes; line += 64) {
      Isa::PrefetchNear(reinterpret_cast<const void*>(line));
    }
  }

  int tokens_ = 0;  // of the block kAhead on, in the run (contiguous)
  const char* rows_[2] = {};
  int64_t row_bytes_[2] = {};
};

// A block's per-token floats at p, tokens t .. t + L of the n - t left:
// whole vectors in a whole block (kWhole), else masked past the block's end.
template <bool kWhole>
KVJAX_INLINE typename Isa::V Part(const float* p, int left) {
  return kWhole ? Isa::Load(p) : Isa::LoadPartial(p, left);
}

// 3. The keys: logits of every row for every token of a block.
template <ValueKind kKind>
class KeyPass {
 public:
  using V = typename Isa::V;
  using W = typename Isa::Words;
  static constexpr int L = Isa::kLanes;

  KeyPass(const RunArgs& a, Arena* arena) : a_(a), rows_(a.rows) {
    plan_.Plan(*a.key_format, arena);
    const int lanes = plan_.lanes;
    q_ = arena->Take<float>(static_cast<size_t>(rows_) * lanes);
    q_sum_ = arena->Take<float>(rows_);
    factors_ = arena->Take<float>(kBlock * kMaxSegments);
    // Several segments with norms (split, prod): each token's factors scale
    // its tables, so all segments add to one tile of dots (one reduction).
    fused_ = kKind == ValueKind::kLut && plan_.f->num_segments > 1 && !plan_.affine;
    for (int r = 0; r < rows_; ++r) {
      const float* q = a.q + static_cast<int64_t>(r) * lanes;
      plan_.ToKernelOrder(q, q_ + r * lanes);
      // q8, q4: logits s (q . c) + z sum(q), the sum in vectors (one serial
      // chain of `lanes` adds was 0.5 us of a run's start, 4 rows).
      V sum = Isa::Zero();
      for (int c = 0; plan_.affine && c < plan_.chunks; ++c) sum = Isa::Add(sum, Isa::Load(q + c * L));
      q_sum_[r] = plan_.affine ? Isa::ReduceAdd(sum) : 0.0f;
    }
    if constexpr (Isa::kMaskedCodes) MaskCodes<Isa>();
    if constexpr (Isa::kMaskedBytes) MaskBytes<Isa>();
    if constexpr (Isa::kSymmetricLookup) plan_.MarkSymmetric();
  }

  int segments() const { return kKind == ValueKind::kLut ? plan_.f->num_segments : 1; }

  // q8 keys read in place (I::kMaskedBytes; I = Isa): a word holds 4 codes,
  // and iteration `it` of a block of 4 L codes masks byte `it` of every
  // word (c 2^(8 it), exact; the top byte shifted down), so chunk 4 b + it,
  // lane l holds natural lane 4 L b + 4 l + it, its query lane scaled by
  // 2^(-8 it). Beside FMAs, mask and convert cost less than zero-extend
  // and convert (Zen 4: 8 FMAs with 4 of either pair, 5.7 against 6.4
  // cycles).
  static constexpr int kByteIterations = 4;
  template <typename I>
  void MaskBytes() {
    if constexpr (kKind != ValueKind::kQ8) return;
    const int lanes = plan_.lanes;
    if (lanes % (kByteIterations * L) != 0) return;
    masked_bytes_ = true;
    for (int r = 0; r < rows_; ++r) {
      const float* q = a_.q + static_cast<int64_t>(r) * lanes;
      for (int c = 0; c < plan_.chunks; ++c) {
        const int b = c / kByteIterations, it = c % kByteIterations;
        const float scale = it + 1 < kByteIterations ? std::ldexp(1.0f, -8 * it) : 1.0f;
        for (int l = 0; l < L; ++l) {
          q_[r * lanes + c * L + l] = q[kByteIterations * L * b + kByteIterations * l + it] * scale;
        }
      }
    }
  }

  // Tokens per tile of `rows` rows: the variant's choice, which may differ
  // for keys that are looked up (they hold more registers).
  static constexpr int TileTokens(int rows) {
    return Isa::TileTokens(rows, kKind == ValueKind::kLut);
  }

  // q4 segments in full words read their codes in place (kMaskedMode): each
  // iteration below the top one scales its query lanes by 2^-s (its mask is
  // a constant of the tiles: UniformMask).
  // (A template on I = Isa: only a variant that masks codes instantiates it.)
  template <typename I>
  void MaskCodes() {
    if constexpr (kKind != ValueKind::kLut) return;
    for (int s = 0; s < plan_.f->num_segments; ++s) {
      if (!plan_.Maskable(s)) continue;
      LutSegment& ls = plan_.segs[s];
      ls.mode = kMaskedMode;
      for (int it = 0; it + 1 < ls.iterations; ++it) {
        const float scale = std::ldexp(1.0f, -4 * it);  // full words: lane code = it
        for (int b = 0; b < ls.blocks; ++b) {
          const int lane0 = (ls.first_chunk + b * ls.iterations + it) * L;
          for (int r = 0; r < rows_; ++r) {
            for (int l = 0; l < L; ++l) q_[r * plan_.lanes + lane0 + l] *= scale;
          }
        }
      }
    }
  }

  // scores[s][r][t] = q_r . k_t (segment s's dots) for every row and token
  // (fused segments: scores[0] holds the logits, factors applied).
  // `t0`: the block's index in the run (for prefetching ahead).
  void Scores(const BlockState& st, int64_t t0, int64_t slot0, int n) {
    const AheadRows ahead(a_, t0, slot0);
    plan_.Factors(a_.k, slot0, n, factors_);
    // Tiles of 4 rows (a GQA group of 4, or 4 queries), the rest in one
    // tile of 3, 2 or 1: each decoded key chunk serves every row of a tile.
    int r0 = 0;
    for (; r0 + 4 <= rows_; r0 += 4) ScoreTile<4>(st, r0, ahead, slot0, n);
    switch (rows_ - r0) {
      case 3: ScoreTile<3>(st, r0, ahead, slot0, n); break;
      case 2: ScoreTile<2>(st, r0, ahead, slot0, n); break;
      case 1: ScoreTile<1>(st, r0, ahead, slot0, n); break;
      default: break;
    }
  }

  // Row r's logits from its dots, for the softmax: the segments' dots times
  // their factors (q8, q4: s dot + z sum(q)). What it reads is copied out of
  // the pass: read in place, the plan's flags and pointers were reloaded for
  // every vector (the softmax's float stores may alias them).
  struct LogitsView {
    const float* dots;     // row r's, segment 0
    const float* factors;  // kLut: segment g's at g * kBlock
    const float* scale;    // q8: the block's scales
    const float* zero;     // q8, q4: the block's zeros
    size_t plane;          // from one segment's dots to the next's
    int segments;          // kLut, not fused: segments whose dots add
    float q_sum;
    bool affine;

    // Tokens t .. t + L; kWhole: a whole block (t + L <= n).
    template <bool kWhole>
    KVJAX_INLINE V At(int t, int n) const {
      V x = Isa::Load(dots + t);
      if (kKind == ValueKind::kQ8) {
        return Isa::Fma(Isa::Set1(q_sum), Part<kWhole>(zero + t, n - t),
                        Isa::Mul(x, Part<kWhole>(scale + t, n - t)));
      }
      if (kKind != ValueKind::kLut || segments == 0) return x;
      x = Isa::Mul(x, Isa::Load(factors + t));
      for (int g = 1; g < segments; ++g) {
        x = Isa::Fma(Isa::Load(dots + g * plane + t), Isa::Load(factors + g * kBlock + t), x);
      }
      if (affine) x = Isa::Fma(Isa::Set1(q_sum), Part<kWhole>(zero + t, n - t), x);
      return x;
    }
  };

  LogitsView Logits(const BlockState& st, int r, int64_t slot0) const {
    const bool lut = kKind == ValueKind::kLut;
    return {&st.scores[r * kBlock],
            factors_,
            a_.k.scale ? a_.k.scale + slot0 : nullptr,
            a_.k.zero ? a_.k.zero + slot0 : nullptr,
            static_cast<size_t>(rows_) * kBlock,
            lut && !fused_ ? plan_.f->num_segments : 0,
            q_sum_[r],
            plan_.affine};
  }

 private:
  template <int kRows>
  void ScoreTile(const BlockState& st, int r0, const AheadRows& ahead, int64_t slot0, int n) {
    bool needed = false;
    for (int i = 0; i < kRows; ++i) needed = needed || st.row[r0 + i].active;
    if (!needed) return;
    constexpr int kTokens = TileTokens(kRows);
    const int lanes = plan_.lanes;
    if (kKind == ValueKind::kLut && fused_) {
      ScoreLutFused<kRows>(st, r0, ahead, slot0, n);
      return;
    }
    if (kKind == ValueKind::kLut) {
      // One dispatch per segment and block: the tiles loop inside.
      for (int s = 0; s < plan_.f->num_segments; ++s) {
        WithWordMode(plan_.segs[s].mode, [&](auto mode) {
          constexpr int kMode = decltype(mode)::value;
          ScoreLut<kRows, kMode, kMode == kMaskedMode ? kMaskedIterations : 0>(st, r0, s, ahead,
                                                                               slot0, n);
        });
      }
      return;
    }
    if constexpr (Isa::kMaskedBytes && kKind == ValueKind::kQ8) {
      if (masked_bytes_) {
        ScoreMaskedBytes<kRows, Isa>(st, r0, ahead, slot0, n);
        return;
      }
    }
    for (int tt = 0; tt < n; tt += kTokens) {
      int64_t slot[kTokens];
      TileSlots<kTokens>(r0 == 0 ? &ahead : nullptr, slot0, tt, n, slot);
      V x[kRows * kTokens];
#pragma GCC unroll 16
      for (int i = 0; i < kRows * kTokens; ++i) x[i] = Isa::Zero();
      for (int c = 0; c < plan_.chunks; ++c) {
        V q[kRows];
#pragma GCC unroll 4
        for (int i = 0; i < kRows; ++i) q[i] = Isa::Load(&q_[(r0 + i) * lanes + c * L]);
#pragma GCC unroll 16
        for (int j = 0; j < kTokens; ++j) {
          const V k = plan_.Direct(a_.k, slot[j], c);
#pragma GCC unroll 4
          for (int i = 0; i < kRows; ++i) x[i * kTokens + j] = Isa::Fma(q[i], k, x[i * kTokens + j]);
        }
      }
      StoreDots<kRows>(st, x, r0, 0, tt);
    }
  }

  // q8 key tiles read in place (MaskBytes): each token's words loaded once
  // per block of 4 L codes, masked once per iteration for every row.
  template <int kRows, typename I>
  void ScoreMaskedBytes(const BlockState& st, int r0, const AheadRows& ahead, int64_t slot0,
                        int n) {
    constexpr int kTokens = TileTokens(kRows);
    const int lanes = plan_.lanes;
    for (int tt = 0; tt < n; tt += kTokens) {
      int64_t slot[kTokens];
      TileSlots<kTokens>(r0 == 0 ? &ahead : nullptr, slot0, tt, n, slot);
      const uint8_t* row[kTokens];
#pragma GCC unroll 16
      for (int j = 0; j < kTokens; ++j) row[j] = plan_.RowOf(a_.k, slot[j]);
      V x[kRows * kTokens];
#pragma GCC unroll 16
      for (int i = 0; i < kRows * kTokens; ++i) x[i] = I::Zero();
      for (int b = 0; b < plan_.chunks / kByteIterations; ++b) {
        W words[kTokens];
#pragma GCC unroll 16
        for (int j = 0; j < kTokens; ++j) words[j] = I::LoadWords(row[j] + kByteIterations * L * b);
#pragma GCC unroll 4
        for (int it = 0; it < kByteIterations; ++it) {
          V q[kRows];
#pragma GCC unroll 4
          for (int i = 0; i < kRows; ++i) {
            q[i] = I::Load(&q_[(r0 + i) * lanes + (kByteIterations * b + it) * L]);
          }
#pragma GCC unroll 16
          for (int j = 0; j < kTokens; ++j) {
            const V k = it + 1 < kByteIterations
                            ? MaskedCodes<I>(words[j], I::SetWords(0xFFu << (8 * it)))
                            : TopCodes<I>(words[j], I::SetWords(8 * it));
#pragma GCC unroll 4
            for (int i = 0; i < kRows; ++i) x[i * kTokens + j] = I::Fma(q[i], k, x[i * kTokens + j]);
          }
        }
      }
      StoreDots<kRows>(st, x, r0, 0, tt);
    }
  }

  // The dots of kRows rows x TileTokens(kRows) tokens from the tile's
  // accumulators, L at a time, taken as a copy: were the accumulators' own
  // address taken, GCC would keep them in memory through the whole loop.
  template <int kRows>
  KVJAX_INLINE void StoreDots(const BlockState& st, const V* accumulators, int r0, int s, int tt) {
    constexpr int kTokens = TileTokens(kRows);
    constexpr int kDots = kRows * kTokens, kGroups = (kDots + L - 1) / L;
    alignas(64) float dots[kGroups * L];
#pragma GCC unroll 2
    for (int g = 0; g < kGroups; ++g) {
      V x[L];
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) x[i] = g * L + i < kDots ? accumulators[g * L + i] : Isa::Zero();
      Isa::Store(dots + g * L, Isa::ReduceTile(x));
    }
    // Dots of tokens past n are masked before any use (Softmax), so only a
    // block row's end bounds the copy: whole tiles where kTokens divides it.
    float* out = st.scores + static_cast<size_t>(s) * rows_ * kBlock;
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) {
      float* row = &out[(r0 + i) * kBlock + tt];
      if (kBlock % kTokens == 0) {
        std::memcpy(row, &dots[i * kTokens], sizeof(float) * kTokens);
      } else {
        for (int j = 0; j < kTokens && tt + j < kBlock; ++j) row[j] = dots[i * kTokens + j];
      }
    }
  }

  // The ring slots of a tile's tokens (a token past the end is a repeat of
  // the last one, its dots unused); one pass over the block prefetches ahead.
  template <int kTokens>
  KVJAX_INLINE void TileSlots(const AheadRows* ahead, int64_t slot0, int tt, int n,
                              int64_t* slot) const {
    if (ahead) ahead->Rows(tt, kTokens);
#pragma GCC unroll 16
    for (int j = 0; j < kTokens; ++j) slot[j] = slot0 + (tt + j < n ? tt + j : n - 1);
  }

  // One kLut segment's dots for a block, tile by tile: each token's words
  // read once per word block, looked up once per iteration (chunk), the
  // segment's table in registers.
  template <int kRows, int kMode, int kIterations>
  void ScoreLut(const BlockState& st, int r0, int s, const AheadRows& ahead, int64_t slot0,
                int n) {
    constexpr int kTokens = TileTokens(kRows);
    typename Isa::Table table[kTokens];
#pragma GCC unroll 16
    for (int j = 0; j < kTokens; ++j) table[j] = Isa::LoadTable(plan_.base[s]);
    const SegmentView<kIterations> view(*this, r0, s);
    for (int tt = 0; tt < n; tt += kTokens) {
      int64_t slot[kTokens];
      TileSlots<kTokens>(r0 == 0 && s == 0 ? &ahead : nullptr, slot0, tt, n, slot);
      V x[kRows * kTokens];
#pragma GCC unroll 16
      for (int i = 0; i < kRows * kTokens; ++i) x[i] = Isa::Zero();
      SegmentTile<kRows, kMode>(x, view, slot, table);
      StoreDots<kRows>(st, x, r0, s, tt);
    }
  }

  // All segments' dots of a block into one tile per 16 tokens x rows: each
  // token's tables times its segment factors (the tile's last token repeats
  // past n, as its slot does).
  template <int kRows>
  void ScoreLutFused(const BlockState& st, int r0, const AheadRows& ahead, int64_t slot0, int n) {
    constexpr int kTokens = TileTokens(kRows);
    SegmentView<0> view[kMaxSegments];
    // Built in place: an assigned copy moved all kMaxLutIterations shifts
    // (turbo3.5: 1% of a call in `rep movs`), the constructor those in use.
    for (int s = 0; s < plan_.f->num_segments; ++s) new (&view[s]) SegmentView<0>(*this, r0, s);
    for (int tt = 0; tt < n; tt += kTokens) {
      int64_t slot[kTokens];
      TileSlots<kTokens>(r0 == 0 ? &ahead : nullptr, slot0, tt, n, slot);
      V x[kRows * kTokens];
#pragma GCC unroll 16
      for (int i = 0; i < kRows * kTokens; ++i) x[i] = Isa::Zero();
      for (int s = 0; s < plan_.f->num_segments; ++s) {
        const typename Isa::Table base = Isa::LoadTable(plan_.base[s]);
        typename Isa::Table table[kTokens];
#pragma GCC unroll 16
        for (int j = 0; j < kTokens; ++j) {
          const float factor = factors_[s * kBlock + (tt + j < n ? tt + j : n - 1)];
          table[j] = Isa::ScaleTable(base, Isa::Set1(factor));
        }
        // Fused segments have norms: never an affine mode.
        WithWordMode(plan_.segs[s].mode, [&](auto mode) {
          constexpr int kMode = decltype(mode)::value;
          if constexpr (kMode % kSymmetricMode < kAffineMode) {
            SegmentTile<kRows, kMode>(x, view[s], slot, table);
          }
        });
      }
      StoreDots<kRows>(st, x, r0, 0, tt);
    }
  }

  // What one segment's tiles of rows r0.. read, copied out of the plan
  // first: read in place (Isa::Words may alias the dots' float stores), its
  // masks and the query and row addresses were reloaded, and the masks
  // spilled again, for every tile (q4: 194 key-pass instructions a token,
  // 174 with the copy).
  // kIterations: the segment's iterations (masked q4, whose masks are
  // constants: UniformMask), or 0 (read at run time, with the shifts).
  template <int kIterations>
  struct SegmentView {
    static constexpr int kShifts = kIterations > 0 ? 1 : kMaxLutIterations;
    SegmentView() = default;
    SegmentView(const KeyPass& pass, int r0, int s)
        : ls(&pass.plan_.segs[s]),
          q(&pass.q_[r0 * pass.plan_.lanes + ls->first_chunk * L]),
          data(pass.a_.k.data),
          row_bytes(pass.plan_.f->row_bytes),
          lanes(pass.plan_.lanes),
          blocks(ls->blocks),
          iterations(kIterations > 0 ? kIterations : ls->iterations) {
      for (int it = 0; kIterations == 0 && it < iterations; ++it) shift[it] = ls->shift[it];
    }
    const LutSegment* ls;
    const float* q;  // row r0's lanes of the segment's first chunk
    const uint8_t* data;
    int64_t row_bytes;
    int lanes, blocks, iterations;
    W shift[kShifts];  // kIterations == 0: each iteration's shifts
  };

  // A segment's dots of one tile into x: each token's words read once per
  // word block, looked up once per iteration (chunk) in its table.
  template <int kRows, int kMode, int kIterations>
  KVJAX_INLINE void SegmentTile(V* x, const SegmentView<kIterations>& view, const int64_t* slot,
                                const typename Isa::Table* table) const {
    constexpr int kTokens = TileTokens(kRows);
    const uint8_t* row[kTokens];
#pragma GCC unroll 16
    for (int j = 0; j < kTokens; ++j) row[j] = view.data + slot[j] * view.row_bytes;
    for (int b = 0; b < view.blocks; ++b) {
      W words[kTokens];
#pragma GCC unroll 16
      for (int j = 0; j < kTokens; ++j) {
        words[j] = LoadedWords<kMode, Isa>(
            Isa::template LutWords<kMode % kAffineMode>(row[j], view.ls->block[b]));
      }
      const float* q_block = view.q + b * view.iterations * L;
      if constexpr (kIterations > 0) {  // masked q4 (kMaskedMode) alone
#pragma GCC unroll 8
        for (int it = 0; it < kIterations; ++it) {
          SegmentChunk<kRows, kMode>(x, words, q_block, view.lanes, UniformMask<Isa>(it),
                                     it, it + 1 == kIterations, table);
        }
      } else {
        for (int it = 0; it < view.iterations; ++it) {
          SegmentChunk<kRows, kMode>(x, words, q_block, view.lanes, view.shift[it],
                                     it, it + 1 == view.iterations, table);
        }
      }
    }
  }

  // Iteration `it` of a word block: one chunk of every token of the tile.
  template <int kRows, int kMode>
  KVJAX_INLINE void SegmentChunk(V* x, const W* words, const float* q_block, int lanes, W shift,
                                 int it, bool top, const typename Isa::Table* table) const {
    constexpr int kTokens = TileTokens(kRows);
    V q[kRows];
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) q[i] = Isa::Load(q_block + i * lanes + it * L);
#pragma GCC unroll 16
    for (int j = 0; j < kTokens; ++j) {
      V k;
      if constexpr (kMode == kMaskedMode) {
        k = top ? TopCodes<Isa>(words[j], shift) : MaskedCodes<Isa>(words[j], shift);
      } else {
        k = LutValues<kMode>(words[j], shift, table[j]);
      }
#pragma GCC unroll 4
      for (int i = 0; i < kRows; ++i) x[i * kTokens + j] = Isa::Fma(q[i], k, x[i * kTokens + j]);
    }
  }

  const RunArgs& a_;
  const int rows_;
  TierPlan<kKind> plan_;
  float *q_, *q_sum_, *factors_;
  bool fused_ = false;
  bool masked_bytes_ = false;  // q8 keys read in place (MaskBytes)
};

// 5. The values: acc_r = acc_r * correction_r + sum over the row's visible
//    tokens of w[r][t] * v_t, in the value format's domain.
template <ValueKind kKind>
class ValuePass {
 public:
  using V = typename Isa::V;
  using M = typename Isa::Mask;
  using W = typename Isa::Words;
  static constexpr int L = Isa::kLanes;

  ValuePass(const RunArgs& a, const Partial& out, Arena* arena) : a_(a), out_(out), rows_(a.rows) {
    plan_.Plan(*a.value_format, arena);
    if constexpr (Isa::kSymmetricLookup) symmetric_ = plan_.MarkSymmetric();
    if constexpr (Isa::kMaskedCodes) PlanMasks<Isa>();
    const int lanes = plan_.lanes;
    acc_ = arena->Take<float>(static_cast<size_t>(rows_) * lanes);
    zero_acc_ = arena->Take<float>(rows_);
    factors_ = arena->Take<float>(kBlock * kMaxSegments);
    // The array only where a segment preloads: beside it q4's loops ran
    // 1.7% slower (Zen 3, two paired runs; placement, not work).
    bool preloads = false;
    for (int s = 0; kKind == ValueKind::kLut && s < plan_.f->num_segments; ++s) {
      preloads = preloads || PreloadsWords(plan_.segs[s].mode);
    }
    if (preloads) words_ = arena->Take<W>(kBlock);
    for (int r = 0; r < rows_; ++r) {
      const float* acc = out.acc + static_cast<int64_t>(r) * lanes;
      plan_.ToKernelOrder(acc, acc_ + r * lanes);
      zero_acc_[r] = 0.0f;
    }
  }

  // The block's factors; whether its q4 segments may read masked codes.
  void Factors(int64_t slot0, int n) {
    plan_.Factors(a_.v, slot0, n, factors_);
    if (!any_masked_) return;
    // A scale not below the limit, NaN included: codes as numbers (kAffineMode).
    const float* scale = a_.v.scale + slot0;
    const V limit = Isa::Set1(kMaskedScaleLimit), one = Isa::Set1(1.0f);
    V over = Isa::Zero();
    int t = 0;
    for (; t + L <= n; t += L) {
      over = Isa::Select(Isa::Less(Isa::Abs(Isa::Load(scale + t)), limit), over, one);
    }
    masked_block_ = Isa::ReduceMax(over) == 0.0f;
    for (; t < n; ++t) masked_block_ = masked_block_ && std::fabs(scale[t]) < kMaskedScaleLimit;
  }

  // Row r's weights from its softmax weights p, for the softmax: times each
  // kLut segment's factor (q8: its scale); the affine formats' p z summed
  // apart. Copied out of the pass, as KeyPass::LogitsView is.
  struct WeightsView {
    float* weights;        // row r's, segment 0
    const float* factors;  // kLut: segment g's at g * kBlock
    const float* scale;    // q8: the block's scales
    const float* zero;     // q8, q4: the block's zeros
    size_t plane;          // from one segment's weights to the next's
    int segments;          // kLut
    bool affine;

    // Tokens t .. t + L; kWhole: the row sees every token of a whole block.
    template <bool kWhole>
    KVJAX_INLINE void Put(int t, int n, const RowSpan& row, V p, V* zero_sum) const {
      if (kKind != ValueKind::kLut && kKind != ValueKind::kQ8) {
        Isa::Store(weights + t, p);
        return;
      }
      if (kKind == ValueKind::kQ8) {
        Isa::Store(weights + t, Isa::Mul(p, Part<kWhole>(scale + t, n - t)));
      } else {
        for (int g = 0; g < segments; ++g) {
          Isa::Store(weights + g * plane + t, Isa::Mul(p, Isa::Load(factors + g * kBlock + t)));
        }
      }
      if (affine && kWhole) {
        *zero_sum = Isa::Fma(p, Isa::Load(zero + t), *zero_sum);
      } else if (affine) {  // select: a masked token's zero (maybe NaN) never enters
        const M visible = Isa::SpanMask(t, row.vb, row.ve);
        *zero_sum = Isa::Add(*zero_sum, Isa::Select(
            visible, Isa::Mul(p, Isa::LoadPartial(zero + t, n - t)), Isa::Zero()));
      }
    }
  };

  WeightsView Weights(const BlockState& st, int r, int64_t slot0) const {
    return {&st.weights[r * kBlock],
            factors_,
            a_.v.scale ? a_.v.scale + slot0 : nullptr,
            a_.v.zero ? a_.v.zero + slot0 : nullptr,
            static_cast<size_t>(rows_) * kBlock,
            kKind == ValueKind::kLut ? plan_.f->num_segments : 0,
            plan_.affine};
  }

  void ScaleZero(int r, float correction, float zero_sum) {
    zero_acc_[r] = zero_acc_[r] * correction + zero_sum;
  }

  void Values(const BlockState& st, int64_t slot0, int n) {
    if constexpr (Isa::kSymmetricLookup) {
      if (symmetric_) {
        ValuesOf<true>(st, slot0, n);
        return;
      }
    }
    ValuesOf<false>(st, slot0, n);
  }

  void Finish() {
    const int lanes = plan_.lanes;
    for (int r = 0; r < rows_; ++r) {
      float* acc = out_.acc + static_cast<int64_t>(r) * lanes;
      plan_.ToNaturalOrder(acc_ + r * lanes, zero_acc_[r], acc);
    }
  }

 private:
  // q4 segments in full words read masked codes (kMaskedMode): iteration it
  // of a word holds c 2^(4 it) and its tile's sums are scaled by 2^(-4 it)
  // as they are added, exactly (a power of two), so the sums are those of
  // the codes as numbers, bit for bit, where no block's scale reaches
  // kMaskedScaleLimit (those read the codes as numbers).
  // (A template on I = Isa: only a variant that masks codes instantiates it.)
  template <typename I>
  void PlanMasks() {
    if constexpr (kKind != ValueKind::kLut) return;
    for (int s = 0; s < plan_.f->num_segments; ++s) {
      if (!plan_.Maskable(s)) continue;
      masked_[s] = any_masked_ = true;
      for (int it = 0; it + 1 < kMaskedIterations; ++it) {
        masks_[s][it] = UniformMask<I>(it);
      }
    }
  }

  // kSymmetric: whether segments may be kSymmetricMode. Apart, so that the
  // other formats' value loops compile as without them (instantiated beside
  // them, they cost q4's loop a reload of its words: +1.5% on Zen 3).
  template <bool kSymmetric>
  void ValuesOf(const BlockState& st, int64_t slot0, int n) {
    int r0 = 0;
    for (; r0 + 4 <= rows_; r0 += 4) ValueRows<4, kSymmetric>(st, r0, slot0, n);
    switch (rows_ - r0) {
      case 3: ValueRows<3, kSymmetric>(st, r0, slot0, n); break;
      case 2: ValueRows<2, kSymmetric>(st, r0, slot0, n); break;
      case 1: ValueRows<1, kSymmetric>(st, r0, slot0, n); break;
      default: break;
    }
  }

  // The tokens every active row of a tile sees, and those any sees.
  struct TileSpan {
    bool active[4];
    int common_b, common_e, union_b, union_e;
  };

  template <int kRows, bool kSymmetric>
  void ValueRows(const BlockState& st, int r0, int64_t slot0, int n) {
    TileSpan span{{false, false, false, false}, 0, n, n, 0};
    bool any = false, all_active = true;
    for (int i = 0; i < kRows; ++i) {
      const RowSpan& row = st.row[r0 + i];
      span.active[i] = row.active;
      all_active = all_active && row.active;
      if (!row.active) continue;
      any = true;
      span.common_b = row.vb > span.common_b ? row.vb : span.common_b;
      span.common_e = row.ve < span.common_e ? row.ve : span.common_e;
      span.union_b = row.vb < span.union_b ? row.vb : span.union_b;
      span.union_e = row.ve > span.union_e ? row.ve : span.union_e;
    }
    if (!any) return;
    if (!all_active || span.common_e < span.common_b) span.common_b = span.common_e = span.union_b;
    if (kKind == ValueKind::kLut) {
      for (int s = 0; s < plan_.f->num_segments; ++s) {
        const LutSegment& ls = plan_.segs[s];
        for (int b = 0; b < ls.blocks; ++b) {
          if constexpr (Isa::kMaskedCodes) {
            if (masked_[s] && masked_block_) {
              ValueBlock<kRows, kMaskedMode>(st, r0, slot0, span, s, b);
              continue;
            }
          }
          WithWordMode(ls.mode, [&](auto mode) {
            constexpr int kMode = decltype(mode)::value;
            if constexpr (kSymmetric || kMode < kSymmetricMode) {
              if constexpr (PreloadsWords(kMode)) PreloadWords<kMode>(slot0, span, ls, b);
              ValueBlock<kRows, kMode>(st, r0, slot0, span, s, b);
            }
          });
        }
      }
    } else {
      ValueBlock<kRows, 0>(st, r0, slot0, span, -1, 0);
    }
  }

  // Word modes whose words cost more to load than to reload from memory:
  // symmetric ones are folded, 3-bit ones spread from their byte groups.
  static constexpr bool PreloadsWords(int mode) {
    return mode >= kSymmetricMode || mode % kAffineMode == Isa::kThreeBitWords;
  }

  // Such a block's words of every token the row tile sees, loaded (folded,
  // spread) once for all its value tiles, each of which reads 2 of the
  // block's 8 chunks (in every tile, turbo4's folds cost 40 operations a
  // token). What it reads is copied first: its stores, of a may-alias
  // vector type, would have the plan reloaded for every token.
  template <int kMode>
  void PreloadWords(int64_t slot0, const TileSpan& span, const LutSegment& ls, int b) {
    const typename Isa::LutBlock block = ls.block[b];
    const int64_t row_bytes = plan_.f->row_bytes;
    const uint8_t* row = plan_.RowOf(a_.v, slot0 + span.union_b);
    W* out = words_;
    for (int t = span.union_b; t < span.union_e; ++t, row += row_bytes) {
      out[t] = LoadedWords<kMode, Isa>(Isa::template LutWords<kMode % kAffineMode>(row, block));
    }
  }

  // The value tiles over a raw or q8 token's chunks (s < 0), or over the
  // iterations of block b of kLut segment s.
  template <int kRows, int kMode>
  void ValueBlock(const BlockState& st, int r0, int64_t slot0, const TileSpan& span, int s, int b) {
    const int count = s >= 0 ? plan_.segs[s].iterations : plan_.chunks;
    constexpr int kChunks = Isa::kValueChunks;
    int c = 0;
    if constexpr (kMode == kMaskedMode) {  // the last tile holds the top code
      constexpr int kMasked = kRows == 3 ? 3 : kChunks;
      constexpr int kLast = kMaskedIterations - (kMaskedIterations - 1) / kMasked * kMasked;
      for (; c + kMasked < kMaskedIterations; c += kMasked) {
        ValueTile<kRows, kMasked, kMaskedMode>(st, r0, slot0, span, s, b, c);
      }
      ValueTile<kRows, kLast, kMaskedTopMode>(st, r0, slot0, span, s, b, c);
      return;
    }
    for (; c + kChunks <= count; c += kChunks) {
      ValueTile<kRows, kChunks, kMode>(st, r0, slot0, span, s, b, c);
    }
    for (; c < count; ++c) ValueTile<kRows, 1, kMode>(st, r0, slot0, span, s, b, c);
  }

  // kChunks chunks of value lanes for kRows rows: chunks c0 .. c0 + kChunks
  // (raw, q8), or iterations it0 .. of block b of segment s (kLut).
  template <int kRows, int kChunks, int kMode>
  void ValueTile(const BlockState& st, int r0, int64_t slot0, const TileSpan& span, int s, int b,
                 int it0) {
    V acc[kRows][kChunks];
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < kChunks; ++j) acc[i][j] = Isa::Zero();
    }
    const LutSegment* ls = s >= 0 ? &plan_.segs[s] : nullptr;
    const int c0 = ls ? ls->first_chunk + b * ls->iterations + it0 : it0;
    const float* weights = st.weights + (s > 0 ? static_cast<size_t>(s) * rows_ * kBlock : 0);
    const typename Isa::Table table = Isa::LoadTable(plan_.base[ls ? s : 0]);
    // Tokens every row sees, then the edges, where each row selects. Two
    // tokens an iteration: the pointer and counter updates were 4 of a q4
    // tile's 20 instructions a token.
#pragma GCC unroll 2
    for (int t = span.common_b; t < span.common_e; ++t) {
      V v[kChunks];
      ValueChunks<kChunks, kMode>(slot0, t, ls, table, b, it0, c0, v);
#pragma GCC unroll 4
      for (int i = 0; i < kRows; ++i) {
        const V w = Isa::Set1(weights[(r0 + i) * kBlock + t]);
#pragma GCC unroll 4
        for (int j = 0; j < kChunks; ++j) acc[i][j] = Isa::Fma(w, v[j], acc[i][j]);
      }
    }
    for (int edge = 0; edge < 2; ++edge) {
      const int begin = edge == 0 ? span.union_b : span.common_e;
      const int end = edge == 0 ? span.common_b : span.union_e;
      for (int t = begin; t < end; ++t) {
        V v[kChunks];
        ValueChunks<kChunks, kMode>(slot0, t, ls, table, b, it0, c0, v);
#pragma GCC unroll 4
        for (int i = 0; i < kRows; ++i) {
          const RowSpan& row = st.row[r0 + i];
          // Select: a token outside the row's span is never multiplied in.
          const M sees = Isa::RowMask(span.active[i] && t >= row.vb && t < row.ve);
          const V w = Isa::Set1(weights[(r0 + i) * kBlock + t]);
#pragma GCC unroll 4
          for (int j = 0; j < kChunks; ++j) {
            acc[i][j] = Isa::Select(sees, Isa::Fma(w, v[j], acc[i][j]), acc[i][j]);
          }
        }
      }
    }
    const int lanes = plan_.lanes;
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) {
      if (!span.active[i]) continue;
      const V correction = Isa::Set1(st.row[r0 + i].correction);
#pragma GCC unroll 4
      for (int j = 0; j < kChunks; ++j) {
        float* p = &acc_[(r0 + i) * lanes + (c0 + j) * L];
        V sum = acc[i][j];
        if constexpr (kMode == kMaskedMode || kMode == kMaskedTopMode) {
          if (kMode == kMaskedMode || j + 1 < kChunks) {  // c 2^(4 it): exactly back
            sum = Isa::Mul(sum, Isa::Set1(MaskedUnit(it0 + j)));
          }
        }
        Isa::Store(p, Isa::Fma(Isa::Load(p), correction, sum));
      }
    }
  }

  template <int kChunks, int kMode>
  KVJAX_INLINE void ValueChunks(int64_t slot0, int t, const LutSegment* ls,
                                const typename Isa::Table& table, int b,
                                int it0, int c0, V* v) const {
    const int64_t slot = slot0 + t;
    if (kKind == ValueKind::kLut) {
      const W words = PreloadsWords(kMode) ? words_[t] : LoadedWords<kMode, Isa>(
          Isa::template LutWords<kMode % kAffineMode>(plan_.RowOf(a_.v, slot), ls->block[b]));
      if constexpr (kMode == kMaskedMode || kMode == kMaskedTopMode) {
        const int s = static_cast<int>(ls - plan_.segs);
#pragma GCC unroll 4
        for (int j = 0; j < kChunks; ++j) {
          v[j] = kMode == kMaskedTopMode && j + 1 == kChunks
                     ? TopCodes<Isa>(words, ls->shift[it0 + j])
                     : MaskedCodes<Isa>(words, masks_[s][it0 + j]);
        }
        return;
      }
#pragma GCC unroll 4
      for (int j = 0; j < kChunks; ++j) v[j] = LutValues<kMode>(words, ls->shift[it0 + j], table);
    } else {
#pragma GCC unroll 4
      for (int j = 0; j < kChunks; ++j) v[j] = plan_.Direct(a_.v, slot, c0 + j);
    }
  }

  const RunArgs& a_;
  const Partial& out_;
  const int rows_;
  TierPlan<kKind> plan_;
  float *acc_, *zero_acc_, *factors_;
  bool symmetric_ = false;  // a segment in kSymmetricMode
  W* words_ = nullptr;      // a block's words, loaded once (PreloadWords)
  bool masked_[kMaxSegments] = {};  // segments that may read masked codes
  bool any_masked_ = false;
  bool masked_block_ = false;  // this block's scales allow masked codes (Factors)
  // Iteration it's codes in place, per segment (kLut formats only).
  W masks_[kKind == ValueKind::kLut ? kMaxSegments : 1][kMaskedIterations];
};

// One run: per block of kBlock tokens, the rows' spans, the key pass, the
// softmax, the value pass. Keys and values may have different formats.
template <ValueKind kKey, ValueKind kValue>
class SimdRun {
 public:
  using V = typename Isa::V;
  using M = typename Isa::Mask;
  static constexpr int L = Isa::kLanes;

  SimdRun(const RunArgs& a, const Partial& out, Arena* arena)
      : args_(a), a_(args_), out_(out), rows_(a.rows), keys_(args_, arena),
        values_(args_, out, arena) {
    st_.rows = rows_;
    st_.row = arena->Take<RowSpan>(rows_);
    const size_t plane = static_cast<size_t>(rows_) * kBlock;
    const size_t scores = plane * BlockPlanes(*a.key_format);
    st_.scores = arena->Take<float>(scores);
    st_.weights = arena->Take<float>(plane * BlockPlanes(*a.value_format));
    for (size_t i = 0; i < scores; ++i) st_.scores[i] = 0.0f;
  }

  void Run() {
    // Blocks never straddle two pages: the passes read the tiers in args_.
    for (int64_t t0 = 0; t0 < a_.count;) {
      const TokenPlace place = Locate(a_, t0);
      args_.k = place.k;
      args_.v = place.v;
      const int n = place.contiguous < kBlock ? static_cast<int>(place.contiguous) : kBlock;
      Block(t0, n, place.slot);
      t0 += n;
    }
    values_.Finish();
  }

 private:
  void Block(int64_t t0, int n, int64_t slot0) {
    bool any = false;
    for (int r = 0; r < rows_; ++r) {
      int64_t b, e;
      VisibleSpan(a_, r, &b, &e);
      b = b < t0 ? t0 : b;
      e = e > t0 + n ? t0 + n : e;
      RowSpan& row = st_.row[r];
      row.vb = static_cast<int>(b - t0);
      row.ve = static_cast<int>(e > b ? e - t0 : b - t0);
      if (row.ve > row.vb) out_.seen[r] = 1;
      row.active = row.ve > row.vb && !out_.nan[r];
      row.correction = 1.0f;
      any = any || row.active;
    }
    if (!any) return;
    keys_.Scores(st_, t0, slot0, n);
    values_.Factors(slot0, n);
    Softmax(slot0, n);
    values_.Values(st_, slot0, n);
  }

  // 4. Softmax weights of the block; the state's max, denominator, flags.
  void Softmax(int64_t slot0, int n) {
    for (int r = 0; r < rows_; ++r) {
      RowSpan& row = st_.row[r];
      if (!row.active) continue;
      // Most rows of a decode step see whole blocks: no masks to build or apply.
      if (n == kBlock && row.vb == 0 && row.ve == kBlock) {
        RowSoftmax<true>(r, row, slot0, n);
      } else {
        RowSoftmax<false>(r, row, slot0, n);
      }
    }
  }

  template <bool kWhole>
  KVJAX_INLINE void RowSoftmax(int r, RowSpan& row, int64_t slot0, int n) {
    const V minus_inf = Isa::Set1(-__builtin_inff());
    const M all = Isa::RowMask(true);
    float* s = &st_.scores[r * kBlock];
    // Locals, read once: the loops' float stores may alias the state.
    const auto logits = keys_.Logits(st_, r, slot0);
    const auto weights = values_.Weights(st_, r, slot0);
    const RowSpan span = row;
    const bool has_softcap = a_.has_softcap;
    const V softcap = Isa::Set1(a_.softcap);
    V block_max = minus_inf;
    M bad = Isa::RowMask(false);  // lanes where a visible logit was NaN or +Inf
    for (int t = 0; t < n; t += L) {
      V x = logits.template At<kWhole>(t, n);
      if (has_softcap) x = Isa::Mul(softcap, VecTanh(Isa::Div(x, softcap)));
      const M visible = kWhole ? all : Isa::SpanMask(t, span.vb, span.ve);
      bad = Isa::FlagNanOrPosInf(x, visible, bad);
      if (!kWhole) x = Isa::Select(visible, x, minus_inf);
      Isa::Store(s + t, x);
      block_max = Isa::Max(block_max, x);
    }
    if (Isa::AnyLane(bad)) {
      out_.nan[r] = 1;
      row.active = false;
      return;
    }
    const float old_max = out_.max[r];
    const float bm = Isa::ReduceMax(block_max);
    const float new_max = bm > old_max ? bm : old_max;
    const float shift = new_max == -__builtin_inff() ? 0.0f : new_max;
    // exp(0) is 1: most blocks keep the running max (no libm call).
    row.correction = old_max == shift ? 1.0f : SoftmaxWeight(old_max - shift);
    out_.max[r] = new_max;
    V sum = Isa::Zero(), zero_sum = Isa::Zero();
    const V shift_v = Isa::Set1(shift);
    for (int t = 0; t < n; t += L) {
      const V p = VecSoftmaxWeight(Isa::Sub(Isa::Load(s + t), shift_v));  // masked: 0
      sum = Isa::Add(sum, p);
      weights.template Put<kWhole>(t, n, span, p, &zero_sum);
    }
    out_.denom[r] = out_.denom[r] * row.correction + Isa::ReduceAdd(sum);
    values_.ScaleZero(r, row.correction, Isa::ReduceAdd(zero_sum));
  }

  RunArgs args_;  // the passes' view: its k and v follow a paged run's pages
  const RunArgs& a_;
  const Partial& out_;
  const int rows_;
  KeyPass<kKey> keys_;
  ValuePass<kValue> values_;
  BlockState st_;
};

// Whether this variant's vectors fit the format (else the scalar reference
// runs): whole chunks of lanes, and segments the lane plans can read.
inline bool SimdFits(const TierFormat& f) {
  if (f.lanes % Isa::kLanes != 0 || f.lanes / Isa::kLanes > 64) return false;
  if (f.kind != ValueKind::kLut) return true;
  for (int s = 0; s < f.num_segments; ++s) {
    const Segment& seg = f.segments[s];
    if (seg.lane_offset % Isa::kLanes != 0 || !LutFits(seg, Isa::kLanes)) return false;
    // Affine segments (q4's scale and zero) alone or not at all: the plan
    // reads a format's first segment to choose between the two algebras.
    if ((seg.norm_index < 0) != (f.segments[0].norm_index < 0)) return false;
    const LutGeometry g = LutGeometryOf(seg, Isa::kLanes);
    if (seg.channels / Isa::kLanes / g.iterations > kMaxLutBlocks) {
      return false;
    }
  }
  return true;
}

template <ValueKind kKey>
void RunWithValues(const RunArgs& a, const Partial& out, Arena* arena) {
  switch (a.value_format->kind) {
    case ValueKind::kF32: SimdRun<kKey, ValueKind::kF32>(a, out, arena).Run(); return;
    case ValueKind::kBF16: SimdRun<kKey, ValueKind::kBF16>(a, out, arena).Run(); return;
    case ValueKind::kF16: SimdRun<kKey, ValueKind::kF16>(a, out, arena).Run(); return;
    case ValueKind::kQ8: SimdRun<kKey, ValueKind::kQ8>(a, out, arena).Run(); return;
    case ValueKind::kLut: SimdRun<kKey, ValueKind::kLut>(a, out, arena).Run(); return;
  }
}

inline void SimdAttendRun(const RunArgs& a, const Partial& out) {
  if (!SimdFits(*a.key_format) || !SimdFits(*a.value_format)) {
    scalar::AttendRun(a, out);
    return;
  }
  Arena arena(a.scratch);
  switch (a.key_format->kind) {
    case ValueKind::kF32: RunWithValues<ValueKind::kF32>(a, out, &arena); return;
    case ValueKind::kBF16: RunWithValues<ValueKind::kBF16>(a, out, &arena); return;
    case ValueKind::kF16: RunWithValues<ValueKind::kF16>(a, out, &arena); return;
    case ValueKind::kQ8: RunWithValues<ValueKind::kQ8>(a, out, &arena); return;
    case ValueKind::kLut: RunWithValues<ValueKind::kLut>(a, out, &arena); return;
  }
}

#endif  // KVJAX_FFI_ATTENTION_SIMD_H_
