// The buffer checks, one owner for all of them: every array argument of a binding is checked here
// (type, dtype and byte order, shape, contiguity, alignment, writability, overlap) before any
// kernel runs, with a message that names the argument, what was expected and what came.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "kernels/batch_norm.h"

namespace bnc_bindings {

namespace py = pybind11;

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
struct DtypeOf<bnc::half> {
  static constexpr char code = 'e';
  static constexpr const char* name = "float16";
};
// ml_dtypes' bfloat16 (a NumPy dtype recognized by its name; char 'E').
template <>
struct DtypeOf<bnc::bfloat16> {
  static constexpr char code = 'E';
  static constexpr const char* name = "bfloat16";
};
// Whether a's dtype is bfloat16: char 'E' and that name (no other dtype is taken for it).
bool is_bfloat16(const py::array& a);

std::string shape_str(const py::array& a);
std::string dtype_str(const py::array& a);
// NumPy's dtype.isnative, read from the descriptor (no Python attribute lookups per call).
bool is_native(const py::array& a);
// obj as an array, or TypeError "name: expected a numpy.ndarray[ or None], got <type>".
py::array as_array(const py::handle& obj, const char* name, bool none_allowed = false);
// The (outer, channels, inner) geometry of x for a channel axis 0 <= axis < x.ndim; x has at
// least 2 dimensions.
bnc::Geometry geometry_of(const py::array& x, const char* name, int64_t axis);

// A checked argument: the array (kept alive) and the bytes it spans; empty for None.
struct Buffer {
  py::array array;
  const char* begin = nullptr;
  const char* end = nullptr;
};

// Checks the layout of an array of the right dtype: C-contiguous, aligned to `align`, writeable
// if `writeable`, and of shape `like`'s shape (when given; `like_name` names it) or (count,).
void check_layout(const py::array& a, const char* name, size_t align, bool writeable,
                  int64_t count, const py::array* like, const char* like_name);

// Checks one argument: an ndarray (or None if `optional`) of dtype U and the layout above.
// `like_name` (or null) names the tensor whose dtype and shape it must have.
template <class U>
Buffer check(const py::handle& obj, const char* name, bool writeable, int64_t count,
             const py::array* like, const char* like_name, bool optional) {
  if (optional && obj.is_none()) return Buffer{};
  py::array a = as_array(obj, name, optional);
  if (a.dtype().char_() != DtypeOf<U>::code || !is_native(a) ||
      (DtypeOf<U>::code == 'E' && !is_bfloat16(a)))
    throw py::type_error(std::string(name) + ": expected dtype " + DtypeOf<U>::name +
                         (like_name ? std::string(" (the dtype of ") + like_name + ")" : "") +
                         ", got " + dtype_str(a));
  check_layout(a, name, alignof(U), writeable, count, like, like_name);
  Buffer b;
  b.begin = static_cast<const char*>(a.data());
  b.end = b.begin + a.nbytes();
  b.array = std::move(a);
  return b;
}

// ValueError unless `out`'s bytes are disjoint from `other`'s: a kernel writing into memory it
// still reads would give wrong results.
void check_disjoint(const Buffer& out, const char* out_name, const Buffer& other,
                    const char* other_name);

}  // namespace bnc_bindings
