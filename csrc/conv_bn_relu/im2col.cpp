// im2col3d: entry checks, geometry, and the CPU kernel (see im2col.h).
#include <ATen/Parallel.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <vector>

#include "im2col.h"
#include "../common/checks.h"

namespace med3d_ext {
namespace im2col {

int64_t geometry(const char* op, const at::Tensor& x, at::IntArrayRef kernel_size,
                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                 int64_t align, int64_t row_start, int64_t rows, Geometry& g) {
  M3D_CHECK_ARG(x.defined() && x.dim() == 5, op, "x", x, "5-D (N, Cin, D, H, W)");
  for (auto* a : {&kernel_size, &stride, &padding, &dilation})
    M3D_CHECK(a->size() == 3, "med3d_ext.", op, ": kernel_size, stride, padding and dilation "
              "need 3 values each");
  check_float(op, "x", x);  // an element mover for 2-, 4- and 8-byte floats (dispatch_bits)
  M3D_CHECK(align >= 1 && align <= 4096, "med3d_ext.", op, ": argument 'align' must be in "
            "[1, 4096], got ", align);
  M3D_CHECK(rows >= -1, "med3d_ext.", op, ": argument 'rows' must be >= 0, or -1 for every "
            "row from row_start, got ", rows);
  g.N = x.size(0), g.C = x.size(1), g.D = x.size(2), g.H = x.size(3), g.W = x.size(4);
  g.sn = x.stride(0), g.sc = x.stride(1), g.sd = x.stride(2), g.sh = x.stride(3);
  g.sw = x.stride(4);
  int64_t out[3];
  const int64_t in[3] = {g.D, g.H, g.W};
  for (int i = 0; i < 3; ++i) {
    M3D_CHECK(kernel_size[i] > 0 && stride[i] > 0 && dilation[i] > 0 && padding[i] >= 0,
              "med3d_ext.", op, ": kernel_size, stride and dilation must be positive and "
              "padding non-negative, got kernel_size=", kernel_size, " stride=", stride,
              " padding=", padding, " dilation=", dilation);
    int64_t span = 0, padded = 0;
    M3D_CHECK(conv_extent(in[i], kernel_size[i], padding[i], dilation[i], padded, span),
              "med3d_ext.", op, ": kernel_size, padding or dilation too large (the padded size or "
              "the dilated kernel overflows int64), got kernel_size=", kernel_size, " padding=",
              padding, " dilation=", dilation);
    M3D_CHECK(padded >= span, "med3d_ext.", op, ": argument 'x' is too small: spatial size ",
              x.sizes().slice(2), " padded by ", padding, " is smaller than the dilated kernel ",
              kernel_size, " (dilation ", dilation, ")");
    // coordinates are int32 in the kernels (im2col.h)
    M3D_CHECK(padded + span < (int64_t(1) << 28), "med3d_ext.", op, ": spatial size ",
              x.sizes().slice(2), " is too large");
    out[i] = (padded - span) / stride[i] + 1;
    g.stride[i] = static_cast<int32_t>(stride[i]);
    g.pad[i] = static_cast<int32_t>(padding[i]);
    g.dil[i] = static_cast<int32_t>(dilation[i]);
  }
  g.Do = out[0], g.Ho = out[1], g.Wo = out[2];
  g.kd = static_cast<int32_t>(kernel_size[0]);
  g.kh = static_cast<int32_t>(kernel_size[1]);
  g.kw = static_cast<int32_t>(kernel_size[2]);
  // K = Cin * kD * kH * kW and M = N * D' * H' * W' pass every per-axis check above with
  // huge kernels or paddings, and their products wrapped (K = 2^64 became 0: an empty matrix
  // instead of an error)
  int64_t K = g.C, M = g.N;
  for (int i = 0; i < 3; ++i) {
    M3D_CHECK(!c10::mul_overflows(K, kernel_size[i], &K) && K <= INT64_MAX - align,
              "med3d_ext.", op, ": Cin * kD * kH * kW overflows int64, got Cin=", g.C,
              " kernel_size=", kernel_size);
    M3D_CHECK(!c10::mul_overflows(M, out[i], &M), "med3d_ext.", op,
              ": the number of output voxels overflows int64, got x ", x.sizes(),
              " kernel_size=", kernel_size, " stride=", stride, " padding=", padding);
  }
  g.K = K;
  g.Kp = (g.K + align - 1) / align * align;
  if (rows < 0) rows = M - row_start;
  // rows <= M - row_start, not row_start + rows <= M: the sum of two huge values wraps around
  M3D_CHECK(row_start >= 0 && rows >= 0 && row_start <= M && rows <= M - row_start, "med3d_ext.",
            op, ": rows [", row_start, ", ", row_start, " + ", rows,
            ") are outside the matrix's ", M, " rows");
  g.row_start = row_start;
  return rows;
}

at::Tensor prepare(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t align,
                   int64_t row_start, int64_t rows, Geometry& g) {
  rows = geometry("im2col3d", x, kernel_size, stride, padding, dilation, align, row_start, rows,
                  g);
  return at::empty({rows, g.Kp}, x.options());
}

}  // namespace im2col

namespace {

// The matrix by lines (im2col.h): a line's stage rows once, then its rows from the stage, runs
// of R columns at a time where runs_of<R> holds. The CUDA kernel (im2col_cuda.cu) is the same
// walk with a block per line chunk of `nw` rows; here a chunk is a whole line.
template <int R, typename bits_t>
void im2col_lines(const bits_t* x, bits_t* out, const im2col::Geometry& g, int64_t M,
                  int32_t Lw, int32_t S) {
  const int64_t Kp = g.Kp, Wo = g.Wo;
  std::vector<int32_t> offs(Kp);
  for (int64_t k = 0; k < Kp; ++k) offs[k] = im2col::stage_offset(g, Lw, k);
  int64_t first, last;
  im2col::line_range(g, M, first, last);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, Wo * Kp));
  at::parallel_for(first, last + 1, grain, [&](int64_t l0, int64_t l1) {
    std::vector<bits_t> stage(static_cast<size_t>(S) * Lw);
    for (int64_t line = l0; line < l1; ++line) {
      const im2col::LineStart ls = im2col::line_start(g, line, 0);
      for (int32_t s = 0; s < S; ++s) {
        const im2col::StageRow r = im2col::stage_row(g, ls, s);
        for (int32_t e = 0; e < Lw; ++e) stage[size_t(s) * Lw + e] = im2col::stage_value(x, g, r, e);
      }
      for (int64_t q = 0; q < Wo; ++q) {
        const int64_t m = line * Wo + q - g.row_start;  // this call's row
        if (m < 0 || m >= M) continue;
        for (int64_t k = 0; k < Kp; k += R)
          im2col::line_values<R>(stage.data(), g, offs[k], static_cast<int32_t>(q), out + m * Kp + k);
      }
    }
  });
}

}  // namespace

