// The README's quickstart, verbatim: built with the examples so that it keeps compiling.
#include <ckpt/ckpt.hpp>

#include <iostream>

int main() {
  using namespace ckpt;
  // Tensors are features x batch, column-major. Parameters outlive the steps of training.
  Parameter<float> w1(Eigen::MatrixXf::Random(16, 4)), b1(Eigen::MatrixXf::Zero(16, 1));
  Parameter<float> w2(Eigen::MatrixXf::Random(1, 16)), b2(Eigen::MatrixXf::Zero(1, 1));
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(4, 32);
  const Eigen::MatrixXf y = x.colwise().sum();  // learn the sum of the 4 features

  Tape<float> tape;
  for (int step = 0; step <= 200; ++step) {
    tape.reset();                                              // a new recording, same memory
    Var<float> h = relu(matmul(w1, tape.constant(x)) + b1);    // bias + relu: one fused entry
    Var<float> loss = mse(matmul(w2, h) + b2, tape.constant(y));
    tape.backward(loss);                                       // gradients land in the parameters
    for (Parameter<float>* p : {&w1, &b1, &w2, &b2}) {
      p->value() -= 0.05f * p->grad();
      p->zero_grad();
    }
    if (step % 50 == 0) std::cout << "step " << step << "  loss " << loss.item() << "\n";
  }
  std::cout << "tape: " << tape.entry_count() << " entries, peak " << tape.peak_bytes() << " bytes\n";
}
