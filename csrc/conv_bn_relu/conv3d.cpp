// The convolution of the fused ops, forward and backward, by ConvAlgo (conv_bn_relu.h):
// ATen's convolution; im2col3d's columns times the weight as one GEMM (im2col.h); or the
// implicit GEMM of the stem (stem_gemm.h), which never writes the columns out.
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>

#include "conv_bn_relu.h"

namespace med3d_ext {
namespace {

// im2col3d's column count is rounded up to 8: 16-byte rows in bf16 / fp16, which cuBLAS's
// tensor-core kernels need (and any wider dtype is aligned by it too).
constexpr int64_t kColumnAlign = 8;

// The columns are built and multiplied in chunks of rows of at most im2col_chunk_bytes()
// (conv_bn_relu.h). Default 1 GiB: one chunk for the training stem (1,048,576 rows x 344
// columns = 688 MiB in bf16 at 8 x 1 x 64 x 128 x 128), while a whole CT volume in fp32
// inference (~11 GB of columns at 256 x 512 x 512) stays within memory. Smaller chunks trade
// launches (host time) for columns that may stay in L2 between the two kernels.
std::atomic<int64_t>& chunk_bytes_setting() {
  static std::atomic<int64_t> bytes{[] {
    const char* env = std::getenv("MED3D_EXT_IM2COL_CHUNK_BYTES");
    const long long v = env ? std::atoll(env) : 0;
    return v > 0 ? int64_t(v) : int64_t(1) << 30;
  }()};
  return bytes;
}

bool symbolic(const at::Tensor& t) {
  return t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

// A kernel size is a constant of the model: under tracing a symbolic one is specialised.
std::array<int64_t, 3> kernel_of(c10::SymIntArrayRef weight_sizes) {
  std::array<int64_t, 3> k;
  for (int i = 0; i < 3; ++i) k[i] = weight_sizes[2 + i].guard_int(__FILE__, __LINE__);
  return k;
}

int64_t padded(int64_t K) { return (K + kColumnAlign - 1) / kColumnAlign * kColumnAlign; }

// Rows [start, start + rows) of the (M, Kp) column matrix (rows = -1: to the end).
at::Tensor columns(const at::Tensor& x, const std::array<int64_t, 3>& kernel,
                   const ConvArgs& conv, int64_t start, int64_t rows) {
  using Sig = at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                         at::IntArrayRef, int64_t, int64_t, int64_t);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("med3d_ext::im2col3d", "")
                             .typed<Sig>();
  return op.call(x, kernel, conv.stride, conv.padding, conv.dilation, kColumnAlign, start, rows);
}

int64_t chunk_rows(int64_t M, int64_t Kp, const at::Tensor& x) {
  const int64_t row_bytes = std::max<int64_t>(1, Kp * x.element_size());
  return std::max<int64_t>(1, std::min(M, im2col_chunk_bytes() / row_bytes));
}

// weight (Cout, Cin, kD, kH, kW) as the (Cout, Kp) matrix of im2col3d's column order, zero
// in the padding columns.
at::Tensor weight_matrix(const at::Tensor& weight) {
  const int64_t K = weight.size(1) * weight.size(2) * weight.size(3) * weight.size(4);
  at::Tensor w = weight.reshape({weight.size(0), K});
  return padded(K) == K ? w : at::constant_pad_nd(w, {0, padded(K) - K});
}

std::vector<int64_t> conv_out_sizes(const at::Tensor& x, const at::Tensor& weight,
                                    const ConvArgs& conv) {
  std::vector<int64_t> sizes{x.size(0), weight.size(0)};
  for (int i = 0; i < 3; ++i) {
    const int64_t span = conv.dilation[i] * (weight.size(2 + i) - 1) + 1;
    sizes.push_back((x.size(2 + i) + 2 * conv.padding[i] - span) / conv.stride[i] + 1);
  }
  return sizes;
}

// (M, Cout) rows in (n, d, h, w) order -> y (N, Cout, D', H', W') in `fmt` (channels_last_3d:
// a view, no copy).
at::Tensor rows_to_y(const at::Tensor& rows, const std::vector<int64_t>& s,
                     at::MemoryFormat fmt) {
  return rows.view({s[0], s[2], s[3], s[4], s[1]}).permute({0, 4, 1, 2, 3}).contiguous(fmt);
}

// grad_y as (M, Cout) rows in x's dtype: a view of its channels_last_3d form.
at::Tensor grad_rows(const at::Tensor& grad_y, const at::Tensor& x) {
  return grad_y.to(x.scalar_type())
      .contiguous(at::MemoryFormat::ChannelsLast3d)
      .permute({0, 2, 3, 4, 1})
      .flatten(0, 3);
}

}  // namespace

int64_t im2col_chunk_bytes() { return chunk_bytes_setting().load(std::memory_order_relaxed); }

void set_im2col_chunk_bytes(int64_t bytes) {
  M3D_CHECK(bytes > 0, "med3d_ext: the im2col chunk size must be a positive number of bytes, "
            "got ", bytes);
  chunk_bytes_setting().store(bytes, std::memory_order_relaxed);
}

at::Tensor im2col_conv_rows(const at::Tensor& x, const at::Tensor& weight, const ConvArgs& conv) {
  const auto s = conv_out_sizes(x, weight, conv);
  const auto kernel = kernel_of(weight.sym_sizes());
  const at::Tensor wt = weight_matrix(weight).t();  // (Kp, Cout)
  const int64_t M = s[0] * s[2] * s[3] * s[4], chunk = chunk_rows(M, wt.size(0), x);
  // (M, Kp) x (Kp, Cout): the rows are output voxels in (n, d, h, w) order, so the product is
  // y in channels_last_3d.
  if (chunk >= M) return at::mm(columns(x, kernel, conv, 0, M), wt);
  at::Tensor y = at::empty({M, s[1]}, x.options());
  for (int64_t r = 0; r < M; r += chunk) {
    const int64_t n = std::min(chunk, M - r);
    at::Tensor out = y.narrow(0, r, n);
    at::mm_out(out, columns(x, kernel, conv, r, n), wt);
  }
  return y;
}

// grad_weight = grad_rows^T (Cout, M) x columns (M, Kp), the columns built again (never kept).
// torch.compile traces this (AOTAutograd runs the C++ backward on fake tensors, whose sizes may
// be symbolic), so sizes are read as SymInts, and the chunk loop, which needs a concrete M,
// runs only on real tensors (a traced graph takes the whole matrix at once).
at::Tensor im2col_conv_weight_grad(const at::Tensor& g, const at::Tensor& x,
                                   c10::SymIntArrayRef weight_sizes, const ConvArgs& conv) {
  const auto kernel = kernel_of(weight_sizes);
  const c10::SymInt K = weight_sizes[1] * weight_sizes[2] * weight_sizes[3] * weight_sizes[4];
  at::Tensor gw;  // (Cout, Kp)
  const bool concrete = !symbolic(g) && !symbolic(x) && !K.is_symbolic() &&
                        !weight_sizes[0].is_symbolic();
  const int64_t M = concrete ? g.size(0) : -1;
  const int64_t Kp = concrete ? padded(K.expect_int()) : -1;
  const int64_t chunk = concrete ? chunk_rows(M, Kp, x) : -1;
  if (!concrete || chunk >= M) {
    gw = at::mm(g.t(), columns(x, kernel, conv, 0, -1));
  } else {  // chunk products summed in fp32 (fp64 for fp64), rounded once at the end
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    // cuBLAS writes a bf16/fp16 product's fp32 accumulator as it is (mm's out_dtype overload,
    // CUDA only); elsewhere each chunk's product is rounded to x's dtype before the sum
    const bool fp32_out = x.is_cuda() && (x.scalar_type() == at::kBFloat16 ||
                                          x.scalar_type() == at::kHalf);
    at::Tensor sum = at::zeros({weight_sizes[0].expect_int(), Kp}, x.options().dtype(acc));
    for (int64_t r = 0; r < M; r += chunk) {
      const int64_t n = std::min(chunk, M - r);
      const at::Tensor a = g.narrow(0, r, n).t(), b = columns(x, kernel, conv, r, n);
      sum.add_(fp32_out ? at::mm(a, b, at::kFloat) : at::mm(a, b));
    }
    gw = sum.to(x.scalar_type());
  }
  // the gradient in the default layout: autograd's accumulation brings it to the weight's own
  return gw.narrow_symint(1, 0, K).reshape_symint(weight_sizes);
}

at::Tensor conv3d_forward(const at::Tensor& x, const at::Tensor& weight, const ConvArgs& conv,
                          at::MemoryFormat fmt) {
  M3D_CHECK(conv.algo == kAten || conv.algo == kIm2col || conv.algo == kImplicitGemm,
            "med3d_ext: conv_algo must be 0 (ATen), 1 (im2col) or 2 (implicit GEMM), got ",
            conv.algo);
  if (conv.algo == kIm2col)
    return rows_to_y(im2col_conv_rows(x, weight, conv), conv_out_sizes(x, weight, conv), fmt);
  if (conv.algo == kImplicitGemm) {
    using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                           at::IntArrayRef, at::IntArrayRef);
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("med3d_ext::implicit_gemm_conv3d", "")
                               .typed<Sig>();
    return rows_to_y(op.call(x, weight, conv.stride, conv.padding, conv.dilation),
                     conv_out_sizes(x, weight, conv), fmt);
  }
  at::Tensor y = at::convolution(x, weight, c10::nullopt, conv.stride, conv.padding,
                                 conv.dilation, false, {0, 0, 0}, 1);
  return y.contiguous(fmt);
}

