// bench_tape — the tape's overhead on a plain MLP: the AD step against a hand-written Eigen
// forward + backward of the same model, both with the same GEMM (ckpt::backend::cpu::gemm).
//
//   mlp_hand/L/W/N   hand-written forward and backward, every activation stored
//   mlp_ad/L/W/N     the same model on a ckpt::Tape: zero_grad, reset, forward, backward
//   scale_<s>_hand/R/C, scale_<s>_ad/R/C   y = relu(x * s), loss = sum(y), with a broadcast
//                    operand s of shape 1 x C ("cols"), R x 1 ("rows") or R x C ("full")
//   attention_hand/S/T/d/H, attention_ad/S/T/d/H, attention_sliced/S/T/d/H   causal multi-head
//                    attention of S sequences of T tokens, width d, H heads, loss = sum(O .* W):
//                    Eigen per (sequence, head), the tape's attention(), and the tape with a
//                    slice, product and softmax per sequence and head
//   act_<f>_hand/R/C, act_<f>_ad/R/C   loss = sum(f(x)) and its gradient for an R x C x, f one
//                    of sigmoid, silu, gelu, tanh: Eigen's vectorised array functions against
//                    the tape's fused entry (expr/math.hpp's exp and tanh)
//   xent_hand/R/C, xent_ad/R/C   cross_entropy over R classes and C samples, forward and backward:
//                    Eigen per column (softmax kept for the reverse) against the tape's entry
//   lnorm_hand/R/C, lnorm_ad/R/C  loss = sum(layer_norm(x, gain, bias) .* W) and the gradients of
//                    x, gain and bias: Eigen (x-hat kept) against the tape's entry
//
// Model: L layers of width W on a batch of N columns; h_{l+1} = relu(W_l h_l + b_l) for every
// layer but the last, which is linear; loss = mean((h_L - y)^2) against a fixed target y.
// Before a size is timed, the hand-written gradients are checked against the AD ones.
//
// Counters: peak_bytes — for mlp_ad the tape's peak_bytes(); for mlp_hand the bytes of the
// activations and activation-gradient buffers it holds. Neither counts parameters or their
// gradients, which both sides hold outside the step.
//
// After the runs, a table of <model>_ad / <model>_hand ratios, of real and of CPU time, goes to stderr
// (from the medians when --benchmark_repetitions > 1). CPU time is the steadier figure on a
// shared machine: the products are single-threaded unless an OpenBLAS runs them. The context
// lines say where products went ("gemm": blas or eigen); for OpenBLAS, pin one thread:
//   OPENBLAS_NUM_THREADS=1 ./bench_tape --benchmark_repetitions=5
//       --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true
// `--paired[=N]` instead alternates the two variants step by step (see run_paired): the
// steadier ratio on a machine that other jobs share.
#include <ckpt/ckpt.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <unistd.h>

namespace {

using Mat = Eigen::MatrixXf;
using Vec = Eigen::VectorXf;
using gemm_backend = ckpt::backend::cpu;

struct mlp_size {
  int layers, width, batch;
  auto key() const { return std::tie(layers, width, batch); }
  friend bool operator<(const mlp_size& a, const mlp_size& b) { return a.key() < b.key(); }
  std::string args() const {
    return std::to_string(layers) + "/" + std::to_string(width) + "/" + std::to_string(batch);
  }
};

/// Weights, biases, input and target of one size, the same for both variants.
struct mlp_data {
  std::vector<Mat> w;
  std::vector<Vec> b;
  Mat x, y;
};

mlp_data generate(const mlp_size& s, unsigned seed) {
  std::mt19937 gen(seed);
  // He-uniform weights keep relu activations O(1) through deep stacks.
  const float a = std::sqrt(6.0f / static_cast<float>(s.width));
  std::uniform_real_distribution<float> weight(-a, a), bias(-0.1f, 0.1f), unit(-1.0f, 1.0f);
  auto fill = [&gen](auto& m, auto& dist) {
    for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = dist(gen);
  };
  mlp_data d;
  for (int l = 0; l < s.layers; ++l) {
    d.w.emplace_back(s.width, s.width);
    d.b.emplace_back(s.width);
    fill(d.w.back(), weight);
    fill(d.b.back(), bias);
  }
  d.x.resize(s.width, s.batch);
  d.y.resize(s.width, s.batch);
  fill(d.x, unit);
  fill(d.y, unit);
  return d;
}

/// The data of one size, generated once (Google Benchmark calls a benchmark several times).
const mlp_data& make_data(const mlp_size& s) {
  static std::map<mlp_size, mlp_data> cache;
  auto it = cache.find(s);
  if (it == cache.end()) it = cache.emplace(s, generate(s, 42)).first;
  return it->second;
}

// ------------------------------------------------------------------ hand-written

/// Forward and backward written out with preallocated buffers: GEMMs through the same call
/// the tape uses (ckpt::backend::cpu::gemm), bias + relu fused in place by Eigen, the relu mask
/// read from the stored output (relu(z) > 0 exactly when z > 0).
class hand_mlp {
 public:
  explicit hand_mlp(const mlp_data& d) : w_(d.w), b_(d.b), y_(d.y) {
    const int layers = static_cast<int>(w_.size());
    const auto width = d.x.rows(), batch = d.x.cols();
    h_.push_back(d.x);
    for (int l = 0; l < layers; ++l) {
      h_.emplace_back(width, batch);
      dw_.emplace_back(width, width);
      db_.emplace_back(width);
    }
    g_ = Mat(width, batch);
    g_next_ = Mat(width, batch);
  }

  float step() {
    const int layers = static_cast<int>(w_.size());
    const int m = static_cast<int>(y_.rows()), n = static_cast<int>(y_.cols());
    for (int l = 0; l < layers; ++l) {
      Mat& out = h_[l + 1];
      gemm_backend::gemm(false, false, m, n, m, 1.0f, w_[l].data(), m, h_[l].data(), m, 0.0f, out.data(), m);
      if (l + 1 < layers)
        out = (out.colwise() + b_[l]).cwiseMax(0.0f);
      else
        out.colwise() += b_[l];
    }
    const float scale = 1.0f / static_cast<float>(y_.size());
    g_.noalias() = (h_[layers] - y_) * (2.0f * scale);
    const float loss = (h_[layers] - y_).squaredNorm() * scale;
    for (int l = layers; l-- > 0;) {
      if (l + 1 < layers) relu_mask(h_[l + 1], g_);
      db_[l].noalias() = g_.rowwise().sum();
      gemm_backend::gemm(false, true, m, m, n, 1.0f, g_.data(), m, h_[l].data(), m, 0.0f, dw_[l].data(), m);
      if (l > 0) {
        gemm_backend::gemm(true, false, m, n, m, 1.0f, w_[l].data(), m, g_.data(), m, 0.0f, g_next_.data(), m);
        std::swap(g_, g_next_);
      }
    }
    return loss;
  }

