// CPU kernels for affine_resample and affine_resample_pair (see resample.h; resize: resize_cpu.cpp).
//
// Work is split over output rows (sample, depth, height) with at::parallel_for; a row is walked
// in blocks with the row's part of the affine map fixed and a precomputed table of the base
// x-coordinates, so no grid tensor is ever formed. (ATen's 3-D grid_sample parallelises over
// the batch only, which leaves all but one core idle for a single volume.)
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "resample.h"
#include "resample_args.h"

namespace med3d_ext {
namespace rs {
namespace {

// Rows per parallel chunk: enough voxels to amortise the scheduling.
inline int64_t row_grain(int64_t W) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(W, 1)); }

template <typename T>
std::vector<T> base_table(int64_t S, bool align) {
  std::vector<T> v(S);
  for (int64_t i = 0; i < S; ++i) v[i] = base_coord<T>(i, S, align);
  return v;
}

// A row is processed in blocks of kBlock voxels, in passes over structure-of-arrays scratch:
// padded source coordinates, then the taps (or nearest offsets) of every voxel, then one pass per
// channel that only gathers, weighs and stores. The first two passes are branch-free and
// vectorise; the taps are computed once per voxel and reused by every channel and by the fused
// label.
constexpr int kBlock = 64;

// The passes are also compiled for AVX2 and picked at load time (GCC function multiversioning),
// so the module still runs on any x86-64. AVX2 only, not FMA: contracting a * b + c would change
// the rounding of the coordinates, and with it nearest-neighbour ties.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__)
#define M3D_RS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define M3D_RS_CLONES
#endif

template <typename T, typename index_t>
struct Block {
  alignas(64) T c[3][kBlock];  // padded source index x, y, z (before: normalised coordinate)
  alignas(64) T w[8][kBlock];
  alignas(64) index_t zy[4][kBlock];
  alignas(64) index_t x[2][kBlock];
  alignas(64) index_t near[kBlock];
};

// Pass 1 tail: normalised -> padded source index. A separate instantiation per padding mode and
// align_corners, picked once per call (a pointer per block, never per voxel).
template <int kPad, bool kAlign, typename T, typename index_t>
M3D_RS_CLONES void to_source(Block<T, index_t>& b, int nb, const Grid<index_t>& g) {
  const int32_t size[3] = {g.W, g.H, g.D};
  for (int k = 0; k < 3; ++k) {
    T* c = b.c[k];
    const int64_t n = size[k];
    for (int j = 0; j < nb; ++j) c[j] = source_index(c[j], n, kPad, kAlign);
  }
}

template <typename T, typename index_t>
using SourceFn = void (*)(Block<T, index_t>&, int, const Grid<index_t>&);

template <typename T, typename index_t>
SourceFn<T, index_t> pick_source(int pad, bool align) {
  switch (pad * 2 + (align ? 1 : 0)) {
    case 1: return &to_source<kZeros, true, T, index_t>;
    case 2: return &to_source<kBorder, false, T, index_t>;
    case 3: return &to_source<kBorder, true, T, index_t>;
    case 4: return &to_source<kReflection, false, T, index_t>;
    case 5: return &to_source<kReflection, true, T, index_t>;
    default: return &to_source<kZeros, false, T, index_t>;
  }
}

// Per-row state shared by the image and label passes: the affine map of the row and, with an
// elastic field, its displacement interpolated along z and y per coarse column.
template <typename T>
struct RowMap {
  const T* bx;  // base x-coordinates of the output grid
  T tx[3];      // theta's x column
  T r[3];       // row terms
  const T* col = nullptr;           // (3, EW) elastic column table of this row, or null
  const Lerp<T>* ex = nullptr;      // per output x: coarse elastic lerp
  int64_t EW = 0;
};

// Pass 1: normalised coordinates of voxels [w0, w0 + nb), then padded source indices.
template <typename T, typename index_t>
M3D_RS_CLONES void coords(Block<T, index_t>& b, int64_t w0, int nb, const RowMap<T>& m,
                          SourceFn<T, index_t> src, const Grid<index_t>& g) {
  for (int k = 0; k < 3; ++k) {
    T* c = b.c[k];
    const T t = m.tx[k], r = m.r[k];
    const T* bx = m.bx + w0;
    // same rounding as the CUDA kernel (which multiplies with m_mul, never an FMA)
    for (int j = 0; j < nb; ++j) c[j] = t * bx[j] + r;
  }
  if (m.col != nullptr) {
    for (int j = 0; j < nb; ++j) {
      const Lerp<T>& l = m.ex[w0 + j];
      for (int k = 0; k < 3; ++k)
        b.c[k][j] += l.l0 * m.col[k * m.EW + l.i0] + l.l1 * m.col[k * m.EW + l.i1];
    }
  }
  src(b, nb, g);
}

template <typename T, typename index_t>
M3D_RS_CLONES void taps_pass(Block<T, index_t>& b, int nb, const Grid<index_t>& g) {
  for (int j = 0; j < nb; ++j) {
    const Taps<T, index_t> t = trilinear_taps<T, index_t>(b.c[0][j], b.c[1][j], b.c[2][j], g);
    for (int q = 0; q < 4; ++q) b.zy[q][j] = t.zy[q];
    for (int q = 0; q < 2; ++q) b.x[q][j] = t.x[q];
    for (int k = 0; k < 8; ++k) b.w[k][j] = t.w[k];
  }
}

template <typename T, typename index_t>
M3D_RS_CLONES void nearest_pass(Block<T, index_t>& b, int nb, const Grid<index_t>& g) {
  for (int j = 0; j < nb; ++j)
    b.near[j] = nearest_offset<T, index_t>(b.c[0][j], b.c[1][j], b.c[2][j], g);
}

// Pass 3 (image): every channel of voxels [0, nb) of the block; o0 = spatial output offset of the
// first one, p / key the intensity parameters (null: none).
template <typename scalar_t, typename T, typename index_t>
M3D_RS_CLONES void image_pass(const Block<T, index_t>& b, int nb, const scalar_t* in,
                              scalar_t* out, int64_t C, int64_t in_cs, int64_t out_cs, int64_t o0,
                              const float* p, uint32_t key) {
  for (int64_t ch = 0; ch < C; ++ch) {
    const scalar_t* src = in + ch * in_cs;
    scalar_t* dst = out + ch * out_cs + o0;
    auto value = [&](int j) {
      Taps<T, index_t> t;
      for (int q = 0; q < 4; ++q) t.zy[q] = b.zy[q][j];
      for (int q = 0; q < 2; ++q) t.x[q] = b.x[q][j];
      for (int k = 0; k < 8; ++k) t.w[k] = b.w[k][j];
      return sample_taps(src, t);
    };
    if (p == nullptr) {
      for (int j = 0; j < nb; ++j) dst[j] = static_cast<scalar_t>(value(j));
    } else {
      for (int j = 0; j < nb; ++j)
        dst[j] = epilogue<scalar_t, T>(value(j), p, key, ch * out_cs + o0 + j);
    }
  }
}

template <typename label_t, typename T, typename index_t>
M3D_RS_CLONES void label_pass(const Block<T, index_t>& b, int nb, const label_t* in,
                              label_t* out, int64_t C, int64_t in_cs, int64_t out_cs, int64_t o0) {
  for (int64_t ch = 0; ch < C; ++ch) {
    const label_t* src = in + ch * in_cs;
    label_t* dst = out + ch * out_cs + o0;
    for (int j = 0; j < nb; ++j) dst[j] = b.near[j] < 0 ? label_t(0) : src[b.near[j]];
  }
}

// Shared row loop of the image grid (kImage) or the label's own grid (!kImage).
template <bool kImage, typename scalar_t, typename label_t, typename T, typename index_t>
void rows(const PairArgs<scalar_t, label_t, T>& a, int64_t N) {
  const int64_t D = kImage ? a.D : a.LD, H = kImage ? a.H : a.LH, W = kImage ? a.W : a.LW;
  const Grid<index_t> g = kImage ? make_grid<index_t>(a.ID, a.IH, a.IW)
                                 : make_grid<index_t>(a.LID, a.LIH, a.LIW);
  const int64_t in_cs = int64_t(g.D) * g.H * g.W, out_cs = D * H * W;
  const int64_t lin_cs = a.LID * a.LIH * a.LIW;  // fused label: its input == the image grid
  const auto bx = base_table<T>(W, a.align), by = base_table<T>(H, a.align),
             bz = base_table<T>(D, a.align);
  const bool elastic = a.elastic != nullptr;
  const bool label = !kImage || (a.fused && a.label != nullptr);
  std::vector<Lerp<T>> ex(elastic ? W : 0);
  for (int64_t w = 0; w < (elastic ? W : 0); ++w) ex[w] = elastic_lerp<T>(w, W, a.EW);
  const int64_t ES = a.ED * a.EH * a.EW;
  const SourceFn<T, index_t> src = pick_source<T, index_t>(a.pad, a.align);
  auto work = [&](auto&& next_chunk) {
    Block<T, index_t> b;
    std::vector<T> col(elastic ? 3 * a.EW : 0);
    RowMap<T> m;
    m.bx = bx.data();
    if (elastic) m.col = col.data(), m.ex = ex.data(), m.EW = a.EW;
    int64_t r0 = 0, r1 = 0;
    while (next_chunk(r0, r1)) for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % H, d = (r / H) % D, n = r / (H * D);
      const T* t = a.theta + n * 12;
      m.tx[0] = t[0], m.tx[1] = t[4], m.tx[2] = t[8];
      row_terms(t, by[h], bz[d], m.r);
      if (elastic) {
        const Lerp<T> lz = elastic_lerp<T>(d, D, a.ED), ly = elastic_lerp<T>(h, H, a.EH);
        const T* e = a.elastic + n * 3 * ES;
        for (int k = 0; k < 3; ++k)
          for (int64_t x = 0; x < a.EW; ++x)
            col[k * a.EW + x] = elastic_zy(e + k * ES, lz, ly, a.EH, a.EW, x);
      }
      const float* p = a.intensity != nullptr ? a.intensity + n * kIntensityFields : nullptr;
      const uint32_t key = p != nullptr ? noise_key(a.seed != nullptr ? a.seed[n] : 0, n) : 0;
      for (int64_t w0 = 0; w0 < W; w0 += kBlock) {
        const int nb = static_cast<int>(std::min<int64_t>(kBlock, W - w0));
        const int64_t o0 = (d * H + h) * W + w0;
        coords(b, w0, nb, m, src, g);
        if constexpr (kImage) {
          taps_pass(b, nb, g);
          image_pass(b, nb, a.image + n * a.C * in_cs, a.image_out + n * a.C * out_cs, a.C,
                     in_cs, out_cs, o0, p, key);
        }
        if (label) {
          nearest_pass(b, nb, g);
          label_pass(b, nb, a.label + n * a.LC * lin_cs, a.label_out + n * a.LC * out_cs, a.LC,
                     lin_cs, out_cs, o0);
        }
      }
    }
  };
  // Chunks of rows are handed out from a shared counter, not split evenly up front: on a busy
  // machine (DataLoader workers, other jobs) a descheduled thread then costs its current chunk
  // only, instead of the whole call waiting for its fixed share.
  const int64_t rows = N * D * H, grain = row_grain(W);
  if (rows <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    work([&, done = false](int64_t& r0, int64_t& r1) mutable {
      if (done) return false;
      done = true, r0 = 0, r1 = rows;
      return true;
    });
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    work([&](int64_t& r0, int64_t& r1) {
      r0 = next.fetch_add(grain, std::memory_order_relaxed);
      r1 = std::min(r0 + grain, rows);
      return r0 < rows;
    });
  });
}

