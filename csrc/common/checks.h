// Entry checks with messages that name the argument and show what it got.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <string>
#include <type_traits>
#include <vector>

namespace med3d_ext {

// Messages are built by string concatenation, not std::ostream: on one GPU build machine
// (torch 2.11, its own g++) formatting through ostream inside this module segfaulted
// (benchmarks/results/2026-11-26_h200/cuda_tests.md), so error paths stay iostream-free and
// hand TORCH_CHECK a single ready-made string.
inline std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  std::string shape = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) shape += ", ";
    shape += std::to_string(t.size(i));
  }
  shape += "]";
  return "a tensor of shape " + shape + ", dtype " + std::string(c10::toString(t.scalar_type())) +
         ", device " + t.device().str();
}

// msg(a, b, ...): concatenation of strings, numbers, sizes, dtypes and devices, without iostreams.
inline std::string msg_piece(const std::string& s) { return s; }
inline std::string msg_piece(const char* s) { return s; }
inline std::string msg_piece(char c) { return std::string(1, c); }
inline std::string msg_piece(bool b) { return b ? "true" : "false"; }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
inline std::string msg_piece(T v) { return std::to_string(v); }
inline std::string msg_piece(at::IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}
inline std::string msg_piece(const std::vector<int64_t>& v) { return msg_piece(at::IntArrayRef(v)); }
inline std::string msg_piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string msg_piece(const c10::Device& d) { return d.str(); }
template <typename... Args>
inline std::string msg(const Args&... args) {
  std::string out;
  ((out += msg_piece(args)), ...);
  return out;
}

// TORCH_CHECK with an iostream-free message (see above).
#define M3D_CHECK(COND, ...) TORCH_CHECK((COND), ::med3d_ext::msg(__VA_ARGS__))

#define M3D_CHECK_ARG(COND, OP, ARG, TENSOR, EXPECTED)                                           \
  TORCH_CHECK((COND), std::string("med3d_ext.") + (OP) + ": argument '" + (ARG) + "' must be " + \
                          std::string(EXPECTED) + ", got " + ::med3d_ext::describe(TENSOR))

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  M3D_CHECK_ARG(t.defined() && t.dim() == dim, op, arg, t, std::to_string(dim) + "-D");
}

inline void check_float(const char* op, const char* arg, const at::Tensor& t) {
  auto st = t.scalar_type();
  M3D_CHECK_ARG(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
                op, arg, t, "floating point (float32, bfloat16, float16 or float64)");
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t,
                              const at::Tensor& ref) {
  M3D_CHECK_ARG(t.device() == ref.device(), op, arg, t,
                "on the same device as the input (" + ref.device().str() + ")");
}

// True when a 5-D tensor is laid out channels_last_3d (N, D, H, W, C in memory), in which case
// per-channel work sees it as a row-major (N*D*H*W, C) matrix.
inline bool is_channels_last_3d(const at::Tensor& t) {
  return t.dim() == 5 && t.size(1) > 1 && !t.is_contiguous() &&
         t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

// The layout a convolution's output takes from its input or weight, as ATen's: channels_last_3d
// as above, and also a one-channel tensor whose channel stride is 1 (x.to(channels_last_3d) of
// an (N, 1, D, H, W) image, or a stem weight (Cout, 1, k, k, k) of a channels_last model): its
// memory is that of either layout, and the stride is the only trace of the one asked for.
inline bool prefers_channels_last_3d(const at::Tensor& t) {
  if (is_channels_last_3d(t)) return true;
  return t.dim() == 5 && t.size(1) == 1 && t.stride(1) == 1 && t.numel() > t.size(0) &&
         t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

// A convolution axis' padded input (in + 2 padding) and dilated kernel (dilation (k - 1) + 1), or
// false when either overflows int64: a huge padding or dilation would otherwise wrap around,
// pass the size checks and give a wrong output size.
inline bool conv_extent(int64_t in, int64_t k, int64_t padding, int64_t dilation, int64_t& padded,
                        int64_t& span) {
  int64_t two_p = 0, dk = 0;
  return !c10::mul_overflows(padding, int64_t(2), &two_p) &&
         !c10::add_overflows(in, two_p, &padded) &&
         !c10::mul_overflows(dilation, k - 1, &dk) && !c10::add_overflows(dk, int64_t(1), &span);
}

// 32-bit indexing is safe when every offset an op forms fits in int32.
inline bool fits_int32(int64_t numel) { return numel < (int64_t(1) << 31) - 1; }

}  // namespace med3d_ext