std::pair<at::Tensor, at::Tensor> conv3d_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                  const at::Tensor& weight, const ConvArgs& conv,
                                                  bool need_x, bool need_w) {
  if (!(need_x || need_w)) return {};
  at::Tensor gw;
  // im2col3d and the implicit GEMM have no derivatives of their own: a double backward
  // (create_graph, possible through conv_bias_relu3d) takes ATen's differentiable
  // convolution_backward instead
  if (conv.algo != kAten && need_w && !at::GradMode::is_enabled()) {
    const at::Tensor g = grad_rows(grad_y, x);
    if (conv.algo == kImplicitGemm) {
      using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                             at::IntArrayRef, at::IntArrayRef, at::IntArrayRef);
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("med3d_ext::implicit_gemm_conv3d_weight_grad",
                                                    "")
                                 .typed<Sig>();
      std::vector<int64_t> wsize;
      for (const auto& v : weight.sym_sizes()) wsize.push_back(v.guard_int(__FILE__, __LINE__));
      gw = op.call(g, x, wsize, conv.stride, conv.padding, conv.dilation);
    } else {
      gw = im2col_conv_weight_grad(g, x, weight.sym_sizes(), conv);
    }
    if (!need_x) return {at::Tensor(), gw};
    need_w = false;  // the input gradient (rare: the stem's input is data) from ATen below
  }
  auto [gx, gw_aten, gb] = at::convolution_backward(
      grad_y, x, weight, c10::nullopt, conv.stride, conv.padding, conv.dilation, false,
      {0, 0, 0}, 1, {need_x, need_w, false});
  return {gx, gw.defined() ? gw : gw_aten};
}

}  // namespace med3d_ext
