// Must not compile: sequential<P> with a type that is not a checkpoint policy.
#include <ckpt/ckpt.hpp>
struct not_a_policy {};
int main() {
  ckpt::Tape<float> t;
  auto x = t.constant(Eigen::MatrixXf::Ones(2, 2));
  auto y = ckpt::sequential<not_a_policy>(3, [](std::size_t, const ckpt::Var<float>& v) { return v; }, x);
  (void)y;
}
