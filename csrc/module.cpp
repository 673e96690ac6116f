// bnc._core: registers the binding files, nothing else. The bindings check every buffer and call
// the kernels without the GIL; the Python layer (bnc/functional.py) checks scalars and types and
// normalizes (copies of strided input, the axis, output allocation).

#include <pybind11/pybind11.h>

#include "bindings/batch_norm.h"
#include "bindings/pool.h"
#include "bindings/runtime.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "bnc's C++ kernels (internal; use bnc.batch_norm_forward / bnc.BatchNorm*d)";
  bnc_bindings::bind_batch_norm(m);
  bnc_bindings::bind_runtime(m);
  bnc_bindings::bind_pool(m);
  m.attr("__version__") = BNC_VERSION;
#ifdef BNC_SANITIZED
  m.attr("sanitized") = true;
#else
  m.attr("sanitized") = false;
#endif
}
