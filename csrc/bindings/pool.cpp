// The output pool's blocks: memory of large outputs that the caller has dropped, kept for the
// next output of exactly that size (bnc/_pool.py documents the behaviour). In C++ because an
// output's allocation and release sit on every call of a small layer: the pool in Python (a
// ctypes buffer with a __del__) cost 2 us a cycle in a loop and ~5 us cold inside a bnc.torch
// step, where torch.empty costs 0.7 (docs/benchmarks.md).
//
// Every function here runs with the GIL held (pybind11's default; a capsule's destructor runs
// where the last reference to the array is dropped, which needs the GIL too). The GIL thus
// serializes them: no lock of our own, and a fork (its thread holds the GIL) never finds the
// pool half-changed.

#include "bindings/pool.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <list>
#include <new>
#include <unordered_map>
#include <vector>

namespace bnc_bindings {
namespace {

namespace py = pybind11;

constexpr std::size_t kAlign = 64;  // a cache line

struct Block {
  void* data;
  std::size_t nbytes;
};

class Pool {
 public:
  std::size_t limit = 0;
  std::size_t min_bytes = 0;
  std::size_t held = 0;

  // A block of nbytes: the most recently returned one of that size (its lines may still be in
  // cache), else a new one.
  Block* lease(std::size_t nbytes) {
    auto found = by_size_.find(nbytes);
    if (found != by_size_.end() && !found->second.empty()) {
      const auto position = found->second.back();
      found->second.pop_back();
      Block* block = *position;
      returned_.erase(position);
      held -= nbytes;
      return block;
    }
    void* data = std::aligned_alloc(kAlign, (nbytes + kAlign - 1) / kAlign * kAlign);
    if (data == nullptr) throw std::bad_alloc();
    return new Block{data, nbytes};
  }

  void give_back(Block* block) {
    if (block->nbytes > limit) return release(block);
    evict(block->nbytes);
    returned_.push_back(block);
    by_size_[block->nbytes].push_back(std::prev(returned_.end()));
    held += block->nbytes;
  }

  // Drops the oldest returned blocks until `room` more bytes fit under the limit.
  void evict(std::size_t room) {
    while (!returned_.empty() && held + room > limit) {
      Block* oldest = returned_.front();
      auto& same = by_size_[oldest->nbytes];
      same.erase(std::find(same.begin(), same.end(), returned_.begin()));
      returned_.pop_front();
      held -= oldest->nbytes;
      release(oldest);
    }
  }

 private:
  static void release(Block* block) {
    std::free(block->data);
    delete block;
  }

  std::list<Block*> returned_;  // oldest first
  std::unordered_map<std::size_t, std::vector<std::list<Block*>::iterator>> by_size_;
};

Pool& pool() {
  static Pool* const instance = new Pool;  // never destroyed: arrays may outlive the module
  return *instance;
}

py::array empty(const std::vector<py::ssize_t>& shape, const py::object& dtype_like) {
  const py::dtype dtype = py::dtype::from_args(dtype_like);
  std::size_t nbytes = static_cast<std::size_t>(dtype.itemsize());
  for (const py::ssize_t n : shape) {
    if (n < 0) throw py::value_error("shape: expected sizes >= 0");
    nbytes *= static_cast<std::size_t>(n);
  }
  Pool& p = pool();
  if (nbytes < p.min_bytes || p.limit == 0 || nbytes == 0) return py::array(dtype, shape);
  Block* block = p.lease(nbytes);
  // The capsule owns the block from here: every view of the array (and a torch tensor made from
  // it) keeps it alive, and the last one gone gives the block back.
  const py::capsule owner(block, [](void* b) { pool().give_back(static_cast<Block*>(b)); });
  return py::array(dtype, shape, {}, block->data, owner);
}

}  // namespace

void bind_pool(py::module_& m) {
  m.def("pool_empty", &empty, py::arg("shape"), py::arg("dtype"),
        "An uninitialized C-contiguous array (np.empty); of at least the pool's minimum size, "
        "its memory from the pool.");
  m.def(
      "pool_configure",
      [](std::size_t limit, std::size_t min_bytes) {
        Pool& p = pool();
        p.limit = limit;
        p.min_bytes = min_bytes;
        p.evict(0);
      },
      py::arg("limit"), py::arg("min_bytes"));
  m.def("pool_held_bytes", [] { return pool().held; });
}

}  // namespace bnc_bindings
