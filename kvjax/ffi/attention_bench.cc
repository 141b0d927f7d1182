// kvjax_attention_bench: what one thread spends per token in each
// decode-attention variant, by store format, with no Python or XLA (the
// figure kernel changes are judged by; docs/attention.md). Built on request:
//
//   cmake -S kvjax/ffi -B build -DKVJAX_BUILD_PYTHON=OFF
//   cmake --build build --target kvjax_attention_bench
//   build/kvjax_attention_bench [--tokens N] [--reps R] [--isa NAME|all]
//                               [--formats NAME,NAME] [--dim D] [--rows R]
//                               [--shared-kv 0|1]
//
// One KV head of D lanes (128; a multiple of 32), R query rows (4: a GQA
// group of 4; SmolLM2 is --dim 64 --rows 3), one store run of N tokens of
// random codes, keys and values in memory of their own as in a cache
// (--shared-kv 1: values read the keys' bytes, so that a run out of cache
// streams half the bytes). Prints the best nanoseconds per token over R
// calls, and their median, one line per variant and format.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "attention_kernels.h"
#include "kernels.h"

namespace {

using kvjax::Segment;
using kvjax::TierFormat;
using kvjax::ValueKind;

// One KV head of `dim` lanes, `rows` query rows (flags --dim, --rows).
int dim = 128, rows = 4;

// A store format like kvjax's: raw, q8, q4 or TurboQuant-shaped segments
// ({bits, channels, norm}; norm -1: q4's affine table), its tables in `tables`.
struct Format {
  const char* name;
  ValueKind kind;
  std::vector<Segment> segments;
  int norm_count;
};

TierFormat Build(const Format& spec, std::vector<float>* tables) {
  TierFormat f;
  f.kind = spec.kind;
  f.lanes = dim;
  f.norm_count = spec.norm_count;
  if (spec.kind == ValueKind::kF32) f.row_bytes = 4 * dim;
  if (spec.kind == ValueKind::kBF16) f.row_bytes = 2 * dim;
  if (spec.kind == ValueKind::kQ8) f.row_bytes = dim;
  int code_offset = 0, lane_offset = 0;
  for (Segment s : spec.segments) {
    s.channels = s.channels * dim / 128;  // the specs are written for 128 lanes
    s.code_offset = code_offset;
    s.lane_offset = lane_offset;
    s.table_offset = static_cast<int32_t>(tables->size());
    // Evenly spaced in [-1, 1] and exactly symmetric, as TurboQuant's codebooks are.
    const int entries = 1 << s.bits;
    for (int i = 0; i < entries; ++i) {
      tables->push_back(i < entries / 2 ? -1.0f + 2.0f * i / (entries - 1)
                                        : -(*tables)[s.table_offset + entries - 1 - i]);
    }
    code_offset += s.channels * s.bits / 8;
    lane_offset += s.channels;
    f.segments[f.num_segments++] = s;
  }
  if (spec.kind == ValueKind::kLut) f.row_bytes = code_offset;
  return f;
}

}  // namespace

// One tier's memory (codes or floats, scales, zeros, norms) for `tokens`
// tokens of format f, filled from g.
struct Tier {
  std::vector<uint8_t> data;
  std::vector<float> scale, zero;
  std::vector<uint16_t> norms;

  Tier(const TierFormat& f, ValueKind kind, int64_t tokens, std::mt19937& g)
      : data(static_cast<size_t>(tokens) * f.row_bytes),
        scale(tokens, 0.01f),
        zero(tokens, -0.05f),
        norms(static_cast<size_t>(tokens) * std::max(1, f.norm_count), 0x3f80) {
    for (uint8_t& b : data) b = static_cast<uint8_t>(g());
    if (kind == ValueKind::kF32) {  // finite floats, not random bits
      float* x = reinterpret_cast<float*>(data.data());
      for (int64_t i = 0; i < tokens * dim; ++i) x[i] = 0.01f * static_cast<float>(g() % 100);
    }
    if (kind == ValueKind::kBF16) {
      for (size_t i = 1; i < data.size(); i += 2) data[i] = 0x3f;
    }
  }

  kvjax::TierData Data() {
    kvjax::TierData d{};
    d.data = data.data();
    d.scale = scale.data();
    d.zero = zero.data();
    d.norms = norms.data();
    return d;
  }
};

