#include "bindings/buffers.h"

namespace bnc_bindings {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

bool is_native(const py::array& a) {
  const char order = a.dtype().byteorder();
  constexpr char kNativeOrder = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '<' : '>';
  return order == '=' || order == '|' || order == kNativeOrder;
}

bool is_bfloat16(const py::array& a) {
  const py::dtype d = a.dtype();
  return d.char_() == 'E' && d.itemsize() == 2 &&
         py::str(d.attr("name")).cast<std::string>() == "bfloat16";
}

std::string dtype_str(const py::array& a) {
  const std::string name = py::str(a.dtype());
  if (is_native(a)) return name;
  return name + " (non-native byte order '" + std::string(py::str(a.dtype().attr("str"))) + "')";
}

py::array as_array(const py::handle& obj, const char* name, bool none_allowed) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + ": expected a numpy.ndarray" +
                         (none_allowed ? " or None" : "") + ", got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  return py::reinterpret_borrow<py::array>(obj);
}

bnc::Geometry geometry_of(const py::array& x, const char* name, int64_t axis) {
  if (x.ndim() < 2)
    throw py::value_error(std::string(name) + ": expected at least 2 dimensions (N, C, ...), got shape " +
                          shape_str(x));
  if (axis < 0 || axis >= x.ndim())
    throw py::value_error("axis: expected 0 <= axis < " + std::to_string(x.ndim()) + ", got " +
                          std::to_string(axis));
  bnc::Geometry g{1, x.shape(axis), 1};
  for (int64_t d = 0; d < axis; ++d) g.outer *= x.shape(d);
  for (int64_t d = axis + 1; d < x.ndim(); ++d) g.inner *= x.shape(d);
  return g;
}

void check_layout(const py::array& a, const char* name, size_t align, bool writeable,
                  int64_t count, const py::array* like, const char* like_name) {
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + ": expected a C-contiguous array, got a strided one");
  if (reinterpret_cast<uintptr_t>(a.data()) % align != 0)
    throw py::value_error(std::string(name) +
                          ": expected an array aligned to its element size, got a misaligned one");
  if (writeable && !a.writeable())
    throw py::value_error(std::string(name) + ": expected a writeable array, got a read-only one");
  if (like) {
    bool same = a.ndim() == like->ndim();
    for (py::ssize_t d = 0; same && d < a.ndim(); ++d) same = a.shape(d) == like->shape(d);
    if (!same)
      throw py::value_error(std::string(name) + ": expected shape " + shape_str(*like) +
                            (like_name ? std::string(" (the shape of ") + like_name + ")" : "") +
                            ", got " + shape_str(a));
  } else if (a.ndim() != 1 || a.shape(0) != count) {
    throw py::value_error(std::string(name) + ": expected shape (" + std::to_string(count) +
                          ",), got " + shape_str(a));
  }
}

void check_disjoint(const Buffer& out, const char* out_name, const Buffer& other,
                    const char* other_name) {
  if (!out.begin || out.begin == out.end || !other.begin) return;
  if (out.begin < other.end && other.begin < out.end)
    throw py::value_error(std::string(out_name) + ": expected memory not shared with " +
                          other_name + ", got an overlapping array");
}

}  // namespace bnc_bindings
