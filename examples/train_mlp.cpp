// train_mlp — trains a small MLP to classify the points of three interleaved 2-D spirals, with
// Adam written out in a few lines. Prints the loss falling, the accuracy, and the tape's figures.
//
//   build/dev/examples/train_mlp [steps]
#include <ckpt/ckpt.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <utility>
#include <vector>

using ckpt::Parameter;
using ckpt::Tape;
using ckpt::Var;
using Mat = Eigen::MatrixXf;

/// Three spirals of `per_class` points each: x is 2 x N (features x batch), labels in {0, 1, 2}.
void make_spirals(int per_class, Mat& x, std::vector<int>& labels) {
  constexpr int classes = 3;
  std::mt19937 gen(7);
  std::normal_distribution<float> noise(0.0f, 0.15f);
  x.resize(2, classes * per_class);
  labels.resize(static_cast<std::size_t>(classes * per_class));
  for (int k = 0; k < classes; ++k) {
    for (int i = 0; i < per_class; ++i) {
      const int j = k * per_class + i;
      const float r = static_cast<float>(i) / static_cast<float>(per_class);
      const float t = 4.0f * static_cast<float>(k) + 4.0f * r + noise(gen);
      x(0, j) = r * std::sin(t);
      x(1, j) = r * std::cos(t);
      labels[static_cast<std::size_t>(j)] = k;
    }
  }
}

/// A weight of rows x cols, He-uniform, and a zero bias column.
Parameter<float> weight(int rows, int cols, std::mt19937& gen) {
  const float a = std::sqrt(6.0f / static_cast<float>(cols));
  std::uniform_real_distribution<float> u(-a, a);
  return Parameter<float>(Mat::NullaryExpr(rows, cols, [&] { return u(gen); }));
}
Parameter<float> bias(int rows) { return Parameter<float>(Mat::Zero(rows, 1)); }

/// Adam over a list of parameters; zeroes their gradients after each update.
struct adam {
  std::vector<Parameter<float>*> params;
  float lr = 0.01f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  std::vector<Mat> m, v;
  int t = 0;

  explicit adam(std::vector<Parameter<float>*> ps) : params(std::move(ps)) {
    for (auto* p : params) m.push_back(Mat::Zero(p->rows(), p->cols())), v.push_back(m.back());
  }
  void step() {
    ++t;
    const float c1 = 1.0f - std::pow(beta1, static_cast<float>(t)), c2 = 1.0f - std::pow(beta2, static_cast<float>(t));
    for (std::size_t i = 0; i < params.size(); ++i) {
      Parameter<float>& p = *params[i];
      m[i] = beta1 * m[i] + (1.0f - beta1) * p.grad();
      v[i] = beta2 * v[i] + (1.0f - beta2) * p.grad().cwiseAbs2();
      p.value().array() -= lr * (m[i].array() / c1) / ((v[i].array() / c2).sqrt() + eps);
      p.zero_grad();
    }
  }
};

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 1500;
  constexpr int hidden = 64;

  Mat x;
  std::vector<int> labels;
  make_spirals(200, x, labels);

  std::mt19937 gen(1);
  Parameter<float> w1 = weight(hidden, 2, gen), b1 = bias(hidden);
  Parameter<float> w2 = weight(hidden, hidden, gen), b2 = bias(hidden);
  Parameter<float> w3 = weight(3, hidden, gen), b3 = bias(3);
  adam opt({&w1, &b1, &w2, &b2, &w3, &b3});

  std::printf("3 spirals, %d points; MLP 2-%d-%d-3 (relu), cross-entropy, Adam lr %.3g, full batch\n",
              static_cast<int>(x.cols()), hidden, hidden, static_cast<double>(opt.lr));

  Tape<float> tape;  // one tape for the whole run: reset() starts each step, nothing regrows
  for (int step = 0; step <= steps; ++step) {
    tape.reset();
    Var<float> h = ckpt::relu(matmul(w1, tape.constant(x)) + b1);  // matmul, then one fused entry
    h = ckpt::relu(matmul(w2, h) + b2);
    Var<float> logits = matmul(w3, h) + b3;
    Var<float> loss = cross_entropy(logits, labels);
    tape.retain(logits);  // keep the logits readable after backward, for the accuracy
    tape.backward(loss);

    if (step % 100 == 0 || step == steps) {
      const auto out = logits.value();
      int correct = 0;
      for (Eigen::Index j = 0; j < out.cols(); ++j) {
        Eigen::Index best = 0;
        out.col(j).maxCoeff(&best);
        correct += best == labels[static_cast<std::size_t>(j)];
      }
      std::printf("step %5d  loss %.4f  accuracy %5.1f%%  tape: %zu entries, peak %zu bytes\n", step,
                  static_cast<double>(loss.item()), 100.0 * correct / static_cast<double>(out.cols()), tape.entry_count(),
                  tape.peak_bytes());
    }
    opt.step();
  }
  std::printf("peak bytes of a step's recording: %zu (%.1f KiB)\n", tape.peak_bytes(),
              static_cast<double>(tape.peak_bytes()) / 1024.0);
  return 0;
}
