// im2col3d: the input windows of a 3-D convolution as a row-major (M, Kp) matrix, so that the
// convolution is one GEMM (conv_bn_relu.h, ConvAlgo::kIm2col).
//
// Why: MedicalNet's stem (Cin = 1, 7^3 kernel, stride 2) is a convolution cuDNN has no good
// kernel for: 343 taps of one channel. As a matrix it is M = N*D'*H'*W' rows by K = Cin*343
// columns times a (K, Cout) weight: a GEMM cuBLAS runs on tensor cores at its memory speed, and
// the weight gradient is the transposed product (Cout, M) x (M, K). The columns are K/8 times
// input (~43x: 721 MB in bf16 at the benchmark shape, 8 x 1 x 64 x 128 x 128), so they are
// never kept:
// the forward builds them, multiplies and frees them, and the backward builds them again
// (in chunks of rows above im2col_chunk_bytes(), conv_bn_relu.h).
//
//   row m = ((n*D' + d')*H' + h')*W' + w'   (an output voxel; the rows are channels_last y)
//   col k = ((c*kD + i)*kH + j)*kW + l      (a kernel tap; weight.reshape(Cout, K)'s order)
//   cols[m, k] = x[n, c, d'*sD - pD + i*dD, h'*sH - pH + j*dH, w'*sW - pW + l*dW]  (0 outside)
//   cols[m, k] = 0 for K <= k < Kp          (K rounded up to `align`: 16-byte rows in bf16)
//
// Two walks, their math shared by the CPU and CUDA kernels: per element (make_tap / make_row /
// element: a column's tap and a row's window corner computed once each, so an element is three
// compares and a load; CUDA's default kernel, and the CPU's fallback for huge lines) and by
// lines ("Lines" below: the CPU op's walk, and CUDA's opt-in kernel).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "../common/macros.h"

