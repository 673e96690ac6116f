// Run-time configuration and the benchmark's copy. The thread cap is defined here once and
// exported (MAX_THREADS) for the Python layer's documentation and messages.

#include "bindings/runtime.h"

#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "bindings/buffers.h"
#include "kernels/copy.h"
#include "kernels/dispatch.h"

namespace bnc_bindings {
namespace {

// More threads than this is a mistake, not a machine (and libgomp aborts on absurd counts).
constexpr int kMaxThreads = 4096;

void copy(py::handle src, py::handle dst) {
  const py::array s = as_array(src, "src");
  const py::array d = as_array(dst, "dst");
  if (s.dtype().attr("hasobject").cast<bool>() || d.dtype().attr("hasobject").cast<bool>())
    throw py::type_error("src, dst: expected arrays of numbers, got an object dtype");
  if (!(s.flags() & py::array::c_style) || !(d.flags() & py::array::c_style))
    throw py::value_error("src, dst: expected C-contiguous arrays");
  if (!d.writeable()) throw py::value_error("dst: expected a writeable array");
  if (s.nbytes() != d.nbytes())
    throw py::value_error("dst: expected " + std::to_string(s.nbytes()) + " bytes, got " +
                          std::to_string(d.nbytes()));
  const char* sb = static_cast<const char*>(s.data());
  char* db = static_cast<char*>(const_cast<void*>(d.data()));
  if (sb < db + d.nbytes() && db < sb + s.nbytes())
    throw py::value_error("dst: expected memory not shared with src");
  const int threads = bnc::get_num_threads();
  py::gil_scoped_release release;
  bnc::parallel_copy(sb, db, s.nbytes(), threads);
}

}  // namespace

void bind_runtime(py::module_& m) {
  // At import, so that a child forked at any later time (also after other libraries used the
  // same libgomp) starts on one thread.
  if (const int error = bnc::install_fork_handler())
    throw std::runtime_error("bnc: pthread_atfork failed (error " + std::to_string(error) + ")");
  // The cache sizes are read once, here: a function-local static being filled by another thread
  // at the moment of a fork would leave the child waiting on its guard forever.
  bnc::stream_threshold_bytes();
  m.def("copy", &copy, py::arg("src"), py::arg("dst"),
        "Multi-threaded copy (the benchmark's memory-bandwidth yardstick).");
  m.def("stream_threshold_bytes", &bnc::stream_threshold_bytes,
        "Outputs of at least this many bytes are written with non-temporal stores.");
  m.def("_set_stream_threshold_bytes", &bnc::set_stream_threshold_bytes, py::arg("bytes"),
        "Testing hook: sets the threshold (a negative value restores the default).");
  m.def("available_isas", &bnc::available_isas, "ISA paths this CPU can run, best last.");
  m.def(
      "select_isa",
      [](const std::string& isa) {
        const std::string error = bnc::select_isa(isa);
        if (!error.empty()) throw py::value_error("BNC_FORCE_ISA: " + error);
      },
      py::arg("isa"), "Chooses the kernels' ISA path ('' for the best available).");
  m.def("active_isa", [] { return std::string(bnc::active_kernels().isa); });
  m.def("have_openmp", &bnc::have_openmp);
  m.def("get_num_threads", &bnc::get_num_threads);
  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 1 || n > kMaxThreads)
          throw py::value_error("n: expected a thread count from 1 to " +
                                std::to_string(kMaxThreads) + ", got " + std::to_string(n));
        bnc::set_num_threads(n);
      },
      py::arg("n"));
  m.attr("MAX_THREADS") = kMaxThreads;
}

}  // namespace bnc_bindings
