// The decode-attention driver: plans runs, runs them in parallel, merges.
#include "attention_driver.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define KVJAX_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KVJAX_ASAN 1
#endif
#endif
#ifndef KVJAX_ASAN
#define KVJAX_ASAN 0
#endif
#if KVJAX_ASAN
#include <sanitizer/asan_interface.h>
#endif

namespace kvjax {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// A store run is split into items of at least this many tokens (fewer items
// than threads otherwise leave cores idle; many tiny ones cost more to merge).
constexpr int64_t kMinItemTokens = 512;
// Items per thread to aim for, so that threads claiming them one at a time
// finish together.
constexpr int64_t kItemsPerThread = 8;

// Partials (floats) below which the caller merges them alone.
constexpr int64_t kMinPoolMergeFloats = int64_t{1} << 16;

// Scratch a pool thread keeps between calls: a decode call's runs need
// tens of KB; a prefill chunk's (1024 queries of GQA 4: 4096 rows) 8 MB
// and more, given back after each item.
constexpr size_t kKeptScratchBytes = size_t{1} << 20;

// A pool thread's working memory for its items, kept across calls. Not
// zeroed: a run uses only what it wrote (it may load vector lanes past a
// block's end, which selects and masks drop). Sanitized builds check both:
// each run's scratch is filled with 0xFF bytes (NaN floats), and the bytes
// past what it may use are poisoned, as an allocation of its own size was.
struct ThreadBuffers {
  std::vector<uint8_t> flags;
  std::vector<TierData> pages_k, pages_v;
  std::unique_ptr<uint8_t[]> memory;
  size_t bytes = 0;

  // `need` bytes, 64-byte aligned.
  void* Scratch(size_t need) {
    if (need + 64 > bytes) {
      Unpoison();
      bytes = need + 64;
      memory.reset(new uint8_t[bytes]);
    }
    const uintptr_t base = reinterpret_cast<uintptr_t>(memory.get());
    uint8_t* aligned = memory.get() + (64 - base % 64) % 64;
#if KVJAX_ASAN
    Unpoison();
    std::memset(aligned, 0xFF, need);
    ASAN_POISON_MEMORY_REGION(aligned + need, memory.get() + bytes - (aligned + need));
#endif
    return aligned;
  }
  // Frees the scratch if it is larger than a thread keeps.
  void Trim() {
    if (bytes > kKeptScratchBytes) {
      Unpoison();
      memory.reset();
      bytes = 0;
    }
  }
  ~ThreadBuffers() { Unpoison(); }

 private:
  void Unpoison() {
#if KVJAX_ASAN
    if (memory) ASAN_UNPOISON_MEMORY_REGION(memory.get(), bytes);
#endif
  }
};

struct Item {
  int64_t sequence;
  int32_t head;
  bool store;  // store tier (else sinks or tail)
  int64_t first_slot, count, first_pos;
  int64_t scratch;  // offset of its partial in the scratch buffer
};

struct Span {
  int64_t first_slot, count, first_pos;
};

// The non-sink tokens j in [begin, end) of a ring of `slots` slots, as at
// most two runs of contiguous slots.
void RingSpans(int64_t begin, int64_t end, int64_t slots, int64_t sinks,
               std::vector<Span>* out) {
  while (begin < end) {
    const int64_t slot = begin % slots;
    const int64_t n = std::min(end - begin, slots - slot);
    out->push_back({slot, n, sinks + begin});
    begin += n;
  }
}

// The K and V tiers (head `item.head`) of each page a paged store item
// spans; false if a page id is out of range (kvjax never passes one).
bool ItemPages(const AttendProblem& p, const SequenceView& seq, const Item& item,
               const TierFormat& key, const TierFormat& value, std::vector<TierData>* pages_k,
               std::vector<TierData>* pages_v) {
  pages_k->clear();
  pages_v->clear();
  const int64_t first = item.first_slot / p.page_size;
  const int64_t last = (item.first_slot + item.count - 1) / p.page_size;
  for (int64_t column = first; column <= last; ++column) {
    const int64_t page = column < p.max_pages ? seq.page_table[column] : -1;
    if (page < 0 || page >= p.num_pages) return false;
    pages_k->push_back(seq.store_k.Page(page, p.heads, key).Head(item.head, key));
    pages_v->push_back(seq.store_v.Page(page, p.heads, value).Head(item.head, value));
  }
  return true;
}

bool AnyRowSees(const Span& s, const int64_t* lo, const int64_t* hi, int rows) {
  for (int r = 0; r < rows; ++r) {
    if (lo[r] <= s.first_pos + s.count - 1 && hi[r] >= s.first_pos && lo[r] <= hi[r]) {
      return true;
    }
  }
  return false;
}

}  // namespace