at::Tensor im2col3d_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t align,
                        int64_t row_start, int64_t rows) {
  im2col::Geometry g;
  at::Tensor cols =
      im2col::prepare(x, kernel_size, stride, padding, dilation, align, row_start, rows, g);
  const int64_t M = cols.size(0), Kp = g.Kp;
  if (cols.numel() == 0) return cols;
  // By lines where a line's stage has 32-bit offsets (every practical convolution): the walk
  // the CUDA kernel takes, so these tests cover its math
  const int64_t S = g.C * g.kd * g.kh, Lw = im2col::stage_width(g, g.Wo);
  if (S * Lw < (int64_t(1) << 30) && Kp < (int64_t(1) << 30)) {
    im2col::dispatch_bits(x, [&](auto tag) {
      using bits_t = decltype(tag);
      const bits_t* xp = static_cast<const bits_t*>(x.const_data_ptr());
      bits_t* out = static_cast<bits_t*>(cols.mutable_data_ptr());
      constexpr int R = im2col::kRunBytes / sizeof(bits_t);  // the CUDA kernel's runs
      if (im2col::runs_of<R>(g)) {
        im2col_lines<R>(xp, out, g, M, int32_t(Lw), int32_t(S));
      } else {
        im2col_lines<1>(xp, out, g, M, int32_t(Lw), int32_t(S));
      }
    });
    return cols;
  }
  std::vector<im2col::Tap> taps(Kp);
  for (int64_t k = 0; k < Kp; ++k) taps[k] = im2col::make_tap(g, k);
  im2col::dispatch_bits(x, [&](auto tag) {
    using bits_t = decltype(tag);
    const bits_t* xp = static_cast<const bits_t*>(x.const_data_ptr());
    bits_t* out = static_cast<bits_t*>(cols.mutable_data_ptr());
    at::parallel_for(0, M, std::max<int64_t>(1, 32768 / Kp), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const im2col::Row row = im2col::make_row(g, g.row_start + m);
        bits_t* o = out + m * Kp;
        for (int64_t k = 0; k < Kp; ++k) o[k] = im2col::element(xp, g, row, taps[k]);
      }
    });
  });
  return cols;
}

TORCH_LIBRARY_IMPL(med3d_ext, CPU, m) { m.impl("im2col3d", &im2col3d_cpu); }

}  // namespace med3d_ext
