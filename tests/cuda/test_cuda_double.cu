// The CUDA backend against the CPU backend in double: every op's value and gradient (see
// test_cuda.cu for the rest and main). One translation unit per scalar type, so that a
// many-core GPU machine compiles them side by side.
#include <ckpt/cuda.hpp>

#include "support/backend_checks.hpp"

using ckpt::backend::cpu;
using ckpt::backend::cuda;
using ckpt::test::cuda_cols;
using ckpt::test::cuda_rows;

TEST_CASE("elementwise expressions in double: one fused kernel each way, broadcasting operands included") {
  ckpt::test::check_elementwise_ops<double, cpu, cuda>(cuda_rows, cuda_cols);
}

TEST_CASE("products, reductions, row-wise ops, losses and layout in double") {
  ckpt::test::check_other_ops<double, cpu, cuda>(cuda_rows, cuda_cols);
}