  /// g = h > 0 ? g : 0, written as a loop the compiler vectorises (Eigen's select() is a
  /// scalar loop with a branch per element, mispredicted half of the time for relu masks).
  static void relu_mask(const Mat& h, Mat& g) {
    const float* hv = h.data();
    float* gv = g.data();
    for (Eigen::Index i = 0, n = g.size(); i < n; ++i) gv[i] = hv[i] > 0.0f ? gv[i] : 0.0f;
  }

  const Mat& dw(int l) const { return dw_[static_cast<std::size_t>(l)]; }
  const Vec& db(int l) const { return db_[static_cast<std::size_t>(l)]; }

  /// Activations h_1..h_L and the two activation-gradient buffers.
  std::size_t held_bytes() const {
    std::size_t bytes = 0;
    for (std::size_t l = 1; l < h_.size(); ++l) bytes += static_cast<std::size_t>(h_[l].size()) * sizeof(float);
    return bytes + static_cast<std::size_t>(g_.size() + g_next_.size()) * sizeof(float);
  }

 private:
  std::vector<Mat> w_;
  std::vector<Vec> b_;
  Mat y_;
  std::vector<Mat> h_;  // h_[0] is the input
  std::vector<Mat> dw_;
  std::vector<Vec> db_;
  Mat g_, g_next_;
};

// ------------------------------------------------------------------ through the tape

class ad_mlp {
 public:
  explicit ad_mlp(const mlp_data& d) : x_(d.x), y_(d.y) {
    w_.reserve(d.w.size());
    b_.reserve(d.b.size());
    for (std::size_t l = 0; l < d.w.size(); ++l) {
      w_.emplace_back(d.w[l]);
      b_.emplace_back(d.b[l]);
    }
  }

  float step() {
    tape_.reset();
    const std::size_t layers = w_.size();
    ckpt::Var<float> h = tape_.constant(x_);
    for (std::size_t l = 0; l < layers; ++l) {
      // The product is a temporary: freed once relu(z + b) is computed, as the hand-written
      // step overwrites it in place (a named Var z would be kept until the sweep passes it).
      if (l + 1 < layers)
        h = ckpt::relu(ckpt::matmul(w_[l], h) + b_[l]);
      else
        h = ckpt::matmul(w_[l], h) + b_[l];
    }
    ckpt::Var<float> loss = ckpt::mse(h, tape_.constant(y_));
    tape_.backward(loss);
    return loss.item();
  }

  void zero_grad() {
    for (auto& p : w_) p.zero_grad();
    for (auto& p : b_) p.zero_grad();
  }
  const ckpt::Parameter<float>& w(int l) const { return w_[static_cast<std::size_t>(l)]; }
  const ckpt::Parameter<float>& b(int l) const { return b_[static_cast<std::size_t>(l)]; }
  const ckpt::Tape<float>& tape() const { return tape_; }

 private:
  ckpt::Tape<float> tape_;
  std::vector<ckpt::Parameter<float>> w_, b_;
  Mat x_, y_;
};

// ------------------------------------------------------------------ the check before timing

template <class A, class H>
float relative_error(const A& ad, const H& hand) {
  const float scale = std::max(hand.cwiseAbs().maxCoeff(), 1e-30f);
  return (ad - hand).cwiseAbs().maxCoeff() / scale;
}

/// Aborts the whole run when the hand-written gradients and the AD gradients differ.
void verify_once(const mlp_size& s) {
  static std::set<mlp_size> verified;
  if (!verified.insert(s).second) return;
  constexpr float tolerance = 1e-4f;
  const mlp_data& d = make_data(s);
  hand_mlp hand(d);
  ad_mlp ad(d);
  ad.zero_grad();
  const float loss_hand = hand.step();
  const float loss_ad = ad.step();
  auto fail = [&](const std::string& what, float err) {
    std::fprintf(stderr,
                 "bench_tape: gradient check FAILED for mlp/%s: %s differs between mlp_ad and mlp_hand by %.3g "
                 "(relative, tolerance %.0e); the figures would compare different computations, so nothing is timed.\n",
                 s.args().c_str(), what.c_str(), static_cast<double>(err), static_cast<double>(tolerance));
    std::exit(EXIT_FAILURE);
  };
  if (!(std::abs(loss_ad - loss_hand) <= tolerance * std::abs(loss_hand))) fail("the loss", std::abs(loss_ad - loss_hand));
  for (int l = 0; l < s.layers; ++l) {
    const float ew = relative_error(ad.w(l).grad(), hand.dw(l));
    if (!(ew <= tolerance)) fail("dW of layer " + std::to_string(l), ew);
    const float eb = relative_error(ad.b(l).grad(), hand.db(l));
    if (!(eb <= tolerance)) fail("db of layer " + std::to_string(l), eb);
  }
}

// ------------------------------------------------------------------ broadcast operands

/// y = relu(x * s), loss = sum(y), the gradients of x and s, float; s is 1 x C ("cols", a
/// per-sample scale), R x 1 ("rows", a per-feature scale) or R x C ("full"). The AD side's
/// broadcast operand takes the owner-computes reverse (a pass for x, then s's shares summed in
/// double by add_column_sums or add_row_sums); the hand-written side is plain Eigen, its sums
/// in float.
struct scale_case {
  std::string operand;  // cols, rows or full
  int rows, cols;
  std::string args() const { return std::to_string(rows) + "/" + std::to_string(cols); }
  int s_rows() const { return operand == "cols" ? 1 : rows; }
  int s_cols() const { return operand == "rows" ? 1 : cols; }
};

struct scale_data {
  Mat x, s;
  explicit scale_data(const scale_case& c) {
    std::mt19937 gen(11);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    x = Mat::NullaryExpr(c.rows, c.cols, [&] { return u(gen); });
    s = Mat::NullaryExpr(c.s_rows(), c.s_cols(), [&] { return u(gen); });
  }
};

class hand_scale {
 public:
  hand_scale(const scale_case& c, const scale_data& d) : c_(c), x_(d.x), s_(d.s), y_(d.x), mask_(d.x), dx_(d.x), ds_(d.s) {}
  float step() {
    if (c_.operand == "cols") {
      y_.array() = (x_.array().rowwise() * s_.row(0).array()).max(0.0f);
      mask_.array() = (y_.array() > 0.0f).cast<float>();
      dx_.array() = mask_.array().rowwise() * s_.row(0).array();
      ds_.array() = (mask_.array() * x_.array()).colwise().sum();
    } else if (c_.operand == "rows") {
      y_.array() = (x_.array().colwise() * s_.col(0).array()).max(0.0f);
      mask_.array() = (y_.array() > 0.0f).cast<float>();
      dx_.array() = mask_.array().colwise() * s_.col(0).array();
      ds_.array() = (mask_.array() * x_.array()).rowwise().sum();
    } else {
      y_.array() = (x_.array() * s_.array()).max(0.0f);
      mask_.array() = (y_.array() > 0.0f).cast<float>();
      dx_.array() = mask_.array() * s_.array();
      ds_.array() = mask_.array() * x_.array();
    }
    return y_.sum();
  }
  const Mat& dx() const { return dx_; }
  const Mat& ds() const { return ds_; }

