// Welford / Chan running statistics, shared by the CPU and CUDA statistics kernels.
//
// State is (count, mean, m2) where m2 = sum (x - mean)^2. Two states merge exactly with Chan's
// formula, so a reduction can be split into any number of chunks (threads, blocks, OpenMP
// workers) and merged in a fixed order: the result does not depend on timing, only on the
// chunking, which is a function of the shape.
#pragma once

#include "macros.h"

namespace med3d_ext {

template <typename acc_t>
struct WelfordState {
  acc_t count;
  acc_t mean;
  acc_t m2;
};

template <typename acc_t>
M3D_HOST_DEVICE WelfordState<acc_t> welford_empty() {
  return {acc_t(0), acc_t(0), acc_t(0)};
}

template <typename acc_t>
M3D_HOST_DEVICE void welford_add(WelfordState<acc_t>& s, acc_t x) {
  s.count += acc_t(1);
  acc_t delta = x - s.mean;
  s.mean += delta / s.count;
  s.m2 += delta * (x - s.mean);
}

template <typename acc_t>
M3D_HOST_DEVICE WelfordState<acc_t> welford_merge(const WelfordState<acc_t>& a,
                                                  const WelfordState<acc_t>& b) {
  if (a.count == acc_t(0)) return b;
  if (b.count == acc_t(0)) return a;
  acc_t count = a.count + b.count;
  acc_t delta = b.mean - a.mean;
  acc_t wb = b.count / count;
  return {count, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb};
}

// Biased (divide by n) or unbiased (divide by n - 1) variance; NaN for the unbiased variance of a
// single value, as torch.var does.
template <typename acc_t>
M3D_HOST_DEVICE acc_t welford_variance(const WelfordState<acc_t>& s, bool unbiased) {
  acc_t denom = unbiased ? s.count - acc_t(1) : s.count;
  return s.m2 / denom;
}

}  // namespace med3d_ext