// The fast passes keep per-axis indices in int32 (see axis_tap).
inline void check_axes(const char* what, std::initializer_list<int64_t> sizes) {
  for (int64_t s : sizes)
    M3D_CHECK(s < (int64_t(1) << 30), "med3d_ext.affine_resample: ", what,
              " spatial sizes must be < 2^30 per axis, got ", s);
}

template <typename scalar_t, typename label_t, typename T, typename index_t>
void run_pair(const PairArgs<scalar_t, label_t, T>& a, int64_t N) {
  // scalar_t is an integer placeholder when there is no image (nearest-only calls).
  bool label_done = false;
  if constexpr (!std::is_integral_v<scalar_t>) {
    if (a.image != nullptr && N * a.C * a.D * a.H * a.W > 0) {
      check_axes("image", {a.ID, a.IH, a.IW});
      rows<true, scalar_t, label_t, T, index_t>(a, N);
      label_done = a.fused && a.label != nullptr;
    }
  }
  if (a.label != nullptr && !label_done && N * a.LC * a.LD * a.LH * a.LW > 0) {
    check_axes("label", {a.LID, a.LIH, a.LIW});
    rows<false, scalar_t, label_t, T, index_t>(a, N);
  }
}

void run_prepared(const Prepared& p, int64_t N, int64_t pad, bool align) {
  // 32-bit offsets when a sample fits: the tap passes vectorise twice as wide.
  dispatch_pair(p, pad, align, [&](const auto& args, auto index_tag) {
    using A = std::decay_t<decltype(args)>;
    run_pair<typename A::scalar_type, typename A::label_type, typename A::coord_type,
             decltype(index_tag)>(args, N);
  });
}

}  // namespace

