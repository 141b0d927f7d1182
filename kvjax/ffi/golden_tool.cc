// kvjax_golden: encode and decode a file of float32 groups with one format
// and one kernel variant, with no Python or XLA. The file formats are in
// docs/golden_vectors.md; tests/golden/ holds files made by the jnp reference.
//
//   kvjax_golden --format q8|q4 [--isa auto|scalar|avx2|avx512|neon] IN OUT
//   kvjax_golden --format turbo --tables TABLES [--isa ...] IN OUT
//   kvjax_golden --list
//
// turbo: the format is the tables file's (its geometry and tables, written
// by the Python side); split formats encode each group with its own outlier
// order, as a cache's first token decides it.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "affine_format.h"
#include "kernels.h"
#include "turbo_format.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace {

constexpr char kGroupsMagic[8] = {'K', 'V', 'J', 'X', 'G', 'R', 'P', '1'};
constexpr char kEncodedMagic[8] = {'K', 'V', 'J', 'X', 'E', 'N', 'C', '1'};
constexpr char kTurboTablesMagic[8] = {'K', 'V', 'J', 'X', 'T', 'B', 'L', '1'};
constexpr char kTurboEncodedMagic[8] = {'K', 'V', 'J', 'X', 'T', 'Q', 'E', '1'};

int Fail(const std::string& message) {
  std::fprintf(stderr, "kvjax_golden: %s\n", message.c_str());
  return 1;
}

bool ReadExact(std::FILE* f, void* data, size_t bytes) {
  return std::fread(data, 1, bytes, f) == bytes;
}

bool WriteExact(std::FILE* f, const void* data, size_t bytes) {
  return bytes == 0 || std::fwrite(data, 1, bytes, f) == bytes;  // data may be null if empty
}

// Reads a groups file; returns an error message or "".
std::string ReadGroups(const char* path, uint32_t* group_size,
                       uint64_t* num_groups, std::vector<float>* values) {
  std::FILE* f = std::fopen(path, "rb");
  if (!f) return std::string("cannot open ") + path;
  char magic[8];
  uint32_t reserved = 0;
  std::string error;
  if (!ReadExact(f, magic, 8) || std::memcmp(magic, kGroupsMagic, 8) != 0) {
    error = std::string(path) + ": not a kvjax groups file (magic KVJXGRP1)";
  } else if (!ReadExact(f, group_size, 4) || !ReadExact(f, &reserved, 4) ||
             !ReadExact(f, num_groups, 8)) {
    error = std::string(path) + ": truncated header";
  } else if (*group_size == 0 || *num_groups > (uint64_t{1} << 40) / *group_size) {
    error = std::string(path) + ": group_size must be > 0 and the file < 4 TiB";
  } else {
    values->resize(*num_groups * *group_size);
    if (!ReadExact(f, values->data(), values->size() * sizeof(float))) {
      error = std::string(path) + ": fewer values than the header promises";
    } else if (std::fgetc(f) != EOF) {
      error = std::string(path) + ": trailing bytes after the values";
    }
  }
  std::fclose(f);
  return error;
}

struct TurboTables {
  uint32_t head_dim = 0, num_instances = 0, prod = 0;
  int bits[2] = {0, 0};
  std::vector<float> values;
};

std::string ReadTurboTables(const char* path, TurboTables* t) {
  std::FILE* f = std::fopen(path, "rb");
  if (!f) return std::string("cannot open ") + path;
  char magic[8];
  uint32_t header[6];
  uint64_t count = 0;
  std::string error;
  if (!ReadExact(f, magic, 8) || std::memcmp(magic, kTurboTablesMagic, 8) != 0) {
    error = std::string(path) + ": not a kvjax turbo tables file (magic KVJXTBL1)";
  } else if (!ReadExact(f, header, sizeof(header)) || !ReadExact(f, &count, 8) ||
             count > (uint64_t{1} << 24)) {
    error = std::string(path) + ": truncated or oversized header";
  } else {
    t->head_dim = header[0];
    t->num_instances = header[1];
    t->prod = header[2];
    t->bits[0] = static_cast<int>(header[3]);
    t->bits[1] = static_cast<int>(header[4]);
    t->values.resize(count);
    if (!ReadExact(f, t->values.data(), count * sizeof(float))) {
      error = std::string(path) + ": fewer tables than the header promises";
    } else if (std::fgetc(f) != EOF) {
      error = std::string(path) + ": trailing bytes after the tables";
    }
  }
  std::fclose(f);
  return error;
}

