// Built against the installed package: one small model, its gradient checked against the
// closed form, so that a broken install fails loudly rather than just compiling.
#include <ckpt/ckpt.hpp>

#include <cstdio>

int main() {
  // loss = mean((w x - y)^2) over a 1 x n row; d loss / d w = 2/n * (w x - y) x^T.
  Eigen::MatrixXd x(2, 3), y(1, 3), w0(1, 2);
  x << 1, 2, 3, -1, 0.5, 2;
  y << 0.5, -1, 2;
  w0 << 0.3, -0.7;
  ckpt::Parameter<double> w(w0);

  ckpt::Tape<double> tape;
  ckpt::Var<double> loss = ckpt::mse(ckpt::matmul(w, tape.constant(x)), tape.constant(y));
  tape.backward(loss);

  const Eigen::MatrixXd expected = 2.0 / 3.0 * (w0 * x - y) * x.transpose();
  const double err = (w.grad() - expected).cwiseAbs().maxCoeff();
  std::printf("ckpt %d.%d.%d from the installed package: loss %.6f, gradient error %.2e\n", CKPT_VERSION_MAJOR,
              CKPT_VERSION_MINOR, CKPT_VERSION_PATCH, loss.item(), err);
  return err < 1e-12 ? 0 : 1;
}
