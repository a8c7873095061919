// Shared by C++ and CUDA translation units: no torch headers here.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define QK_HD __host__ __device__ __forceinline__
#else
#define QK_HD inline
#endif