int RunTurbo(const kvjax::KernelSet& kernels, const char* tables_path, const char* in_path,
             const char* out_path) {
  TurboTables t;
  std::string error = ReadTurboTables(tables_path, &t);
  if (!error.empty()) return Fail(error);
  uint32_t group_size = 0;
  uint64_t num_groups = 0;
  std::vector<float> x;
  error = ReadGroups(in_path, &group_size, &num_groups, &x);
  if (!error.empty()) return Fail(error);
  if (group_size != t.head_dim) {
    return Fail("the groups have " + std::to_string(group_size) + " values, the tables are for " +
                std::to_string(t.head_dim));
  }
  kvjax::TurboLayout f;
  error = kvjax::MakeTurboLayout(static_cast<int>(t.head_dim), static_cast<int>(t.num_instances),
                                 t.bits, t.prod != 0, t.values.data(),
                                 static_cast<int64_t>(t.values.size()), &f);
  if (!error.empty()) return Fail(tables_path + std::string(": ") + error);
  const int64_t n = static_cast<int64_t>(num_groups);
  const int d = f.head_dim;
  std::vector<int32_t> orders(f.split ? n * d : 0);
  std::vector<int64_t> rows(f.split ? n : 0);
  for (int64_t g = 0; g < static_cast<int64_t>(rows.size()); ++g) {
    kvjax::OutlierOrder(x.data() + g * d, d, orders.data() + g * d);
    rows[g] = g;
  }
  const int32_t* order = f.split ? orders.data() : nullptr;
  std::vector<uint8_t> codes(n * f.code_bytes);
  std::vector<uint16_t> norms(n * f.norm_count);
  std::vector<float> decoded(x.size());
  kernels.turbo.encode(f, x.data(), n, order, rows.data(), codes.data(), norms.data());
  kernels.turbo.decode(f, codes.data(), norms.data(), n, order, rows.data(), decoded.data());
  std::FILE* out = std::fopen(out_path, "wb");
  if (!out) return Fail(std::string("cannot write ") + out_path);
  const uint32_t header[4] = {static_cast<uint32_t>(d), static_cast<uint32_t>(f.code_bytes),
                              static_cast<uint32_t>(f.norm_count), f.split ? 1u : 0u};
  const bool ok = WriteExact(out, kTurboEncodedMagic, 8) && WriteExact(out, header, 16) &&
                  WriteExact(out, &num_groups, 8) && WriteExact(out, codes.data(), codes.size()) &&
                  WriteExact(out, norms.data(), norms.size() * 2) &&
                  WriteExact(out, orders.data(), orders.size() * 4) &&
                  WriteExact(out, decoded.data(), decoded.size() * 4);
  if (std::fclose(out) != 0 || !ok) return Fail(std::string("write failed: ") + out_path);
  std::printf("%s turbo: %llu groups of %d\n", kernels.isa,
              static_cast<unsigned long long>(num_groups), d);
  return 0;
}

// XLA's CPU threads run with denormals flushed to zero, as inputs and as
// results (x86 MXCSR FTZ + DAZ, AArch64 FPCR.FZ), so the kernels' bits are
// defined there; this program runs them in the same environment.
void FlushDenormalsAsXlaDoes() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_setcsr(_mm_getcsr() | 0x8040);
#elif defined(__aarch64__)
  uint64_t fpcr;
  asm volatile("mrs %0, fpcr" : "=r"(fpcr));
  asm volatile("msr fpcr, %0" : : "r"(fpcr | (uint64_t{1} << 24)));
#endif
}

}  // namespace

int main(int argc, char** argv) {
  FlushDenormalsAsXlaDoes();
  std::string format, isa = "auto", tables;
  std::vector<const char*> paths;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--list") {
      for (const kvjax::KernelSet* k : kvjax::CompiledKernels()) {
        std::printf("%s %s\n", k->isa,
                    kvjax::CpuSupports(k->isa) ? "supported" : "unsupported");
      }
      return 0;
    }
    if ((arg == "--format" || arg == "--isa" || arg == "--tables") && i + 1 < argc) {
      (arg == "--format" ? format : arg == "--isa" ? isa : tables) = argv[++i];
    } else if (!arg.empty() && arg[0] == '-') {
      return Fail("unknown option " + arg);
    } else {
      paths.push_back(argv[i]);
    }
  }
  if (paths.size() != 2) {
    return Fail("usage: kvjax_golden --format q8|q4|turbo [--tables FILE] [--isa NAME] IN OUT");
  }
  if (format != "q8" && format != "q4" && format != "turbo") {
    return Fail("--format: expected q8, q4 or turbo, got '" + format + "'");
  }
  if ((format == "turbo") != !tables.empty()) {
    return Fail("--tables: required with --format turbo, and only then");
  }
  std::string error;
  const kvjax::KernelSet* kernels = kvjax::SelectKernels(isa, "--isa", &error);
  if (!kernels) return Fail(error);
  if (format == "turbo") return RunTurbo(*kernels, tables.c_str(), paths[0], paths[1]);
  const kvjax::FormatKernels& fk = format == "q8" ? kernels->q8 : kernels->q4;
  const int codes_per_byte = format == "q8" ? 1 : 2;

  uint32_t group_size = 0;
  uint64_t num_groups = 0;
  std::vector<float> x;
  error = ReadGroups(paths[0], &group_size, &num_groups, &x);
  if (!error.empty()) return Fail(error);
  if (group_size % codes_per_byte != 0) {
    return Fail("q4 needs an even group_size, got " + std::to_string(group_size));
  }
  const int64_t groups = static_cast<int64_t>(num_groups);
  std::vector<uint8_t> codes(num_groups * (group_size / codes_per_byte));
  std::vector<float> scale(num_groups), zero(num_groups), decoded(x.size());
  fk.encode(x.data(), groups, group_size, codes.data(), scale.data(), zero.data());
  fk.decode(codes.data(), scale.data(), zero.data(), groups, group_size,
            decoded.data());

  std::FILE* out = std::fopen(paths[1], "wb");
  if (!out) return Fail(std::string("cannot write ") + paths[1]);
  const uint32_t bits = format == "q8" ? 8 : 4;
  const bool ok = WriteExact(out, kEncodedMagic, 8) && WriteExact(out, &bits, 4) &&
                  WriteExact(out, &group_size, 4) &&
                  WriteExact(out, &num_groups, 8) &&
                  WriteExact(out, codes.data(), codes.size()) &&
                  WriteExact(out, scale.data(), scale.size() * 4) &&
                  WriteExact(out, zero.data(), zero.size() * 4) &&
                  WriteExact(out, decoded.data(), decoded.size() * 4);
  if (std::fclose(out) != 0 || !ok) return Fail(std::string("write failed: ") + paths[1]);
  std::printf("%s %s: %llu groups of %u\n", kernels->isa, format.c_str(),
              static_cast<unsigned long long>(num_groups), group_size);
  return 0;
}