 private:
  scale_case c_;
  Mat x_, s_, y_, mask_, dx_, ds_;
};

class ad_scale {
 public:
  explicit ad_scale(const scale_data& d) : x_(d.x), s_(d.s) {}
  float step() {
    x_.zero_grad();
    s_.zero_grad();
    tape_.reset();
    const ckpt::Var<float> loss = ckpt::sum(ckpt::relu(tape_.param(x_) * tape_.param(s_)));
    tape_.backward(loss);
    return loss.item();
  }
  const ckpt::Parameter<float>& x() const { return x_; }
  const ckpt::Parameter<float>& s() const { return s_; }
  const ckpt::Tape<float>& tape() const { return tape_; }

 private:
  ckpt::Tape<float> tape_;
  ckpt::Parameter<float> x_, s_;
};

void verify_scale(const scale_case& c) {
  static std::set<std::string> verified;
  if (!verified.insert(c.operand + "/" + c.args()).second) return;
  const scale_data d(c);
  hand_scale hand(c, d);
  ad_scale ad(d);
  hand.step();
  ad.step();
  constexpr float tolerance = 1e-4f;
  const float ex = relative_error(ad.x().grad(), hand.dx()), es = relative_error(ad.s().grad(), hand.ds());
  if (!(ex <= tolerance && es <= tolerance)) {
    std::fprintf(stderr, "bench_tape: gradient check FAILED for scale_%s/%s: dx %.3g, ds %.3g (relative, tolerance %.0e)\n",
                 c.operand.c_str(), c.args().c_str(), static_cast<double>(ex), static_cast<double>(es), static_cast<double>(tolerance));
    std::exit(EXIT_FAILURE);
  }
}

// ------------------------------------------------------------------ activations

/// loss = sum(f(x)) and dx = f'(x), float, for f = sigmoid, silu, gelu or tanh. The hand-written
/// side is Eigen's array functions (its own vectorised exp, tanh and logistic), y stored, the
/// backward from x and y; the AD side is one fused reduction entry, sum(f(x)), which stores
/// nothing: its reverse computes f again from x.
struct act_case {
  std::string fn;
  int rows, cols;
  std::string args() const { return std::to_string(rows) + "/" + std::to_string(cols); }
};

Mat act_input(const act_case& c) {
  std::mt19937 gen(13);
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  return Mat::NullaryExpr(c.rows, c.cols, [&] { return u(gen); });
}

class hand_act {
 public:
  hand_act(const act_case& c, const Mat& x) : fn_(c.fn), x_(x), y_(x), dx_(x) {}
  float step() {
    const auto x = x_.array();
    constexpr float k = 0.7978845608028654f, a = 0.044715f;
    if (fn_ == "sigmoid") {
      y_.array() = x.logistic();
      dx_.array() = y_.array() * (1.0f - y_.array());
    } else if (fn_ == "silu") {
      y_.array() = x * x.logistic();
      dx_.array() = x.logistic() * (1.0f + x * (1.0f - x.logistic()));
    } else if (fn_ == "gelu") {
      y_.array() = 0.5f * x * (1.0f + (k * (x + a * x.cube())).tanh());
      const auto t = (k * (x + a * x.cube())).tanh();
      dx_.array() = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t.square()) * k * (1.0f + 3.0f * a * x.square());
    } else {
      y_.array() = x.tanh();
      dx_.array() = 1.0f - y_.array().square();
    }
    return y_.sum();
  }
  const Mat& dx() const { return dx_; }

 private:
  std::string fn_;
  Mat x_, y_, dx_;
};

class ad_act {
 public:
  ad_act(const act_case& c, const Mat& x) : fn_(c.fn), x_(x) {}
  float step() {
    x_.zero_grad();
    tape_.reset();
    const ckpt::Var<float> x = tape_.param(x_);
    const ckpt::Var<float> loss = fn_ == "sigmoid" ? ckpt::sum(ckpt::sigmoid(x))
                                  : fn_ == "silu"  ? ckpt::sum(ckpt::silu(x))
                                  : fn_ == "gelu"  ? ckpt::sum(ckpt::gelu(x))
                                                   : ckpt::sum(ckpt::tanh(x));
    tape_.backward(loss);
    return loss.item();
  }
  const ckpt::Parameter<float>& x() const { return x_; }
  const ckpt::Tape<float>& tape() const { return tape_; }

 private:
  std::string fn_;
  ckpt::Tape<float> tape_;
  ckpt::Parameter<float> x_;
};

void verify_act(const act_case& c) {
  static std::set<std::string> verified;
  if (!verified.insert(c.fn + "/" + c.args()).second) return;
  const Mat x = act_input(c);
  hand_act hand(c, x);
  ad_act ad(c, x);
  hand.step();
  ad.step();
  constexpr float tolerance = 1e-5f;
  const float e = relative_error(ad.x().grad(), hand.dx());
  if (!(e <= tolerance)) {
    std::fprintf(stderr, "bench_tape: gradient check FAILED for act_%s/%s: dx %.3g (relative, tolerance %.0e)\n", c.fn.c_str(),
                 c.args().c_str(), static_cast<double>(e), static_cast<double>(tolerance));
    std::exit(EXIT_FAILURE);
  }
}

