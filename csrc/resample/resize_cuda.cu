// CUDA kernels for resize (F.interpolate, see resample.h): one thread per output element.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "resample.h"
#include "resample_args.h"
#include "../common/cuda_utils.cuh"

namespace med3d_ext {
namespace rs {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
resize_linear_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, index_t total,
                     index_t ID, index_t IH, index_t IW, index_t D, index_t H, index_t W) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= total) return;
  const index_t w = i % W, h = (i / W) % H, d = (i / (W * H)) % D, nc = i / (W * H * D);
  const Lerp<T> z = resize_linear<T>(d, ID, D), y = resize_linear<T>(h, IH, H),
                x = resize_linear<T>(w, IW, W);
  const scalar_t* p = in + nc * ID * IH * IW;
  auto lerp_x = [&](index_t zz, index_t yy) {
    const scalar_t* q = p + (zz * IH + yy) * IW;
    return x.l0 * static_cast<T>(q[x.i0]) + x.l1 * static_cast<T>(q[x.i1]);
  };
  out[i] = static_cast<scalar_t>(z.l0 * (y.l0 * lerp_x(z.i0, y.i0) + y.l1 * lerp_x(z.i0, y.i1)) +
                                 z.l1 * (y.l0 * lerp_x(z.i1, y.i0) + y.l1 * lerp_x(z.i1, y.i1)));
}

template <typename bits_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
resize_nearest_kernel(const bits_t* __restrict__ in, bits_t* __restrict__ out, index_t total,
                      index_t ID, index_t IH, index_t IW, index_t D, index_t H, index_t W) {
  const index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= total) return;
  const index_t w = i % W, h = (i / W) % H, d = (i / (W * H)) % D, nc = i / (W * H * D);
  const index_t src = ((nc * ID + static_cast<index_t>(resize_nearest(d, ID, D))) * IH +
                       static_cast<index_t>(resize_nearest(h, IH, H))) * IW +
                      static_cast<index_t>(resize_nearest(w, IW, W));
  out[i] = in[src];
}

// Backward of the trilinear resize: one thread per input element gathers its output gradients
// (resize_grad_at; no atomics, so bitwise reproducible).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
resize_backward_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ gi, index_t total,
                       index_t ID, index_t IH, index_t IW, index_t D, index_t H, index_t W) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= total) return;
  const index_t w = i % IW, h = (i / IW) % IH, d = (i / (IW * IH)) % ID, nc = i / (IW * IH * ID);
  gi[i] = static_cast<scalar_t>(
      resize_grad_at<T>(g + nc * D * H * W, d, h, w, ID, IH, IW, D, H, W));
}

template <typename F>
void launch_resize(const at::Tensor& in, at::Tensor& out, F&& kernel) {
  const int64_t total = out.numel();
  M3D_INDEX_SWITCH(fits_int32(std::max(total, in.numel())), index_t, [&] {
    kernel(index_t{}, static_cast<index_t>(total), ceil_div(total, kThreads));
  });
}

}  // namespace

at::Tensor resize_cuda(const at::Tensor& image, at::IntArrayRef size, int64_t mode) {
  const c10::cuda::CUDAGuard guard(image.device());
  at::Tensor out = prepare_resize(image, size, mode);
  if (out.numel() == 0) return out;
  at::Tensor in = image.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t ID = in.size(2), IH = in.size(3), IW = in.size(4);
  const int64_t D = out.size(2), H = out.size(3), W = out.size(4);
  if (mode == kBilinear) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "resize_cuda", [&] {
      launch_resize(in, out, [&](auto tag, auto total, int64_t blocks) {
        using index_t = decltype(tag);
        resize_linear_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
            in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, ID, IH, IW,
            D, H, W);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return out;
  }
  auto nearest = [&](auto bits_tag) {
    using bits_t = decltype(bits_tag);
    launch_resize(in, out, [&](auto tag, auto total, int64_t blocks) {
      using index_t = decltype(tag);
      resize_nearest_kernel<bits_t, index_t><<<blocks, kThreads, 0, stream>>>(
          static_cast<const bits_t*>(in.const_data_ptr()),
          static_cast<bits_t*>(out.mutable_data_ptr()), total, ID, IH, IW, D, H, W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  };
  switch (in.element_size()) {
    case 1: nearest(uint8_t{}); break;
    case 2: nearest(uint16_t{}); break;
    case 4: nearest(uint32_t{}); break;
    case 8: nearest(uint64_t{}); break;
    default: M3D_CHECK(false, "med3d_ext.resize: unsupported element size ", in.element_size());
  }
  return out;
}

at::Tensor resize_backward_cuda(const at::Tensor& grad, at::IntArrayRef input_size) {
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor gi = prepare_resize_backward(grad, input_size);
  if (gi.numel() == 0) return gi;
  if (grad.numel() == 0) return gi.zero_();
  const at::Tensor g = grad.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t ID = gi.size(2), IH = gi.size(3), IW = gi.size(4);
  const int64_t D = g.size(2), H = g.size(3), W = g.size(4);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "resize_backward_cuda", [&] {
    // the element count of gi drives the launch; g's offsets must fit the index type too
    launch_resize(g, gi, [&](auto tag, auto total, int64_t blocks) {
      using index_t = decltype(tag);
      resize_backward_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), gi.mutable_data_ptr<scalar_t>(), total, ID, IH, IW, D,
          H, W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return gi;
}

TORCH_LIBRARY_IMPL(med3d_ext, CUDA, m) {
  m.impl("resize", &resize_cuda);
  m.impl("resize_backward", &resize_backward_cuda);
}

}  // namespace rs
}  // namespace med3d_ext
