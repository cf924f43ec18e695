// im2col3d on CUDA (see im2col.h). Two kernels:
//   lines (MED3D_EXT_IM2COL_KERNEL=lines; opt-in until it has run on a GPU): a block stages a
//       line chunk's input rows in shared memory (loads consecutive along W) and writes its
//       contiguous (nw, Kp) block of the matrix, 16 bytes per store where columns come in runs
//       (im2col.h, "Lines"; the CPU op takes the same walk);
//   gather (the default): a block writes a tile of kRows rows by up to kTileCols columns. Its
//       columns' taps and its rows' window corners go to shared memory first (the only integer
//       divisions), then each thread writes its column of every row: consecutive threads write
//       consecutive columns (coalesced stores), and each element is three compares and a load
//       that hits L1/L2 (a row's taps read a 7x7x7 neighbourhood, rows next to each other
//       overlap).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "im2col.h"
#include "../common/checks.h"
#include "../common/run.h"
#include "../common/cuda_utils.cuh"

namespace med3d_ext {
namespace {

constexpr int kRows = 64;          // rows per block: amortises the tap table over 64 rows
constexpr int kTileCols = 1024;    // columns per block at most (24 KB of taps)
constexpr int kMaxThreads = 512;

// index_t: the type of make_tap / make_row's divisions (int32_t when the matrix's rows and
// columns, counted from 0, fit in it).
template <typename bits_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
im2col3d_kernel(const bits_t* __restrict__ x, bits_t* __restrict__ cols, im2col::Geometry g,
                int64_t M) {
  __shared__ im2col::Tap taps[kTileCols];
  __shared__ im2col::Row rows[kRows];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTileCols;
  const int nrows = static_cast<int>(M - m0 < kRows ? M - m0 : kRows);
  const int ncols = static_cast<int>(g.Kp - k0 < kTileCols ? g.Kp - k0 : kTileCols);
  for (int k = threadIdx.x; k < ncols; k += blockDim.x)
    taps[k] = im2col::make_tap<index_t>(g, k0 + k);
  for (int r = threadIdx.x; r < nrows; r += blockDim.x)
    rows[r] = im2col::make_row<index_t>(g, g.row_start + m0 + r);
  __syncthreads();
  bits_t* out = cols + m0 * g.Kp + k0;
  // A thread's tap stays in registers across the rows (the usual case is one column per
  // thread); a row's corner is a shared-memory broadcast. A tile narrower than the block (the
  // stem's 32-column space-to-depth input, ops/stem.py) splits its rows among groups of
  // `width` threads, one column each, so no thread idles.
  const int width = ncols < int(blockDim.x) ? ncols : int(blockDim.x);
  const int groups = int(blockDim.x) / width, group = int(threadIdx.x) / width;
  if (group >= groups) return;  // the block's last threads when width does not divide it
  for (int k = int(threadIdx.x) % width; k < ncols; k += width) {
    const im2col::Tap tap = taps[k];
    for (int r = group; r < nrows; r += groups)
      out[r * g.Kp + k] = im2col::element(x, g, rows[r], tap);
  }
}

// ---- lines (im2col.h) ----

constexpr int kLineThreads = 256;
constexpr int kLineRows = 128;                 // rows of a line chunk at most
constexpr int64_t kStageBudget = 40 * 1024;    // shared memory per block (< the 48 KB default)

// The (offsets, stage) shared-memory carve-up: Kp int32 offsets, then the stage 16-byte aligned.
__host__ __device__ inline int64_t offsets_bytes(int64_t Kp) { return (Kp * 4 + 15) / 16 * 16; }

// Block b: line first_line + b / chunks, rows w' = ow0 .. ow0 + nw - 1 of it (fewer in a line's
// last chunk), written where they fall in this call's rows [row_start, row_start + M).
template <typename bits_t, int R>
__global__ void __launch_bounds__(kLineThreads)
im2col3d_lines_kernel(const bits_t* __restrict__ x, bits_t* __restrict__ cols, im2col::Geometry g,
                      int64_t M, int64_t first_line, int32_t nw, int32_t chunks, int32_t Lw,
                      int32_t S) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int32_t Kp = static_cast<int32_t>(g.Kp);  // < kStageBudget / 4 (the host's check)
  int32_t* offs = reinterpret_cast<int32_t*>(smem);
  bits_t* stage = reinterpret_cast<bits_t*>(smem + offsets_bytes(Kp));
  const int64_t line = first_line + blockIdx.x / chunks;
  const int32_t ow0 = static_cast<int32_t>(blockIdx.x % chunks) * nw;
  const int32_t rows_here = min(nw, static_cast<int32_t>(g.Wo) - ow0);
  const im2col::LineStart ls = im2col::line_start(g, line, ow0);
  for (int32_t k = threadIdx.x; k < Kp; k += blockDim.x) offs[k] = im2col::stage_offset(g, Lw, k);
  // a warp per stage row, its lanes consecutive elements of it: consecutive w in x
  const int32_t lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int32_t s = threadIdx.x / 32; s < S; s += warps) {
    const im2col::StageRow r = im2col::stage_row(g, ls, s);
    for (int32_t e = lane; e < Lw; e += 32) stage[s * Lw + e] = im2col::stage_value(x, g, r, e);
  }
  __syncthreads();
  // the chunk's rows are consecutive rows of the matrix: consecutive threads, consecutive runs
  const int64_t m0 = line * g.Wo + ow0 - g.row_start;
  const int32_t runs = Kp / R, total = rows_here * runs;
  for (int32_t t = threadIdx.x; t < total; t += blockDim.x) {
    const int32_t q = t / runs, k = (t - q * runs) * R;
    const int64_t m = m0 + q;
    if (m < 0 || m >= M) continue;
    Run<bits_t, R> v;
    im2col::line_values<R>(stage, g, offs[k], q, v.v);
    store_run<R>(cols + m * g.Kp + k, v);
  }
}

