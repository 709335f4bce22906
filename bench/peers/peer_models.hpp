// The two models of the side-by-side comparison with PyTorch (bench/peers/), self-contained so
// that the peer driver does not depend on the Google Benchmark suites.
//
//   mlp:  L layers h <- relu(W_i h + b_i), W_i: w x w, b_i: w x 1, all trainable (as bench_checkpoint)
//   lora: L blocks h <- relu(W_i h + s B_i (A_i h) + b_i), W_i, b_i frozen, A_i: r x w, B_i: w x r
//         trainable, s = alpha / r (nn::LoRALinear)
//   lora_res: bench_lora's stack: L residual blocks h <- h + fc2_i(relu(fc1_i(h))), fc1_i and
//         fc2_i nn::LoRALinear (frozen W, b; trainable A, B); layer 2i is fc1_i, 2i+1 fc2_i
//   loss: mean(h_L^2) over all w x n entries; x: w x n (features x batch, column-major)
//
// Initialisation (std::mt19937_64, uniform): W_i ~ U(-a, a) with a = sqrt(6 / w) (He: keeps
// the activations' and the gradients' scale through relu layers), b_i ~ U(-0.1, 0.1),
// x ~ U(-1, 1), A_i ~ U(-1/sqrt(w), 1/sqrt(w)), B_i ~ U(-0.1/sqrt(r), 0.1/sqrt(r)). B_i is NOT
// zero as LoRA's own initialisation has it: with B = 0 the gradient of A is exactly zero and the
// cross-check would compare nothing. bench_checkpoint's U(-1/sqrt(w), 1/sqrt(w)) weights shrink
// the gradient by ~0.4 per layer, so at depth 256 the first layers' gradients underflow to
// zero/denormals; the He bound keeps every gradient in float's normal range.
// lora_res follows bench_lora instead: W, b, A ~ U(-1/sqrt(w), 1/sqrt(w)) (nn::Linear's and
// LoRALinear's own bounds), B ~ U(-0.05, 0.05), alpha = 2 r.
//
// Kink margin: relu's derivative jumps at 0, so two correct float implementations whose sums
// round differently can disagree on one mask bit when a pre-activation lies within rounding
// distance of 0 (seen: |z| = 1.6e-7 max|z| in a LoRA stack), and every gradient below that
// layer then differs by ~1e-3. generate() therefore runs the forward in double and nudges each
// bias b_i[f] by the smallest step that keeps every pre-activation z_i[f, :] at least
// 1e-5 max|z_i| away from 0 (steps of that size, ~1e-4 of b's range): the cross-check then
// tests the implementations, not the rounding at a kink.
#pragma once
#include <ckpt/ckpt.hpp>

#include <cmath>
#include <cstdio>
#include <cstddef>
#include <random>
#include <string>
#include <vector>

namespace peers {

using Mat = Eigen::MatrixXf;

inline Mat uniform(int rows, int cols, double bound, std::mt19937_64& gen) {
  std::uniform_real_distribution<double> d(-bound, bound);
  Mat m(rows, cols);
  for (int j = 0; j < cols; ++j)
    for (int i = 0; i < rows; ++i) m(i, j) = static_cast<float>(d(gen));
  return m;
}

struct config {
  std::string model = "mlp";  // "mlp", "lora" or "lora_res"
  int depth = 64, width = 256, batch = 64, rank = 8;
  double alpha = 16.0;
  std::uint64_t seed = 1;
};

/// The initial values, as plain matrices (what is written to and read from the .npy files).
struct init_values {
  Mat x;
  std::vector<Mat> W, b, A, B;  // A, B empty for the mlp
  int nudged = 0;               // biases moved off a kink (see above)
  const Mat& get(const std::string& name, int i) const {
    if (name == "x") return x;
    const auto& v = name == "W" ? W : name == "b" ? b : name == "A" ? A : B;
    return v[static_cast<std::size_t>(i)];
  }

  static constexpr double kink_margin = 1e-5;

  static init_values generate(const config& c) {
    init_values v = draw(c);
    v.nudged = v.keep_off_kinks(c);
    return v;
  }

