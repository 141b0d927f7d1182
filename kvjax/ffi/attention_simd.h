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
//      kLanes / kRows tokens: the decoded chunk of a token is loaded once for
//      all rows of the tile, and the tile's kLanes dot products reduce in one
//      transpose-and-add;
//   4. per row: softcap, the mask (select), NaN / +Inf detection, the block
//      max, the softmax weights;
//   5. values: tiles of 4 rows x 4 chunks of accumulators in registers over
//      the block's tokens (each visible token decoded once for the tile),
//      added to the running accumulator with the row's correction (two-level
//      summation keeps long runs accurate).
//
// Lanes never cross tokens, and a row never reads a token outside its span.

#ifndef KVJAX_FFI_ATTENTION_SIMD_H_
#define KVJAX_FFI_ATTENTION_SIMD_H_

// This header is included inside a namespace; its includes come first in
// the including file: attention_format.h, attention_kernels.h, <cstdint>,
// <cstring>, <limits>. It uses no library templates (see RunArgs::scratch).

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

template <ValueKind kKind>
class SimdRun {
 public:
  using V = typename Isa::V;
  using M = typename Isa::Mask;
  static constexpr int L = Isa::kLanes;
  static constexpr int kBlock = 64;  // tokens per block: a multiple of L

  SimdRun(const RunArgs& a, const Partial& out)
      : a_(a), out_(out), f_(*a.format), lanes_(f_.lanes), chunks_(lanes_ / L),
        rows_(a.rows) {
    Arena arena(a.scratch);
    perm_ = arena.Take<int>(lanes_);
    q_ = arena.Take<float>(static_cast<size_t>(rows_) * lanes_);
    acc_ = arena.Take<float>(static_cast<size_t>(rows_) * lanes_);
    scores_ = arena.Take<float>(static_cast<size_t>(rows_) * kBlock);
    weights_ = arena.Take<float>(static_cast<size_t>(rows_) * kBlock);
    k_tables_ = arena.Take<float>(kBlock * 16 * kMaxSegments);
    v_tables_ = arena.Take<float>(kBlock * 16 * kMaxSegments);
    row_ = arena.Take<Row>(rows_);
  }

  void Run() {
    Setup();
    for (int64_t t0 = 0; t0 < a_.count; t0 += kBlock) {
      Block(t0, a_.count - t0 < kBlock ? static_cast<int>(a_.count - t0) : kBlock);
    }
    Finish();
  }

 private:
  // Per-row state of this run.
  struct Row {
    int vb, ve;       // visible tokens of the current block, [vb, ve)
    bool active;      // updates this block
    float correction; // of the accumulator, this block
  };

  void Setup() {
    // Lane order: lane i of the kernel holds natural lane perm_[i].
    for (int i = 0; i < lanes_; ++i) perm_[i] = i;
    if (kKind == ValueKind::kLut) {
      for (int s = 0; s < f_.num_segments; ++s) {
        const Segment& seg = f_.segments[s];
        for (int i = 0; i < seg.channels; ++i) {
          perm_[seg.lane_offset + i] = seg.lane_offset + Isa::LutChannel(seg, i);
        }
        for (int c = 0; c < seg.channels / L; ++c) {
          Isa::PlanLut(seg, c, &plans_[seg.lane_offset / L + c]);
          plan_segment_[seg.lane_offset / L + c] = s;
        }
        // The codebook repeated to 16 entries (q4: 0 .. 15).
        for (int i = 0; i < 16; ++i) {
          base_[s][i] = seg.norm_index < 0 ? static_cast<float>(i % 16)
                                           : f_.tables[seg.table_offset + i % (1 << seg.bits)];
        }
      }
      // Lanes that no segment covers (turbo1p's empty mse lanes) read as 0.
      for (int c = 0; c < chunks_; ++c) covered_[c] = 0;
      for (int s = 0; s < f_.num_segments; ++s) {
        const Segment& seg = f_.segments[s];
        for (int c = 0; c < seg.channels / L; ++c) covered_[seg.lane_offset / L + c] = 1;
      }
    }
    for (int r = 0; r < rows_; ++r) {
      const float* q = a_.q + static_cast<int64_t>(r) * lanes_;
      const float* acc = out_.acc + static_cast<int64_t>(r) * lanes_;
      for (int i = 0; i < lanes_; ++i) {
        q_[r * lanes_ + i] = q[perm_[i]];
        acc_[r * lanes_ + i] = acc[perm_[i]];
      }
    }
    for (size_t i = 0; i < static_cast<size_t>(rows_) * kBlock; ++i) scores_[i] = 0.0f;
  }

