// pybind11 bindings of bnc._core: check every buffer (dtype, contiguity, size, writability, overlap),
// take raw pointers with the GIL held, then release the GIL and call the kernel. The Python layer
// (bnc/functional.py) checks first and gives friendlier messages; these checks keep direct callers safe.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/batch_norm.h"
#include "kernels/copy.h"
#include "kernels/dispatch.h"

namespace py = pybind11;

namespace {

using bnc::Geometry;
using bnc::half;

// More threads than this is a mistake, not a machine (and libgomp aborts on absurd counts).
constexpr int kMaxThreads = 4096;

template <class U>
struct DtypeOf;
template <>
struct DtypeOf<float> {
  static constexpr char code = 'f';
  static constexpr const char* name = "float32";
};
template <>
struct DtypeOf<double> {
  static constexpr char code = 'd';
  static constexpr const char* name = "float64";
};
template <>
struct DtypeOf<half> {
  static constexpr char code = 'e';
  static constexpr const char* name = "float16";
};

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// NumPy's dtype.isnative, read from the descriptor rather than through a Python attribute: the
// checks run on every call, and a cold interpreter (after a large kernel) pays for each lookup.
bool is_native(const py::array& a) {
  const char order = a.dtype().byteorder();
  constexpr char kNativeOrder = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '<' : '>';
  return order == '=' || order == '|' || order == kNativeOrder;
}

py::array as_array(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + ": expected a numpy.ndarray, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  return py::reinterpret_borrow<py::array>(obj);
}

// A checked view of one argument: numpy array of dtype U, C-contiguous, `count` elements
// (or exactly `shape` when given), writeable when it is an output.
struct Buffer {
  py::array array;
  const char* begin = nullptr;
  const char* end = nullptr;
};

template <class U>
Buffer check(const py::handle& obj, const char* name, bool writeable, int64_t count,
             const py::array* same_shape_as = nullptr) {
  py::array a = as_array(obj, name);
  if (a.dtype().char_() != DtypeOf<U>::code || !is_native(a))
    throw py::type_error(std::string(name) + ": expected dtype " + DtypeOf<U>::name +
                         (is_native(a) ? "" : " (native byte order)") + ", got " +
                         std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + ": expected a C-contiguous array, got a strided one");
  if (reinterpret_cast<uintptr_t>(a.data()) % alignof(U) != 0)
    throw py::value_error(std::string(name) + ": expected an array aligned to its element size, " +
                          "got a misaligned one");
  if (writeable && !a.writeable())
    throw py::value_error(std::string(name) + ": expected a writeable array, got a read-only one");
  if (same_shape_as) {
    bool same = a.ndim() == same_shape_as->ndim();
    for (py::ssize_t d = 0; same && d < a.ndim(); ++d) same = a.shape(d) == same_shape_as->shape(d);
    if (!same)
      throw py::value_error(std::string(name) + ": expected shape " + shape_str(*same_shape_as) +
                            ", got " + shape_str(a));
  } else if (a.ndim() != 1 || a.shape(0) != count) {
    throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(count) +
                          ",), got " + shape_str(a));
  }
  Buffer b;
  b.begin = static_cast<const char*>(a.data());
  b.end = b.begin + a.nbytes();
  b.array = std::move(a);
  return b;
}

template <class U>
Buffer check_optional(const py::handle& obj, const char* name, bool writeable, int64_t count) {
  if (obj.is_none()) return Buffer{};
  return check<U>(obj, name, writeable, count);
}

template <class U>
const U* in_ptr(const Buffer& b) {
  return b.begin ? reinterpret_cast<const U*>(b.begin) : nullptr;
}
template <class U>
U* out_ptr(Buffer& b) {
  return b.begin ? static_cast<U*>(b.array.mutable_data()) : nullptr;
}