at::Tensor affine_resample_cpu(const at::Tensor& image, const at::Tensor& theta,
                               at::IntArrayRef size, int64_t mode, int64_t padding_mode,
                               bool align_corners) {
  Prepared p = prepare_single(image, theta, size, mode, padding_mode);
  run_prepared(p, image.size(0), padding_mode, align_corners);
  return mode == kBilinear ? p.image_out : p.label_out;
}

std::tuple<at::Tensor, at::Tensor> affine_resample_pair_cpu(
    const at::Tensor& image, const at::Tensor& label, const at::Tensor& theta,
    at::IntArrayRef size, at::IntArrayRef label_size, const std::optional<at::Tensor>& elastic,
    const std::optional<at::Tensor>& intensity, const std::optional<at::Tensor>& seed,
    int64_t padding_mode, bool align_corners) {
  Prepared p = prepare_pair(image, label, theta, size, label_size, elastic, intensity, seed,
                            padding_mode);
  run_prepared(p, image.size(0), padding_mode, align_corners);
  return {p.image_out, p.label_out};
}

TORCH_LIBRARY_IMPL(med3d_ext, CPU, m) {
  m.impl("affine_resample", &affine_resample_cpu);
  m.impl("affine_resample_pair", &affine_resample_pair_cpu);
}

}  // namespace rs
}  // namespace med3d_ext