int main(int argc, char** argv) {
  int64_t tokens = 8192;
  int reps = 50;
  bool shared_kv = false;
  std::string isa = "all", names = "all";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string arg = argv[i];
    if (arg == "--tokens") tokens = std::atoll(argv[i + 1]);
    else if (arg == "--reps") reps = std::atoi(argv[i + 1]);
    else if (arg == "--isa") isa = argv[i + 1];
    else if (arg == "--formats") names = "," + std::string(argv[i + 1]) + ",";
    else if (arg == "--dim") dim = std::atoi(argv[i + 1]);
    else if (arg == "--rows") rows = std::atoi(argv[i + 1]);
    else if (arg == "--shared-kv") shared_kv = std::atoi(argv[i + 1]) != 0;
    else {
      std::fprintf(stderr,
                   "usage: kvjax_attention_bench [--tokens N] [--reps R] [--isa NAME|all] "
                   "[--formats NAME,NAME] [--dim D] [--rows R] [--shared-kv 0|1]\n");
      return 2;
    }
  }
  if (dim < 32 || dim % 32 != 0 || rows < 1 || reps < 1 || tokens < 1) {
    std::fprintf(stderr,
                 "--dim: expected a positive multiple of 32; --rows, --reps and --tokens at least 1\n");
    return 2;
  }
  // {bits, channels, code offset, lane offset, table offset, norm, kappa, kappa scale}
  const std::vector<Format> formats = {
      {"f32", ValueKind::kF32, {}, 0},
      {"bf16", ValueKind::kBF16, {}, 0},
      {"q8", ValueKind::kQ8, {}, 0},
      {"q4", ValueKind::kLut, {{4, 128, 0, 0, 0, -1, -1, 0.0f}}, 0},
      {"turbo4", ValueKind::kLut, {{4, 128, 0, 0, 0, 0, -1, 0.0f}}, 1},
      {"turbo3", ValueKind::kLut, {{3, 128, 0, 0, 0, 0, -1, 0.0f}}, 1},
      {"turbo2", ValueKind::kLut, {{2, 128, 0, 0, 0, 0, -1, 0.0f}}, 1},
      {"turbo3.5", ValueKind::kLut, {{4, 64, 0, 0, 0, 0, -1, 0.0f}, {3, 64, 0, 0, 0, 1, -1, 0.0f}}, 2},
  };
  std::mt19937 g(1);
  std::vector<float> q(rows * dim);
  for (float& x : q) x = std::uniform_real_distribution<float>(-0.1f, 0.1f)(g);
  std::vector<int64_t> lo(rows, 0), hi(rows, tokens);
  for (const kvjax::KernelSet* k : kvjax::CompiledKernels()) {
    if ((isa != "all" && isa != k->isa) || !kvjax::CpuSupports(k->isa) || !k->attend) continue;
    for (const Format& spec : formats) {
      if (names != "all" && names.find("," + std::string(spec.name) + ",") == std::string::npos) {
        continue;
      }
      std::vector<float> tables;
      tables.reserve(64);
      TierFormat f = Build(spec, &tables);
      f.tables = tables.data();
      Tier keys(f, spec.kind, tokens, g), values(f, spec.kind, shared_kv ? 0 : tokens, g);
      kvjax::RunArgs a{};
      a.key_format = a.value_format = &f;
      a.k = keys.Data();
      a.v = shared_kv ? a.k : values.Data();
      a.count = tokens;
      a.rows = rows;
      a.q = q.data();
      a.lo = lo.data();
      a.hi = hi.data();
      std::vector<uint8_t> scratch(kvjax::RunScratchBytes(f, f, rows) + 64);
      a.scratch = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64;
      std::vector<float> partial(rows * (dim + 2));
      std::vector<uint8_t> flags(2 * rows);
      std::vector<double> seconds;
      for (int r = 0; r < reps; ++r) {
        std::fill(partial.begin(), partial.begin() + rows, -__builtin_inff());
        std::fill(partial.begin() + rows, partial.end(), 0.0f);
        std::fill(flags.begin(), flags.end(), 0);
        const kvjax::Partial out{partial.data(), partial.data() + rows, flags.data(),
                                 flags.data() + rows, partial.data() + 2 * rows};
        const auto start = std::chrono::steady_clock::now();
        k->attend(a, out);
        seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
      // The best call is the figure to compare builds by; the median shows
      // how much of the run a shared machine took away.
      std::sort(seconds.begin(), seconds.end());
      const double per_token = 1e9 / static_cast<double>(tokens);
      std::printf("%s %s: %.1f ns/token (%lld tokens, best of %d; median %.1f)\n", k->isa,
                  spec.name, seconds.front() * per_token, static_cast<long long>(tokens), reps,
                  seconds[seconds.size() / 2] * per_token);
    }
  }
  return 0;
}