void RunAttend(const AttendProblem& p, AttendRunFn run, int threads,
            const ParallelFn& parallel) {
  const int rows = p.rows;
  // Queries have the key format's lanes, outputs the value format's.
  const int hot_lanes = p.hot.lanes, store_lanes = p.store_value.lanes;
  // Visible positions of every row of every sequence: [lo, hi].
  std::vector<int64_t> lo(p.num_sequences * rows), hi(p.num_sequences * rows);
  int64_t store_tokens = 0;
  for (int64_t s = 0; s < p.num_sequences; ++s) {
    const SequenceView& seq = p.sequences[s];
    for (int r = 0; r < rows; ++r) {
      const int64_t pos = seq.row_pos[r];
      hi[s * rows + r] = pos;
      lo[s * rows + r] = seq.has_window ? pos - static_cast<int64_t>(seq.window) + 1
                                        : std::numeric_limits<int64_t>::min();
    }
    const int64_t end = std::max<int64_t>(seq.length - p.sinks, 0);
    store_tokens += std::max<int64_t>(end - seq.tail_count - seq.evicted, 0) * p.heads;
  }
  // Items of about equal size, enough to keep every thread busy.
  const int64_t pieces = kItemsPerThread * std::max(1, threads);
  const int64_t chunk = std::max<int64_t>(kMinItemTokens, (store_tokens + pieces - 1) / pieces);

  std::vector<Item> items;
  std::vector<int64_t> first_item(p.num_sequences * p.heads + 1, 0);
  int64_t scratch = 0;
  auto add = [&](int64_t s, int h, bool store, const Span& span) {
    const int lanes = store ? store_lanes : hot_lanes;
    items.push_back({s, h, store, span.first_slot, span.count, span.first_pos, scratch});
    scratch += static_cast<int64_t>(rows) * (lanes + 4);
  };
  std::vector<Span> spans;
  for (int64_t s = 0; s < p.num_sequences; ++s) {
    const SequenceView& seq = p.sequences[s];
    const int64_t* row_lo = &lo[s * rows];
    const int64_t* row_hi = &hi[s * rows];
    for (int h = 0; h < p.heads; ++h) {
      first_item[s * p.heads + h] = static_cast<int64_t>(items.size());
      if (!seq.layer_ok) continue;
      const int64_t sink_count = std::min<int64_t>(seq.length, p.sinks);
      const int64_t end = std::max<int64_t>(seq.length - p.sinks, 0);
      spans.clear();
      if (sink_count > 0) spans.push_back({0, sink_count, 0});
      for (const Span& span : spans) {
        if (AnyRowSees(span, row_lo, row_hi, rows)) add(s, h, false, span);
      }
      spans.clear();
      if (p.page_size > 0) {  // pages: items are runs of non-sink indices
        if (end - seq.tail_count > seq.evicted) {
          spans.push_back({seq.evicted, end - seq.tail_count - seq.evicted, p.sinks + seq.evicted});
        }
      } else {
        RingSpans(seq.evicted, end - seq.tail_count, p.store_slots, p.sinks, &spans);
      }
      for (const Span& span : spans) {
        const int64_t n_pieces = (span.count + chunk - 1) / chunk;  // of equal size
        int64_t size = (span.count + n_pieces - 1) / std::max<int64_t>(1, n_pieces);
        if (p.page_size > 0) size = (size + p.page_size - 1) / p.page_size * p.page_size;
        for (int64_t t = 0; t < span.count; t += size) {
          const Span piece{span.first_slot + t, std::min(size, span.count - t),
                           span.first_pos + t};
          if (AnyRowSees(piece, row_lo, row_hi, rows)) add(s, h, true, piece);
        }
      }
      spans.clear();
      RingSpans(end - seq.tail_count, end, p.tail_slots, p.sinks, &spans);
      for (const Span& span : spans) {
        if (AnyRowSees(span, row_lo, row_hi, rows)) add(s, h, false, span);
      }
    }
  }
  first_item[p.num_sequences * p.heads] = static_cast<int64_t>(items.size());

  // Partial of an item: max[R], denom[R], seen/nan flags[R] (as floats), acc[R][lanes].
  std::vector<float> partials(scratch);
  const size_t run_bytes = std::max(RunScratchBytes(p.hot, p.hot, rows),
                                    RunScratchBytes(p.store_key, p.store_value, rows));
  parallel(static_cast<int64_t>(items.size()), [&](int64_t begin, int64_t end) {
    // Each claim is one item: a thread's buffers outlive the call, instead
    // of a scratch allocated and zeroed for every item.
    thread_local ThreadBuffers buffers;
    std::vector<uint8_t>& flags = buffers.flags;
    std::vector<TierData>& pages_k = buffers.pages_k;
    std::vector<TierData>& pages_v = buffers.pages_v;
    flags.resize(2 * rows);
    void* aligned = buffers.Scratch(run_bytes);
    for (int64_t i = begin; i < end; ++i) {
      const Item& item = items[i];
      const SequenceView& seq = p.sequences[item.sequence];
      const TierFormat& key = item.store ? p.store_key : p.hot;
      const TierFormat& value = item.store ? p.store_value : p.hot;
      const int lanes = value.lanes;
      float* part = &partials[item.scratch];
      std::fill(part, part + rows, -kInf);
      std::fill(part + rows, part + static_cast<int64_t>(rows) * (lanes + 4), 0.0f);
      std::fill(flags.begin(), flags.end(), 0);
      const TierView& kv_k = item.store ? seq.store_k
                             : item.first_pos < p.sinks ? seq.sink_k : seq.tail_k;
      const TierView& kv_v = item.store ? seq.store_v
                             : item.first_pos < p.sinks ? seq.sink_v : seq.tail_v;
      RunArgs args;
      args.key_format = &key;
      args.value_format = &value;
      args.k = kv_k.Head(item.head, key);
      args.v = kv_v.Head(item.head, value);
      args.first_slot = item.first_slot;
      args.count = item.count;
      args.first_pos = item.first_pos;
      args.rows = rows;
      args.q = (item.store ? seq.q_store : seq.q_hot) +
               static_cast<int64_t>(item.head) * rows * key.lanes;
      args.lo = &lo[item.sequence * rows];
      args.hi = &hi[item.sequence * rows];
      args.has_softcap = p.has_softcap;
      args.softcap = seq.softcap;
      args.scratch = aligned;
      Partial out{part, part + rows, flags.data(), flags.data() + rows, part + 4 * rows};
      if (item.store && p.page_size > 0) {
        args.page_size = p.page_size;
        if (ItemPages(p, seq, item, key, value, &pages_k, &pages_v)) {
          args.page_k = pages_k.data();
          args.page_v = pages_v.data();
          run(args, out);
        } else {  // poisoned: NaN rather than a read outside the pool
          std::fill(flags.begin(), flags.end(), 1);
        }
      } else {
        run(args, out);
      }
      for (int r = 0; r < rows; ++r) {
        part[2 * rows + r] = flags[r];
        part[3 * rows + r] = flags[rows + r];
      }
    }
    buffers.Trim();
  });

  // Merge the items of each (sequence, head) and write its outputs: on the
  // pool only where there is enough to merge to pay for waking it.
  const auto merge = [&](int64_t begin, int64_t end) {
    for (int64_t sh = begin; sh < end; ++sh) {
      const int64_t s = sh / p.heads;
      const int h = static_cast<int>(sh % p.heads);
      const SequenceView& seq = p.sequences[s];
      float* out_hot = seq.out_hot + static_cast<int64_t>(h) * rows * hot_lanes;
      float* out_store = seq.out_store + static_cast<int64_t>(h) * rows * store_lanes;
      const int64_t i0 = first_item[sh], i1 = first_item[sh + 1];
      for (int r = 0; r < rows; ++r) {
        float* hot_row = out_hot + static_cast<int64_t>(r) * hot_lanes;
        float* store_row = out_store + static_cast<int64_t>(r) * store_lanes;
        bool seen = false, nan = !seq.layer_ok;
        float max = -kInf;
        for (int64_t i = i0; i < i1; ++i) {
          const float* part = &partials[items[i].scratch];
          if (part[2 * rows + r] == 0.0f) continue;  // saw nothing: not merged
          seen = true;
          nan = nan || part[3 * rows + r] != 0.0f;
          max = std::max(max, part[r]);
        }
        if (nan || !seen) {
          const float fill = nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
          std::fill(hot_row, hot_row + hot_lanes, fill);
          std::fill(store_row, store_row + store_lanes, fill);
          continue;
        }
        const float shift = max == -kInf ? 0.0f : max;
        std::fill(hot_row, hot_row + hot_lanes, 0.0f);
        std::fill(store_row, store_row + store_lanes, 0.0f);
        float denom = 0.0f;
        for (int64_t i = i0; i < i1; ++i) {
          const Item& item = items[i];
          const float* part = &partials[item.scratch];
          if (part[2 * rows + r] == 0.0f) continue;
          const int lanes = item.store ? store_lanes : hot_lanes;
          const float weight = SoftmaxWeight(part[r] - shift);
          denom += part[rows + r] * weight;
          const float* acc = part + 4 * rows + static_cast<int64_t>(r) * lanes;
          float* row = item.store ? store_row : hot_row;
          for (int c = 0; c < lanes; ++c) row[c] += acc[c] * weight;
        }
        // All visible logits -inf: denom 0, and 0/0 is NaN, as in the reference.
        for (int c = 0; c < hot_lanes; ++c) hot_row[c] /= denom;
        for (int c = 0; c < store_lanes; ++c) store_row[c] /= denom;
      }
    }
  };
  if (scratch < kMinPoolMergeFloats) {
    merge(0, p.num_sequences * p.heads);
  } else {
    parallel(p.num_sequences * p.heads, merge);
  }
}

}  // namespace kvjax
