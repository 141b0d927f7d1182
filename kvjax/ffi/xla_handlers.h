// The XLA FFI handlers kvjax registers, and the kernel variant they run.
#ifndef KVJAX_FFI_XLA_HANDLERS_H_
#define KVJAX_FFI_XLA_HANDLERS_H_

#include <string>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace kvjax {

struct Selection {
  const KernelSet* kernels = nullptr;  // nullptr: `error` says why
  std::string error;
};

// Chosen once, at first use, from the CPU and $KVJAX_ISA.
const Selection& ActiveKernels();

XLA_FFI_DECLARE_HANDLER_SYMBOL(Q8Encode);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Q4Encode);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Q8Decode);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Q4Decode);
XLA_FFI_DECLARE_HANDLER_SYMBOL(TurboEncode);
XLA_FFI_DECLARE_HANDLER_SYMBOL(TurboDecode);
XLA_FFI_DECLARE_HANDLER_SYMBOL(TurboOrder);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Attend);

}  // namespace kvjax

#endif  // KVJAX_FFI_XLA_HANDLERS_H_
