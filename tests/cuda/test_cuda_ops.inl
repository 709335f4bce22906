// The CUDA backend against the CPU backend in one scalar type: every op's value and gradient.
// Included by test_cuda_float.cu and test_cuda_double.cu, which name the type (CKPT_TEST_SCALAR),
// so that a many-core GPU machine compiles the two side by side; test_cuda.cu has the rest and
// main.
#include <ckpt/cuda.hpp>

#include "support/backend_checks.hpp"

#define CKPT_TEST_STRING_(x) #x
#define CKPT_TEST_STRING(x) CKPT_TEST_STRING_(x)

TEST_CASE("elementwise expressions in " CKPT_TEST_STRING(CKPT_TEST_SCALAR) ": one fused kernel each way, broadcasting operands included") {
  ckpt::test::check_elementwise_ops<CKPT_TEST_SCALAR, ckpt::backend::cpu, ckpt::backend::cuda>(ckpt::test::cuda_rows, ckpt::test::cuda_cols);
}

TEST_CASE("products, reductions, row-wise ops, losses and layout in " CKPT_TEST_STRING(CKPT_TEST_SCALAR)) {
  ckpt::test::check_other_ops<CKPT_TEST_SCALAR, ckpt::backend::cpu, ckpt::backend::cuda>(ckpt::test::cuda_rows, ckpt::test::cuda_cols);
}
