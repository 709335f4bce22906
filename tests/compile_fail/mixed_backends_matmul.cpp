// Must not compile: a product of tensors of two backends (a stand-in for backend::cuda, which
// needs nvcc; the check is the same).
#include <ckpt/ckpt.hpp>

struct other_backend : ckpt::backend::cpu {
  static constexpr const char* name = "other";
};

int main() {
  ckpt::Tape<float> cpu_tape;
  ckpt::Tape<float, other_backend> other_tape;
  auto a = cpu_tape.variable(Eigen::MatrixXf::Ones(2, 2));
  auto b = other_tape.variable(Eigen::MatrixXf::Ones(2, 2));
  auto c = ckpt::matmul(a, b);
  (void)c;
}