  void Finish() {
    for (int r = 0; r < rows_; ++r) {
      float* acc = out_.acc + static_cast<int64_t>(r) * lanes_;
      for (int i = 0; i < lanes_; ++i) acc[perm_[i]] = acc_[r * lanes_ + i];
    }
  }

  // Decoded chunk `c` of the token in `slot` of tier `d`; `table` is its
  // per-token tables (kLut).
  V Decode(const TierData& d, int64_t slot, int c, const float* table) const {
    const uint8_t* row = d.data + slot * f_.row_bytes;
    switch (kKind) {
      case ValueKind::kF32: return Isa::LoadF32(row, c);
      case ValueKind::kBF16: return Isa::LoadBF16(row, c);
      case ValueKind::kF16: return Isa::LoadF16(row, c);
      case ValueKind::kQ8:  // dequantized, as materialize: c * scale + zero
        return Isa::Fma(Isa::LoadU8(row, c), Isa::Set1(d.scale[slot]), Isa::Set1(d.zero[slot]));
      case ValueKind::kLut:
        if (!covered_[c]) return Isa::Zero();
        return Isa::LoadLut(row, plans_[c], table + 16 * plan_segment_[c]);
    }
    return Isa::Zero();
  }

  void Tables(const TierData& d, int64_t slot0, int n, float* out) const {
    const int per_token = 16 * f_.num_segments;
    for (int t = 0; t < n; ++t) {
      const int64_t slot = slot0 + t;
      for (int s = 0; s < f_.num_segments; ++s) {
        const Segment& seg = f_.segments[s];
        float mul, add = 0.0f;
        if (seg.norm_index < 0) {
          mul = d.scale[slot];
          add = d.zero[slot];
        } else {
          mul = SegmentFactor(f_, d, slot, seg);
        }
        Isa::Table16(base_[s], mul, add, out + t * per_token + 16 * s);
      }
    }
  }

  void Block(int64_t t0, int n) {
    bool any = false;
    for (int r = 0; r < rows_; ++r) {
      int64_t b, e;
      VisibleSpan(a_, r, &b, &e);
      b = b < t0 ? t0 : b;
      e = e > t0 + n ? t0 + n : e;
      Row& row = row_[r];
      row.vb = static_cast<int>(b - t0);
      row.ve = static_cast<int>(e > b ? e - t0 : b - t0);
      if (row.ve > row.vb) out_.seen[r] = 1;
      row.active = row.ve > row.vb && !out_.nan[r];
      row.correction = 1.0f;
      any = any || row.active;
    }
    if (!any) return;
    const int64_t slot0 = a_.first_slot + t0;
    if (kKind == ValueKind::kLut) {
      Tables(a_.k, slot0, n, k_tables_);
      Tables(a_.v, slot0, n, v_tables_);
    }
    Scores(slot0, n);
    Softmax(n);
    Values(slot0, n);
  }

  // 3. scores_[r * kBlock + t] = q_r . k_t for every row and token.
  void Scores(int64_t slot0, int n) {
    int r0 = 0;
    for (; r0 + 4 <= rows_; r0 += 4) ScoreTile<4>(r0, slot0, n);
    for (; r0 + 2 <= rows_; r0 += 2) ScoreTile<2>(r0, slot0, n);
    for (; r0 < rows_; ++r0) ScoreTile<1>(r0, slot0, n);
  }

