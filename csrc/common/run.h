// Runs: V adjacent elements moved with one load or store (16 bytes for the vector paths), and
// a process-wide switch read from the environment. Shared by the op families' kernels.
#pragma once

#include <cstdlib>
#include <cstring>

#include "macros.h"

namespace med3d_ext {

// V adjacent elements moved with one load or store. V > 1 needs the address aligned to the
// run's size (sizeof(T) * V), which the callers' dispatch checks. Loading 16-byte vectors one
// element at a time made up most of the instructions of the stem's pool kernels (ncu on an
// H100, 2026-11-27: the backward gather issued 8 byte loads and 8 bf16 loads per window, and
// ran at 17% of the DRAM bandwidth).
template <typename T, int V>
struct alignas(sizeof(T) * V) Run {
  T v[V];
};

template <int V, typename T>
M3D_HOST_DEVICE Run<T, V> load_run(const T* p) {
  Run<T, V> r;
  if constexpr (V > 1) {
    r = *reinterpret_cast<const Run<T, V>*>(p);
  } else {
    r.v[0] = p[0];
  }
  return r;
}

template <int V, typename T>
M3D_HOST_DEVICE void store_run(T* p, const Run<T, V>& r) {
  if constexpr (V > 1) {
    *reinterpret_cast<Run<T, V>*>(p) = r;
  } else {
    p[0] = r.v[0];
  }
}

// Whether the environment variable `name` is set to exactly `value` (the CUDA kernels' opt-in
// switches, read at every call so that one process can time both sides).
inline bool env_equals(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

}  // namespace med3d_ext
