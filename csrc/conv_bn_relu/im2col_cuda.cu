// im2col3d on CUDA (see im2col.h): a block writes a tile of kRows rows by up to kTileCols
// columns. Its columns' taps and its rows' window corners go to shared memory first (the only
// integer divisions), then each thread writes its column of every row: consecutive threads
// write consecutive columns (coalesced stores), and each element is three compares and a load
// that hits L1/L2 (a row's taps read a 7x7x7 neighbourhood, rows next to each other overlap).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "im2col.h"
#include "../common/checks.h"
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
  auto stream = at::cuda::getCurrentCUDAStream();
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