  template <int kRows>
  void ScoreTile(int r0, int64_t slot0, int n) {
    bool needed = false;
    for (int i = 0; i < kRows; ++i) needed = needed || row_[r0 + i].active;
    if (!needed) return;
    constexpr int kTokens = L / kRows;
    const int per_token = 16 * f_.num_segments;
    for (int tt = 0; tt < n; tt += kTokens) {
      V x[L];
      for (int i = 0; i < L; ++i) x[i] = Isa::Zero();
      int64_t slot[kTokens];
      const float* table[kTokens];
      for (int j = 0; j < kTokens; ++j) {
        const int t = tt + j < n ? tt + j : n - 1;  // past the end: a repeat, unused
        slot[j] = slot0 + t;
        table[j] = kKind == ValueKind::kLut ? k_tables_ + t * per_token : nullptr;
      }
      for (int c = 0; c < chunks_; ++c) {
        V q[kRows];
        for (int i = 0; i < kRows; ++i) q[i] = Isa::Load(&q_[(r0 + i) * lanes_ + c * L]);
        for (int j = 0; j < kTokens; ++j) {
          const V k = Decode(a_.k, slot[j], c, table[j]);
          for (int i = 0; i < kRows; ++i) x[i * kTokens + j] = Isa::Fma(q[i], k, x[i * kTokens + j]);
        }
      }
      alignas(64) float dots[L];
      Isa::Store(dots, Isa::ReduceTile(x));
      for (int i = 0; i < kRows; ++i) {
        for (int j = 0; j < kTokens && tt + j < n; ++j) {
          scores_[(r0 + i) * kBlock + tt + j] = dots[i * kTokens + j];
        }
      }
    }
  }

  // 4. Softmax weights of the block; the state's max, denominator, flags.
  void Softmax(int n) {
    const V minus_inf = Isa::Set1(-__builtin_inff());
    for (int r = 0; r < rows_; ++r) {
      Row& row = row_[r];
      if (!row.active) continue;
      float* s = &scores_[r * kBlock];
      float* w = &weights_[r * kBlock];
      V block_max = minus_inf;
      bool bad = false;
      for (int t = 0; t < n; t += L) {
        V x = Isa::Load(s + t);
        if (a_.has_softcap) {
          const V c = Isa::Set1(a_.softcap);
          x = Isa::Mul(c, Isa::Tanh(Isa::Div(x, c)));
        }
        const M visible = Isa::SpanMask(t, row.vb, row.ve);
        bad = bad || Isa::AnyNanOrPosInf(x, visible);
        x = Isa::Select(visible, x, minus_inf);
        Isa::Store(s + t, x);
        block_max = Isa::Max(block_max, x);
      }
      if (bad) {
        out_.nan[r] = 1;
        row.active = false;
        continue;
      }
      const float old_max = out_.max[r];
      const float bm = Isa::ReduceMax(block_max);
      const float new_max = bm > old_max ? bm : old_max;
      const float shift = new_max == -__builtin_inff() ? 0.0f : new_max;
      row.correction = Isa::ExpScalar(old_max - shift);
      out_.max[r] = new_max;
      V sum = Isa::Zero();
      const V shift_v = Isa::Set1(shift);
      for (int t = 0; t < n; t += L) {
        const V p = Isa::Exp(Isa::Sub(Isa::Load(s + t), shift_v));  // masked: 0
        sum = Isa::Add(sum, p);
        Isa::Store(w + t, p);
      }
      out_.denom[r] = out_.denom[r] * row.correction + Isa::ReduceAdd(sum);
    }
  }

  // 5. acc_r = acc_r * correction_r + sum over the row's visible tokens of
  //    w[r][t] * v_t.
  void Values(int64_t slot0, int n) {
    int r0 = 0;
    for (; r0 + 4 <= rows_; r0 += 4) ValueRows<4>(r0, slot0, n);
    for (; r0 < rows_; ++r0) ValueRows<1>(r0, slot0, n);
  }

