// Must not compile: an expression mixing float and double tensors.
#include <ckpt/ckpt.hpp>
int main() {
  ckpt::Tape<float> tf;
  ckpt::Tape<double> td;
  auto a = tf.constant(Eigen::MatrixXf::Ones(2, 2));
  auto b = td.constant(Eigen::MatrixXd::Ones(2, 2));
  auto e = a + b;
  (void)e;
}