  static init_values draw(const config& c) {
    std::mt19937_64 gen(c.seed);
    init_values v;
    const int w = c.width;
    v.x = uniform(w, c.batch, 1.0, gen);
    if (c.model == "lora_res") {
      const double k = 1.0 / std::sqrt(double(w));
      for (int i = 0; i < 2 * c.depth; ++i) {
        v.W.push_back(uniform(w, w, k, gen));
        v.b.push_back(uniform(w, 1, k, gen));
        v.A.push_back(uniform(c.rank, w, k, gen));
        v.B.push_back(uniform(w, c.rank, 0.05, gen));
      }
      return v;
    }
    for (int i = 0; i < c.depth; ++i) {
      v.W.push_back(uniform(w, w, std::sqrt(6.0 / w), gen));
      v.b.push_back(uniform(w, 1, 0.1, gen));
      if (c.model == "lora") {
        v.A.push_back(uniform(c.rank, w, 1.0 / std::sqrt(double(w)), gen));
        v.B.push_back(uniform(w, c.rank, 0.1 / std::sqrt(double(c.rank)), gen));
      }
    }
    return v;
  }

  /// See "Kink margin" above. Returns the number of biases nudged.
  int keep_off_kinks(const config& c) {
    using MatD = Eigen::MatrixXd;
    const double s = static_cast<double>(static_cast<float>(c.alpha / c.rank));
    const bool residual = c.model == "lora_res";
    auto linear = [&](std::size_t i, const MatD& v) -> MatD {  // without the bias
      MatD z = W[i].cast<double>() * v;
      if (!A.empty()) z += s * (B[i].cast<double>() * (A[i].cast<double>() * v));
      return z;
    };
    MatD h = x.cast<double>();
    int nudged = 0;
    for (std::size_t i = 0; i < W.size(); i += residual ? 2 : 1) {
      MatD z = linear(i, h);
      const double delta = kink_margin * (z.cwiseAbs().maxCoeff() + 1.0 /* covers b */);
      for (int f = 0; f < z.rows(); ++f) {
        const double b0 = b[i](f, 0);
        auto clear = [&](double bf) {
          for (int n = 0; n < z.cols(); ++n)
            if (std::abs(z(f, n) + bf) < delta) return false;
          return true;
        };
        float bf = static_cast<float>(b0);
        for (int k = 1; !clear(static_cast<double>(bf)); ++k)  // +2d, -2d, +4d, -4d, ...
          bf = static_cast<float>(b0 + (k % 2 ? 1 : -1) * 2.0 * delta * ((k + 1) / 2));
        if (static_cast<double>(bf) != b0) ++nudged;
        b[i](f, 0) = bf;
      }
      z.colwise() += b[i].cast<double>().col(0);
      if (residual) {  // h + fc2(relu(z)); no relu after the sum
        MatD y = linear(i + 1, z.cwiseMax(0.0));
        y.colwise() += b[i + 1].cast<double>().col(0);
        h += y;
      } else {
        h = z.cwiseMax(0.0);
      }
    }
    return nudged;
  }
};

/// The MLP stack; its step is bench_checkpoint's.
struct mlp {
  std::vector<ckpt::Parameter<float>> W, b;
  Mat x;
  /// get(name, i) returns the initial value of "x", "W", "b" (i-th layer); one at a time, so that
  /// loading from files never holds two copies of the parameters.
  template <class Get>
  mlp(const config& c, Get&& get) : x(get("x", 0)) {
    W.reserve(static_cast<std::size_t>(c.depth));
    b.reserve(static_cast<std::size_t>(c.depth));
    for (int i = 0; i < c.depth; ++i) {
      W.emplace_back(get("W", i));
      b.emplace_back(get("b", i));
    }
  }
  void zero_grad() {
    for (auto& p : W) p.zero_grad();
    for (auto& p : b) p.zero_grad();
  }
  std::size_t depth() const { return W.size(); }
  ckpt::Var<float> layer(std::size_t i, const ckpt::Var<float>& h) { return ckpt::relu(ckpt::matmul(W[i], h) + b[i]); }
  /// Trainable tensors in file order: grad_W_000.., grad_b_000..
  std::vector<std::pair<std::string, const ckpt::Parameter<float>*>> trainable() const;
};

/// The LoRA block stack.
struct lora {
  std::vector<ckpt::nn::LoRALinear<float>> blocks;
  Mat x;
  template <class Get>
  lora(const config& c, Get&& get) : x(get("x", 0)) {
    blocks.reserve(static_cast<std::size_t>(c.depth));
    for (int i = 0; i < c.depth; ++i) {
      blocks.emplace_back(get("W", i), get("b", i), c.rank, c.alpha, 0);
      blocks.back().A().value() = get("A", i);
      blocks.back().B_matrix().value() = get("B", i);
    }
  }
  void zero_grad() {
    for (auto& l : blocks) l.zero_grad();
  }
  std::size_t depth() const { return blocks.size(); }
  ckpt::Var<float> layer(std::size_t i, const ckpt::Var<float>& h) { return ckpt::relu(blocks[i](h)); }
  std::vector<std::pair<std::string, const ckpt::Parameter<float>*>> trainable();
};

/// bench_lora's residual LoRA block stack.
struct lora_res {
  std::vector<ckpt::nn::LoRALinear<float>> fc;  // fc1 of block 0, fc2 of block 0, fc1 of block 1, ...
  Mat x;
  template <class Get>
  lora_res(const config& c, Get&& get) : x(get("x", 0)) {
    fc.reserve(2 * static_cast<std::size_t>(c.depth));
    for (int i = 0; i < 2 * c.depth; ++i) {
      fc.emplace_back(get("W", i), get("b", i), c.rank, c.alpha, 0);
      fc.back().A().value() = get("A", i);
      fc.back().B_matrix().value() = get("B", i);
    }
  }
  void zero_grad() {
    for (auto& l : fc) l.zero_grad();
  }
  std::size_t depth() const { return fc.size() / 2; }
  ckpt::Var<float> layer(std::size_t i, const ckpt::Var<float>& h) { return h + fc[2 * i + 1](ckpt::relu(fc[2 * i](h))); }
  std::vector<std::pair<std::string, const ckpt::Parameter<float>*>> trainable();
};

inline std::string indexed(const char* stem, std::size_t i) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s_%03zu", stem, i);
  return buf;
}