  template <int kRows>
  void ValueRows(int r0, int64_t slot0, int n) {
    bool active[kRows];
    int common_b = 0, common_e = n, union_b = n, union_e = 0;
    bool any = false;
    for (int i = 0; i < kRows; ++i) {
      const Row& row = row_[r0 + i];
      active[i] = row.active;
      if (!row.active) continue;
      any = true;
      common_b = row.vb > common_b ? row.vb : common_b;
      common_e = row.ve < common_e ? row.ve : common_e;
      union_b = row.vb < union_b ? row.vb : union_b;
      union_e = row.ve > union_e ? row.ve : union_e;
    }
    if (!any) return;
    bool all_active = true;
    for (int i = 0; i < kRows; ++i) all_active = all_active && active[i];
    if (!all_active || common_e < common_b) common_b = common_e = union_b;
    int c = 0;
    for (; c + 4 <= chunks_; c += 4) ValueTile<kRows, 4>(r0, c, slot0, active, common_b, common_e, union_b, union_e);
    for (; c < chunks_; ++c) ValueTile<kRows, 1>(r0, c, slot0, active, common_b, common_e, union_b, union_e);
  }

  template <int kRows, int kChunks>
  void ValueTile(int r0, int c0, int64_t slot0, const bool* active, int common_b,
                 int common_e, int union_b, int union_e) {
    V acc[kRows][kChunks];
    for (int i = 0; i < kRows; ++i) {
      for (int j = 0; j < kChunks; ++j) acc[i][j] = Isa::Zero();
    }
    const int per_token = 16 * f_.num_segments;
    for (int t = union_b; t < union_e; ++t) {
      const float* table = kKind == ValueKind::kLut ? v_tables_ + t * per_token : nullptr;
      V v[kChunks];
      for (int j = 0; j < kChunks; ++j) v[j] = Decode(a_.v, slot0 + t, c0 + j, table);
      const bool all = t >= common_b && t < common_e;
      for (int i = 0; i < kRows; ++i) {
        const Row& row = row_[r0 + i];
        // Select: a token outside the row's span is never multiplied in.
        if (!all && !(active[i] && t >= row.vb && t < row.ve)) continue;
        const V w = Isa::Set1(weights_[(r0 + i) * kBlock + t]);
        for (int j = 0; j < kChunks; ++j) acc[i][j] = Isa::Fma(w, v[j], acc[i][j]);
      }
    }
    for (int i = 0; i < kRows; ++i) {
      if (!active[i]) continue;
      const V correction = Isa::Set1(row_[r0 + i].correction);
      for (int j = 0; j < kChunks; ++j) {
        float* p = &acc_[(r0 + i) * lanes_ + (c0 + j) * L];
        Isa::Store(p, Isa::Fma(Isa::Load(p), correction, acc[i][j]));
      }
    }
  }

  const RunArgs& a_;
  const Partial& out_;
  const TierFormat& f_;
  const int lanes_, chunks_, rows_;
  int* perm_;
  float *q_, *acc_, *scores_, *weights_, *k_tables_, *v_tables_;
  Row* row_;
  uint8_t covered_[64] = {};
  typename Isa::LutPlan plans_[64];  // per chunk (lanes <= 64 chunks)
  int plan_segment_[64] = {};
  float base_[kMaxSegments][16] = {};
};

// Whether this variant's vectors fit the format (else the scalar reference
// runs): whole chunks of lanes, and segments the lane plans can read.
inline bool SimdFits(const TierFormat& f) {
  if (f.lanes % Isa::kLanes != 0 || f.lanes / Isa::kLanes > 64) return false;
  if (f.kind != ValueKind::kLut) return true;
  for (int s = 0; s < f.num_segments; ++s) {
    const Segment& seg = f.segments[s];
    if (seg.lane_offset % Isa::kLanes != 0 || !Isa::LutFits(seg)) {
      return false;
    }
  }
  return true;
}

inline void SimdAttendRun(const RunArgs& a, const Partial& out) {
  if (!SimdFits(*a.format)) {
    scalar::AttendRun(a, out);
    return;
  }
  switch (a.format->kind) {
    case ValueKind::kF32: SimdRun<ValueKind::kF32>(a, out).Run(); return;
    case ValueKind::kBF16: SimdRun<ValueKind::kBF16>(a, out).Run(); return;
    case ValueKind::kF16: SimdRun<ValueKind::kF16>(a, out).Run(); return;
    case ValueKind::kQ8: SimdRun<ValueKind::kQ8>(a, out).Run(); return;
    case ValueKind::kLut: SimdRun<ValueKind::kLut>(a, out).Run(); return;
  }
}

#endif  // KVJAX_FFI_ATTENTION_SIMD_H_
