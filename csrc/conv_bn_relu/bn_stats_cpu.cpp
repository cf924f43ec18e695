// CPU kernel for bn_stats (see bn_stats.h).
//
// Both layouts are cut into fixed chunks (a function of the shape only). Inside a chunk the
// statistics are computed with a two-pass loop that the compiler vectorises; chunks are then
// merged with Chan's formula in index order, so results are deterministic for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "bn_stats.h"
#include "../common/welford.h"

namespace med3d_ext {
namespace {

constexpr int64_t kChunk = 4096;

// Statistics of one contiguous run of values, as a Welford state. Each pass keeps kLanes
// independent partial sums (merged in a fixed order): one running sum is a serial chain of
// dependent adds that the compiler may not reorder, so it neither vectorises nor pipelines.
constexpr int kLanes = 8;

template <typename acc_t, typename F>
acc_t lane_sum(int64_t n, const F& f) {
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += f(i + l);
  for (; i < n; ++i) part[0] += f(i);
  acc_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += part[l];
  return total;
}

template <typename scalar_t, typename acc_t>
WelfordState<acc_t> run_stats(const scalar_t* p, int64_t n) {
  const acc_t mean = lane_sum<acc_t>(n, [&](int64_t i) { return static_cast<acc_t>(p[i]); }) / acc_t(n);
  const acc_t m2 = lane_sum<acc_t>(n, [&](int64_t i) {
    const acc_t d = static_cast<acc_t>(p[i]) - mean;
    return d * d;
  });
  return {acc_t(n), mean, m2};
}

// x viewed as (N, C, S), contiguous: channels are independent, parallelise over them.
template <typename scalar_t, typename acc_t>
void stats_nchw(const scalar_t* x, int64_t N, int64_t C, int64_t S,
                std::vector<WelfordState<acc_t>>& out) {
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      auto state = welford_empty<acc_t>();
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* base = x + (n * C + c) * S;
        for (int64_t s = 0; s < S; s += kChunk) {
          state = welford_merge(state, run_stats<scalar_t, acc_t>(base + s, std::min(kChunk, S - s)));
        }
      }
      out[c] = state;
    }
  });
}

// x viewed as a row-major (M, C) matrix (channels_last_3d). Rows are cut into fixed blocks; each
// block produces one state per channel with a two-pass loop over rows that vectorises across
// channels; blocks are merged in order.
template <typename scalar_t, typename acc_t>
void stats_nhwc(const scalar_t* x, int64_t M, int64_t C, std::vector<WelfordState<acc_t>>& out) {
  const int64_t rows = std::max<int64_t>(1, kChunk / std::max<int64_t>(C, 1));
  const int64_t blocks = (M + rows - 1) / rows;
  std::vector<WelfordState<acc_t>> partial(blocks * C);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> mean(C), m2(C);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * rows, r1 = std::min(M, r0 + rows);
      std::fill(mean.begin(), mean.end(), acc_t(0));
      std::fill(m2.begin(), m2.end(), acc_t(0));
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < C; ++c) mean[c] += static_cast<acc_t>(x[r * C + c]);
      const acc_t n = acc_t(r1 - r0);
      for (int64_t c = 0; c < C; ++c) mean[c] /= n;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < C; ++c) {
          acc_t d = static_cast<acc_t>(x[r * C + c]) - mean[c];
          m2[c] += d * d;
        }
      for (int64_t c = 0; c < C; ++c) partial[b * C + c] = {n, mean[c], m2[c]};
    }
  });
  at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      auto state = welford_empty<acc_t>();
      for (int64_t b = 0; b < blocks; ++b) state = welford_merge(state, partial[b * C + c]);
      out[c] = state;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x_in, bool unbiased) {
  check_bn_stats_input(x_in);
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const int64_t S = C == 0 ? 0 : (N == 0 ? 0 : x_in.numel() / (N * C));
  auto opts = x_in.options().dtype(bn_stats_acc_type(x_in));
  auto mean = at::empty({C}, opts), var = at::empty({C}, opts);
  if (C == 0) return {mean, var};
  if (N * S == 0) {  // statistics of nothing: NaN, as torch.var_mean gives
    mean.fill_(NAN);
    var.fill_(NAN);
    return {mean, var};
  }
  const bool cl = is_channels_last_3d(x_in);
  at::Tensor x = cl ? x_in : x_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<WelfordState<acc_t>> states(C);
    if (cl) {
      stats_nhwc<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), N * S, C, states);
    } else {
      stats_nchw<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), N, C, S, states);
    }
    auto* m = mean.data_ptr<acc_t>();
    auto* v = var.data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      m[c] = states[c].mean;
      v[c] = welford_variance(states[c], unbiased);
    }
  });
  return {mean, var};
}

TORCH_LIBRARY_IMPL(med3d_ext, CPU, m) { m.impl("bn_stats", &bn_stats_cpu); }

}  // namespace med3d_ext
