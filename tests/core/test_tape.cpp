#include "support/gradcheck.hpp"

using namespace ckpt;

TEST_CASE("backward on a non-scalar names the shape") {
  Tape<double> tape;
  auto x = tape.variable(ckpt::test::random_matrix(2, 3, 1));
  Var<double> y = relu(x);
  CHECK_THROWS_WITH_AS(tape.backward(y), doctest::Contains("1x1, got 2x3"), shape_error);
}
