// Portability macros shared by every op family.
//
// Per-voxel math lives in headers of M3D_HOST_DEVICE functions so the CPU (.cpp) and the CUDA
// (.cu) translation units compile the very same code: nvcc sees __host__ __device__, the host
// compiler sees a plain inline function.
#pragma once

#if defined(__CUDACC__)
#define M3D_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define M3D_HOST_DEVICE inline
#endif

// Unroll a short bounded loop: on the GPU and with clang the plain pragma; GCC has its own
// spelling (and warns on the other).
#if defined(__CUDACC__) || defined(__clang__)
#define M3D_UNROLL _Pragma("unroll")
#else
#define M3D_UNROLL _Pragma("GCC unroll 8")
#endif

// Turn a runtime bool into a constexpr template parameter (flash-attention's BOOL_SWITCH idea):
//   M3D_BOOL_SWITCH(has_residual, kResidual, [&] { launch<kResidual>(...); });
#define M3D_BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                             \
    if (COND) {                                     \
      constexpr static bool CONST_NAME = true;      \
      return __VA_ARGS__();                         \
    } else {                                        \
      constexpr static bool CONST_NAME = false;     \
      return __VA_ARGS__();                         \
    }                                               \
  }()

// 32-bit indexing is measurably faster on the GPU; volumes above 2^31 elements take the 64-bit
// instantiation. Chosen at run time from the largest tensor an op touches.
#define M3D_INDEX_SWITCH(USE_32, INDEX_T, ...)      \
  [&] {                                             \
    if (USE_32) {                                   \
      using INDEX_T = int32_t;                      \
      return __VA_ARGS__();                         \
    } else {                                        \
      using INDEX_T = int64_t;                      \
      return __VA_ARGS__();                         \
    }                                               \
  }()
