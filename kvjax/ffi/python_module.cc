// The nanobind module: handler capsules for jax.ffi and what was selected.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <string>
#include <vector>

#include "kernels.h"
#include "xla_handlers.h"

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule Capsule(T* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_kvjax_ffi, m) {
  m.def("handlers", [] {
    nb::dict d;
    d["kvjax_q8_encode"] = Capsule(kvjax::Q8Encode);
    d["kvjax_q4_encode"] = Capsule(kvjax::Q4Encode);
    d["kvjax_q8_decode"] = Capsule(kvjax::Q8Decode);
    d["kvjax_q4_decode"] = Capsule(kvjax::Q4Decode);
    d["kvjax_turbo_encode"] = Capsule(kvjax::TurboEncode);
    d["kvjax_turbo_decode"] = Capsule(kvjax::TurboDecode);
    d["kvjax_turbo_order"] = Capsule(kvjax::TurboOrder);
    d["kvjax_attend"] = Capsule(kvjax::Attend);
    return d;
  });
  m.def("selected_isa", [] {
    const kvjax::Selection& s = kvjax::ActiveKernels();
    if (!s.kernels) throw std::runtime_error(s.error);
    return std::string(s.kernels->isa);
  }, "The kernel variant in use; raises if $KVJAX_ISA names one that cannot run.");
  m.def("compiled_isas", [] {
    std::vector<std::string> names;
    for (const kvjax::KernelSet* k : kvjax::CompiledKernels()) names.push_back(k->isa);
    return names;
  });
  m.def("supported_isas", [] {
    std::vector<std::string> names;
    for (const kvjax::KernelSet* k : kvjax::CompiledKernels()) {
      if (kvjax::CpuSupports(k->isa)) names.push_back(k->isa);
    }
    return names;
  });
}
