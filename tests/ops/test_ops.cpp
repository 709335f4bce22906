#include "support/gradcheck.hpp"

using namespace ckpt;
using ckpt::test::expect_grad;
using ckpt::test::random_matrix;

TEST_CASE("elementwise: relu(a + b) * sigmoid(a) fused") {
  expect_grad([](Tape<double>&, std::span<const Var<double>> v) -> Var<double> { return relu(v[0] + v[1]) * sigmoid(v[0]); },
              {random_matrix(3, 4, 1), random_matrix(3, 4, 2)});
}

TEST_CASE("matmul with transposed operands") {
  expect_grad([](Tape<double>&, std::span<const Var<double>> v) -> Var<double> { return matmul(transpose(v[0]), v[1]); },
              {random_matrix(3, 4, 1), random_matrix(3, 2, 2)});
}