// ------------------------------------------------------------------ row-wise: cross-entropy, layer norm

/// R rows (classes or features) by C columns (samples), float; what a column's reductions cost.
struct rowwise_case {
  int rows, cols;
  std::string args() const { return std::to_string(rows) + "/" + std::to_string(cols); }
};

struct rowwise_data {
  Mat x, w, gain, bias;
  std::vector<int> labels;
  explicit rowwise_data(const rowwise_case& c) {
    std::mt19937 gen(17);
    std::uniform_real_distribution<float> u(-3.0f, 3.0f);
    x = Mat::NullaryExpr(c.rows, c.cols, [&] { return u(gen); });
    w = Mat::NullaryExpr(c.rows, c.cols, [&] { return u(gen); });
    gain = Mat::NullaryExpr(c.rows, 1, [&] { return 1.0f + 0.1f * u(gen); });
    bias = Mat::NullaryExpr(c.rows, 1, [&] { return 0.1f * u(gen); });
    std::uniform_int_distribution<int> label(0, c.rows - 1);
    for (int j = 0; j < c.cols; ++j) labels.push_back(label(gen));
  }
};

/// Cross-entropy by hand: P = softmax per column (kept), loss = mean(log-sum-exp - x[label]),
/// dx = (P - onehot) / C.
class hand_xent {
 public:
  explicit hand_xent(const rowwise_data& d) : x_(d.x), p_(d.x), dx_(d.x), labels_(d.labels) {}
  float step() {
    float loss = 0;
    for (Eigen::Index j = 0; j < x_.cols(); ++j) {
      const float mx = x_.col(j).maxCoeff();
      p_.col(j).array() = (x_.col(j).array() - mx).exp();
      const float sum = p_.col(j).sum();
      p_.col(j) /= sum;
      loss += std::log(sum) + mx - x_(labels_[static_cast<std::size_t>(j)], j);
    }
    const float scale = 1.0f / static_cast<float>(x_.cols());
    dx_ = p_ * scale;
    for (Eigen::Index j = 0; j < x_.cols(); ++j) dx_(labels_[static_cast<std::size_t>(j)], j) -= scale;
    return loss * scale;
  }
  const Mat& dx() const { return dx_; }
  std::size_t held_bytes() const { return static_cast<std::size_t>(p_.size() + dx_.size()) * sizeof(float); }

 private:
  Mat x_, p_, dx_;
  std::vector<int> labels_;
};

class ad_xent {
 public:
  explicit ad_xent(const rowwise_data& d) : x_(d.x), labels_(d.labels) {}
  float step() {
    x_.zero_grad();
    tape_.reset();
    const ckpt::Var<float> loss = ckpt::cross_entropy(tape_.param(x_), labels_);
    tape_.backward(loss);
    return loss.item();
  }
  const ckpt::Parameter<float>& x() const { return x_; }
  const ckpt::Tape<float>& tape() const { return tape_; }

 private:
  ckpt::Tape<float> tape_;
  ckpt::Parameter<float> x_;
  std::vector<int> labels_;
};

/// Layer norm by hand: x-hat and 1/std kept, y = gain .* x-hat + bias, loss = sum(y .* W);
/// reverse dx = rstd (g gain - mean(g gain) - x-hat mean(g gain x-hat)), dgain = sum over
/// samples of W .* x-hat, dbias = sum of W.
class hand_lnorm {
 public:
  explicit hand_lnorm(const rowwise_data& d)
      : x_(d.x), w_(d.w), gain_(d.gain), bias_(d.bias), xhat_(d.x), y_(d.x), dx_(d.x), dgain_(d.gain), dbias_(d.bias), rstd_(1, d.x.cols()) {}
  float step() {
    constexpr float eps = 1e-5f;
    const float n = static_cast<float>(x_.rows());
    for (Eigen::Index j = 0; j < x_.cols(); ++j) {
      const float mu = x_.col(j).mean();
      xhat_.col(j).array() = x_.col(j).array() - mu;
      const float var = xhat_.col(j).squaredNorm() / n;
      rstd_(0, j) = 1.0f / std::sqrt(var + eps);
      xhat_.col(j) *= rstd_(0, j);
    }
    y_.array() = (xhat_.array().colwise() * gain_.col(0).array()).colwise() + bias_.col(0).array();
    const float loss = (y_.array() * w_.array()).sum();
    for (Eigen::Index j = 0; j < x_.cols(); ++j) {
      const auto d = (w_.col(j).array() * gain_.col(0).array());
      const float mean_d = d.sum() / n, mean_dx = (d * xhat_.col(j).array()).sum() / n;
      dx_.col(j).array() = rstd_(0, j) * (d - mean_d - xhat_.col(j).array() * mean_dx);
    }
    dgain_ = (w_.array() * xhat_.array()).rowwise().sum().matrix();
    dbias_ = w_.rowwise().sum();
    return loss;
  }
  const Mat& dx() const { return dx_; }
  const Mat& dgain() const { return dgain_; }
  std::size_t held_bytes() const { return static_cast<std::size_t>(xhat_.size() + y_.size() + dx_.size() + rstd_.size()) * sizeof(float); }

 private:
  Mat x_, w_, gain_, bias_, xhat_, y_, dx_, dgain_, dbias_, rstd_;
};

class ad_lnorm {
 public:
  explicit ad_lnorm(const rowwise_data& d) : x_(d.x), gain_(d.gain), bias_(d.bias), w_(d.w) {}
  float step() {
    x_.zero_grad();
    gain_.zero_grad();
    bias_.zero_grad();
    tape_.reset();
    const ckpt::Var<float> y = ckpt::layer_norm(tape_.param(x_), tape_.param(gain_), tape_.param(bias_));
    const ckpt::Var<float> loss = ckpt::sum(y * tape_.constant(w_));
    tape_.backward(loss);
    return loss.item();
  }
  const ckpt::Parameter<float>& x() const { return x_; }
  const ckpt::Parameter<float>& gain() const { return gain_; }
  const ckpt::Tape<float>& tape() const { return tape_; }