// MED3D_EXT_IM2COL_KERNEL=lines: read at every call, so one process can time both kernels.
bool lines_asked() { return env_equals("MED3D_EXT_IM2COL_KERNEL", "lines"); }

// Launches the lines kernel when asked and its shared memory fits; false otherwise.
bool launch_lines(const at::Tensor& x, at::Tensor& cols, const im2col::Geometry& g, int64_t M,
                  cudaStream_t stream) {
  if (!lines_asked() || g.Wo <= 0 || g.Kp * 4 > kStageBudget / 2) return false;
  const int64_t S = g.C * g.kd * g.kh, esize = x.element_size();
  int64_t nw = std::min<int64_t>(g.Wo, kLineRows);
  auto bytes = [&](int64_t w) { return offsets_bytes(g.Kp) + S * im2col::stage_width(g, w) * esize; };
  while (nw > 1 && bytes(nw) > kStageBudget) nw = (nw + 1) / 2;
  if (bytes(nw) > kStageBudget) return false;
  const int64_t chunks = ceil_div(g.Wo, nw);
  int64_t first, last;
  im2col::line_range(g, M, first, last);
  const int64_t blocks = (last - first + 1) * chunks;
  if (blocks >= (int64_t(1) << 31)) return false;
  const int32_t Lw = static_cast<int32_t>(im2col::stage_width(g, nw));
  const size_t smem = static_cast<size_t>(bytes(nw));
  // 16-byte runs need the matrix 16-byte aligned (a fresh allocation) and runs_of<R>
  const bool aligned = reinterpret_cast<uintptr_t>(cols.const_data_ptr()) % im2col::kRunBytes == 0;
  im2col::dispatch_bits(x, [&](auto tag) {
    using bits_t = decltype(tag);
    constexpr int R = im2col::kRunBytes / sizeof(bits_t);
    const bits_t* xp = static_cast<const bits_t*>(x.const_data_ptr());
    bits_t* out = static_cast<bits_t*>(cols.mutable_data_ptr());
    if (aligned && im2col::runs_of<R>(g)) {
      im2col3d_lines_kernel<bits_t, R><<<static_cast<unsigned>(blocks), kLineThreads, smem, stream>>>(
          xp, out, g, M, first, int32_t(nw), int32_t(chunks), Lw, int32_t(S));
    } else {
      im2col3d_lines_kernel<bits_t, 1><<<static_cast<unsigned>(blocks), kLineThreads, smem, stream>>>(
          xp, out, g, M, first, int32_t(nw), int32_t(chunks), Lw, int32_t(S));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return true;
}

}  // namespace

at::Tensor im2col3d_cuda(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t align,
                         int64_t row_start, int64_t rows) {
  const c10::cuda::CUDAGuard guard(x.device());
  im2col::Geometry g;
  at::Tensor cols =
      im2col::prepare(x, kernel_size, stride, padding, dilation, align, row_start, rows, g);
  const int64_t M = cols.size(0);
  if (cols.numel() == 0) return cols;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (launch_lines(x, cols, g, M, stream)) return cols;
  const int64_t tiles = ceil_div(g.Kp, kTileCols);
  M3D_CHECK(tiles <= 65535, "med3d_ext.im2col3d: ", g.Kp, " columns are too many");
  // One thread per column of a tile where it fits (the stem's 344 columns: 352 threads, one
  // store each per row), rounded up to whole warps; at least 256, with the rows of a narrow
  // tile split among them (the kernel).
  const int threads =
      static_cast<int>(std::clamp<int64_t>(ceil_div(std::min<int64_t>(g.Kp, kTileCols), 32) * 32,
                                           256, kMaxThreads));
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kRows)), static_cast<unsigned>(tiles));
  M3D_CHECK(ceil_div(M, kRows) < (int64_t(1) << 31), "med3d_ext.im2col3d: ", M,
            " rows are too many");
  // make_row's int32 divisions also form Do*Ho*Wo: a chunk of rows near the start of a matrix
  // whose samples have >= 2^31 output voxels would otherwise overflow it
  const bool small = g.row_start + M < (int64_t(1) << 31) && g.Kp < (int64_t(1) << 31) &&
                     g.Do * g.Ho * g.Wo < (int64_t(1) << 31);
  im2col::dispatch_bits(x, [&](auto tag) {
    using bits_t = decltype(tag);
    M3D_INDEX_SWITCH(small, index_t, [&] {
      im2col3d_kernel<bits_t, index_t><<<grid, threads, 0, stream>>>(
          static_cast<const bits_t*>(x.const_data_ptr()),
          static_cast<bits_t*>(cols.mutable_data_ptr()), g, M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return cols;
}

TORCH_LIBRARY_IMPL(med3d_ext, CUDA, m) { m.impl("im2col3d", &im2col3d_cuda); }

}  // namespace med3d_ext
