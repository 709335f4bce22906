// ckpt — umbrella header for the CUDA backend (compile with nvcc): everything in ckpt/ckpt.hpp
// plus backend::cuda. `Tape<float, backend::cuda>` runs the same user code on the GPU.
#pragma once
#include "ckpt/config.hpp"

#if !defined(__CUDACC__)
#error "<ckpt/cuda.hpp> is compiled by nvcc (a .cu file); CPU-only code includes <ckpt/ckpt.hpp>"
#endif

#include "ckpt/ckpt.hpp"
#include "ckpt/backend/cuda/context.cuh"
#include "ckpt/backend/cuda/cuda.cuh"