// Outputs must not overlap any other argument: a kernel writing into memory it still reads
// would give wrong results.
void check_no_overlap(const std::vector<std::pair<const char*, const Buffer*>>& outputs,
                      const std::vector<std::pair<const char*, const Buffer*>>& all) {
  for (const auto& out : outputs) {
    if (!out.second->begin || out.second->begin == out.second->end) continue;
    for (const auto& other : all) {
      if (other.second == out.second || !other.second->begin) continue;
      if (out.second->begin < other.second->end && other.second->begin < out.second->end)
        throw py::value_error(std::string(out.first) + ": expected memory not shared with " +
                              other.first + ", got an overlapping array");
    }
  }
}

Geometry geometry_of(const py::array& x, int64_t axis) {
  if (x.ndim() < 1)
    throw py::value_error("x: expected an array with a channel axis, got a 0-d array");
  if (axis < 0 || axis >= x.ndim())
    throw py::value_error("axis: expected 0 <= axis < " + std::to_string(x.ndim()) + ", got " +
                          std::to_string(axis));
  Geometry g{1, x.shape(axis), 1};
  for (int64_t d = 0; d < axis; ++d) g.outer *= x.shape(d);
  for (int64_t d = axis + 1; d < x.ndim(); ++d) g.inner *= x.shape(d);
  return g;
}

void check_eps(double eps) {
  if (!(eps > 0.0) || !std::isfinite(eps))
    throw py::value_error("eps must be positive and finite, got " + std::to_string(eps));
}

void check_momentum(double momentum) {
  if (!std::isfinite(momentum))
    throw py::value_error("momentum: expected a finite number, got " + std::to_string(momentum));
}

void raise_if_out_of_memory(int64_t status) {
  if (status < 0) throw std::bad_alloc();
}

template <class T, class P>
int64_t forward_train_typed(const bnc::KernelSet<T, P>& k, const py::array& x, py::handle y,
                            py::handle weight, py::handle bias, py::handle running_mean,
                            py::handle running_var, int64_t axis, double eps, double momentum,
                            py::handle save_mean, py::handle save_invstd) {
  const Geometry g = geometry_of(x, axis);
  if (g.per_channel() < 2)
    throw py::value_error("Expected more than 1 value per channel when training, got " +
                          std::to_string(g.per_channel()));
  const int64_t C = g.channels;
  Buffer bx = check<T>(x, "x", false, 0, &x);
  Buffer by = check<T>(y, "out", true, 0, &x);
  Buffer bw = check_optional<P>(weight, "weight", false, C);
  Buffer bb = check_optional<P>(bias, "bias", false, C);
  Buffer brm = check_optional<P>(running_mean, "running_mean", true, C);
  Buffer brv = check_optional<P>(running_var, "running_var", true, C);
  Buffer bsm = check<P>(save_mean, "save_mean", true, C);
  Buffer bsi = check<P>(save_invstd, "save_invstd", true, C);
  check_no_overlap({{"out", &by}, {"running_mean", &brm}, {"running_var", &brv},
                    {"save_mean", &bsm}, {"save_invstd", &bsi}},
                   {{"x", &bx}, {"out", &by}, {"weight", &bw}, {"bias", &bb},
                    {"running_mean", &brm}, {"running_var", &brv}, {"save_mean", &bsm},
                    {"save_invstd", &bsi}});
  const int threads = bnc::get_num_threads();
  // Pointers are taken with the GIL held; then the kernel runs without it.
  const T* x_ptr = in_ptr<T>(bx);
  T* y_ptr = out_ptr<T>(by);
  const P *w_ptr = in_ptr<P>(bw), *b_ptr = in_ptr<P>(bb);
  P *rm_ptr = out_ptr<P>(brm), *rv_ptr = out_ptr<P>(brv);
  P *sm_ptr = out_ptr<P>(bsm), *si_ptr = out_ptr<P>(bsi);
  int64_t skipped;
  {
    py::gil_scoped_release release;
    skipped = k.forward_train(x_ptr, y_ptr, g, w_ptr, b_ptr, eps, momentum, rm_ptr, rv_ptr, sm_ptr,
                              si_ptr, threads);
  }
  raise_if_out_of_memory(skipped);
  return skipped;
}