namespace med3d_ext {
namespace im2col {

struct Geometry {
  int64_t N, C, D, H, W;             // input sizes
  int64_t sn, sc, sd, sh, sw;        // input strides in elements (any layout)
  int64_t Do, Ho, Wo;                // output grid
  int32_t kd, kh, kw;                // kernel
  int32_t stride[3], pad[3], dil[3];
  int64_t K, Kp;                     // real and padded column count
  int64_t row_start;                 // the output's first row is this row of the full matrix
};

// A column: kernel tap (c, i, j, l) as its displacement from the window corner, in voxels, and
// its offset in x. Padding columns (k >= K) get a displacement no voxel has, so they read as 0
// exactly like the convolution's own zero padding, with no extra branch.
struct Tap {
  int32_t dd, dh, dw;
  int64_t offset;
};
constexpr int32_t kNoVoxel = -(1 << 29);

// index_t: the type of the divisions, int32_t where the caller knows Kp < 2^31 (on the GPU a
// 64-bit division is a ~70-instruction routine, a 32-bit one a handful).
template <typename index_t = int64_t>
M3D_HOST_DEVICE Tap make_tap(const Geometry& g, int64_t k64) {
  if (k64 >= g.K) return {kNoVoxel, 0, 0, 0};
  const index_t k = static_cast<index_t>(k64), kw = g.kw, kh = g.kh, kd = g.kd;
  const index_t l = k % kw, j = (k / kw) % kh, i = (k / (kw * kh)) % kd,
                c = k / (kw * kh * kd);  // kD*kH*kW <= K < 2^31 where index_t is int32_t
  Tap t;
  t.dd = static_cast<int32_t>(i * g.dil[0]);
  t.dh = static_cast<int32_t>(j * g.dil[1]);
  t.dw = static_cast<int32_t>(l * g.dil[2]);
  t.offset = int64_t(c) * g.sc + t.dd * g.sd + t.dh * g.sh + t.dw * g.sw;
  return t;
}

// A row: output voxel m's window corner (may lie in the padding, so negative) and the offset
// of that corner in x (meaningful only after adding a tap that lands inside).
struct Row {
  int32_t d0, h0, w0;
  int64_t offset;
};

// index_t as in make_tap: int32_t where the caller knows M < 2^31.
template <typename index_t = int64_t>
M3D_HOST_DEVICE Row make_row(const Geometry& g, int64_t m64) {
  const index_t m = static_cast<index_t>(m64), Wo = static_cast<index_t>(g.Wo),
                Ho = static_cast<index_t>(g.Ho), Do = static_cast<index_t>(g.Do);
  const index_t ow = m % Wo, oh = (m / Wo) % Ho, od = (m / (Wo * Ho)) % Do,
                n = m / (Wo * Ho * Do);  // Do*Ho*Wo <= M < 2^31 where index_t is int32_t
  Row r;
  r.d0 = static_cast<int32_t>(od * g.stride[0] - g.pad[0]);
  r.h0 = static_cast<int32_t>(oh * g.stride[1] - g.pad[1]);
  r.w0 = static_cast<int32_t>(ow * g.stride[2] - g.pad[2]);
  r.offset = int64_t(n) * g.sn + r.d0 * g.sd + r.h0 * g.sh + r.w0 * g.sw;
  return r;
}

// cols[m, k] from x. `bits_t` is an unsigned integer of the element's size: im2col only moves
// elements, and all-zero bits are 0.0 in every IEEE float format.
M3D_HOST_DEVICE bool inside(const Geometry& g, const Row& r, const Tap& t) {
  const int32_t d = r.d0 + t.dd, h = r.h0 + t.dh, w = r.w0 + t.dw;
  // unsigned compares: a negative coordinate wraps to a huge value and fails the bound too
  return static_cast<uint32_t>(d) < static_cast<uint32_t>(g.D) &&
         static_cast<uint32_t>(h) < static_cast<uint32_t>(g.H) &&
         static_cast<uint32_t>(w) < static_cast<uint32_t>(g.W);
}

template <typename bits_t>
M3D_HOST_DEVICE bits_t element(const bits_t* x, const Geometry& g, const Row& r, const Tap& t) {
  return inside(g, r, t) ? x[r.offset + t.offset] : bits_t(0);
}

// element() without a branch around the load, for the GPU's gathers, whose loads can then all
// be in flight at once: an outside voxel (or a row past the matrix, valid = false) reads x[0]
// and is replaced by 0. x must have an element.
template <typename bits_t>
M3D_HOST_DEVICE bits_t element_unbranched(const bits_t* x, const Geometry& g, const Row& r,
                                          const Tap& t, bool valid) {
  const bool in = valid && inside(g, r, t);
  const bits_t v = x[in ? r.offset + t.offset : 0];
  return in ? v : bits_t(0);
}

// ---- Lines: the staged form both devices use (im2col.cpp, im2col_cuda.cu) ----
//
// The rows of one (n, d', h') and a run of nw consecutive w' read the same S = C*kD*kH input
// rows (c, i, j), each over one span of W: they are staged first, contiguously (stage row s =
// (c*kD + i)*kH + j, Lw elements from w = w'0*sW - pW, zero outside x), and every element of the
// line's rows is then stage[s*Lw + q*sW + l*dW] for row q of the line and column k = s*kW + l
// (k < K). On the GPU the stage is shared memory, filled with loads that are consecutive along W,
// and the rows are a contiguous (nw, Kp) block of the matrix written 16 bytes at a time; the old
// per-element gather read a 7x7x7 neighbourhood per row and wrote 2 bytes per store (89 us for
// the fold_w stem input on an H200, ncu 2026-11-28_h200-s19, at 49% of the memory throughput).

// The stage's width for a line of nw rows.
M3D_HOST_DEVICE int64_t stage_width(const Geometry& g, int64_t nw) {
  return (nw - 1) * g.stride[2] + int64_t(g.kw - 1) * g.dil[2] + 1;
}

// The lines holding this call's rows [row_start, row_start + M) (M > 0): the first and last.
inline void line_range(const Geometry& g, int64_t M, int64_t& first, int64_t& last) {
  first = g.row_start / g.Wo;
  last = (g.row_start + M - 1) / g.Wo;
}

// Where a line starts: its sample, output d' and h', and first w'.
struct LineStart {
  int64_t n;
  int32_t od, oh, ow0;
};

// Line `line` (= (n*D' + d')*H' + h', i.e. matrix row / W') starting at w' = ow0.
M3D_HOST_DEVICE LineStart line_start(const Geometry& g, int64_t line, int32_t ow0) {
  LineStart l;
  l.oh = static_cast<int32_t>(line % g.Ho);
  l.od = static_cast<int32_t>((line / g.Ho) % g.Do);
  l.n = line / (g.Ho * g.Do);
  l.ow0 = ow0;
  return l;
}

// Stage row s = (c*kD + i)*kH + j of a line: x's (n, c, d'*sD - pD + i*dD, h'*sH - pH + j*dH)
// row, whether it lies inside x, and the W of its element 0 (w'0*sW - pW). Decoded once per row,
// not per element (each decode is three divisions, ~20 instructions apiece on a GPU).
struct StageRow {
  int64_t offset;  // x's offset of (n, c, d, h, w = 0); 0 when the row is outside x
  int32_t w0;
  bool in;
};

M3D_HOST_DEVICE StageRow stage_row(const Geometry& g, const LineStart& l, int32_t s) {
  const int32_t j = s % g.kh, i = (s / g.kh) % g.kd, c = s / (g.kh * g.kd);
  const int32_t d = l.od * g.stride[0] - g.pad[0] + i * g.dil[0];
  const int32_t h = l.oh * g.stride[1] - g.pad[1] + j * g.dil[1];
  StageRow r;
  r.in = static_cast<uint32_t>(d) < static_cast<uint32_t>(g.D) &&
         static_cast<uint32_t>(h) < static_cast<uint32_t>(g.H);
  r.offset = r.in ? l.n * g.sn + c * g.sc + d * g.sd + h * g.sh : 0;
  r.w0 = l.ow0 * g.stride[2] - g.pad[2];
  return r;
}

// Stage element e of a stage row: x at w = w0 + e, 0 outside x.
template <typename bits_t>
M3D_HOST_DEVICE bits_t stage_value(const bits_t* x, const Geometry& g, const StageRow& r,
                                   int32_t e) {
  const int32_t w = r.w0 + e;
  return r.in && static_cast<uint32_t>(w) < static_cast<uint32_t>(g.W) ? x[r.offset + w * g.sw]
                                                                       : bits_t(0);
}

// Column k's offset in a stage of width Lw (its row q adds q*sW), or -1 for a padding column.
M3D_HOST_DEVICE int32_t stage_offset(const Geometry& g, int32_t Lw, int64_t k) {
  if (k >= g.K) return -1;
  const int32_t kk = static_cast<int32_t>(k);
  return (kk / g.kw) * Lw + (kk % g.kw) * g.dil[2];
}

// A run's bytes: one 16-byte store per run on the GPU (R = kRunBytes / element size).
constexpr int kRunBytes = 16;

// Whether columns come in runs of R: R consecutive columns from a multiple of R share their
// stage row (kW % R == 0), so they read R stage elements dW apart; K and Kp are then multiples
// of R too (K = C*kD*kH*kW; Kp when `align` is), so a run is all real or all padding.
template <int R>
M3D_HOST_DEVICE bool runs_of(const Geometry& g) {
  return g.kw % R == 0 && g.Kp % R == 0;
}

// Columns k0 .. k0 + R - 1 of the line's row q (off: stage_offset(g, Lw, k0); R == 1, or a run
// per runs_of<R>).
template <int R, typename bits_t>
M3D_HOST_DEVICE void line_values(const bits_t* stage, const Geometry& g, int32_t off, int32_t q,
                                 bits_t* v) {
  const int32_t base = off + q * g.stride[2];
M3D_UNROLL
  for (int e = 0; e < R; ++e) v[e] = off < 0 ? bits_t(0) : stage[base + e * g.dil[2]];
}

// Entry checks and geometry for op `op` (its name in messages): fills g, returns the row count.
int64_t geometry(const char* op, const at::Tensor& x, at::IntArrayRef kernel_size,
                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                 int64_t align, int64_t row_start, int64_t rows, Geometry& g);

// geometry() for im2col3d, shared by both devices (im2col.cpp); returns the (rows, Kp) output,
// allocated, not yet written.
at::Tensor prepare(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t align,
                   int64_t row_start, int64_t rows, Geometry& g);

// Calls fn(bits_tag) with an unsigned integer tag of x's element size (prepare admits only
// the float dtypes: 2, 4 or 8 bytes).
template <typename F>
void dispatch_bits(const at::Tensor& x, F&& fn) {
  switch (x.element_size()) {
    case 2: return fn(uint16_t{});
    case 4: return fn(uint32_t{});
    case 8: return fn(uint64_t{});
    default: TORCH_CHECK(false, "med3d_ext.im2col3d: unsupported element size ", x.element_size());
  }
}

}  // namespace im2col

// The op (schema in csrc/registration.cpp): im2col3d(x, kernel_size, stride, padding,
// dilation, align, row_start, rows) -> rows [row_start, row_start + rows) of the
// (N*D'*H'*W', round_up(Cin*kD*kH*kW, align)) matrix, in x's dtype. A row range bounds the
// memory of a large convolution (conv3d.cpp multiplies it chunk by chunk).
at::Tensor im2col3d_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t align,
                        int64_t row_start, int64_t rows);

}  // namespace med3d_ext