 private:
  ckpt::Tape<float> tape_;
  ckpt::Parameter<float> x_, gain_, bias_;
  Mat w_;
};

void verify_rowwise(const std::string& op, const rowwise_case& c) {
  static std::set<std::string> verified;
  if (!verified.insert(op + "/" + c.args()).second) return;
  const rowwise_data d(c);
  constexpr float tolerance = 1e-4f;
  float err = 0;
  if (op == "xent") {
    hand_xent hand(d);
    ad_xent ad(d);
    hand.step();
    ad.step();
    err = relative_error(ad.x().grad(), hand.dx());
  } else {
    hand_lnorm hand(d);
    ad_lnorm ad(d);
    hand.step();
    ad.step();
    err = std::max(relative_error(ad.x().grad(), hand.dx()), relative_error(ad.gain().grad(), hand.dgain()));
  }
  if (!(err <= tolerance)) {
    std::fprintf(stderr, "bench_tape: gradient check FAILED for %s/%s: %.3g (relative, tolerance %.0e)\n", op.c_str(), c.args().c_str(),
                 static_cast<double>(err), static_cast<double>(tolerance));
    std::exit(EXIT_FAILURE);
  }
}

// ------------------------------------------------------------------ attention

/// Causal multi-head attention over `sequences` sequences of T tokens, width d, `heads` heads:
/// loss = sum(O .* W), O = attention(q, k, v), and the gradients of q, k and v (float).
struct attention_case {
  int sequences, T, d, heads;
  std::string args() const {
    return std::to_string(sequences) + "/" + std::to_string(T) + "/" + std::to_string(d) + "/" + std::to_string(heads);
  }
  int dh() const { return d / heads; }
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(dh())); }
};

struct attention_data {
  Mat q, k, v, w;
  explicit attention_data(const attention_case& c) {
    std::mt19937 gen(13);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const int n = c.sequences * c.T;
    q = Mat::NullaryExpr(c.d, n, [&] { return u(gen); });
    k = Mat::NullaryExpr(c.d, n, [&] { return u(gen); });
    v = Mat::NullaryExpr(c.d, n, [&] { return u(gen); });
    w = Mat::NullaryExpr(c.d, n, [&] { return u(gen); });
  }
};

/// Per (sequence, head) blocks in plain Eigen, the products through the same GEMM:
/// S = scale K^T Q, masked; P = softmax(S) per column; O = V P. Reverse: dO = W,
/// dV = dO P^T, dP = V^T dO, dS = P .* (dP - sum_rows(P .* dP)), dQ = scale K dS,
/// dK = scale Q dS^T. Stores P (the weights) for the reverse, as autograd would.
class hand_attention {
 public:
  hand_attention(const attention_case& c, const attention_data& d)
      : c_(c), q_(d.q), k_(d.k), v_(d.v), w_(d.w), p_(c.T, c.T * c.heads * c.sequences), o_(d.v), dq_(d.q), dk_(d.k), dv_(d.v),
        dp_(c.T, c.T) {}
  float step() {
    const int T = c_.T, dh = c_.dh(), d = c_.d;
    const float scale = c_.scale();
    for (int s = 0; s < c_.sequences; ++s)
      for (int h = 0; h < c_.heads; ++h) {
        float* P = p_.data() + static_cast<long>(s * c_.heads + h) * T * T;
        const long at = static_cast<long>(s) * d * T + h * dh;
        gemm_backend::gemm(true, false, T, T, dh, scale, k_.data() + at, d, q_.data() + at, d, 0.0f, P, T);
        Eigen::Map<Mat> Pm(P, T, T);
        for (int col = 0; col < T; ++col) {
          for (int r = col + 1; r < T; ++r) Pm(r, col) = -std::numeric_limits<float>::infinity();
          const float mx = Pm.col(col).maxCoeff();
          Pm.col(col) = (Pm.col(col).array() - mx).exp().matrix();
          Pm.col(col) /= Pm.col(col).sum();
        }
        gemm_backend::gemm(false, false, dh, T, T, 1.0f, v_.data() + at, d, P, T, 0.0f, o_.data() + at, d);
      }
    const float loss = (o_.array() * w_.array()).sum();
    for (int s = 0; s < c_.sequences; ++s)
      for (int h = 0; h < c_.heads; ++h) {
        const float* P = p_.data() + static_cast<long>(s * c_.heads + h) * T * T;
        const long at = static_cast<long>(s) * d * T + h * dh;
        gemm_backend::gemm(false, true, dh, T, T, 1.0f, w_.data() + at, d, P, T, 0.0f, dv_.data() + at, d);
        gemm_backend::gemm(true, false, T, T, dh, 1.0f, v_.data() + at, d, w_.data() + at, d, 0.0f, dp_.data(), T);
        const Eigen::Map<const Mat> Pm(P, T, T);
        const Eigen::RowVectorXf dot = (Pm.array() * dp_.array()).colwise().sum();
        dp_.array() = Pm.array() * (dp_.array().rowwise() - dot.array());  // dS, in place
        gemm_backend::gemm(false, false, dh, T, T, scale, k_.data() + at, d, dp_.data(), T, 0.0f, dq_.data() + at, d);
        gemm_backend::gemm(false, true, dh, T, T, scale, q_.data() + at, d, dp_.data(), T, 0.0f, dk_.data() + at, d);
      }
    return loss;
  }
  const Mat& dq() const { return dq_; }
  const Mat& dk() const { return dk_; }
  const Mat& dv() const { return dv_; }
  /// P, O and a block's dP (not dq, dk, dv: the tape side's are parameter gradients, which its
  /// peak_bytes does not count either).
  std::size_t held_bytes() const { return static_cast<std::size_t>(p_.size() + o_.size() + dp_.size()) * sizeof(float); }

 private:
  attention_case c_;
  Mat q_, k_, v_, w_, p_, o_, dq_, dk_, dv_, dp_;
};