template <class T, class P>
void forward_eval_typed(const bnc::KernelSet<T, P>& k, const py::array& x, py::handle y,
                        py::handle weight, py::handle bias, py::handle running_mean,
                        py::handle running_var, int64_t axis, double eps, py::handle save_mean,
                        py::handle save_invstd) {
  const Geometry g = geometry_of(x, axis);
  const int64_t C = g.channels;
  Buffer bx = check<T>(x, "x", false, 0, &x);
  Buffer by = check<T>(y, "out", true, 0, &x);
  Buffer bw = check_optional<P>(weight, "weight", false, C);
  Buffer bb = check_optional<P>(bias, "bias", false, C);
  Buffer brm = check<P>(running_mean, "running_mean", false, C);
  Buffer brv = check<P>(running_var, "running_var", false, C);
  Buffer bsm = check<P>(save_mean, "save_mean", true, C);
  Buffer bsi = check<P>(save_invstd, "save_invstd", true, C);
  check_no_overlap({{"out", &by}, {"save_mean", &bsm}, {"save_invstd", &bsi}},
                   {{"x", &bx}, {"out", &by}, {"weight", &bw}, {"bias", &bb},
                    {"running_mean", &brm}, {"running_var", &brv}, {"save_mean", &bsm},
                    {"save_invstd", &bsi}});
  const int threads = bnc::get_num_threads();
  const T* x_ptr = in_ptr<T>(bx);
  T* y_ptr = out_ptr<T>(by);
  const P *w_ptr = in_ptr<P>(bw), *b_ptr = in_ptr<P>(bb);
  const P *rm_ptr = in_ptr<P>(brm), *rv_ptr = in_ptr<P>(brv);
  P *sm_ptr = out_ptr<P>(bsm), *si_ptr = out_ptr<P>(bsi);
  int64_t status;
  {
    py::gil_scoped_release release;
    status = k.forward_eval(x_ptr, y_ptr, g, w_ptr, b_ptr, rm_ptr, rv_ptr, eps, sm_ptr, si_ptr,
                            threads);
  }
  raise_if_out_of_memory(status);
}

template <class T, class P>
void backward_typed(const bnc::KernelSet<T, P>& k, const py::array& dy, py::handle x,
                    py::handle dx, py::handle save_mean, py::handle save_invstd, py::handle weight,
                    int64_t axis, bool training, py::handle grad_weight, py::handle grad_bias) {
  const Geometry g = geometry_of(dy, axis);
  const int64_t C = g.channels;
  Buffer bdy = check<T>(dy, "dy", false, 0, &dy);
  Buffer bx = check<T>(x, "x", false, 0, &dy);
  Buffer bdx = check<T>(dx, "out", true, 0, &dy);
  Buffer bsm = check<P>(save_mean, "save_mean", false, C);
  Buffer bsi = check<P>(save_invstd, "save_invstd", false, C);
  Buffer bw = check_optional<P>(weight, "weight", false, C);
  Buffer bgw = check<P>(grad_weight, "grad_weight", true, C);
  Buffer bgb = check<P>(grad_bias, "grad_bias", true, C);
  check_no_overlap({{"out", &bdx}, {"grad_weight", &bgw}, {"grad_bias", &bgb}},
                   {{"dy", &bdy}, {"x", &bx}, {"out", &bdx}, {"save_mean", &bsm},
                    {"save_invstd", &bsi}, {"weight", &bw}, {"grad_weight", &bgw},
                    {"grad_bias", &bgb}});
  const int threads = bnc::get_num_threads();
  const T *dy_ptr = in_ptr<T>(bdy), *x_ptr = in_ptr<T>(bx);
  T* dx_ptr = out_ptr<T>(bdx);
  const P *sm_ptr = in_ptr<P>(bsm), *si_ptr = in_ptr<P>(bsi), *w_ptr = in_ptr<P>(bw);
  P *gw_ptr = out_ptr<P>(bgw), *gb_ptr = out_ptr<P>(bgb);
  int64_t status;
  {
    py::gil_scoped_release release;
    status = k.backward(dy_ptr, x_ptr, dx_ptr, g, sm_ptr, si_ptr, w_ptr, training, gw_ptr, gb_ptr,
                        threads);
  }
  raise_if_out_of_memory(status);
}

