// kvjax_golden: encode and decode a file of float32 groups with one format
// and one kernel variant, with no Python or XLA. The file formats are in
// docs/golden_vectors.md; tests/golden/ holds files made by the jnp reference.
//
//   kvjax_golden --format q8|q4 [--isa auto|scalar|avx2|avx512|neon] IN OUT
//   kvjax_golden --list
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "affine_format.h"
#include "kernels.h"

namespace {

constexpr char kGroupsMagic[8] = {'K', 'V', 'J', 'X', 'G', 'R', 'P', '1'};
constexpr char kEncodedMagic[8] = {'K', 'V', 'J', 'X', 'E', 'N', 'C', '1'};

int Fail(const std::string& message) {
  std::fprintf(stderr, "kvjax_golden: %s\n", message.c_str());
  return 1;
}

bool ReadExact(std::FILE* f, void* data, size_t bytes) {
  return std::fread(data, 1, bytes, f) == bytes;
}

bool WriteExact(std::FILE* f, const void* data, size_t bytes) {
  return std::fwrite(data, 1, bytes, f) == bytes;
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

}  // namespace

int main(int argc, char** argv) {
  std::string format, isa = "auto";
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
    if ((arg == "--format" || arg == "--isa") && i + 1 < argc) {
      (arg == "--format" ? format : isa) = argv[++i];
    } else if (!arg.empty() && arg[0] == '-') {
      return Fail("unknown option " + arg);
    } else {
      paths.push_back(argv[i]);
    }
  }
  if (paths.size() != 2) {
    return Fail("usage: kvjax_golden --format q8|q4 [--isa NAME] IN OUT");
  }
  if (format != "q8" && format != "q4") {
    return Fail("--format: expected q8 or q4, got '" + format + "'");
  }
  std::string error;
  const kvjax::KernelSet* kernels = kvjax::SelectKernels(isa, "--isa", &error);
  if (!kernels) return Fail(error);
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
