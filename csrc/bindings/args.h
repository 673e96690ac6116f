// Table-driven bindings: each operation is described by a table of its array arguments (name,
// element type, extent, input or output, optional); run_op checks every one of them (buffers.h),
// and the overlap of every output with every other argument, takes the raw pointers with the GIL
// held, then releases the GIL and calls the kernel.
#pragma once

#include <array>
#include <cstddef>
#include <new>
#include <type_traits>

#include "bindings/buffers.h"
#include "kernels/dispatch.h"

namespace bnc_bindings {

enum class Elem { data, param, stats };  // x's dtype T; the per-channel dtype P; float64
enum class Extent { like_first, channels };  // the first argument's shape; (C,)
enum class Access { in, out };

struct ArgSpec {
  const char* name;
  Elem elem;
  Extent extent;
  Access access;
  bool optional;
};

// The arguments' raw pointers, taken with the GIL held.
template <size_t N>
struct Pointers {
  const void* in_ptr[N];
  void* out_ptr[N];
  template <class U>
  const U* in(size_t i) const {
    return static_cast<const U*>(in_ptr[i]);
  }
  template <class U>
  U* out(size_t i) const {
    return static_cast<U*>(out_ptr[i]);
  }
};

// Calls f(kernel set) for x's dtype: float32, float64, or float16 or bfloat16 (with float32
// parameters).
template <class F>
auto by_dtype(const py::array& x, const char* name, F&& f) {
  const bnc::KernelTable& t = bnc::active_kernels();
  const char code = is_native(x) ? x.dtype().char_() : '?';
  if (code == 'f') return f(t.f32);
  if (code == 'd') return f(t.f64);
  if (code == 'e') return f(t.f16);
  if (code == 'E' && is_bfloat16(x)) return f(t.bf16);
  throw py::type_error(std::string(name) +
                       ": expected dtype float16, float32, float64 or bfloat16, got " +
                       dtype_str(x));
}

template <class T, class P>
Buffer check_arg(const ArgSpec& s, const py::handle& h, const py::array& first,
                 const char* first_name, int64_t channels) {
  const bool out = s.access == Access::out;
  const py::array* like = s.extent == Extent::like_first ? &first : nullptr;
  // An input that must match the first tensor says so; an output's shape is obviously its own.
  const char* like_name = like && !out && s.name != first_name ? first_name : nullptr;
  switch (s.elem) {
    case Elem::data:
      return check<T>(h, s.name, out, channels, like, like_name, s.optional);
    case Elem::param:
      return check<P>(h, s.name, out, channels, like, like_name, s.optional);
    case Elem::stats:
      break;
  }
  return check<double>(h, s.name, out, channels, like, like_name, s.optional);
}

// Checks the arguments `handles` against `spec` (the first one is the tensor whose dtype picks
// the kernels and whose shape the others follow), then runs call(kernels, pointers, geometry,
// threads) without the GIL. Returns the kernel's status; a negative one (no memory for the
// workspace) raises MemoryError. Nothing is written when a check fails.
template <size_t N, class Call>
int64_t run_op(const std::array<ArgSpec, N>& spec, const std::array<py::handle, N>& handles,
               int64_t axis, bool training_statistics, Call&& call) {
  const py::array first = as_array(handles[0], spec[0].name);
  return by_dtype(first, spec[0].name, [&](const auto& kernels) -> int64_t {
    using Kernels = std::decay_t<decltype(kernels)>;
    using T = typename Kernels::Data;
    using P = typename Kernels::Param;
    const bnc::Geometry g = geometry_of(first, spec[0].name, axis);
    // Training normalizes with the batch's own variance: one value per channel has none (an
    // empty batch is allowed and updates nothing).
    if (training_statistics && g.per_channel() == 1)
      throw py::value_error("Expected more than 1 value per channel when training, got input size " +
                            shape_str(first));
    std::array<Buffer, N> buffers;
    for (size_t i = 0; i < N; ++i)
      buffers[i] = check_arg<T, P>(spec[i], handles[i], first, spec[0].name, g.channels);
    for (size_t i = 0; i < N; ++i) {
      if (spec[i].access != Access::out) continue;
      for (size_t j = 0; j < N; ++j)
        if (j != i) check_disjoint(buffers[i], spec[i].name, buffers[j], spec[j].name);
    }
    Pointers<N> ptr;
    for (size_t i = 0; i < N; ++i) {
      const bool present = buffers[i].begin != nullptr;
      ptr.in_ptr[i] = present ? buffers[i].array.data() : nullptr;
      ptr.out_ptr[i] = present && spec[i].access == Access::out
                           ? buffers[i].array.mutable_data() : nullptr;
    }
    const int threads = bnc::get_num_threads();
    int64_t status;
    {
      py::gil_scoped_release release;
      status = call(kernels, ptr, g, threads);
    }
    if (status < 0) throw std::bad_alloc();
    return status;
  });
}

}  // namespace bnc_bindings
