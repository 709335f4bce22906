// Must not compile: an expression mixing tensors of two backends (here the CPU backend and a
// stand-in for another, since backend::cuda needs nvcc; the check is the same for both).
#include <ckpt/ckpt.hpp>

struct other_backend : ckpt::backend::cpu {
  static constexpr const char* name = "other";
};

int main() {
  ckpt::Tape<float> cpu_tape;
  ckpt::Tape<float, other_backend> other_tape;
  auto a = cpu_tape.variable(Eigen::MatrixXf::Ones(2, 2));
  auto b = other_tape.variable(Eigen::MatrixXf::Ones(2, 2));
  auto c = ckpt::eval(a + b);
  (void)c;
}