/// The tape's attention(), or (`sliced`) the same from per-sequence, per-head slices,
/// products and concatenations, as a model had to write it before attention() existed.
class ad_attention {
 public:
  ad_attention(const attention_case& c, const attention_data& d, bool sliced)
      : c_(c), sliced_(sliced), q_(d.q), k_(d.k), v_(d.v), w_(d.w, true), mask_(Mat::Zero(c.T, c.T)) {
    for (int col = 0; col < c.T; ++col)
      for (int r = col + 1; r < c.T; ++r) mask_(r, col) = -std::numeric_limits<float>::infinity();
  }
  float step() {
    for (auto* p : {&q_, &k_, &v_}) p->zero_grad();
    tape_.reset();
    const ckpt::Var<float> q = tape_.param(q_), k = tape_.param(k_), v = tape_.param(v_);
    const ckpt::Var<float> o = sliced_ ? sliced(q, k, v) : ckpt::attention(q, k, v, c_.heads, c_.T, true);
    const ckpt::Var<float> loss = ckpt::sum(o * w_);
    tape_.backward(loss);
    return loss.item();
  }
  const ckpt::Parameter<float>& q() const { return q_; }
  const ckpt::Parameter<float>& k() const { return k_; }
  const ckpt::Parameter<float>& v() const { return v_; }
  const ckpt::Tape<float>& tape() const { return tape_; }

 private:
  ckpt::Var<float> sliced(const ckpt::Var<float>& q, const ckpt::Var<float>& k, const ckpt::Var<float>& v) {
    const ckpt::Var<float> mask = tape_.constant(mask_);
    std::vector<ckpt::Var<float>> seqs;
    for (int s = 0; s < c_.sequences; ++s) {
      const ckpt::Var<float> qs = ckpt::slice_cols(q, s * c_.T, c_.T), ks = ckpt::slice_cols(k, s * c_.T, c_.T),
                             vs = ckpt::slice_cols(v, s * c_.T, c_.T);
      std::vector<ckpt::Var<float>> heads;
      for (int h = 0; h < c_.heads; ++h) {
        const ckpt::Var<float> qh = ckpt::slice_rows(qs, h * c_.dh(), c_.dh()), kh = ckpt::slice_rows(ks, h * c_.dh(), c_.dh()),
                               vh = ckpt::slice_rows(vs, h * c_.dh(), c_.dh());
        const ckpt::Var<float> p = ckpt::softmax(ckpt::matmul(ckpt::transpose(kh), qh) * c_.scale() + mask);
        heads.push_back(ckpt::matmul(vh, p));
      }
      seqs.push_back(ckpt::concat_rows(heads));
    }
    return ckpt::concat_cols(seqs);
  }

  attention_case c_;
  bool sliced_;
  ckpt::Tape<float> tape_;
  ckpt::Parameter<float> q_, k_, v_, w_;
  Mat mask_;
};

void verify_attention(const attention_case& c) {
  static std::set<std::string> verified;
  if (!verified.insert(c.args()).second) return;
  const attention_data d(c);
  hand_attention hand(c, d);
  hand.step();
  for (const bool sliced : {false, true}) {
    ad_attention ad(c, d, sliced);
    ad.step();
    constexpr float tolerance = 1e-4f;
    const float eq = relative_error(ad.q().grad(), hand.dq()), ek = relative_error(ad.k().grad(), hand.dk()),
                ev = relative_error(ad.v().grad(), hand.dv());
    if (!(eq <= tolerance && ek <= tolerance && ev <= tolerance)) {
      std::fprintf(stderr, "bench_tape: gradient check FAILED for attention_%s/%s: dq %.3g, dk %.3g, dv %.3g (relative, tolerance %.0e)\n",
                   sliced ? "sliced" : "ad", c.args().c_str(), static_cast<double>(eq), static_cast<double>(ek), static_cast<double>(ev),
                   static_cast<double>(tolerance));
      std::exit(EXIT_FAILURE);
    }
  }
}

// ------------------------------------------------------------------ benchmarks

void set_counters(benchmark::State& state, const mlp_size& s, std::size_t peak_bytes) {
  state.counters["peak_bytes"] = benchmark::Counter(static_cast<double>(peak_bytes));
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * s.batch);
}

void bm_mlp_hand(benchmark::State& state, mlp_size s) {
  verify_once(s);
  hand_mlp model(make_data(s));
  for (auto _ : state) {
    benchmark::DoNotOptimize(model.step());
    benchmark::DoNotOptimize(model.dw(0).data());
    benchmark::ClobberMemory();
  }
  set_counters(state, s, model.held_bytes());
}

// A step zeroes the parameters' gradients first (they accumulate, as an optimizer's step
// expects), the counterpart of the hand-written side overwriting its own: both end each
// iteration with the gradients of that one step.
void bm_mlp_ad(benchmark::State& state, mlp_size s) {
  verify_once(s);
  ad_mlp model(make_data(s));
  for (auto _ : state) {
    model.zero_grad();
    benchmark::DoNotOptimize(model.step());
    benchmark::DoNotOptimize(model.w(0).grad_data());
    benchmark::ClobberMemory();
  }
  set_counters(state, s, model.tape().peak_bytes());
}

const std::vector<mlp_size> sizes = {{16, 256, 64}, {64, 256, 64}, {32, 512, 128}, {64, 16, 4}, {16, 1024, 64}};
const std::vector<scale_case> scale_cases = {{"cols", 4096, 64}, {"rows", 4096, 64}, {"full", 4096, 64}, {"cols", 64, 4096}};

void bm_scale_hand(benchmark::State& state, scale_case c) {
  verify_scale(c);
  const scale_data d(c);
  hand_scale model(c, d);
  for (auto _ : state) {
    benchmark::DoNotOptimize(model.step());
    benchmark::ClobberMemory();
  }
  // y, the mask, dx, ds
  const std::size_t held = static_cast<std::size_t>(3 * d.x.size() + d.s.size()) * sizeof(float);
  state.counters["peak_bytes"] = benchmark::Counter(static_cast<double>(held));
}

void bm_scale_ad(benchmark::State& state, scale_case c) {
  verify_scale(c);
  ad_scale model(scale_data{c});
  for (auto _ : state) {
    benchmark::DoNotOptimize(model.step());
    benchmark::ClobberMemory();
  }
  state.counters["peak_bytes"] = benchmark::Counter(static_cast<double>(model.tape().peak_bytes()));
}

const std::vector<act_case> act_cases = {{"sigmoid", 4096, 256}, {"silu", 4096, 256}, {"gelu", 4096, 256}, {"tanh", 4096, 256}};

