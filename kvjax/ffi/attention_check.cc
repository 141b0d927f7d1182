// kvjax_attention_check: every decode-attention variant against the scalar
// reference on random caches, with no Python or XLA (so it also runs under
// the sanitizers and, cross-compiled, under qemu-aarch64).
//
//   kvjax_attention_check [--isa NAME] [--cases N] [--seed S]
//
// Each case draws store formats for keys and values (the same or each its
// own: f32, bf16, f16, q8, and packed-code formats with segments of 1 to 4
// bits, affine or with norms and QJL coefficients), a hot format,
// a head dim, rows, ring positions, counters, query positions, a window and a
// softcap, and NaN / Inf values in random tokens. The variant must give NaN
// and +-Inf exactly where the reference does and agree within 2e-5 of each
// row's largest value elsewhere; it and the reference must both agree with
// float64 attention (Float64Run) within 5e-5, NaN and +-Inf alike. Prints
// one line per variant; exits 1 on a mismatch.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention_driver.h"
#include "attention_format.h"
#include "kernels.h"

namespace kvjax {
namespace {

struct Case {
  AttendProblem problem;
  TierFormat hot, store_key, store_value;
  std::vector<uint8_t> sink_k, sink_v, tail_k, tail_v, store_k, store_v;
  std::vector<float> store_scale_k, store_zero_k, store_scale_v, store_zero_v;
  std::vector<uint16_t> norms_k, norms_v;
  std::vector<float> tables, q_hot, q_store;
  std::vector<int32_t> row_pos;
  SequenceView seq;
  std::string label;
};

uint16_t Bf16Bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return static_cast<uint16_t>((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

uint16_t F16Bits(float x) {  // round to nearest; values here are small
  if (std::isnan(x)) return 0x7E00;
  if (std::isinf(x)) return x > 0 ? 0x7C00 : 0xFC00;
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  float a = std::fabs(x);
  if (a >= 65520.0f) return sign | 0x7C00;
  if (a < 6.1035156e-05f) return sign | static_cast<uint16_t>(std::nearbyint(a / 5.9604644775390625e-8f));
  int e;
  const float m = std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
  int mant = static_cast<int>(std::nearbyint((m * 2 - 1) * 1024));
  int exp = e - 1 + 15;
  if (mant == 1024) { mant = 0; ++exp; }
  return sign | static_cast<uint16_t>(exp << 10) | static_cast<uint16_t>(mant);
}

// Random values for `n` rows of `lanes` in `kind`, with rare NaN / Inf.
void FillRaw(std::mt19937& g, ValueKind kind, int64_t n, int lanes, double bad,
             std::vector<uint8_t>* out) {
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<double> u;
  const int bytes = kind == ValueKind::kF32 ? 4 : 2;
  out->assign(static_cast<size_t>(n) * lanes * bytes, 0);
  for (int64_t i = 0; i < n * lanes; ++i) {
    float x = normal(g);
    const double r = u(g);
    if (r < bad) x = r < bad / 3 ? NAN : r < 2 * bad / 3 ? INFINITY : -INFINITY;
    if (kind == ValueKind::kF32) {
      std::memcpy(out->data() + 4 * i, &x, 4);
    } else {
      const uint16_t h = kind == ValueKind::kBF16 ? Bf16Bits(x) : F16Bits(x);
      std::memcpy(out->data() + 2 * i, &h, 2);
    }
  }
}

// A store format of kind `kind` (0-3 raw/q8, 4 affine lut (q4), 5
// turbo-like lut: segments of random widths, maybe a QJL one) at head dim d,
// its codebooks appended to `tables`.
TierFormat DrawStoreFormat(std::mt19937& g, int kind, int d, std::vector<float>* tables) {
  auto pick = [&](int n) { return static_cast<int>(g() % n); };
  std::uniform_real_distribution<float> u01(0, 1);
  std::normal_distribution<float> normal;
  TierFormat f;
  f.lanes = d;
  if (kind < 4) {
    f.kind = static_cast<ValueKind>(kind);
    f.row_bytes = kind == 3 ? d : d * (kind == 0 ? 4 : 2);
  } else if (kind == 4) {  // q4
    f.kind = ValueKind::kLut;
    f.row_bytes = d / 2;
    f.num_segments = 1;
    f.segments[0] = Segment{4, d, 0, 0, static_cast<int32_t>(tables->size()), -1, -1, 0.0f};
    tables->insert(tables->end(), 16, 0.0f);
  } else {
    f.kind = ValueKind::kLut;
    const int nseg = d >= 32 ? 1 + pick(2) : 1;
    const bool qjl = u01(g) < 0.4;
    f.lanes = qjl ? 2 * d : d;
    int code = 0, lane = 0, norm = 0;
    for (int s = 0; s < nseg; ++s) {
      const int m = d / nseg;
      const int bits = 1 + pick(4);
      f.segments[s] = Segment{bits, m, code, lane, static_cast<int32_t>(tables->size()),
                              norm++, -1, 0.0f};
      // Half the codebooks symmetric (entry 2^b - 1 - c = -entry c), as
      // TurboQuant's are: variants may read those in a cheaper way.
      const size_t first = tables->size();
      const bool symmetric = u01(g) < 0.5;
      for (int i = 0; i < (1 << bits); ++i) {
        tables->push_back(symmetric && i >= (1 << (bits - 1))
                              ? -(*tables)[first + (1 << bits) - 1 - i] : normal(g));
      }
      code += bits == 3 ? m / 8 * 3 : m * bits / 8;
      lane += m;
    }
    f.num_segments = nseg;
    if (qjl) {
      f.segments[nseg] = Segment{1, d, code, d, static_cast<int32_t>(tables->size()), 0,
                                 norm++, 0.3f};
      tables->push_back(-1.0f);
      tables->push_back(1.0f);
      code += d / 8;
      f.num_segments = nseg + 1;
    }
    f.row_bytes = code;
    f.norm_count = norm;
  }
  return f;
}

bool IsRaw(const TierFormat& f) {
  return f.kind == ValueKind::kF32 || f.kind == ValueKind::kBF16 || f.kind == ValueKind::kF16;
}

Case Draw(std::mt19937& g) {
  Case c;
  auto pick = [&](int n) { return static_cast<int>(g() % n); };
  std::uniform_real_distribution<float> u01(0, 1);
  std::normal_distribution<float> normal;
  const int heads = 1 + pick(3);
  const int dims[] = {16, 32, 48, 64, 128, 8, 6, 24, 256};  // 256: two q4 word blocks
  int d = dims[pick(9)];
  // Keys and values: the same format half of the time, else each its own.
  const int key_kind = pick(6);
  const bool same = u01(g) < 0.5;
  const int value_kind = same ? key_kind : pick(6);
  if ((key_kind >= 4 || value_kind >= 4) && d % 16) d = 64;
  const int group = 1 + pick(4);
  const int n_q = 1 + pick(4);
  const int rows = group * n_q;
  // A quarter of the stores span several blocks of a run (kAttendBlockTokens).
  const int long_store = u01(g) < 0.25;
  const int sinks = pick(3), tail_slots = 2 + pick(12),
            store_slots = 8 + pick(long_store ? 3 * kAttendBlockTokens : 200);
  const double bad = u01(g) < 0.3 ? 0.002 : 0.0;

  c.hot.kind = static_cast<ValueKind>(pick(3));
  c.hot.lanes = d;
  c.hot.row_bytes = d * (c.hot.kind == ValueKind::kF32 ? 4 : 2);
  c.tables.reserve(4096);  // the formats point into it
  c.store_key = DrawStoreFormat(g, key_kind, d, &c.tables);
  c.store_value = same ? c.store_key : DrawStoreFormat(g, value_kind, d, &c.tables);
  c.store_key.tables = c.store_value.tables = c.tables.data();

  FillRaw(g, c.hot.kind, static_cast<int64_t>(heads) * sinks, d, bad, &c.sink_k);
  FillRaw(g, c.hot.kind, static_cast<int64_t>(heads) * sinks, d, bad, &c.sink_v);
  FillRaw(g, c.hot.kind, static_cast<int64_t>(heads) * tail_slots, d, bad, &c.tail_k);
  FillRaw(g, c.hot.kind, static_cast<int64_t>(heads) * tail_slots, d, bad, &c.tail_v);
  const int64_t store_rows = static_cast<int64_t>(heads) * store_slots;
  const TierFormat* formats[2] = {&c.store_key, &c.store_value};
  std::vector<uint8_t>* data[2] = {&c.store_k, &c.store_v};
  for (int i = 0; i < 2; ++i) {
    if (IsRaw(*formats[i])) {
      FillRaw(g, formats[i]->kind, store_rows, d, bad, data[i]);
    } else {
      data[i]->resize(store_rows * formats[i]->row_bytes);
      for (auto& b : *data[i]) b = static_cast<uint8_t>(g());
    }
  }
  for (auto* v : {&c.store_scale_k, &c.store_scale_v}) {
    v->resize(store_rows);
    for (auto& x : *v) x = u01(g) < bad ? NAN : 0.01f + 0.1f * u01(g);
  }
  // Sometimes value scales near float's top (values ~1e31, sums of c 2^28
  // times them overflow): a variant that masks q4 codes in place must read
  // such blocks' codes as numbers (kMaskedScaleLimit).
  if (u01(g) < 0.1) {
    for (auto& x : c.store_scale_v) x = u01(g) < 0.5 ? 0x1p100f * (1.0f + u01(g)) : x;
  }
  for (auto* v : {&c.store_zero_k, &c.store_zero_v}) {
    v->resize(store_rows);
    for (auto& x : *v) x = normal(g);
  }
  c.norms_k.resize(store_rows * c.store_key.norm_count);
  c.norms_v.resize(store_rows * c.store_value.norm_count);
  for (auto* v : {&c.norms_k, &c.norms_v}) {
    for (auto& x : *v) x = Bf16Bits(u01(g) < bad ? NAN : 0.5f + u01(g));
  }

  // Counters: a non-sink run of at most store_slots tokens, the newest in the tail.
  const int32_t end = pick(3 * store_slots);
  const int32_t retained = std::min<int32_t>(end, store_slots - pick(store_slots / 2 + 1));
  c.seq.length = sinks + end;
  if (end == 0) c.seq.length = pick(sinks + 1);
  c.seq.evicted = std::max<int32_t>(end - retained, 0);
  c.seq.tail_count = std::min<int32_t>({retained, tail_slots - 1, static_cast<int32_t>(pick(tail_slots))});
  c.q_hot.resize(static_cast<size_t>(heads) * rows * d);
  c.q_store.resize(static_cast<size_t>(heads) * rows * c.store_key.lanes);
  for (auto& x : c.q_hot) x = normal(g) * 0.3f;
  for (auto& x : c.q_store) x = normal(g) * 0.3f;
  c.row_pos.resize(rows);
  for (int r = 0; r < rows; ++r) c.row_pos[r] = pick(c.seq.length + 3) - 1;
  c.seq.has_window = u01(g) < 0.3;
  c.seq.window = 1 + pick(40);
  c.seq.softcap = 2.0f + 10 * u01(g);
  c.seq.q_hot = c.q_hot.data();
  c.seq.q_store = c.q_store.data();
  c.seq.row_pos = c.row_pos.data();
  auto view = [&](std::vector<uint8_t>& data, int slots, const TierFormat& f, float* scale,
                  float* zero, uint16_t* norms) {
    TierView t;
    t.base.data = data.data();
    t.base.scale = scale;
    t.base.zero = zero;
    t.base.norms = norms;
    t.head_slots = slots;
    t.head_bytes = static_cast<int64_t>(slots) * f.row_bytes;
    return t;
  };
  c.seq.sink_k = view(c.sink_k, sinks, c.hot, nullptr, nullptr, nullptr);
  c.seq.sink_v = view(c.sink_v, sinks, c.hot, nullptr, nullptr, nullptr);
  c.seq.tail_k = view(c.tail_k, tail_slots, c.hot, nullptr, nullptr, nullptr);
  c.seq.tail_v = view(c.tail_v, tail_slots, c.hot, nullptr, nullptr, nullptr);
  c.seq.store_k = view(c.store_k, store_slots, c.store_key, c.store_scale_k.data(),
                       c.store_zero_k.data(), c.norms_k.data());
  c.seq.store_v = view(c.store_v, store_slots, c.store_value, c.store_scale_v.data(),
                       c.store_zero_v.data(), c.norms_v.data());
  c.problem.heads = heads;
  c.problem.rows = rows;
  c.problem.sinks = sinks;
  c.problem.tail_slots = tail_slots;
  c.problem.store_slots = store_slots;
  c.problem.has_softcap = u01(g) < 0.3;
  c.problem.hot = c.hot;
  c.problem.store_key = c.store_key;
  c.problem.store_value = c.store_value;
  c.label = "kinds " + std::to_string(key_kind) + "/" + std::to_string(value_kind) + " d " + std::to_string(d) + " heads " +
            std::to_string(heads) + " rows " + std::to_string(rows) + " length " +
            std::to_string(c.seq.length) + " evicted " + std::to_string(c.seq.evicted) +
            " tail " + std::to_string(c.seq.tail_count) + " hot " +
            std::to_string(static_cast<int>(c.hot.kind)) + (c.problem.has_softcap ? " softcap" : "") +
            (c.seq.has_window ? " window " + std::to_string(c.seq.window) : "") +
            (bad > 0 ? " with NaN/Inf" : "");
  return c;
}

// Both outputs of one case by one variant.
// Float64 attention over one run, folded into `out`: each row's logits,
// weights and sums in double over the tokens it sees, decoded as the scalar
// reference decodes them (DecodeToken), the state kept relative to its max
// rounded to float (as the driver merges partials). The reference every
// variant's accuracy is judged by (docs/api.md: float64 softmax attention):
// a weight is 0 only where float64's exp is, so 0 * Inf is NaN only there.
void Float64Run(const RunArgs& a, const Partial& out) {
  const TierFormat& key = *a.key_format;
  const TierFormat& value = *a.value_format;
  std::vector<float> k(key.lanes), v(value.lanes);
  std::vector<double> logit(a.count), acc(value.lanes);
  for (int r = 0; r < a.rows; ++r) {
    const float* q = a.q + static_cast<int64_t>(r) * key.lanes;
    double run_max = -HUGE_VAL;
    bool bad = false, any = false;
    for (int64_t t = 0; t < a.count; ++t) {
      const int64_t pos = a.first_pos + t;
      if (pos < a.lo[r] || pos > a.hi[r]) continue;
      any = true;
      const TokenPlace place = Locate(a, t);
      DecodeToken(key, place.k, place.slot, k.data());
      double x = 0.0;
      for (int i = 0; i < key.lanes; ++i) x += static_cast<double>(q[i]) * k[i];
      if (a.has_softcap) x = a.softcap * std::tanh(x / a.softcap);
      bad = bad || std::isnan(x) || x == HUGE_VAL;
      logit[t] = x;
      run_max = std::max(run_max, x);
    }
    if (any) out.seen[r] = 1;
    if (bad) out.nan[r] = 1;
    if (!any || out.nan[r]) continue;
    // The new state's max (float, as the partials keep it); 0 while -inf.
    const float new_max = static_cast<float>(std::max<double>(run_max, out.max[r]));
    const double shift = new_max == -HUGE_VALF ? 0.0 : new_max;
    const double correction = std::exp(static_cast<double>(out.max[r]) - shift);
    double denom = out.denom[r] * correction;
    float* row_acc = out.acc + static_cast<int64_t>(r) * value.lanes;
    for (int i = 0; i < value.lanes; ++i) acc[i] = row_acc[i] * correction;
    for (int64_t t = 0; t < a.count; ++t) {
      const int64_t pos = a.first_pos + t;
      if (pos < a.lo[r] || pos > a.hi[r]) continue;
      const TokenPlace place = Locate(a, t);
      DecodeToken(value, place.v, place.slot, v.data());
      const double p = std::exp(logit[t] - shift);
      denom += p;
      for (int i = 0; i < value.lanes; ++i) acc[i] += p * v[i];
    }
    out.max[r] = new_max;
    out.denom[r] = static_cast<float>(denom);
    for (int i = 0; i < value.lanes; ++i) row_acc[i] = static_cast<float>(acc[i]);
  }
}

std::vector<float> Run(Case& c, AttendRunFn run) {
  const int heads = c.problem.heads, rows = c.problem.rows;
  std::vector<float> out(static_cast<size_t>(heads) * rows * (c.hot.lanes + c.store_value.lanes));
  c.seq.out_hot = out.data();
  c.seq.out_store = out.data() + static_cast<size_t>(heads) * rows * c.hot.lanes;
  c.problem.sequences = &c.seq;
  c.problem.num_sequences = 1;
  RunAttend(c.problem, run, 3, [](int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    for (int64_t i = 0; i < n; i += 2) fn(i, i + 2 < n ? i + 2 : n);  // several chunks
  });
  return out;
}

// The case's store as kvjax.paged lays it out: pages [pages][heads][slots]
// of a random size, in shuffled order, read through a page table. Rows no
// retained token uses hold NaN bytes (never read: select, not multiply).
struct PagedStore {
  std::vector<uint8_t> data[2];
  std::vector<float> scale[2], zero[2];
  std::vector<uint16_t> norms[2];
  std::vector<int32_t> table;
};

std::vector<float> RunPaged(const Case& original, AttendRunFn run, unsigned seed) {
  Case c = original;  // its views still point at `original`'s buffers
  std::mt19937 g(seed);
  PagedStore ps;
  const int heads = c.problem.heads, ring = c.problem.store_slots;
  const int64_t end = std::max<int64_t>(c.seq.length - c.problem.sinks, 0);
  const int64_t store_end = end - c.seq.tail_count;
  const int size = 1 + static_cast<int>(g() % 16);
  const int64_t columns = std::max<int64_t>(1, (store_end + size - 1) / size);
  const int64_t pages = columns + 1 + g() % 3;
  std::vector<int32_t> order(pages);
  for (int64_t p = 0; p < pages; ++p) order[p] = static_cast<int32_t>(p);
  std::shuffle(order.begin(), order.end(), g);
  ps.table.assign(order.begin(), order.begin() + columns);
  const TierFormat* formats[2] = {&c.store_key, &c.store_value};
  const TierView* rings[2] = {&original.seq.store_k, &original.seq.store_v};
  TierView* views[2] = {&c.seq.store_k, &c.seq.store_v};
  const int64_t rows = pages * heads * size;
  for (int i = 0; i < 2; ++i) {
    const TierFormat& f = *formats[i];
    ps.data[i].assign(rows * f.row_bytes, 0xFF);
    ps.scale[i].assign(rows, NAN);
    ps.zero[i].assign(rows, NAN);
    ps.norms[i].assign(rows * f.norm_count, 0xFFFF);
    for (int64_t j = c.seq.evicted; j < store_end; ++j) {
      const int64_t slot = j % ring, page = ps.table[j / size], at = j % size;
      for (int h = 0; h < heads; ++h) {
        const int64_t src = static_cast<int64_t>(h) * ring + slot;
        const int64_t dst = (page * heads + h) * size + at;
        std::memcpy(&ps.data[i][dst * f.row_bytes], rings[i]->base.data + src * f.row_bytes,
                    f.row_bytes);
        ps.scale[i][dst] = rings[i]->base.scale[src];
        ps.zero[i][dst] = rings[i]->base.zero[src];
        for (int n = 0; n < f.norm_count; ++n) {
          ps.norms[i][dst * f.norm_count + n] = rings[i]->base.norms[src * f.norm_count + n];
        }
      }
    }
    views[i]->base.data = ps.data[i].data();
    views[i]->base.scale = ps.scale[i].data();
    views[i]->base.zero = ps.zero[i].data();
    views[i]->base.norms = ps.norms[i].data();
    views[i]->head_slots = size;
    views[i]->head_bytes = static_cast<int64_t>(size) * f.row_bytes;
  }
  c.seq.page_table = ps.table.data();
  c.problem.page_size = size;
  c.problem.num_pages = pages;
  c.problem.max_pages = columns;
  return Run(c, run);
}

std::string Num(float x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", x);
  return buf;
}

// Largest finite |value| of each row of `width` lanes.
std::vector<float> RowScales(const float* x, size_t rows, int width) {
  std::vector<float> scale(rows, 0.0f);
  for (size_t r = 0; r < rows; ++r) {
    for (int i = 0; i < width; ++i) {
      if (std::isfinite(x[r * width + i])) scale[r] = std::max(scale[r], std::fabs(x[r * width + i]));
    }
  }
  return scale;
}

// Empty when `got` agrees with `want` (rows of `width` lanes, each within
// `tolerance` of `scale[row]`, plus want's own distance from `exact` where
// given: a reference's rounding is not the variant's error), else what
// differs.
std::string Compare(const float* got, const float* want, size_t rows, int width,
                    const std::vector<float>& scale, float tolerance,
                    const float* exact = nullptr) {
  for (size_t row = 0; row < rows; ++row) {
    for (int i = 0; i < width; ++i) {
      const float g = got[row * width + i], w = want[row * width + i];
      const bool same_class = std::isnan(g) == std::isnan(w) &&
                              (std::isinf(g) == std::isinf(w)) &&
                              (!std::isinf(w) || std::signbit(g) == std::signbit(w));
      const size_t at = row * width + i;
      const float own = exact && std::isfinite(exact[at]) ? std::fabs(w - exact[at]) : 0.0f;
      if (!same_class ||
          (std::isfinite(w) && std::fabs(g - w) > tolerance * scale[row] + own + 1e-30f)) {
        return "row " + std::to_string(row) + " lane " + std::to_string(i) + ": got " +
               Num(g) + ", reference " + Num(w) + " (row scale " + Num(scale[row]) + ")";
      }
    }
  }
  return "";
}

}  // namespace
}  // namespace kvjax

int main(int argc, char** argv) {
  std::string isa = "all";
  int cases = 400;
  unsigned seed = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string arg = argv[i];
    if (arg == "--isa") isa = argv[i + 1];
    else if (arg == "--cases") cases = std::atoi(argv[i + 1]);
    else if (arg == "--seed") seed = static_cast<unsigned>(std::atoi(argv[i + 1]));
    else {
      std::fprintf(stderr, "usage: kvjax_attention_check [--isa NAME|all] [--cases N] [--seed S]\n");
      return 2;
    }
  }
  int failures = 0;
  for (const kvjax::KernelSet* k : kvjax::CompiledKernels()) {
    if ((isa != "all" && isa != k->isa) || !kvjax::CpuSupports(k->isa)) continue;
    if (k->attend == nullptr) {
      std::printf("%s: not built\n", k->isa);
      continue;
    }
    std::mt19937 g(seed);
    int bad = 0, nan_rows = 0;
    std::string first;
    for (int i = 0; i < cases; ++i) {
      kvjax::Case c = kvjax::Draw(g);
      const std::vector<float> want = kvjax::Run(c, kvjax::scalar::AttendRun);
      const std::vector<float> got = kvjax::Run(c, k->attend);
      for (float w : want) nan_rows += std::isnan(w);
      // Both outputs, hot lanes then store lanes, row by row, on the scale of
      // the row's larger part (one is often tiny beside the other).
      const size_t rows = static_cast<size_t>(c.problem.heads) * c.problem.rows;
      const float* got_store = got.data() + rows * c.hot.lanes;
      const float* want_store = want.data() + rows * c.hot.lanes;
      std::vector<float> scale = kvjax::RowScales(want.data(), rows, c.hot.lanes);
      const std::vector<float> store_scale = kvjax::RowScales(want_store, rows, c.store_value.lanes);
      for (size_t r = 0; r < rows; ++r) scale[r] = std::max(scale[r], store_scale[r]);
      // Against the reference (within 2e-5 beyond the reference's own error
      // against float64), then both against float64 within the bar (5e-5).
      const std::vector<float> exact = kvjax::Run(c, kvjax::Float64Run);
      const float* exact_store = exact.data() + rows * c.hot.lanes;
      std::string diff =
          kvjax::Compare(got.data(), want.data(), rows, c.hot.lanes, scale, 2e-5f, exact.data());
      if (diff.empty()) {
        diff = kvjax::Compare(got_store, want_store, rows, c.store_value.lanes, scale, 2e-5f,
                              exact_store);
      }
      for (const std::vector<float>* out : {&got, &want}) {
        if (!diff.empty()) break;
        const float* hot = out->data();
        diff = kvjax::Compare(hot, exact.data(), rows, c.hot.lanes, scale, 5e-5f);
        if (diff.empty()) {
          diff = kvjax::Compare(hot + rows * c.hot.lanes, exact_store, rows, c.store_value.lanes,
                                scale, 5e-5f);
        }
        if (!diff.empty()) diff = (out == &got ? "float64: " : "float64 (scalar): ") + diff;
      }
      // The same store in pages (kvjax.paged), through the variant and the
      // scalar reference, against the ring's reference.
      for (kvjax::AttendRunFn paged_run : {k->attend, &kvjax::scalar::AttendRun}) {
        if (!diff.empty()) break;
        const std::vector<float> paged = kvjax::RunPaged(c, paged_run, seed * 7919u + i);
        diff = kvjax::Compare(paged.data(), want.data(), rows, c.hot.lanes, scale, 2e-5f,
                              exact.data());
        if (diff.empty()) {
          diff = kvjax::Compare(paged.data() + rows * c.hot.lanes, want_store, rows,
                                c.store_value.lanes, scale, 2e-5f, exact_store);
        }
        if (!diff.empty()) diff = "paged: " + diff;
      }
      if (!diff.empty()) {
        if (bad++ == 0) first = "case " + std::to_string(i) + " (" + c.label + "): " + diff;
      }
    }
    std::printf("%s: %d cases, %d mismatched%s%s (NaN outputs %d)\n", k->isa, cases, bad,
                bad ? "; first: " : "", first.c_str(), nan_rows);
    failures += bad;
  }
  return failures ? 1 : 0;
}
