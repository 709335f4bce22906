// ckpt — configuration macros and version. Every other header includes this one first.
#pragma once

#define CKPT_VERSION_MAJOR 0
#define CKPT_VERSION_MINOR 1
#define CKPT_VERSION_PATCH 0

// One qualifier for functions that run on the host and, under nvcc, on the device too:
// the expression nodes and their derivative rules are written once for both backends.
#if defined(__CUDACC__)
#define CKPT_HOST_DEVICE __host__ __device__
// Eigen is the host-side container here (inputs, results, the CPU backend); device code never
// calls it. Without this, nvcc compiles Eigen's own __host__ __device__ annotations, which
// warn under -Werror. (Include ckpt headers before Eigen's in a .cu file.)
#ifndef EIGEN_NO_CUDA
#define EIGEN_NO_CUDA
#endif
#else
#define CKPT_HOST_DEVICE
#endif

#if defined(__GNUC__) || defined(__clang__)
#define CKPT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define CKPT_ALWAYS_INLINE inline
#endif

// Chunk size of a tape's record arena; the test suites shrink it so chunk-crossing code runs.
#ifndef CKPT_DEFAULT_CHUNK_BYTES
#define CKPT_DEFAULT_CHUNK_BYTES (64 * 1024)
#endif