void bm_act_hand(benchmark::State& state, act_case c) {
  verify_act(c);
  hand_act model(c, act_input(c));
  for (auto _ : state) {
    benchmark::DoNotOptimize(model.step());
    benchmark::ClobberMemory();
  }
  // y and dx
  state.counters["peak_bytes"] = benchmark::Counter(static_cast<double>(2 * model.dx().size() * sizeof(float)));
}

void bm_act_ad(benchmark::State& state, act_case c) {
  verify_act(c);
  ad_act model(c, act_input(c));
  for (auto _ : state) {
    benchmark::DoNotOptimize(model.step());
    benchmark::ClobberMemory();
  }
  state.counters["peak_bytes"] = benchmark::Counter(static_cast<double>(model.tape().peak_bytes()));
}

const std::vector<rowwise_case> xent_cases = {{32000, 64}, {10, 4096}};
const std::vector<rowwise_case> lnorm_cases = {{1024, 512}, {64, 4096}};

template <class Model>
void bm_rowwise(benchmark::State& state, std::string op, rowwise_case c) {
  verify_rowwise(op, c);
  Model model{rowwise_data{c}};
  for (auto _ : state) {
    benchmark::DoNotOptimize(model.step());
    benchmark::ClobberMemory();
  }
  std::size_t held = 0;
  if constexpr (requires { model.held_bytes(); })
    held = model.held_bytes();
  else
    held = model.tape().peak_bytes();
  state.counters["peak_bytes"] = benchmark::Counter(static_cast<double>(held));
}

const std::vector<attention_case> attention_cases = {{16, 64, 256, 4}, {32, 12, 48, 4}, {4, 256, 64, 4}};

void bm_attention_hand(benchmark::State& state, attention_case c) {
  verify_attention(c);
  hand_attention model(c, attention_data{c});
  for (auto _ : state) {
    benchmark::DoNotOptimize(model.step());
    benchmark::ClobberMemory();
  }
  state.counters["peak_bytes"] = benchmark::Counter(static_cast<double>(model.held_bytes()));
}

void bm_attention_tape(benchmark::State& state, attention_case c, bool sliced) {
  verify_attention(c);
  ad_attention model(c, attention_data{c}, sliced);
  for (auto _ : state) {
    benchmark::DoNotOptimize(model.step());
    benchmark::ClobberMemory();
  }
  state.counters["peak_bytes"] = benchmark::Counter(static_cast<double>(model.tape().peak_bytes()));
}

double minimum(const std::vector<double>& v) { return v.empty() ? 0.0 : *std::min_element(v.begin(), v.end()); }

void register_all() {
  for (const mlp_size& s : sizes) {
    // Explicit names: the args are part of the name, so Google Benchmark appends nothing.
    // With repetitions, "min" joins mean/median/stddev: on a shared machine the fastest
    // repetition is the one least disturbed.
    benchmark::RegisterBenchmark(("mlp_hand/" + s.args()).c_str(), bm_mlp_hand, s)
        ->Unit(benchmark::kMicrosecond)
        ->ComputeStatistics("min", minimum);
    benchmark::RegisterBenchmark(("mlp_ad/" + s.args()).c_str(), bm_mlp_ad, s)
        ->Unit(benchmark::kMicrosecond)
        ->ComputeStatistics("min", minimum);
  }
  for (const attention_case& c : attention_cases) {
    benchmark::RegisterBenchmark(("attention_hand/" + c.args()).c_str(), bm_attention_hand, c)
        ->Unit(benchmark::kMicrosecond)
        ->ComputeStatistics("min", minimum);
    benchmark::RegisterBenchmark(("attention_ad/" + c.args()).c_str(), bm_attention_tape, c, false)
        ->Unit(benchmark::kMicrosecond)
        ->ComputeStatistics("min", minimum);
    benchmark::RegisterBenchmark(("attention_sliced/" + c.args()).c_str(), bm_attention_tape, c, true)
        ->Unit(benchmark::kMicrosecond)
        ->ComputeStatistics("min", minimum);
  }
  for (const rowwise_case& c : xent_cases) {
    benchmark::RegisterBenchmark(("xent_hand/" + c.args()).c_str(), bm_rowwise<hand_xent>, "xent", c)
        ->Unit(benchmark::kMicrosecond)
        ->ComputeStatistics("min", minimum);
    benchmark::RegisterBenchmark(("xent_ad/" + c.args()).c_str(), bm_rowwise<ad_xent>, "xent", c)
        ->Unit(benchmark::kMicrosecond)
        ->ComputeStatistics("min", minimum);
  }
  for (const rowwise_case& c : lnorm_cases) {
    benchmark::RegisterBenchmark(("lnorm_hand/" + c.args()).c_str(), bm_rowwise<hand_lnorm>, "lnorm", c)
        ->Unit(benchmark::kMicrosecond)
        ->ComputeStatistics("min", minimum);
    benchmark::RegisterBenchmark(("lnorm_ad/" + c.args()).c_str(), bm_rowwise<ad_lnorm>, "lnorm", c)
        ->Unit(benchmark::kMicrosecond)
        ->ComputeStatistics("min", minimum);
  }
  for (const act_case& c : act_cases) {
    benchmark::RegisterBenchmark(("act_" + c.fn + "_hand/" + c.args()).c_str(), bm_act_hand, c)
        ->Unit(benchmark::kMicrosecond)
        ->ComputeStatistics("min", minimum);
    benchmark::RegisterBenchmark(("act_" + c.fn + "_ad/" + c.args()).c_str(), bm_act_ad, c)
        ->Unit(benchmark::kMicrosecond)
        ->ComputeStatistics("min", minimum);
  }
  for (const scale_case& c : scale_cases) {
    benchmark::RegisterBenchmark(("scale_" + c.operand + "_hand/" + c.args()).c_str(), bm_scale_hand, c)
        ->Unit(benchmark::kMicrosecond)
        ->ComputeStatistics("min", minimum);
    benchmark::RegisterBenchmark(("scale_" + c.operand + "_ad/" + c.args()).c_str(), bm_scale_ad, c)
        ->Unit(benchmark::kMicrosecond)
        ->ComputeStatistics("min", minimum);
  }
}

// ------------------------------------------------------------------ ratio table