inline std::vector<std::pair<std::string, const ckpt::Parameter<float>*>> mlp::trainable() const {
  std::vector<std::pair<std::string, const ckpt::Parameter<float>*>> t;
  for (std::size_t i = 0; i < W.size(); ++i) t.emplace_back(indexed("W", i), &W[i]);
  for (std::size_t i = 0; i < b.size(); ++i) t.emplace_back(indexed("b", i), &b[i]);
  return t;
}

inline std::vector<std::pair<std::string, const ckpt::Parameter<float>*>> lora_res::trainable() {
  std::vector<std::pair<std::string, const ckpt::Parameter<float>*>> t;
  for (std::size_t i = 0; i < fc.size(); ++i) t.emplace_back(indexed("A", i), &fc[i].A());
  for (std::size_t i = 0; i < fc.size(); ++i) t.emplace_back(indexed("B", i), &fc[i].B_matrix());
  return t;
}

inline std::vector<std::pair<std::string, const ckpt::Parameter<float>*>> lora::trainable() {
  std::vector<std::pair<std::string, const ckpt::Parameter<float>*>> t;
  for (std::size_t i = 0; i < blocks.size(); ++i) t.emplace_back(indexed("A", i), &blocks[i].A());
  for (std::size_t i = 0; i < blocks.size(); ++i) t.emplace_back(indexed("B", i), &blocks[i].B_matrix());
  return t;
}

/// One training step (forward + backward) under policy P: bench_checkpoint's mlp_step.
template <ckpt::Policy P, class Model>
float step(Model& m, ckpt::Tape<float>& tape) {
  tape.reset();
  m.zero_grad();
  ckpt::Var<float> x = tape.constant(m.x);
  ckpt::Var<float> h = ckpt::sequential<P>(
      m.depth(), [&m](std::size_t i, const ckpt::Var<float>& v) -> ckpt::Var<float> { return m.layer(i, v); }, x);
  ckpt::Var<float> loss = ckpt::mean(ckpt::square(h));
  tape.backward(loss);
  return loss.item();
}

}  // namespace peers
