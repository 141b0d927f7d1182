// The dispatch table: every kernel of one instruction-set variant, the
// variants built into this binary, and the one point that picks one.
#ifndef KVJAX_FFI_KERNELS_H_
#define KVJAX_FFI_KERNELS_H_

#include <string>
#include <vector>

#include "affine_kernels.h"
#include "attention_kernels.h"
#include "turbo_kernels.h"

namespace kvjax {

struct KernelSet {
  const char* isa;
  FormatKernels q8;
  FormatKernels q4;
  TurboKernels turbo;
  AttendRunFn attend;
};

#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 { void AttendRun(const RunArgs& args, const Partial& out); }
namespace avx512 { void AttendRun(const RunArgs& args, const Partial& out); }
#endif
#if defined(__aarch64__)
namespace neon { void AttendRun(const RunArgs& args, const Partial& out); }
#endif

// Variants built into this binary, in order of preference.
std::vector<const KernelSet*> CompiledKernels();

// Whether this CPU can run `isa` (and the OS saves its registers).
bool CpuSupports(const std::string& isa);

// The variant to run: `requested` ("" or "auto" for the best this CPU
// supports; otherwise a name from CompiledKernels). Returns nullptr and sets
// `error` (which names the request as `source`, e.g. "KVJAX_ISA") for an
// unknown name, a variant not built here, or one this CPU cannot run: never
// a silent fallback.
const KernelSet* SelectKernels(const std::string& requested,
                               const std::string& source, std::string* error);

}  // namespace kvjax

#endif  // KVJAX_FFI_KERNELS_H_
