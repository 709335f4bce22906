// Must not compile: assigning a double expression to a float Var.
#include <ckpt/ckpt.hpp>
int main() {
  ckpt::Tape<double> t;
  auto a = t.constant(Eigen::MatrixXd::Ones(2, 2));
  ckpt::Var<float> y = relu(a);
  (void)y;
}
