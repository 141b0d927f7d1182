// Decode attention over whole caches: which runs of which tiers every query
// row reads, on which threads, and the log-sum-exp merge of their partials
// (flash-decoding). No XLA types: attention_handler.cc fills an
// `AttendProblem` from the FFI buffers, the standalone test driver from
// plain arrays.
#ifndef KVJAX_FFI_ATTENTION_DRIVER_H_
#define KVJAX_FFI_ATTENTION_DRIVER_H_

#include <cstdint>
#include <functional>

#include "attention_kernels.h"

namespace kvjax {

// A tier of one sequence and layer: head h's token in slot s is at
// `data + h * head_bytes + s * format.row_bytes`, its scale/zero at
// `[h * head_slots + s]`, its norms at `norms + (h * head_slots + s) *
// format.norm_count`.
struct TierView {
  TierData base;
  int64_t head_bytes = 0;
  int64_t head_slots = 0;

  // Page `page` of a paged store laid out [pages][heads][slots] (this view
  // is page 0's).
  TierView Page(int64_t page, int heads, const TierFormat& f) const {
    TierView t = *this;
    const int64_t rows = page * heads * head_slots;
    t.base.data = base.data + page * heads * head_bytes;
    if (base.scale) t.base.scale = base.scale + rows;
    if (base.zero) t.base.zero = base.zero + rows;
    if (base.norms) t.base.norms = base.norms + rows * f.norm_count;
    return t;
  }

  TierData Head(int h, const TierFormat& f) const {
    TierData d;
    d.data = base.data + h * head_bytes;
    if (base.scale) d.scale = base.scale + h * head_slots;
    if (base.zero) d.zero = base.zero + h * head_slots;
    if (base.norms) d.norms = base.norms + h * head_slots * f.norm_count;
    return d;
  }
};

// One sequence (one batch entry, its layer already selected).
struct SequenceView {
  bool layer_ok = true;  // false: a traced layer index outside the stack
  int32_t length = 0, evicted = 0, tail_count = 0;
  const float* q_hot = nullptr;    // [H][R][D], scaled
  const float* q_store = nullptr;  // [H][R][A_k], the store key format's domain
  const int32_t* row_pos = nullptr;  // [R]
  bool has_window = false;
  int32_t window = 0;
  float softcap = 0.0f;  // used when AttendProblem::has_softcap
  TierView sink_k, sink_v, tail_k, tail_v, store_k, store_v;
  // Paged store (AttendProblem::page_size > 0): non-sink token j is slot
  // j % page_size of page page_table[j / page_size] of store_k / store_v
  // (which view page 0); [max_pages] entries.
  const int32_t* page_table = nullptr;
  float* out_hot = nullptr;    // [H][R][D]
  float* out_store = nullptr;  // [H][R][A_v], the store value format's domain
};

struct AttendProblem {
  int64_t num_sequences = 0;
  const SequenceView* sequences = nullptr;
  int32_t heads = 0, rows = 0;
  int32_t sinks = 0, tail_slots = 0, store_slots = 0;
  // A paged store: page_size = store_slots tokens per page, num_pages pages,
  // max_pages page-table entries per sequence; 0 for a ring store.
  int32_t page_size = 0;
  int64_t num_pages = 0, max_pages = 0;
  bool has_softcap = false;
  TierFormat hot;                       // sinks and tail, keys and values
  TierFormat store_key, store_value;    // the store's keys and values
};

// Calls fn(begin, end) over [0, n) in chunks, possibly on several threads.
using ParallelFn = std::function<void(int64_t n, const std::function<void(int64_t, int64_t)>& fn)>;

// Runs every sequence and head of `problem` through `run` (one variant's
// AttendRun), `threads` wide, and writes the outputs.
void RunAttend(const AttendProblem& problem, AttendRunFn run, int threads,
            const ParallelFn& parallel);

}  // namespace kvjax

#endif  // KVJAX_FFI_ATTENTION_DRIVER_H_