/// The console reporter, plus a table of <model>_ad / <model>_hand ratios printed at the end.
class ratio_reporter : public benchmark::ConsoleReporter {
 public:
  using benchmark::ConsoleReporter::ConsoleReporter;

  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      if (r.error_occurred) continue;
      const std::string name = r.run_name.function_name;
      const auto slash = name.find('/');
      if (slash == std::string::npos) continue;
      // Keyed by "<model>/<args>" and then "ad" or "hand": mlp_ad/16/256/64 -> mlp/16/256/64, ad.
      const std::string variant = name.substr(0, slash);
      const auto underscore = variant.rfind('_');
      if (underscore == std::string::npos) continue;
      auto& slot = times_[variant.substr(0, underscore) + name.substr(slash)][variant.substr(underscore + 1)];
      if (r.run_type == Run::RT_Aggregate) {
        if (r.aggregate_name == "median") {
          slot.real = r.GetAdjustedRealTime();
          slot.cpu = r.GetAdjustedCPUTime();
          slot.median = true;
        } else if (r.aggregate_name == "min") {
          slot.min_cpu = r.GetAdjustedCPUTime();
        }
      } else if (!slot.median) {  // a single run, until there are aggregates
        slot.real = r.GetAdjustedRealTime();
        slot.cpu = r.GetAdjustedCPUTime();
      }
    }
    ConsoleReporter::ReportRuns(runs);
  }

  void Finalize() override {
    ConsoleReporter::Finalize();
    bool header = false;
    for (const auto& [args, variants] : times_) {
      const auto ad = variants.find("ad"), hand = variants.find("hand");
      if (ad == variants.end() || hand == variants.end() || hand->second.real <= 0 || hand->second.cpu <= 0) continue;
      const times& h = hand->second;
      const times& a = ad->second;
      const bool medians = a.median && h.median;
      if (!header) {
        std::fprintf(stderr, "\n%s <model>_ad / <model>_hand, time per step in the benchmarks' unit\n",
                     medians ? "medians of the repetitions:" : "single runs:");
        std::fprintf(stderr, "%-22s %12s %12s %8s   %12s %12s %8s   %s\n", "model/args", "hand real", "ad real",
                     "ad/hand", "hand cpu", "ad cpu", "ad/hand", "ad/hand of the min cpu");
        header = true;
      }
      std::fprintf(stderr, "%-22s %12.1f %12.1f %8.3f   %12.1f %12.1f %8.3f", args.c_str(), h.real, a.real,
                   a.real / h.real, h.cpu, a.cpu, a.cpu / h.cpu);
      if (h.min_cpu > 0 && a.min_cpu > 0) std::fprintf(stderr, "   %8.3f", a.min_cpu / h.min_cpu);
      std::fprintf(stderr, "\n");
    }
  }

 private:
  struct times {
    double real = 0, cpu = 0, min_cpu = 0;
    bool median = false;
  };
  std::map<std::string, std::map<std::string, times>> times_;
};

// ------------------------------------------------------------------ paired mode

double thread_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

/// `--paired[=N]`: alternates one hand-written step and one AD step, N pairs per size (scaled
/// down for the large ones), timing each by this thread's CPU time, and prints the medians.
/// Both variants then see the same machine at the same moments, which a shared machine's drift
/// (other builds, other benchmarks) does not grant consecutive Google Benchmark runs.
int run_paired(int pairs) {
  std::printf("paired steps, thread CPU time, medians (and minima) per step\n");
  std::printf("%-16s %6s %12s %12s %8s %8s\n", "layers/width/N", "pairs", "hand us", "ad us", "ad/hand", "(min)");
  for (const mlp_size& s : sizes) {
    verify_once(s);
    hand_mlp hand(make_data(s));
    ad_mlp ad(make_data(s));
    const double work = static_cast<double>(s.layers) * s.width * s.width * s.batch;
    const int n = std::clamp(static_cast<int>(pairs * (16.0 * 256 * 256 * 64) / work), 5, pairs);
    std::vector<double> th, ta;
    for (int i = 0; i < 3; ++i) {
      hand.step();
      ad.zero_grad();
      ad.step();
    }
    for (int i = 0; i < n; ++i) {
      const double t0 = thread_cpu_seconds();
      benchmark::DoNotOptimize(hand.step());
      const double t1 = thread_cpu_seconds();
      ad.zero_grad();
      benchmark::DoNotOptimize(ad.step());
      const double t2 = thread_cpu_seconds();
      th.push_back(t1 - t0);
      ta.push_back(t2 - t1);
    }
    auto median = [](std::vector<double> v) {
      std::nth_element(v.begin(), v.begin() + static_cast<long>(v.size() / 2), v.end());
      return v[v.size() / 2];
    };
    const double mh = median(th), ma = median(ta);
    const double nh = *std::min_element(th.begin(), th.end()), na = *std::min_element(ta.begin(), ta.end());
    std::printf("%-16s %6d %12.1f %12.1f %8.3f %8.3f\n", s.args().c_str(), n, mh * 1e6, ma * 1e6, ma / mh, na / nh);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--paired") return run_paired(200);
    if (a.starts_with("--paired=")) return run_paired(std::max(1, std::atoi(argv[i] + 9)));
  }
  // The ratio table rides on the console output; other formats (json, csv) stay untouched.
  bool console = true;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a.starts_with("--benchmark_format=") && a != "--benchmark_format=console") console = false;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  // Where the products go: BLAS, or Eigen when OpenBLAS runs an old-core kernel on this
  // processor (see backend/cpu/cpu.hpp; CKPT_GEMM=blas|eigen overrides).
  benchmark::AddCustomContext("gemm", gemm_backend::gemm_engine());
#if defined(CKPT_USE_BLAS)
  if (openblas_get_corename != nullptr) benchmark::AddCustomContext("openblas_core", openblas_get_corename());
  const char* threads = std::getenv("OPENBLAS_NUM_THREADS");
  benchmark::AddCustomContext("OPENBLAS_NUM_THREADS", threads ? threads : "(unset)");
#endif
  register_all();
  if (console) {
    ratio_reporter reporter(isatty(STDOUT_FILENO) ? benchmark::ConsoleReporter::OO_Color
                                                  : benchmark::ConsoleReporter::OO_None);
    benchmark::RunSpecifiedBenchmarks(&reporter);
  } else {
    benchmark::RunSpecifiedBenchmarks();
  }
  benchmark::Shutdown();
  return 0;
}