// Calls f(kernel set) for x's dtype: float32, float64 or float16 (with float32 parameters).
template <class F>
auto by_dtype(const py::array& x, const char* name, F&& f) {
  const bnc::KernelTable& t = bnc::active_kernels();
  if (!is_native(x))
    throw py::type_error(std::string(name) +
                         ": expected dtype float16, float32 or float64 (native byte order), got " +
                         std::string(py::str(x.dtype())));
  switch (x.dtype().char_()) {
    case 'f':
      return f(t.f32);
    case 'd':
      return f(t.f64);
    case 'e':
      return f(t.f16);
    default:
      throw py::type_error(std::string(name) + ": expected dtype float16, float32 or float64, got " +
                           std::string(py::str(x.dtype())));
  }
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "bnc's C++ kernels (internal; use bnc.batch_norm_forward / bnc.BatchNorm*d)";

  m.def(
      "forward_train",
      [](py::handle x, py::handle out, py::handle weight, py::handle bias, py::handle running_mean,
         py::handle running_var, int64_t axis, double eps, double momentum, py::handle save_mean,
         py::handle save_invstd) -> int64_t {
        check_eps(eps);
        check_momentum(momentum);
        const py::array xa = as_array(x, "x");
        return by_dtype(xa, "x", [&](const auto& k) {
          return forward_train_typed(k, xa, out, weight, bias, running_mean, running_var, axis, eps,
                                     momentum, save_mean, save_invstd);
        });
      },
      py::arg("x"), py::arg("out"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"),
      py::arg("running_var"), py::arg("axis"), py::arg("eps"), py::arg("momentum"),
      py::arg("save_mean"), py::arg("save_invstd"),
      "Training forward with batch statistics; returns the number of channels whose running "
      "statistics were not updated because the batch statistics were not finite.");

  m.def(
      "forward_eval",
      [](py::handle x, py::handle out, py::handle weight, py::handle bias, py::handle running_mean,
         py::handle running_var, int64_t axis, double eps, py::handle save_mean,
         py::handle save_invstd) {
        check_eps(eps);
        const py::array xa = as_array(x, "x");
        by_dtype(xa, "x", [&](const auto& k) {
          forward_eval_typed(k, xa, out, weight, bias, running_mean, running_var, axis, eps,
                             save_mean, save_invstd);
        });
      },
      py::arg("x"), py::arg("out"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"),
      py::arg("running_var"), py::arg("axis"), py::arg("eps"), py::arg("save_mean"),
      py::arg("save_invstd"), "Inference forward with the running statistics.");

  m.def(
      "backward",
      [](py::handle dy, py::handle x, py::handle out, py::handle save_mean, py::handle save_invstd,
         py::handle weight, int64_t axis, bool training, py::handle grad_weight,
         py::handle grad_bias) {
        const py::array dya = as_array(dy, "dy");
        by_dtype(dya, "dy", [&](const auto& k) {
          backward_typed(k, dya, x, out, save_mean, save_invstd, weight, axis, training,
                         grad_weight, grad_bias);
        });
      },
      py::arg("dy"), py::arg("x"), py::arg("out"), py::arg("save_mean"), py::arg("save_invstd"),
      py::arg("weight"), py::arg("axis"), py::arg("training"), py::arg("grad_weight"),
      py::arg("grad_bias"), "Backward: writes dx into out, grad_weight and grad_bias.");

  m.def(
      "copy",
      [](py::handle src, py::handle dst) {
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
      },
      py::arg("src"), py::arg("dst"),
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
  m.attr("__version__") = BNC_VERSION;
#ifdef BNC_SANITIZED
  m.attr("sanitized") = true;
#else
  m.attr("sanitized") = false;
#endif
}
