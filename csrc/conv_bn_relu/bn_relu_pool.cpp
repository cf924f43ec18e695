// conv_bn_relu_maxpool3d / bn_relu_maxpool_backward (see bn_relu_pool.h): the device-independent
// op bodies (checks, conv + statistics, layouts), the CPU kernels and the CPU registration.
//
// CPU kernels work plane by plane ((n, c) pairs, in parallel) through the tensors' strides, so
// contiguous and channels_last_3d share one code path; per-channel sums are merged in plane
// order, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "bn_relu_pool.h"

namespace med3d_ext {

std::vector<int64_t> pool_out_sizes(const char* op, const at::Tensor& y, at::IntArrayRef kernel,
                                    at::IntArrayRef stride, at::IntArrayRef padding) {
  M3D_CHECK(kernel.size() == 3 && stride.size() == 3 && padding.size() == 3, "med3d_ext.", op,
            ": pool_kernel, pool_stride and pool_padding need 3 values");
  int64_t window = 1;
  std::vector<int64_t> out{y.size(0), y.size(1)};
  for (int a = 0; a < 3; ++a) {
    // padding <= kernel / 2, not 2 * padding <= kernel: 2 * padding can overflow
    M3D_CHECK(kernel[a] > 0 && stride[a] > 0 && padding[a] >= 0 && padding[a] <= kernel[a] / 2,
              "med3d_ext.", op, ": pool_kernel ", kernel, ", pool_stride ", stride,
              " and pool_padding ", padding, " must be positive, positive, and at most half "
              "the kernel (as max_pool3d requires)");
    // each side bounded before the product: 2^21-wide sides wrapped the window size to 0,
    // passed the 255-voxel check and ran a 2^63-step loop (a hang)
    M3D_CHECK(kernel[a] <= kMaxPoolWindow, "med3d_ext.", op, ": pool windows of at most ",
              kMaxPoolWindow, " voxels are supported (the argmax is stored in 8 bits), got ",
              kernel);
    // max_pool3d's limit too (it refuses a stride that does not fit an int); PoolGeom keeps it
    // as an int, and 2^32 wrapped to 0: the CUDA gather divided by zero (every gradient 0)
    M3D_CHECK(stride[a] <= std::numeric_limits<int32_t>::max(), "med3d_ext.", op,
              ": pool_stride ", stride, " must be at most ", std::numeric_limits<int32_t>::max(),
              " (as max_pool3d requires)");
    window *= kernel[a];
    // Floor division, as max_pool3d: a window wider than the padded input (span < 0) leaves
    // no output (C++ '/' truncates toward zero, which would give one output there).
    const int64_t span = y.size(2 + a) + 2 * padding[a] - kernel[a];
    const int64_t o = span < 0 ? 0 : span / stride[a] + 1;
    M3D_CHECK(o > 0, "med3d_ext.", op, ": the conv output ", y.sizes(),
              " is too small for the pool kernel ", kernel, " with padding ", padding);
    out.push_back(o);
  }
  M3D_CHECK(window <= kMaxPoolWindow, "med3d_ext.", op, ": pool windows of at most ",
            kMaxPoolWindow, " voxels are supported (the argmax is stored in 8 bits), got ", kernel);
  return out;
}

PoolGeom make_pool_geom(const at::Tensor& y, at::IntArrayRef out_spatial,
                        at::IntArrayRef out_strides, at::IntArrayRef kernel,
                        at::IntArrayRef stride, at::IntArrayRef padding) {
  PoolGeom g;
  g.D = y.size(2), g.H = y.size(3), g.W = y.size(4);
  g.OD = out_spatial[0], g.OH = out_spatial[1], g.OW = out_spatial[2];
  for (int a = 0; a < 3; ++a) {
    g.k[a] = int(kernel[a]), g.s[a] = int(stride[a]), g.p[a] = int(padding[a]);
    g.ys[a] = y.stride(2 + a), g.os[a] = out_strides[a];
  }
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_relu_maxpool3d_generic(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                               const c10::optional<at::Tensor>& running_mean,
                               const c10::optional<at::Tensor>& running_var,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool training, double eps,
                               at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
                               at::IntArrayRef pool_padding, int64_t conv_algo, PoolApplyFn apply,
                               StatsFn stats) {
  const char* op = "conv_bn_relu_maxpool3d";
  auto [fmt, y, mean, invstd, var] =
      conv_bn_stats_generic(op, x, weight, bn_weight, bn_bias, running_mean, running_var,
                            c10::nullopt, stride, padding, dilation, training, eps, conv_algo,
                            stats);
  const auto sizes = pool_out_sizes(op, y, pool_kernel, pool_stride, pool_padding);
  at::Tensor out = at::empty(sizes, y.options(), fmt);
  at::Tensor argmax = at::empty(sizes, y.options().dtype(at::kByte), fmt);
  if (out.numel() > 0) {
    const PoolGeom g = make_pool_geom(y, at::IntArrayRef(sizes).slice(2),
                                      out.strides().slice(2), pool_kernel, pool_stride,
                                      pool_padding);
    apply(y, mean, invstd, acc_param(bn_weight, y), acc_param(bn_bias, y), g, out, argmax);
  }
  return {out, y, mean, invstd, var, argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_backward_generic(
    const at::Tensor& grad_out_in, const at::Tensor& y_in, const at::Tensor& argmax_in,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, bool training, at::IntArrayRef pool_kernel,
    at::IntArrayRef pool_stride, at::IntArrayRef pool_padding, PoolBackwardFn backward) {
  const char* op = "bn_relu_maxpool_backward";
  M3D_CHECK_ARG(y_in.defined() && y_in.dim() == 5, op, "y", y_in, "5-D (N, C, D, H, W)");
  check_float(op, "y", y_in);
  const auto sizes = pool_out_sizes(op, y_in, pool_kernel, pool_stride, pool_padding);
  M3D_CHECK_ARG(grad_out_in.defined() && grad_out_in.sizes() == at::IntArrayRef(sizes), op,
                "grad_out", grad_out_in, "of the pooled shape " + msg_piece(sizes));
  M3D_CHECK_ARG(argmax_in.sizes() == at::IntArrayRef(sizes) && argmax_in.scalar_type() == at::kByte,
                op, "argmax", argmax_in, "uint8 of the pooled shape " + msg_piece(sizes));
  check_same_device(op, "grad_out", grad_out_in, y_in);
  check_same_device(op, "argmax", argmax_in, y_in);
  const int64_t C = y_in.size(1);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &mean},
                         {"invstd", &invstd}, {"bn_weight", &bn_weight}, {"bn_bias", &bn_bias}})
    check_channel_param(op, name, *t, y_in, C);
  // One layout for all: y's (the kernels walk grad_out and argmax with y's pooled strides).
  const auto fmt = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(fmt);
  const at::Tensor grad_out = grad_out_in.to(y.scalar_type()).contiguous(fmt);
  const at::Tensor argmax = argmax_in.contiguous(fmt);
  if (y.numel() == 0) {
    auto z = at::zeros({C}, y.options().dtype(acc_dtype(y)));
    return {at::empty_like(y, y.options(), fmt), z, z.clone()};
  }
  const PoolGeom g = make_pool_geom(y, at::IntArrayRef(sizes).slice(2), grad_out.strides().slice(2),
                                    pool_kernel, pool_stride, pool_padding);
  return backward(grad_out, y, argmax, acc_param(mean, y), acc_param(invstd, y),
                  acc_param(bn_weight, y), acc_param(bn_bias, y), g, training);
}

// ---- CPU kernels ---------------------------------------------------------------------------

void bn_relu_pool_forward_cpu(const at::Tensor& y, const at::Tensor& mean,
                              const at::Tensor& invstd, const at::Tensor& w, const at::Tensor& b,
                              const PoolGeom& g, at::Tensor& out, at::Tensor& argmax) {
  const int64_t N = y.size(0), C = y.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_pool_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t *m = mean.const_data_ptr<acc_t>(), *is = invstd.const_data_ptr<acc_t>(),
                *wp = w.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    uint8_t* ap = argmax.data_ptr<uint8_t>();
    // the window math in the index type the CUDA kernel picks for these sizes (so the CPU tests
    // run the 32-bit instantiation too)
    M3D_INDEX_SWITCH(pool_index_fits_int32(y.numel(), out.numel()), index_t, [&] {
      at::parallel_for(0, N * C, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n = p / C, c = p % C;
          const scalar_t* yc = yp + n * y.stride(0) + c * y.stride(1);
          const int64_t obase = n * out.stride(0) + c * out.stride(1);
          const acc_t sc = wp[c] * is[c];
          for (int64_t od = 0; od < g.OD; ++od)
            for (int64_t oh = 0; oh < g.OH; ++oh)
              for (int64_t ow = 0; ow < g.OW; ++ow) {
                const int64_t o = obase + od * g.os[0] + oh * g.os[1] + ow * g.os[2];
                acc_t z;
                pool_window_max<1, scalar_t, acc_t, index_t>(yc, 0, g, index_t(od), index_t(oh),
                                                             index_t(ow), m + c, &sc, bp + c, &z,
                                                             ap + o);
                op[o] = static_cast<scalar_t>(bn_act<true>(z));
              }
        }
      });
    });
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_pool_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& argmax,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& w, const at::Tensor& b,
    const PoolGeom& g, bool training) {
  const int64_t N = y.size(0), C = y.size(1), S = g.D * g.H * g.W;
  at::Tensor grad_y = at::empty_like(y, y.options(), layout_of(y));
  auto grad_w = at::empty({C}, mean.options()), grad_b = at::empty({C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_pool_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t *m = mean.const_data_ptr<acc_t>(), *is = invstd.const_data_ptr<acc_t>(),
                *wp = w.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>();
    const scalar_t *yp = y.const_data_ptr<scalar_t>(), *gp = grad_out.const_data_ptr<scalar_t>();
    const uint8_t* ap = argmax.const_data_ptr<uint8_t>();
    scalar_t* gyp = grad_y.data_ptr<scalar_t>();
    const int64_t window = int64_t(g.k[0]) * g.k[1] * g.k[2];
    // Pass 1, per plane: scatter grad_out to the argmax positions (in output order, so each
    // voxel's sum is added in the same order as pool_grad_at's gather, which the CUDA kernel
    // uses: one result on both devices, up to the FMA nvcc makes of bn_pre_act, which can
    // break a tie within one ulp the other way), then mask by the ReLU, round to y's dtype (as the
    // CUDA backward stores it, and as the unfused max_pool3d backward hands it to BatchNorm),
    // keep it in grad_y and add the plane's two BatchNorm sums. The gather form cost a window
    // search with divisions per voxel, twice; this is O(voxels + outputs).
    std::vector<acc_t> part(N * C * 2);
    at::parallel_for(0, N * C, 1, [&](int64_t p0, int64_t p1) {
      std::vector<acc_t> sum(S);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / C, c = p % C;
        const int64_t ybase = n * y.stride(0) + c * y.stride(1);
        const int64_t obase = n * grad_out.stride(0) + c * grad_out.stride(1);
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t od = 0; od < g.OD; ++od)
          for (int64_t oh = 0; oh < g.OH; ++oh)
            for (int64_t ow = 0; ow < g.OW; ++ow) {
              const int64_t o = obase + od * g.os[0] + oh * g.os[1] + ow * g.os[2];
              const int64_t k = ap[o];
              if (k >= window) continue;  // not a window offset: matches no voxel (as the gather)
              const int64_t d = od * g.s[0] - g.p[0] + k / (g.k[1] * g.k[2]);
              const int64_t h = oh * g.s[1] - g.p[1] + (k / g.k[2]) % g.k[1];
              const int64_t w = ow * g.s[2] - g.p[2] + k % g.k[2];
              if (d < 0 || d >= g.D || h < 0 || h >= g.H || w < 0 || w >= g.W) continue;
              sum[(d * g.H + h) * g.W + w] += static_cast<acc_t>(gp[o]);
            }
        const acc_t mc = m[c], sc = wp[c] * is[c], bc = bp[c];
        acc_t s0 = 0, s1 = 0;
        int64_t v = 0;
        for (int64_t d = 0; d < g.D; ++d)
          for (int64_t h = 0; h < g.H; ++h)
            for (int64_t x = 0; x < g.W; ++x, ++v) {
              const int64_t i = ybase + d * g.ys[0] + h * g.ys[1] + x * g.ys[2];
              const acc_t yv = static_cast<acc_t>(yp[i]);
              const acc_t z = bn_pre_act<acc_t>(yv, mc, sc, bc, acc_t(0));
              const scalar_t gs = static_cast<scalar_t>(bn_masked_grad<true>(sum[v], z));
              gyp[i] = gs;
              const acc_t gv = static_cast<acc_t>(gs);
              s0 += gv;
              s1 += gv * (yv - mc);
            }
        part[2 * p] = s0;
        part[2 * p + 1] = s1;
      }
    });
    std::vector<BnBwdCoef<acc_t>> coef(C);
    acc_t* gw = grad_w.data_ptr<acc_t>();
    acc_t* gb = grad_b.data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      acc_t s0 = 0, s1 = 0;
      for (int64_t n = 0; n < N; ++n) {
        s0 += part[2 * (n * C + c)];
        s1 += part[2 * (n * C + c) + 1];
      }
      coef[c] = bn_bwd_coef<acc_t>(wp[c], is[c], s0, s1, acc_t(N * S), training);
      gw[c] = s1 * is[c];
      gb[c] = s0;
    }
    // Pass 2: grad_y = BatchNorm's input gradient of the stored g, in place.
    at::parallel_for(0, N * C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const auto& q = coef[p % C];
        const acc_t mc = m[p % C];
        const int64_t ybase = (p / C) * y.stride(0) + (p % C) * y.stride(1);
        for (int64_t d = 0; d < g.D; ++d)
          for (int64_t h = 0; h < g.H; ++h)
            for (int64_t x = 0; x < g.W; ++x) {
              const int64_t i = ybase + d * g.ys[0] + h * g.ys[1] + x * g.ys[2];
              gyp[i] = static_cast<scalar_t>(bn_grad_input<acc_t>(
                  static_cast<acc_t>(gyp[i]), static_cast<acc_t>(yp[i]), mc, q.A, q.k1, q.Bp));
            }
      }
    });
  });
  return {grad_y, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bn_relu_maxpool3d_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                           const c10::optional<at::Tensor>& running_mean,
                           const c10::optional<at::Tensor>& running_var, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, bool training,
                           double eps, at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
                           at::IntArrayRef pool_padding, int64_t conv_algo) {
  return conv_bn_relu_maxpool3d_generic(x, weight, bn_weight, bn_bias, running_mean, running_var,
                                        stride, padding, dilation, training, eps, pool_kernel,
                                        pool_stride, pool_padding, conv_algo,
                                        &bn_relu_pool_forward_cpu,
                                        nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_maxpool_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& argmax,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& bn_weight,
    const at::Tensor& bn_bias, bool training, at::IntArrayRef pool_kernel,
    at::IntArrayRef pool_stride, at::IntArrayRef pool_padding) {
  return bn_relu_maxpool_backward_generic(grad_out, y, argmax, mean, invstd, bn_weight, bn_bias,
                                          training, pool_kernel, pool_stride, pool_padding,
                                          &bn_relu_pool_backward_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(med3d_ext, CPU, m) {
  m.impl("conv_bn_relu_maxpool3d", &conv_bn_relu_maxpool3d_cpu);
  m.impl("bn_relu_maxpool_backward", &bn_relu_maxpool_backward_cpu);
}

}  // namespace med3d_ext
