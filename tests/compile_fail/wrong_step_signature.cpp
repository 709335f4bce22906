// Must not compile: a step function that does not return a Var.
#include <ckpt/ckpt.hpp>
int main() {
  ckpt::Tape<float> t;
  auto x = t.constant(Eigen::MatrixXf::Ones(2, 2));
  auto y = ckpt::sequential<ckpt::policy::sqrt_n>(3, [](std::size_t, const ckpt::Var<float>&) { return 1; }, x);
  (void)y;
}
