// Every differentiable op against a reference forward value and against central finite
// differences in double, on random shapes and values including batch 1 (cols = 1) and width 1
// (rows = 1). Also: parameters as operands, the GEMM count of products with constant or frozen
// operands, dropout's counter-based mask, and a float instantiation of every op.
#include "support/backend_checks.hpp"

#include <array>
#include <cmath>
#include <functional>
#include <limits>
#include <numbers>
#include <random>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

using namespace ckpt;
using ckpt::test::close_rel;
using ckpt::test::expect_close;
using ckpt::test::expect_grad;
using ckpt::test::expect_op;
using ckpt::test::expect_value;
using ckpt::test::Mat;
using ckpt::test::numeric_grad;
using ckpt::test::program;
using ckpt::test::random_away_from_zero;
using ckpt::test::random_matrix;
using ckpt::test::same_bits;
using ckpt::test::test_shapes;

using V = Var<double>;
using Vs = std::span<const V>;

namespace {

Mat scalar_mat(double x) {
  Mat m(1, 1);
  m(0, 0) = x;
  return m;
}

/// m repeated to the broadcast shape `out`.
Mat bcast(const Mat& m, shape out) {
  return m.replicate(out.rows / static_cast<int>(m.rows()), out.cols / static_cast<int>(m.cols()));
}

Mat random_in(shape s, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  return random_matrix(s.rows, s.cols, seed, lo, hi);
}

std::vector<int> random_labels(int classes, int count, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int> d(0, classes - 1);
  std::vector<int> labels(static_cast<std::size_t>(count));
  for (int& l : labels) l = d(gen);
  return labels;
}

Mat softmax_ref(const Mat& x) {
  Mat y(x.rows(), x.cols());
  for (int j = 0; j < x.cols(); ++j) {
    const Eigen::VectorXd e = (x.col(j).array() - x.col(j).maxCoeff()).exp().matrix();
    y.col(j) = e / e.sum();
  }
  return y;
}

Mat norm_ref(const Mat& x, const Mat& gain, const Mat* bias, double eps, bool centred) {
  Mat y(x.rows(), x.cols());
  for (int j = 0; j < x.cols(); ++j) {
    const double mu = centred ? x.col(j).mean() : 0.0;
    const Eigen::VectorXd d = x.col(j).array() - mu;
    const double var = d.squaredNorm() / static_cast<double>(x.rows());
    y.col(j) = gain.cwiseProduct(d / std::sqrt(var + eps));
    if (bias) y.col(j) += *bias;
  }
  return y;
}

double cross_entropy_ref(const Mat& x, const std::vector<int>& labels) {
  double total = 0;
  for (int j = 0; j < x.cols(); ++j) {
    const double mx = x.col(j).maxCoeff();
    total += mx + std::log((x.col(j).array() - mx).exp().sum()) - x(labels[static_cast<std::size_t>(j)], j);
  }
  return total / static_cast<double>(x.cols());
}

/// The four elementwise binary ops, by index, as a program and as a reference.
program binary_program(int op) {
  switch (op) {
    case 0: return [](Tape<double>&, Vs v) -> V { return v[0] + v[1]; };
    case 1: return [](Tape<double>&, Vs v) -> V { return v[0] - v[1]; };
    case 2: return [](Tape<double>&, Vs v) -> V { return v[0] * v[1]; };
    default: return [](Tape<double>&, Vs v) -> V { return v[0] / v[1]; };
  }
}
Mat binary_ref(int op, const Mat& a, const Mat& b) {
  switch (op) {
    case 0: return a + b;
    case 1: return a - b;
    case 2: return a.cwiseProduct(b);
    default: return a.cwiseQuotient(b);
  }
}
const char* binary_name(int op) {
  static const char* names[] = {"+", "-", "*", "/"};
  return names[op];
}

}  // namespace

// ------------------------------------------------------------------ elementwise

TEST_CASE("elementwise: + - * / tensor with tensor") {
  std::uint64_t seed = 100;
  for (const shape s : test_shapes(1)) {
    CAPTURE(s);
    const Mat a = random_in(s, ++seed);
    const Mat b = random_in(s, ++seed);
    const Mat d = random_away_from_zero(s.rows, s.cols, ++seed, 0.5, 2.0);
    for (int op = 0; op < 4; ++op) {
      CAPTURE(binary_name(op));
      const Mat& rhs = op == 3 ? d : b;
      expect_op(binary_program(op), {a, rhs}, binary_ref(op, a, rhs));
    }
    // The same Var on both sides: both adjoint contributions land in one buffer.
    expect_op([](Tape<double>&, Vs v) -> V { return v[0] * v[0]; }, {a}, a.cwiseProduct(a));
    expect_op([](Tape<double>&, Vs v) -> V { return v[0] - v[0]; }, {a}, Mat::Zero(s.rows, s.cols));
  }
}

TEST_CASE("elementwise: tensor with scalar and scalar with tensor") {
  std::uint64_t seed = 200;
  for (const shape s : test_shapes(2)) {
    CAPTURE(s);
    const Mat a = random_in(s, ++seed);
    const Mat d = random_away_from_zero(s.rows, s.cols, ++seed, 0.5, 2.0);
    const auto A = a.array();
    const auto D = d.array();
    expect_op([](Tape<double>&, Vs v) -> V { return v[0] + 2.5; }, {a}, (A + 2.5).matrix());
    expect_op([](Tape<double>&, Vs v) -> V { return v[0] - 1.5; }, {a}, (A - 1.5).matrix());
    expect_op([](Tape<double>&, Vs v) -> V { return v[0] * -3.0; }, {a}, (A * -3.0).matrix());
    expect_op([](Tape<double>&, Vs v) -> V { return v[0] / 1.7; }, {a}, (A / 1.7).matrix());
    expect_op([](Tape<double>&, Vs v) -> V { return 2.5 + v[0]; }, {a}, (2.5 + A).matrix());
    expect_op([](Tape<double>&, Vs v) -> V { return 1.5 - v[0]; }, {a}, (1.5 - A).matrix());
    expect_op([](Tape<double>&, Vs v) -> V { return -3.0 * v[0]; }, {a}, (-3.0 * A).matrix());
    expect_op([](Tape<double>&, Vs v) -> V { return 1.7 / v[0]; }, {d}, (1.7 / D).matrix());
    // Integer and float scalars convert to the tape's type.
    expect_op([](Tape<double>&, Vs v) -> V { return 2 * v[0]; }, {a}, (2.0 * A).matrix());
    expect_op([](Tape<double>&, Vs v) -> V { return v[0] / 4; }, {a}, (A / 4.0).matrix());
    expect_op([](Tape<double>&, Vs v) -> V { return v[0] * 0.5f; }, {a}, (A * 0.5).matrix());
  }
}

TEST_CASE("elementwise: unary minus") {
  std::uint64_t seed = 300;
  for (const shape s : test_shapes(3)) {
    CAPTURE(s);
    const Mat a = random_in(s, ++seed);
    expect_op([](Tape<double>&, Vs v) -> V { return -v[0]; }, {a}, -a);
    expect_op([](Tape<double>&, Vs v) -> V { return -(v[0] * 2.0) + v[0]; }, {a}, -a);
  }
}

TEST_CASE("elementwise: 2-D broadcasting (rows x 1 bias, 1 x cols, 1 x 1) for + - * /") {
  std::uint64_t seed = 400;
  for (const shape s : test_shapes(4)) {
    const int r = s.rows, c = s.cols;
    const std::vector<std::pair<shape, shape>> pairs = {
        {{r, c}, {r, 1}}, {{r, 1}, {r, c}}, {{r, c}, {1, c}}, {{1, c}, {r, c}},
        {{r, 1}, {1, c}}, {{1, c}, {r, 1}}, {{r, c}, {1, 1}}, {{1, 1}, {r, c}},
    };
    for (const auto& pair : pairs) {
      const shape sa = pair.first, sb = pair.second;  // not a structured binding: clang 14 cannot capture those
      CAPTURE(sa);
      CAPTURE(sb);
      const shape out{std::max(sa.rows, sb.rows), std::max(sa.cols, sb.cols)};
      const Mat a = random_in(sa, ++seed);
      const Mat b = random_in(sb, ++seed);
      const Mat d = random_away_from_zero(sb.rows, sb.cols, ++seed, 0.5, 2.0);
      for (int op = 0; op < 4; ++op) {
        CAPTURE(binary_name(op));
        const Mat& rhs = op == 3 ? d : b;
        expect_op(binary_program(op), {a, rhs}, binary_ref(op, bcast(a, out), bcast(rhs, out)));
      }
    }
    // Broadcasts nested inside a larger fused expression: the inner node is r x 1 or 1 x c,
    // the outer one r x c.
    const Mat col = random_in({r, 1}, ++seed), row = random_in({1, c}, ++seed), full = random_in(s, ++seed);
    const Mat outer = bcast(col, s) + bcast(row, s);
    expect_op([](Tape<double>&, Vs v) -> V { return (v[0] + v[1]) * v[2]; }, {col, row, full},
              outer.cwiseProduct(full));
    expect_op([](Tape<double>&, Vs v) -> V { return tanh(v[0] * v[1]) - v[0]; }, {col, full},
              (bcast(col, s).cwiseProduct(full).array().tanh() - bcast(col, s).array()).matrix());
    expect_op([](Tape<double>&, Vs v) -> V { return v[2] + (v[0] * 2.0 + v[1]); }, {col, col, full},
              full + bcast(3.0 * col, s));
  }
}

TEST_CASE("elementwise: activations, exp, log, sqrt, square, pow") {
  using std::numbers::pi;
  struct unary_case {
    const char* name;
    program f;
    std::function<Mat(const Mat&)> ref;
    int domain;  // 0: [-2, 2); 1: magnitude in [0.2, 2), random sign; 2: [0.5, 2)
  };
  const std::vector<unary_case> cases = {
      {"relu", [](Tape<double>&, Vs v) -> V { return relu(v[0]); }, [](const Mat& x) -> Mat { return x.cwiseMax(0.0); }, 1},
      {"gelu", [](Tape<double>&, Vs v) -> V { return gelu(v[0]); },
       [](const Mat& x) -> Mat {
         const auto X = x.array();
         return (0.5 * X * (1.0 + (std::sqrt(2.0 / pi) * (X + 0.044715 * X.cube())).tanh())).matrix();
       },
       0},
      {"gelu_erf", [](Tape<double>&, Vs v) -> V { return gelu_erf(v[0]); },
       [](const Mat& x) -> Mat { return x.unaryExpr([](double t) { return 0.5 * t * (1.0 + std::erf(t / std::sqrt(2.0))); }); }, 0},
      {"silu", [](Tape<double>&, Vs v) -> V { return silu(v[0]); },
       [](const Mat& x) -> Mat { return (x.array() / (1.0 + (-x.array()).exp())).matrix(); }, 0},
      {"sigmoid", [](Tape<double>&, Vs v) -> V { return sigmoid(v[0]); },
       [](const Mat& x) -> Mat { return (1.0 / (1.0 + (-x.array()).exp())).matrix(); }, 0},
      {"tanh", [](Tape<double>&, Vs v) -> V { return tanh(v[0]); }, [](const Mat& x) -> Mat { return x.array().tanh().matrix(); }, 0},
      {"exp", [](Tape<double>&, Vs v) -> V { return exp(v[0]); }, [](const Mat& x) -> Mat { return x.array().exp().matrix(); }, 0},
      {"log", [](Tape<double>&, Vs v) -> V { return log(v[0]); }, [](const Mat& x) -> Mat { return x.array().log().matrix(); }, 2},
      {"sqrt", [](Tape<double>&, Vs v) -> V { return sqrt(v[0]); }, [](const Mat& x) -> Mat { return x.array().sqrt().matrix(); }, 2},
      {"square", [](Tape<double>&, Vs v) -> V { return square(v[0]); }, [](const Mat& x) -> Mat { return x.array().square().matrix(); }, 0},
      {"pow 3", [](Tape<double>&, Vs v) -> V { return pow(v[0], 3); }, [](const Mat& x) -> Mat { return x.array().pow(3.0).matrix(); }, 0},
      {"pow 2.5", [](Tape<double>&, Vs v) -> V { return pow(v[0], 2.5); }, [](const Mat& x) -> Mat { return x.array().pow(2.5).matrix(); }, 2},
      {"pow -1.5", [](Tape<double>&, Vs v) -> V { return pow(v[0], -1.5); }, [](const Mat& x) -> Mat { return x.array().pow(-1.5).matrix(); }, 2},
      {"pow 0.5 of an expression", [](Tape<double>&, Vs v) -> V { return pow(v[0] * 2.0, 0.5); },
       [](const Mat& x) -> Mat { return (2.0 * x.array()).sqrt().matrix(); }, 2},
  };
  std::uint64_t seed = 500;
  for (const shape s : test_shapes(5)) {
    CAPTURE(s);
    for (const auto& c : cases) {
      CAPTURE(c.name);
      ++seed;
      const Mat x = c.domain == 0   ? random_in(s, seed, -2.0, 2.0)
                    : c.domain == 1 ? random_away_from_zero(s.rows, s.cols, seed, 0.2, 2.0)
                                    : random_in(s, seed, 0.5, 2.0);
      expect_op(c.f, {x}, c.ref(x));
    }
  }
}

TEST_CASE("elementwise: a fused expression that uses the same leaf twice is one entry") {
  std::uint64_t seed = 600;
  for (const shape s : test_shapes(6)) {
    CAPTURE(s);
    const Mat x = random_in(s, ++seed, -2.0, 2.0);
    const Mat y = random_away_from_zero(s.rows, s.cols, ++seed, 0.5, 2.0);
    const auto X = x.array(), Y = y.array();
    expect_op([](Tape<double>&, Vs v) -> V { return v[0] * sigmoid(v[0]); }, {x}, (X / (1.0 + (-X).exp())).matrix());
    expect_op([](Tape<double>&, Vs v) -> V { return (v[0] + v[1]) * (v[0] - v[1]) / exp(v[0]) + square(v[1]) / v[1]; }, {x, y},
              ((X + Y) * (X - Y) / X.exp() + Y).matrix());
    expect_op([](Tape<double>&, Vs v) -> V { return relu(v[0] + v[1]) * sigmoid(v[0]); }, {x, y},
              ((X + Y).max(0.0) / (1.0 + (-X).exp())).matrix(), 1e-5);

    // One entry and one new node for the whole tree (no temporaries on the tape).
    Tape<double> tape;
    const V a = tape.variable(x), b = tape.variable(y);
    const std::size_t entries = tape.entry_count(), nodes = tape.node_count();
    V z = a * sigmoid(a) + exp(b) * (a - b) / b;
    CHECK(tape.entry_count() == entries + 1);
    CHECK(tape.node_count() == nodes + 1);
    CHECK(std::string(tape.node(z.index()).op) == "add");
    CHECK(tape.node(z.index()).kind == op_kind::elementwise);
  }
}

// ------------------------------------------------------------------ temporaries

TEST_CASE("temporaries: a product passed to relu(. + b) as a temporary is freed; the tape holds one buffer a layer") {
  // h <- act(W_i h + b_i), 6 layers of 8 x 8 over a batch of 8 (512-byte buffers, no rounding).
  constexpr int w = 8, n = 8, layers = 6;
  constexpr std::size_t buffer = w * n * sizeof(double);
  std::vector<Parameter<double>> W, b;
  for (int i = 0; i < layers; ++i) {
    W.emplace_back(random_matrix(w, w, 2000 + static_cast<std::uint64_t>(i), -0.6, 0.6));
    b.emplace_back(random_matrix(w, 1, 2100 + static_cast<std::uint64_t>(i), -0.2, 0.2));
  }
  const Mat x0 = random_in({w, n}, 2200);
  struct figures {
    std::size_t bytes_after_forward, peak_forward;
    Mat loss, dx;
    std::vector<Mat> dW, db;
  };
  // `named`: the product is a named Var (kept, readable) instead of a temporary.
  auto run = [&](int act, bool named) {
    for (auto& p : W) p.zero_grad();
    for (auto& p : b) p.zero_grad();
    Tape<double> t;
    const V x = t.variable(x0);
    V h = x;
    for (int i = 0; i < layers; ++i) {
      if (named) {
        const V z = matmul(W[i], h);
        h = act == 0 ? V(relu(z + b[i])) : act == 1 ? V(tanh(z + b[i])) : V(sigmoid(z + b[i]));
        CHECK(z.value().allFinite());  // still readable
      } else {
        h = act == 0 ? V(relu(matmul(W[i], h) + b[i])) : act == 1 ? V(tanh(matmul(W[i], h) + b[i])) : V(sigmoid(matmul(W[i], h) + b[i]));
      }
    }
    figures f{t.bytes(), t.peak_bytes(), {}, {}, {}, {}};
    const V loss = sum(h * h);
    t.backward(loss);
    f.loss = loss.value();
    f.dx = t.grad(x);
    for (auto& p : W) f.dW.push_back(p.grad());
    for (auto& p : b) f.db.push_back(p.grad());
    return f;
  };
  for (int act = 0; act < 3; ++act) {
    CAPTURE(act);
    const figures temp = run(act, false), named = run(act, true);
    // x and one output a layer; a product lives only until its layer's expression is computed.
    CHECK(temp.bytes_after_forward == (1 + layers) * buffer);
    CHECK(temp.peak_forward == (2 + layers) * buffer);
    CHECK(named.bytes_after_forward == (1 + 2 * layers) * buffer);
    // Freeing changes no arithmetic: the gradients are the same bits.
    CHECK(same_bits(temp.loss, named.loss));
    CHECK(same_bits(temp.dx, named.dx));
    for (int i = 0; i < layers; ++i) {
      CHECK(same_bits(temp.dW[i], named.dW[i]));
      CHECK(same_bits(temp.db[i], named.db[i]));
    }
  }
}

TEST_CASE("temporaries: gradients against finite differences where they are freed and where they are kept") {
  std::uint64_t seed = 2300;
  for (const shape s : test_shapes(23)) {
    CAPTURE(s);
    const Mat W = random_in({s.rows, s.rows}, ++seed), x = random_in(s, ++seed), bias = random_in({s.rows, 1}, ++seed);
    // Freed: the reverse reads only the output (relu, tanh, sigmoid, exp, sqrt over a sum) or
    // nothing (a sum, a scaled difference).
    expect_grad([](Tape<double>&, Vs v) -> V { return relu(matmul(v[0], v[1]) + v[2]); }, {W, x, bias}, 1e-5);
    expect_grad([](Tape<double>&, Vs v) -> V { return tanh(matmul(v[0], v[1]) - v[2] * 2.0); }, {W, x, bias});
    expect_grad([](Tape<double>&, Vs v) -> V { return sigmoid((matmul(v[0], v[1]) + v[2]) * -1.0); }, {W, x, bias});
    // Kept: neg is a unary function, whose rule reads its argument.
    expect_grad([](Tape<double>&, Vs v) -> V { return sigmoid(-(matmul(v[0], v[1]) + v[2])); }, {W, x, bias});
    expect_grad([](Tape<double>&, Vs v) -> V { return exp(0.5 * matmul(v[0], v[1]) + v[2]); }, {W, x, bias});
    expect_grad([](Tape<double>&, Vs v) -> V { return sqrt(matmul(v[0], v[1]) + 6.0); }, {W, x, bias});
    expect_grad([](Tape<double>&, Vs v) -> V { return v[1] + matmul(v[0], v[1]) / 3.0; }, {W, x, bias});
    // Kept: the reverse reads the product (x * sigmoid(x), a product of two temporaries; a
    // square under the root).
    expect_grad([](Tape<double>&, Vs v) -> V { return sqrt(square(v[2]) + 1.0 + square(matmul(v[0], v[1]))); }, {W, x, bias});
    expect_grad([](Tape<double>&, Vs v) -> V { return matmul(v[0], v[1]) * sigmoid(matmul(v[0], v[1])); }, {W, x, bias});
    // Kept: softmax's own reverse reads its output, so it is no temporary to free.
    expect_grad([](Tape<double>&, Vs v) -> V { return relu(softmax(matmul(v[0], v[1])) + v[2]); }, {W, x, bias}, 1e-5);
    // A product that goes into another product through an expression.
    expect_grad([](Tape<double>&, Vs v) -> V { return matmul(v[0], tanh(matmul(v[0], v[1]) + v[2])); }, {W, x, bias});
    // Kept: moved in, but another entry read it first (its reverse reads z: dW = g z^T).
    expect_grad(
        [](Tape<double>&, Vs v) -> V {
          V z = matmul(v[0], v[1]);
          const V a = matmul(v[0], z);
          return relu(std::move(z) + a);
        },
        {W, x, bias}, 1e-5);
    // Kept: an expression used before it is moved into its last use.
    expect_grad(
        [](Tape<double>&, Vs v) -> V {
          auto e = matmul(v[0], v[1]) + v[2];
          const V sq = square(e);
          const V th = tanh(std::move(e));
          return sq + th;
        },
        {W, x, bias});
    // Kept: a handle passed on by tag(), and a checkpoint's input (its re-trace reads it).
    expect_grad(
        [](Tape<double>&, Vs v) -> V {
          const V h = matmul(v[0], v[1]);
          const V y = relu(tag(h, "pre") + v[2]);
          return y + h * 2.0;
        },
        {W, x, bias}, 1e-5);
    expect_grad(
        [](Tape<double>&, Vs v) -> V {
          V h = matmul(v[0], v[1]);
          const V c = checkpoint("c", [](const V& u) -> V { return tanh(u); }, h);
          return relu(std::move(h) + c);
        },
        {W, x, bias}, 1e-5);
  }
}

TEST_CASE("temporaries: what stays and what is freed, and the error for a freed value") {
  Tape<double> t;
  const V W = t.variable(random_in({4, 4}, 2400)), x = t.variable(random_in({4, 3}, 2401));
  const V bias = t.variable(random_in({4, 1}, 2402));
  const std::size_t start = t.bytes();
  constexpr std::size_t buffer = 128;  // 4 x 3 doubles, rounded to 64 bytes

  SUBCASE("a product whose value the reverse reads stays") {
    const V y = matmul(W, x) * sigmoid(matmul(W, x));
    CHECK(t.bytes() == start + 3 * buffer);
    CHECK(y.value().allFinite());
  }
  SUBCASE("an expression used as an lvalue keeps its temporaries, also for a last use moved in") {
    auto e = matmul(W, x) + bias;
    const V a = relu(e);
    const V c = sigmoid(e);  // reads the product again
    CHECK(t.bytes() == start + 3 * buffer);
    const Mat z = (W.value() * x.value()).colwise() + bias.value().col(0);
    CHECK(close_rel(a.value(), z.cwiseMax(0.0), 1e-15));
    CHECK(close_rel(c.value(), (1.0 / (1.0 + (-z.array()).exp())).matrix(), 1e-15));
    const V d = tanh(std::move(e));  // not its only use: the product stays
    CHECK(t.bytes() == start + 4 * buffer);
    CHECK(close_rel(d.value(), z.array().tanh().matrix(), 1e-15));
    const V loss = sum(a + c + d);
    t.backward(loss);
    CHECK(t.grad(W).allFinite());
  }
  SUBCASE("an expression moved into its only use frees its product; a later use is an error") {
    auto e = matmul(W, x) + bias;
    const V d = tanh(std::move(e));
    CHECK(t.bytes() == start + buffer);
    const Mat z = (W.value() * x.value()).colwise() + bias.value().col(0);
    CHECK(close_rel(d.value(), z.array().tanh().matrix(), 1e-15));
    CHECK_THROWS_WITH_AS(V(square(e)), doctest::Contains("was freed once the expression it was passed to as a temporary"),
                         tape_error);
    CHECK_THROWS_WITH_AS((void)matmul(transpose(W), e), doctest::Contains("('matmul', 4x3) was freed"), tape_error);
  }
  SUBCASE("the steps of sequential() get copies of the caller's handle: no temporaries") {
    const V h = matmul(W, x);
    const V y = sequential<policy::none>(2, [&bias](std::size_t, V v) -> V { return relu(std::move(v) + bias); }, h);
    CHECK(h.value().allFinite());  // the caller's handle still reads
    CHECK(t.bytes() == start + 3 * buffer);  // h and the two steps' outputs (relu's own reverse reads its output)
    CHECK(y.value().allFinite());
  }
  SUBCASE("a stale expression is reported, not counted on another recording's nodes") {
    auto p = matmul(W, x) * 2.0;
    t.reset();
    CHECK_THROWS_WITH_AS(eval(p), doctest::Contains("finished recording"), tape_error);
    CHECK_THROWS_WITH_AS(eval(std::move(p)), doctest::Contains("finished recording"), tape_error);
  }
  SUBCASE("handles passed on by tag() and eval() are no temporaries") {
    const V h = matmul(W, x);
    const V y = relu(tag(h, "pre") + bias);
    const V k = relu(eval(h) + bias);
    CHECK(t.bytes() == start + 3 * buffer);
    CHECK(close_rel(y.value(), k.value(), 0.0));
    CHECK(h.value().allFinite());  // still readable
  }
  SUBCASE("softmax frees a temporary input (its reverse reads its output), keeps a named one") {
    const V p = softmax(matmul(W, x));
    CHECK(t.bytes() == start + buffer);
    const V z = matmul(W, x);
    const V q = log_softmax(z);
    CHECK(t.bytes() == start + 3 * buffer);
    CHECK(z.value().allFinite());
    t.backward(sum(p * q));
    CHECK(t.grad(W).allFinite());
  }
  SUBCASE("no gradient flows: the temporary goes as well") {
    const V k = t.constant(random_in({4, 4}, 2403)), u = t.constant(random_in({4, 3}, 2404));
    const std::size_t before = t.bytes();
    const V y = matmul(k, u) * 2.0;
    CHECK_FALSE(y.requires_grad());
    CHECK(t.bytes() == before + buffer);
  }
}

// ------------------------------------------------------------------ reductions and losses

TEST_CASE("reductions: sum, mean, mse, fused and broadcast operands") {
  std::uint64_t seed = 700;
  for (const shape s : test_shapes(7)) {
    CAPTURE(s);
    const Mat a = random_in(s, ++seed), b = random_in(s, ++seed), col = random_in({s.rows, 1}, ++seed);
    const double n = static_cast<double>(a.size());
    expect_op([](Tape<double>&, Vs v) -> V { return sum(v[0]); }, {a}, scalar_mat(a.sum()));
    expect_op([](Tape<double>&, Vs v) -> V { return mean(v[0]); }, {a}, scalar_mat(a.mean()));
    expect_op([](Tape<double>&, Vs v) -> V { return mse(v[0], v[1]); }, {a, b}, scalar_mat((a - b).squaredNorm() / n));
    const Mat r = random_away_from_zero(s.rows, s.cols, ++seed);
    expect_op([](Tape<double>&, Vs v) -> V { return mse(relu(v[0]), v[1] * 2.0); }, {r, b},
              scalar_mat((r.cwiseMax(0.0) - 2.0 * b).squaredNorm() / n));
    expect_op([](Tape<double>&, Vs v) -> V { return sum(square(v[0] - v[1])); }, {a, b}, scalar_mat((a - b).squaredNorm()));
    expect_op([](Tape<double>&, Vs v) -> V { return mean(v[0] * v[1]); }, {a, col}, scalar_mat(a.cwiseProduct(bcast(col, s)).mean()));
    expect_op([](Tape<double>&, Vs v) -> V { return sum(v[1] - v[0]); }, {a, col}, scalar_mat((bcast(col, s) - a).sum()));
    // mse with a constant target: only the prediction gets a gradient.
    expect_grad([b](Tape<double>& t, Vs v) -> V { return mse(v[0], t.constant(b)); }, {a});
  }
}

TEST_CASE("reductions: a float sum over a million elements is correctly rounded from double, whatever the layout") {
  // One float accumulator would be off by about 1e-4 relative here (the terms are all positive
  // and small against the total); the reductions accumulate in double.
  const shape s{1000, 1000};
  Eigen::MatrixXf a(s.rows, s.cols);
  std::mt19937 gen(5);
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  for (long i = 0; i < a.size(); ++i) a(i) = u(gen);
  const Eigen::MatrixXf col = Eigen::MatrixXf::Constant(s.rows, 1, 0.25f);
  double exact = 0, exact_b = 0;
  for (long i = 0; i < a.size(); ++i) {
    exact += static_cast<double>(a(i));
    exact_b += static_cast<double>(a(i) + 0.25f);  // the fused expression's terms, in float
  }
  Tape<float> t;
  const Var<float> x = t.variable(a), c = t.constant(col);
  const float got = sum(x).item(), got_mean = mean(x).item(), got_b = sum(x + c).item();  // the last: broadcast, strided
  CHECK(got == static_cast<float>(exact));
  CHECK(got_mean == static_cast<float>(exact / static_cast<double>(a.size())));
  CHECK(got_b == static_cast<float>(exact_b));
  // A plain float loop is far off, so the checks above can tell the two apart.
  float naive = 0;
  for (long i = 0; i < a.size(); ++i) naive += a(i);
  CHECK(std::abs(static_cast<double>(naive) - exact) / exact > 1e-6);
}

TEST_CASE("float gradients and column sums do not drift with the length of the sum") {
  // A broadcast operand's gradient, a bias's over the batch, softmax and norms over long
  // columns: within 1e-6 of double over 2^16 to 2^18 terms (see check_long_sums).
  ckpt::test::check_long_sums<backend::cpu>(1 << 18);
}

TEST_CASE("a 1 x cols or 1 x 1 operand's gradient adds in the order of detail/accumulate.hpp") {
  // Row r into partial sum r mod 8, the eight in order. The CPU's add_broadcast_sums takes a
  // column's terms through a buffer in blocks of detail::term_block (256) rows: lengths around
  // the lanes and the blocks. In double, so that another order shows in the last bits.
  for (const int rows : {2, 7, 9, 255, 256, 257, 1031}) {
    CAPTURE(rows);
    const Eigen::MatrixXd x = Eigen::MatrixXd::Random(rows, 3);
    Tape<double> t;
    const Var<double> xv = t.variable(x), s = t.variable(Eigen::MatrixXd::Ones(1, 3));
    t.backward(sum(xv * s));  // each share is g * x = x exactly
    const Eigen::MatrixXd ds = t.grad(s);
    for (int c = 0; c < 3; ++c) {
      double part[8] = {};
      for (int r = 0; r < rows; ++r) part[r % 8] += x(r, c);
      double total = 0;
      for (const double p : part) total += p;
      CHECK(ds(0, c) == total);
    }
    // A 1 x 1 operand: element r + c rows into partial sum (r + c rows) mod 8, across columns.
    Tape<double> t1;
    const Var<double> x1 = t1.variable(x), one = t1.variable(Eigen::MatrixXd::Ones(1, 1));
    t1.backward(sum(x1 * one));
    double part[8] = {};
    for (long i = 0; i < x.size(); ++i) part[i % 8] += x(i);
    double total = 0;
    for (const double p : part) total += p;
    CHECK(t1.grad(one)(0, 0) == total);
  }
}

TEST_CASE("rowwise: softmax and log_softmax along the features") {
  std::uint64_t seed = 800;
  for (const shape s : test_shapes(8)) {
    CAPTURE(s);
    const Mat x = random_in(s, ++seed, -3.0, 3.0);
    const Mat sm = softmax_ref(x);
    expect_op([](Tape<double>&, Vs v) -> V { return softmax(v[0]); }, {x}, sm);
    expect_op([](Tape<double>&, Vs v) -> V { return log_softmax(v[0]); }, {x}, sm.array().log().matrix());
    // On an expression operand (recorded first), and stable for large logits.
    expect_op([](Tape<double>&, Vs v) -> V { return softmax(v[0] * 2.0); }, {x}, softmax_ref(2.0 * x));
    const Mat big = (x.array() + 1000.0).matrix();
    expect_op([](Tape<double>&, Vs v) -> V { return log_softmax(v[0]); }, {big}, sm.array().log().matrix(), 1e-5);
  }
}

TEST_CASE("rowwise: layer_norm with gain and bias as inputs, rms_norm") {
  std::uint64_t seed = 900;
  for (const shape s : test_shapes(9)) {
    CAPTURE(s);
    const Mat x = random_in(s, ++seed, -2.0, 2.0);
    const Mat g = random_in({s.rows, 1}, ++seed, 0.5, 1.5);
    const Mat b = random_in({s.rows, 1}, ++seed);
    expect_op([](Tape<double>&, Vs v) -> V { return layer_norm(v[0], v[1], v[2]); }, {x, g, b}, norm_ref(x, g, &b, 1e-5, true));
    expect_op([](Tape<double>&, Vs v) -> V { return layer_norm(v[0], v[1], v[2], 0.25); }, {x, g, b}, norm_ref(x, g, &b, 0.25, true));
    expect_op([](Tape<double>&, Vs v) -> V { return rms_norm(v[0], v[1]); }, {x, g}, norm_ref(x, g, nullptr, 1e-6, false));
    expect_op([](Tape<double>&, Vs v) -> V { return rms_norm(v[0], v[1], 0.5); }, {x, g}, norm_ref(x, g, nullptr, 0.5, false));
    // Expression operands; a constant gain and bias (only x gets a gradient).
    expect_op([](Tape<double>&, Vs v) -> V { return layer_norm(v[0] * v[0], v[1] + 1.0, v[2]); }, {x, g, b},
              norm_ref(x.cwiseProduct(x), (g.array() + 1.0).matrix(), &b, 1e-5, true));
    expect_grad([g, b](Tape<double>& t, Vs v) -> V { return layer_norm(v[0], t.constant(g), t.constant(b)); }, {x});
    expect_grad([x](Tape<double>& t, Vs v) -> V { return rms_norm(t.constant(x), v[0]); }, {g});
  }
}

TEST_CASE("loss: cross_entropy with integer labels") {
  std::uint64_t seed = 1000;
  for (const shape s : test_shapes(10)) {
    CAPTURE(s);
    const Mat x = random_in(s, ++seed, -3.0, 3.0);
    const std::vector<int> labels = random_labels(s.rows, s.cols, ++seed);
    expect_op([labels](Tape<double>&, Vs v) -> V { return cross_entropy(v[0], labels); }, {x}, scalar_mat(cross_entropy_ref(x, labels)));
    expect_op([labels](Tape<double>&, Vs v) -> V { return cross_entropy(v[0] * 3.0 + 2.0, std::span<const int>(labels)); }, {x},
              scalar_mat(cross_entropy_ref((3.0 * x.array() + 2.0).matrix(), labels)));
  }
  // What the reverse keeps (the labels, each column's maximum and sum of exps: 3 x cols) is
  // a node only when there is a reverse; for a constant it is a temporary, given back.
  const Mat x = random_in({7, 40}, 1099);
  const std::vector<int> labels = random_labels(7, 40, 1098);
  Tape<double> t;
  const V c = t.constant(x), v = t.variable(x);
  // (A 1x1 value takes the pool's 64-byte alignment; 3 x 40 doubles are 15 x 64 bytes.)
  const std::size_t inputs = t.bytes(), scalar = 64, kept = Tape<double>::bytes_of({3, 40});
  const V lc = cross_entropy(c, labels);
  CHECK(t.bytes() == inputs + scalar);
  const V lv = cross_entropy(v, labels);
  CHECK(t.bytes() == inputs + 2 * scalar + kept);
  CHECK(same_bits(lc.value(), lv.value()));
  CHECK(std::abs(lv.item() - cross_entropy_ref(x, labels)) <= 1e-14);
}

TEST_CASE("layer_norm, rms_norm and gather_cols keep what their reverse reads only when there is a reverse") {
  // Statistics (2 x cols) and gather_cols' index are nodes of the tape when the op records a
  // reverse; on constants they are pool temporaries, given back: only the output stays.
  const Mat x = random_in({8, 16}, 1090), g = random_in({8, 1}, 1091, 0.5, 1.5), b = random_in({8, 1}, 1092);
  const std::vector<int> ids = {3, 0, 3, 15, 7, 7, 1, 2};
  Tape<double> t;
  const V c = t.constant(x), cg = t.constant(g), cb = t.constant(b), v = t.variable(x);
  // (8 x 16 doubles are 16 x 64 bytes and 2 x 16 are 4 x 64: no rounding to the pool's 64.)
  const std::size_t out = Tape<double>::bytes_of({8, 16}), stats = Tape<double>::bytes_of({2, 16});
  const std::size_t gathered = Tape<double>::bytes_of({8, 8});
  auto check_op = [&](const char* what, std::size_t bytes, std::size_t kept, auto op) {
    CAPTURE(what);
    const std::size_t nodes = t.node_count(), before = t.bytes();
    const V on_constant = op(c);
    CHECK(t.node_count() == nodes + 1);
    CHECK(t.bytes() == before + bytes);
    const V on_variable = op(v);
    CHECK(t.node_count() == nodes + 3);
    CHECK(t.bytes() >= before + 2 * bytes + kept);
    CHECK(same_bits(on_constant.value(), on_variable.value()));
  };
  check_op("layer_norm", out, stats, [&](const V& a) { return layer_norm(a, cg, cb); });
  check_op("rms_norm", out, stats, [&](const V& a) { return rms_norm(a, cg); });
  check_op("gather_cols", gathered, 1, [&](const V& a) { return gather_cols(a, ids); });
  // And the reverse still reads them: gradients against finite differences.
  expect_grad([&](Tape<double>& tt, Vs vs) -> V { return layer_norm(vs[0], tt.constant(g), tt.constant(b)); }, {x});
  expect_grad([&](Tape<double>&, Vs vs) -> V { return gather_cols(vs[0], ids); }, {x});
}

// ------------------------------------------------------------------ products and layout

TEST_CASE("matmul: all four transpose combinations") {
  std::mt19937_64 gen(11);
  std::uniform_int_distribution<int> d(2, 5);
  const int m0 = d(gen), k0 = d(gen), n0 = d(gen);
  const std::vector<std::array<int, 3>> dims = {{m0, k0, n0}, {m0, k0, 1}, {1, k0, n0}, {m0, 1, n0}, {1, 1, 1}, {1, k0, 1}};
  std::uint64_t seed = 1100;
  for (const auto& mkn : dims) {
    const int m = mkn[0], k = mkn[1], n = mkn[2];
    CAPTURE(m);
    CAPTURE(k);
    CAPTURE(n);
    const Mat a = random_in({m, k}, ++seed), b = random_in({k, n}, ++seed);
    const Mat at = a.transpose(), bt = b.transpose();
    const Mat ab = a * b;
    expect_op([](Tape<double>&, Vs v) -> V { return matmul(v[0], v[1]); }, {a, b}, ab);
    expect_op([](Tape<double>&, Vs v) -> V { return matmul(transpose(v[0]), v[1]); }, {at, b}, ab);
    expect_op([](Tape<double>&, Vs v) -> V { return matmul(v[0], transpose(v[1])); }, {a, bt}, ab);
    expect_op([](Tape<double>&, Vs v) -> V { return matmul(transpose(v[0]), transpose(v[1])); }, {at, bt}, ab);
    // Expression operands (recorded first), transposed or not; the same Var on both sides.
    expect_op([](Tape<double>&, Vs v) -> V { return matmul(v[0] * 2.0, transpose(v[1] - 1.0)); }, {a, bt},
              2.0 * a * (b.array() - 1.0).matrix());
    expect_op([](Tape<double>&, Vs v) -> V { return matmul(v[0], transpose(v[0])); }, {a}, a * at);
    expect_op([](Tape<double>&, Vs v) -> V { return matmul(transpose(v[0]), v[0]); }, {a}, at * a);
  }
}

TEST_CASE("layout: standalone transpose") {
  std::uint64_t seed = 1200;
  for (const shape s : test_shapes(12)) {
    CAPTURE(s);
    const Mat x = random_in(s, ++seed), y = random_in({s.cols, s.rows}, ++seed);
    const Mat xt = x.transpose();
    expect_op([](Tape<double>&, Vs v) -> V {
      Var<double> t = transpose(v[0]);
      return t;
    }, {x}, xt);
    expect_op([](Tape<double>&, Vs v) -> V {
      Var<double> t = transpose(v[0]);
      return t * v[1] + t;
    }, {x, y}, xt.cwiseProduct(y) + xt);
    expect_op([](Tape<double>&, Vs v) -> V { return eval(transpose(v[0])); }, {x}, xt);
    expect_op([](Tape<double>&, Vs v) -> V {
      Var<double> t = transpose(sigmoid(v[0]));
      return t;
    }, {x}, (1.0 / (1.0 + (-xt.array()).exp())).matrix());
    // A recorded transpose is a layout entry of its own, not an elementwise copy.
    Tape<double> tape;
    const V a = tape.variable(x);
    Var<double> t = transpose(a);
    CHECK(std::string(tape.node(t.index()).op) == "transpose");
    CHECK(t.dims() == shape{s.cols, s.rows});
  }
}

TEST_CASE("layout: slice_rows") {
  std::uint64_t seed = 1300;
  for (const shape s : test_shapes(13)) {
    CAPTURE(s);
    const Mat x = random_in(s, ++seed);
    std::vector<std::pair<int, int>> ranges = {{0, s.rows}, {0, 1}, {s.rows - 1, 1}};
    if (s.rows >= 3) ranges.push_back({1, s.rows - 2});
    for (const auto& range : ranges) {
      const int begin = range.first, count = range.second;
      CAPTURE(begin);
      CAPTURE(count);
      expect_op([begin, count](Tape<double>&, Vs v) -> V { return slice_rows(v[0], begin, count); }, {x}, x.middleRows(begin, count));
      expect_op([begin, count](Tape<double>&, Vs v) -> V { return slice_rows(v[0] * v[0], begin, count) * 3.0; }, {x},
                3.0 * x.cwiseProduct(x).middleRows(begin, count));
    }
    // Two slices of one tensor: their adjoints add up in the source.
    if (s.rows >= 2) {
      const int h = s.rows / 2;
      expect_op([h](Tape<double>&, Vs v) -> V { return slice_rows(v[0], 0, h) * slice_rows(v[0], 1, h); }, {x},
                x.topRows(h).cwiseProduct(x.middleRows(1, h)));
    }
  }
}

TEST_CASE("layout: concat_rows") {
  std::uint64_t seed = 1400;
  for (const shape s : test_shapes(14)) {
    CAPTURE(s);
    const Mat a = random_in({s.rows, s.cols}, ++seed), b = random_in({1, s.cols}, ++seed), c = random_in({3, s.cols}, ++seed);
    Mat abc(a.rows() + b.rows() + c.rows(), s.cols);
    abc << a, b, c;
    Mat aa(2 * a.rows(), s.cols);
    aa << a, a;
    expect_op([](Tape<double>&, Vs v) -> V { return concat_rows({v[0], v[1], v[2]}); }, {a, b, c}, abc);
    expect_op([](Tape<double>&, Vs v) -> V { return concat_rows(std::vector<V>{v[0], v[0]}); }, {a}, aa);
    expect_op([](Tape<double>&, Vs v) -> V { return concat_rows(v.subspan(0, 1)); }, {a}, a);
    // A constant part gets no gradient; the variable parts still do.
    expect_op([c](Tape<double>& t, Vs v) -> V { return concat_rows({v[0], t.constant(c), v[1]}); }, {a, b},
              (Mat(abc.rows(), s.cols) << a, c, b).finished());
    // Slicing a concatenation back apart is the identity.
    expect_op([](Tape<double>&, Vs v) -> V { return slice_rows(concat_rows({v[0], v[1]}), v[0].rows(), 1); }, {a, b}, b);
  }
}

TEST_CASE("layout: slice_cols and concat_cols") {
  std::uint64_t seed = 1450;
  for (const shape s : test_shapes(145)) {
    CAPTURE(s);
    const Mat x = random_in(s, ++seed);
    std::vector<std::pair<int, int>> ranges = {{0, s.cols}, {0, 1}, {s.cols - 1, 1}};
    if (s.cols >= 3) ranges.push_back({1, s.cols - 2});
    for (const auto& range : ranges) {
      const int begin = range.first, count = range.second;
      CAPTURE(begin);
      CAPTURE(count);
      expect_op([begin, count](Tape<double>&, Vs v) -> V { return slice_cols(v[0], begin, count); }, {x}, x.middleCols(begin, count));
      expect_op([begin, count](Tape<double>&, Vs v) -> V { return slice_cols(exp(v[0]), begin, count) * 2.0; }, {x},
                2.0 * x.array().exp().matrix().middleCols(begin, count));
    }
    const Mat a = random_in({s.rows, s.cols}, ++seed), b = random_in({s.rows, 1}, ++seed), c = random_in({s.rows, 3}, ++seed);
    Mat abc(s.rows, a.cols() + b.cols() + c.cols());
    abc << a, b, c;
    Mat aa(s.rows, 2 * a.cols());
    aa << a, a;
    expect_op([](Tape<double>&, Vs v) -> V { return concat_cols({v[0], v[1], v[2]}); }, {a, b, c}, abc);
    expect_op([](Tape<double>&, Vs v) -> V { return concat_cols(std::vector<V>{v[0], v[0]}); }, {a}, aa);
    expect_op([c](Tape<double>& t, Vs v) -> V { return concat_cols({v[0], t.constant(c), v[1]}); }, {a, b},
              (Mat(s.rows, abc.cols()) << a, c, b).finished());
    // Each sequence of a batch through its own op, joined back: the adjoints land per column.
    expect_op([](Tape<double>&, Vs v) -> V {
      std::vector<V> cols;
      for (int j = 0; j < v[0].cols(); ++j) cols.push_back(slice_cols(v[0], j, 1) * static_cast<double>(j + 1));
      return concat_cols(cols);
    }, {a}, a * Eigen::VectorXd::LinSpaced(s.cols, 1.0, static_cast<double>(s.cols)).asDiagonal());
  }
}

TEST_CASE("layout: gather_cols (embedding lookup), repeated and missing ids") {
  std::uint64_t seed = 1480;
  for (const shape s : test_shapes(148)) {
    CAPTURE(s);
    const Mat x = random_in(s, ++seed);
    // More ids than columns, so that ids repeat; some columns of x are never taken.
    const std::vector<int> ids = random_labels(s.cols, 2 * s.cols + 1, ++seed);
    Mat want(s.rows, static_cast<int>(ids.size()));
    for (std::size_t j = 0; j < ids.size(); ++j) want.col(static_cast<int>(j)) = x.col(ids[j]);
    expect_op([ids](Tape<double>&, Vs v) -> V { return gather_cols(v[0], ids); }, {x}, want);
    expect_op([ids](Tape<double>&, Vs v) -> V { return gather_cols(tanh(v[0]) * 2.0, std::span<const int>(ids)); }, {x},
              2.0 * want.array().tanh().matrix());
    expect_op([](Tape<double>&, Vs v) -> V { return gather_cols(v[0], {0}); }, {x}, x.col(0));
  }
}

TEST_CASE("layout: gather_cols with no ids gives a rows x 0 tensor, with and without a reverse") {
  Tape<double> tape;
  const V x = tape.variable(random_matrix(3, 4, 1));
  const V none = gather_cols(x, std::span<const int>());
  const V from_constant = gather_cols(tape.constant(random_matrix(3, 4, 2)), std::span<const int>());  // no reverse: an empty index
  CHECK(none.rows() == 3);
  CHECK(none.cols() == 0);
  CHECK(from_constant.cols() == 0);
  tape.backward(sum(x) + sum(none) + sum(from_constant));
  CHECK(same_bits(tape.grad(x), Mat::Ones(3, 4).eval()));
}

TEST_CASE("layout: gather_cols adds a repeated column's adjoints in increasing j, in double for float") {
  // Column 1 is taken by every third output column of 3000, column 0 by the others, column 2
  // never. Its gradient must be the sum of the adjoints of the columns that took it, added in
  // increasing j in double and rounded once: here the adjoint of column j is w(:, j).
  auto check = [](auto zero) {
    using T = decltype(zero);
    using M = Eigen::Matrix<T, -1, -1>;
    const int n = 3000;
    std::vector<int> ids(static_cast<std::size_t>(n));
    for (int j = 0; j < n; ++j) ids[static_cast<std::size_t>(j)] = j % 3 == 0 ? 1 : 0;
    const M w = random_matrix(5, n, 7, 0.0, 1.0).cast<T>();
    Tape<T> tape;
    const Var<T> x = tape.variable(random_matrix(5, 3, 8).cast<T>());
    tape.backward(sum(gather_cols(x, ids) * tape.constant(w)));
    Eigen::MatrixXd total = Eigen::MatrixXd::Zero(5, 3);
    for (int j = 0; j < n; ++j) total.col(ids[static_cast<std::size_t>(j)]) += w.col(j).template cast<double>();
    const M want = total.cast<T>();
    CHECK(same_bits(tape.grad(x), want));
  };
  check(0.0);
  check(0.0f);
}

TEST_CASE("layout: gather_cols from a parameter (an embedding table) accumulates into its gradient, frozen gets none") {
  const Mat table = random_matrix(4, 6, 1);
  Parameter<double> E(table);
  const std::vector<int> ids = {5, 0, 5, 2};
  const Mat w = random_matrix(4, 4, 2);
  for (int step = 0; step < 2; ++step) {  // two steps: the second adds to the first
    Tape<double> tape;
    tape.backward(sum(gather_cols(tape.param(E), ids) * tape.constant(w)));
  }
  Mat want = Mat::Zero(4, 6);
  for (std::size_t j = 0; j < ids.size(); ++j) want.col(ids[j]) += 2.0 * w.col(static_cast<int>(j));
  CHECK(close_rel(E.grad(), want, 1e-15));

  nn::Embedding<double> emb(table, /*frozen=*/true);
  Tape<double> tape;
  const V y = emb(tape, ids);
  CHECK(tape.entry_count() == 0);  // nothing to differentiate: no entry, no index for a reverse
  CHECK(same_bits(y.value(), table(Eigen::all, ids)));
}

// ------------------------------------------------------------------ attention

namespace {

struct attention_case {
  int d, heads, T, sequences;
};

/// The scores K^T Q * scale of every (sequence, head), laid out as attention_scores does.
Mat scores_ref(const Mat& q, const Mat& k, const attention_case& a, double scale) {
  const int dh = a.d / a.heads;
  Mat out(a.T, a.T * a.heads * a.sequences);
  for (int s = 0; s < a.sequences; ++s)
    for (int h = 0; h < a.heads; ++h)
      out.middleCols((s * a.heads + h) * a.T, a.T) =
          scale * k.block(h * dh, s * a.T, dh, a.T).transpose() * q.block(h * dh, s * a.T, dh, a.T);
  return out;
}

/// softmax over the keys of each query, keys after the query left out when causal, then V P.
Mat attention_ref(const Mat& q, const Mat& k, const Mat& v, const attention_case& a, bool causal) {
  const int dh = a.d / a.heads, dv = static_cast<int>(v.rows()) / a.heads;
  const Mat sc = scores_ref(q, k, a, 1.0 / std::sqrt(static_cast<double>(dh)));
  Mat out(v.rows(), v.cols());
  for (int s = 0; s < a.sequences; ++s)
    for (int h = 0; h < a.heads; ++h) {
      Mat p = sc.middleCols((s * a.heads + h) * a.T, a.T);
      for (int c = 0; c < a.T; ++c) {
        const int last = causal ? c : a.T - 1;
        const double mx = p.col(c).head(last + 1).maxCoeff();
        double total = 0;
        for (int r = 0; r < a.T; ++r) total += r <= last ? std::exp(p(r, c) - mx) : 0.0;
        for (int r = 0; r < a.T; ++r) p(r, c) = r <= last ? std::exp(p(r, c) - mx) / total : 0.0;
      }
      out.block(h * dv, s * a.T, dv, a.T) = v.block(h * dv, s * a.T, dv, a.T) * p;
    }
  return out;
}

}  // namespace

TEST_CASE("attention: scores, output and attention() against per-sequence, per-head products; gradients against finite differences") {
  std::uint64_t seed = 1490;
  for (const attention_case a : {attention_case{6, 2, 4, 3}, attention_case{6, 3, 5, 2}, attention_case{4, 1, 1, 3}, attention_case{5, 1, 3, 1}}) {
    CAPTURE(a.d);
    CAPTURE(a.heads);
    CAPTURE(a.T);
    CAPTURE(a.sequences);
    const int n = a.T * a.sequences;
    const Mat q = random_in({a.d, n}, ++seed), k = random_in({a.d, n}, ++seed), v = random_in({2 * a.heads, n}, ++seed);
    expect_op([a](Tape<double>&, Vs x) -> V { return attention_scores(x[0], x[1], a.heads, a.T, 0.7); }, {q, k}, scores_ref(q, k, a, 0.7));
    const Mat p = random_in({a.T, a.T * a.heads * a.sequences}, ++seed);
    Mat mixed(v.rows(), n);
    for (int s = 0; s < a.sequences; ++s)
      for (int h = 0; h < a.heads; ++h)
        mixed.block(2 * h, s * a.T, 2, a.T) = v.block(2 * h, s * a.T, 2, a.T) * p.middleCols((s * a.heads + h) * a.T, a.T);
    expect_op([a](Tape<double>&, Vs x) -> V { return attention_output(x[0], x[1], a.heads, a.T); }, {v, p}, mixed);
    for (const bool causal : {false, true}) {
      CAPTURE(causal);
      expect_op([a, causal](Tape<double>&, Vs x) -> V { return attention(x[0], x[1], x[2], a.heads, a.T, causal); }, {q, k, v},
                attention_ref(q, k, v, a, causal));
      // Self-attention: one tensor as q, k and v (three adjoints into one buffer), expression operands.
      const Mat x0 = random_in({a.d, n}, ++seed);
      expect_grad([a, causal](Tape<double>&, Vs x) -> V { return attention(x[0], x[0] * 2.0, tanh(x[0]), a.heads, a.T, causal); }, {x0});
    }
  }
}

TEST_CASE("attention: one Var as q and k; checkpointed and with saved products, bit for bit the plain run") {
  const attention_case a{6, 3, 4, 2};
  const Mat x = random_matrix(6, 8, 30), v = random_matrix(3, 8, 31);
  // The same Var as q and k: both reverse products add into its one adjoint.
  expect_grad([a](Tape<double>&, Vs in) -> V { return attention_output(in[1], softmax(attention_scores(in[0], in[0], a.heads, a.T, 0.5, true)), a.heads, a.T); },
              {x, v});
  auto run = [&](int mode) {  // 0 plain, 1 checkpoint(), 2 checkpoint saving the products
    Tape<double> tape;
    const V xv = tape.variable(x), vv = tape.variable(v);
    auto layer = [&a](const V& h, const V& val) -> V { return tanh(attention(h, h * 2.0, val, a.heads, a.T, true)); };
    V y;
    if (mode == 0) y = layer(xv, vv);
    if (mode == 1) y = checkpoint(layer, xv, vv);
    if (mode == 2) y = checkpoint<save::matmul>(layer, xv, vv);
    tape.backward(sum(square(y)));
    return std::tuple{Mat(tape.grad(xv)), Mat(tape.grad(vv)), tape.counters()};
  };
  const auto [x0, v0, c0] = run(0);
  const auto [x1, v1, c1] = run(1);
  const auto [x2, v2, c2] = run(2);
  CHECK(same_bits(x0, x1));
  CHECK(same_bits(v0, v1));
  CHECK(same_bits(x0, x2));
  CHECK(same_bits(v0, v2));
  const std::size_t products = static_cast<std::size_t>(a.heads * 2);  // per entry: heads x sequences
  CHECK(c1.gemms == c0.gemms + 2 * products);  // the re-trace redoes the scores and the output
  CHECK(c2.gemms == c0.gemms);                 // both are products, kept: nothing redone
  CHECK(c2.nodes_replayed == 2);
}

TEST_CASE("attention: one entry with the bits of its three ops, holding P and one head's scratch in reverse") {
  // Scores 8x the size of a token tensor (T * heads / d), as in a model with long sequences:
  // where the three entries held P, dP and dS at once, the one entry holds P and a scratch of
  // one head's blocks. (Every size below is a multiple of the pool's 64 bytes.)
  const attention_case a{8, 4, 16, 3};
  const int n = a.T * a.sequences;
  const Mat q = random_matrix(a.d, n, 40), k = random_matrix(a.d, n, 41), v = random_matrix(a.d, n, 42), w = random_matrix(a.d, n, 43);
  const std::size_t scores = sizeof(double) * static_cast<std::size_t>(a.T * a.T * a.heads * a.sequences);
  const std::size_t tokens = sizeof(double) * static_cast<std::size_t>(a.d * n);
  const std::size_t head_scratch = scores / static_cast<std::size_t>(a.heads);
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    auto run = [&](bool fused) {
      Tape<double> t;
      const V qv = t.variable(q), kv = t.variable(k), vv = t.variable(v);
      const V y = fused ? attention(qv, kv, vv, a.heads, a.T, causal)
                        : attention_output(vv, softmax(attention_scores(qv, kv, a.heads, a.T, 1.0 / std::sqrt(2.0), causal)), a.heads, a.T);
      const V loss = sum(y * t.constant(w));
      const std::size_t forward = t.bytes();
      const Mat value = y.value();
      t.backward(loss);
      return std::tuple{value, Mat(t.grad(qv)), Mat(t.grad(kv)), Mat(t.grad(vv)), forward, t.peak_bytes(), t.counters().gemms};
    };
    const auto [y1, dq1, dk1, dv1, fwd1, peak1, gemms1] = run(true);
    const auto [y3, dq3, dk3, dv3, fwd3, peak3, gemms3] = run(false);
    CHECK(same_bits(y1, y3));
    CHECK(same_bits(dq1, dq3));
    CHECK(same_bits(dk1, dk3));
    CHECK(same_bits(dv1, dv3));
    CHECK(gemms1 == gemms3);
    CHECK(fwd1 == fwd3);  // both hold P and the output after the forward (the scores are freed)
    // The one entry's reverse: the output's adjoint, those of q, k, v, one head's scratch and
    // the loss's 1x1 adjoint (64 bytes) on top of the forward.
    CHECK(peak1 == fwd1 + 4 * tokens + head_scratch + 64);
    // The three entries held P, dP and dS at the softmax's reverse.
    CHECK(peak3 >= fwd3 + 2 * scores);
    CHECK(peak1 + scores < peak3);
  }
}

namespace {
template <fixed_string Op>
struct keep_op {  // a save predicate that keeps the values of one op
  static bool save(const node_info& n) { return n.op != nullptr && std::string_view(n.op) == Op.view(); }
};
}  // namespace

TEST_CASE("attention: constant operands, no gradient at all, and predicates that keep the weights or the output alone") {
  const attention_case a{6, 3, 4, 2};  // q, k: 3 heads of 2 rows; v: 3 heads of 3 rows
  const int n = a.T * a.sequences;
  const Mat q = random_matrix(6, n, 50), k = random_matrix(6, n, 51), v = random_matrix(9, n, 52), w = random_matrix(9, n, 53);
  const double scale = 1.0 / std::sqrt(2.0);
  const std::size_t products = static_cast<std::size_t>(a.heads * a.sequences);
  for (const bool causal : {false, true}) {
    CAPTURE(causal);
    // Every choice of which of q, k, v are variables: the one entry against the three ops.
    for (int mask = 0; mask < 8; ++mask) {
      CAPTURE(mask);
      auto run = [&](bool fused) {
        Tape<double> t;
        auto on = [&](const Mat& m, int bit) { return (mask >> bit) & 1 ? t.variable(m) : t.constant(m); };
        const V qv = on(q, 0), kv = on(k, 1), vv = on(v, 2);
        const V y = fused ? attention(qv, kv, vv, a.heads, a.T, causal)
                          : attention_output(vv, softmax(attention_scores(qv, kv, a.heads, a.T, scale, causal)), a.heads, a.T);
        const Mat value = y.value();
        const std::size_t held = t.bytes();
        if (mask) t.backward(sum(y * t.constant(w)));
        auto grad = [&](const V& x, int bit) { return (mask >> bit) & 1 ? Mat(t.grad(x)) : Mat(); };
        return std::tuple{value, grad(qv, 0), grad(kv, 1), grad(vv, 2), held, t.counters().gemms};
      };
      const auto [y1, dq1, dk1, dv1, held1, gemms1] = run(true);
      const auto [y3, dq3, dk3, dv3, held3, gemms3] = run(false);
      CHECK(same_bits(y1, y3));
      CHECK(same_bits(dq1, dq3));
      CHECK(same_bits(dk1, dk3));
      CHECK(same_bits(dv1, dv3));
      CHECK(gemms1 == gemms3);
      if (mask == 0) {  // no reverse: the weights were a temporary, given back; the tape holds the inputs and the output
        const std::size_t leaves = 2 * Tape<double>::bytes_of({6, n}) + Tape<double>::bytes_of({9, n});
        CHECK(held1 == leaves + Tape<double>::bytes_of({9, n}));
      }
    }
    // Checkpointed, keeping the weights alone, the output alone, or both: the same bits, and
    // a re-trace redoes exactly the products of what was not kept.
    auto run = [&](int mode, bool variables) {
      Tape<double> tape;
      const V xv = tape.variable(q), vv = variables ? tape.variable(v) : tape.constant(v), h = tape.variable(w);
      const V kc = variables ? xv * 2.0 : eval(tape.constant(k) * 1.0);
      const V qc = variables ? xv : tape.constant(q);
      auto layer = [&](const V& x) -> V { return x * attention(qc, kc, vv, a.heads, a.T, causal); };
      V y;
      if (mode == 0) y = layer(h);
      if (mode == 1) y = checkpoint(layer, h);
      if (mode == 2) y = checkpoint<keep_op<"attention.weights">>(layer, h);
      if (mode == 3) y = checkpoint<keep_op<"attention">>(layer, h);
      if (mode == 4) y = checkpoint<save::matmul>(layer, h);
      tape.backward(sum(square(y)));
      return std::tuple{Mat(tape.grad(h)), variables ? Mat(tape.grad(xv)) : Mat(), tape.counters().gemms};
    };
    for (const bool variables : {true, false}) {
      CAPTURE(variables);
      const auto [h0, x0, c0] = run(0, variables);
      for (int mode = 1; mode <= 4; ++mode) {
        CAPTURE(mode);
        const auto [h1, x1, c1] = run(mode, variables);
        CHECK(same_bits(h0, h1));
        CHECK(same_bits(x0, x1));
        // Re-traced: the scores (unless the weights were kept) and the output (unless kept).
        // Without a reverse (constant q, k, v) the weights are no node: only a kept output
        // spares the products.
        const bool kept_out = mode == 3 || mode == 4, kept_weights = variables && (mode == 2 || mode == 4);
        const std::size_t redone = (kept_weights || (!variables && kept_out) ? 0 : products) + (kept_out ? 0 : products);
        CHECK(c1 == c0 + redone);
      }
    }
  }
}

namespace {
/// Each head of `width` rows repeated `group` times (a key/value tensor as plain multi-head
/// attention would need it), and the reverse: each group of heads' rows summed into one.
Mat repeat_heads(const Mat& m, int width, int group) {
  const int heads = static_cast<int>(m.rows()) / width;
  Mat out(m.rows() * group, m.cols());
  for (int h = 0; h < heads * group; ++h) out.middleRows(h * width, width) = m.middleRows((h / group) * width, width);
  return out;
}
Mat sum_heads(const Mat& m, int width, int group) {
  const int heads = static_cast<int>(m.rows()) / width;
  Mat out = Mat::Zero(m.rows() / group, m.cols());
  for (int h = 0; h < heads; ++h) out.middleRows((h / group) * width, width) += m.middleRows(h * width, width);
  return out;
}
}  // namespace

TEST_CASE("attention: q and k without rows (heads of width 0) weigh the visible keys equally") {
  Tape<double> t;
  const Mat vm = random_matrix(2, 4, 70);
  const V q = t.variable(Mat(0, 4)), v = t.variable(vm);
  const V y = attention(q, q, v, 1, 2, true);  // two sequences of 2 tokens
  Mat want(2, 4);
  want << vm.col(0), (vm.col(0) + vm.col(1)) / 2, vm.col(2), (vm.col(2) + vm.col(3)) / 2;
  CHECK(close_rel(y.value(), want, 1e-15));
  t.backward(sum(y));
  Mat dv(2, 4);
  dv.row(0) << 1.5, 0.5, 1.5, 0.5;
  dv.row(1) = dv.row(0);
  CHECK(same_bits(t.grad(v), dv));
}

TEST_CASE("attention: grouped-query and multi-query attention against each key/value head repeated") {
  const int heads = 6, w = 2, dv = 3, T = 5, sequences = 2, n = T * sequences;
  const Mat q = random_matrix(heads * w, n, 60);
  for (const int kv : {3, 2, 1}) {  // 2 or 3 query heads per key/value head; 1: multi-query
    CAPTURE(kv);
    const int group = heads / kv;
    const Mat k = random_matrix(kv * w, n, 61), v = random_matrix(kv * dv, n, 62), wt = random_matrix(heads * dv, n, 63);
    for (const bool causal : {false, true}) {
      CAPTURE(causal);
      auto run = [&](const Mat& kin, const Mat& vin) {
        Tape<double> t;
        const V qv = t.variable(q), kvv = t.variable(kin), vv = t.variable(vin);
        const V y = attention(qv, kvv, vv, heads, T, causal);
        const Mat value = y.value();
        t.backward(sum(y * t.constant(wt)));
        return std::tuple{value, Mat(t.grad(qv)), Mat(t.grad(kvv)), Mat(t.grad(vv))};
      };
      const auto [y, dq, dk, dvv] = run(k, v);
      const auto [ye, dqe, dke, dve] = run(repeat_heads(k, w, group), repeat_heads(v, dv, group));
      CHECK(y.rows() == heads * dv);
      CHECK(close_rel(y, ye, 1e-14));
      CHECK(close_rel(dq, dqe, 1e-13));
      CHECK(close_rel(dk, sum_heads(dke, w, group), 1e-13));
      CHECK(close_rel(dvv, sum_heads(dve, dv, group), 1e-13));
      expect_grad([=](Tape<double>&, Vs x) -> V { return attention(x[0], x[1], x[2], heads, T, causal); }, {q, k, v});
    }
    // Checkpointed (and keeping the weights and output): the same bits as the plain run.
    auto run = [&](int mode) {
      Tape<double> tape;
      const V qv = tape.variable(q), kvv = tape.variable(k), vv = tape.variable(v);
      auto layer = [&](const V& x, const V& kk, const V& vvv) -> V { return tanh(attention(x, kk * 2.0, vvv, heads, T, true)); };
      V y;
      if (mode == 0) y = layer(qv, kvv, vv);
      if (mode == 1) y = checkpoint(layer, qv, kvv, vv);
      if (mode == 2) y = checkpoint<save::matmul>(layer, qv, kvv, vv);
      tape.backward(sum(square(y)));
      return std::tuple{Mat(tape.grad(qv)), Mat(tape.grad(kvv)), Mat(tape.grad(vv))};
    };
    const auto [q0, k0, v0] = run(0);
    for (int mode = 1; mode <= 2; ++mode) {
      CAPTURE(mode);
      const auto [q1, k1, v1] = run(mode);
      CHECK(same_bits(q0, q1));
      CHECK(same_bits(k0, k1));
      CHECK(same_bits(v0, v1));
    }
  }
}

TEST_CASE("attention: causal scores are -inf after the query, and no gradient flows through them") {
  const attention_case a{4, 2, 3, 2};
  const Mat q = random_matrix(4, 6, 1), k = random_matrix(4, 6, 2), w = random_matrix(3, 12, 3);
  Tape<double> tape;
  const V qv = tape.variable(q), kv = tape.variable(k);
  const V sc = attention_scores(qv, kv, a.heads, a.T, 0.5, true);
  const Mat want = scores_ref(q, k, a, 0.5);
  Mat wm = w;  // the adjoint the reverse must use: w with the masked entries zeroed
  for (int c = 0; c < sc.cols(); ++c)
    for (int r = 0; r < 3; ++r) {
      if (r > c % 3) {
        CHECK(sc.value()(r, c) == -std::numeric_limits<double>::infinity());
        wm(r, c) = 0;
      } else {
        CHECK(std::abs(sc.value()(r, c) - want(r, c)) <= 1e-14);
      }
    }
  tape.retain(sc);
  tape.backward(sum(sc * tape.constant(w)));  // the loss is -inf; its adjoints are w, finite
  Mat dq = Mat::Zero(4, 6), dk = Mat::Zero(4, 6);
  for (int s = 0; s < 2; ++s)
    for (int h = 0; h < 2; ++h) {
      const Mat g = wm.middleCols((s * 2 + h) * 3, 3);
      dq.block(2 * h, 3 * s, 2, 3) = 0.5 * k.block(2 * h, 3 * s, 2, 3) * g;
      dk.block(2 * h, 3 * s, 2, 3) = 0.5 * q.block(2 * h, 3 * s, 2, 3) * g.transpose();
    }
  CHECK(close_rel(tape.grad(qv), dq, 1e-14));
  CHECK(close_rel(tape.grad(kv), dk, 1e-14));
  CHECK(tape.counters().gemms == 4 + 8);  // one product per (sequence, head) forward, two in reverse

  // The reverse's masked copy of the adjoint comes from the tape's pool: counted at the peak
  // (12 x 3 doubles, rounded to 64 bytes: 320), given back after.
  auto peak = [&](bool causal) {
    Tape<double> t;
    const V x = t.variable(q), y = t.variable(k);
    t.backward(sum(attention_scores(x, y, a.heads, a.T, 0.5, causal) * t.constant(w)));
    return std::pair{t.peak_bytes(), t.bytes()};
  };
  const auto [causal_peak, causal_after] = peak(true);
  const auto [plain_peak, plain_after] = peak(false);
  CHECK(causal_peak == plain_peak + 320);
  CHECK(causal_after == plain_after);
}

// ------------------------------------------------------------------ dropout

TEST_CASE("dropout: gradient against finite differences (the mask is fixed for a fresh tape)") {
  std::uint64_t seed = 1500;
  for (const shape s : test_shapes(15)) {
    CAPTURE(s);
    const Mat x = random_in(s, ++seed), y = random_away_from_zero(s.rows, s.cols, ++seed);
    // A fresh tape has seed 0x5eed, step 0 and op counter 0: the reference draws that mask.
    const std::uint64_t key = rng::key(Tape<double>{}.seed(), 0, 0);
    Mat expected(s.rows, s.cols);
    for (long i = 0; i < x.size(); ++i)
      expected(i) = rng::uniform(key, static_cast<std::uint64_t>(i)) >= 0.4f ? x(i) * (1.0 / 0.6) : 0.0;
    expect_op([](Tape<double>&, Vs v) -> V { return dropout(v[0], 0.4); }, {x}, expected);
    expect_grad([](Tape<double>&, Vs v) -> V { return dropout(relu(v[1]) * v[0], 0.25) + v[0]; }, {x, y});
    expect_grad([](Tape<double>&, Vs v) -> V { return matmul(dropout(v[0], 0.5), transpose(v[1])); }, {x, y});
    // Broadcast operands under a dropout and inside one: their gradients are sums of shares,
    // each share masked by the element's draw (row r's column operand, column c's row one).
    const Mat col = random_in({s.rows, 1}, ++seed), row = random_in({1, s.cols}, ++seed), one = random_in({1, 1}, ++seed);
    expect_grad([](Tape<double>&, Vs v) -> V { return dropout(v[1] * v[0] + v[2], 0.3); }, {x, col, row});
    expect_grad([](Tape<double>&, Vs v) -> V { return dropout(v[1], 0.5) * v[0] + dropout(v[2] * v[3], 0.4); }, {x, col, row, one});
  }
}

TEST_CASE("dropout: p = 0 is the identity") {
  const Mat x = random_matrix(6, 5, 1);
  Tape<double> tape;
  const V a = tape.variable(x);
  V y = dropout(a, 0.0);
  CHECK(same_bits(y.value(), x));
  V loss = sum(y * 3.0);
  tape.backward(loss);
  CHECK(same_bits(tape.grad(a), Mat::Constant(6, 5, 3.0)));
  expect_grad([](Tape<double>&, Vs v) -> V { return dropout(v[0], 0.0); }, {x});
}

TEST_CASE("dropout: drops about p of the elements and scales the rest by 1 / (1 - p)") {
  const Mat ones = Mat::Ones(100, 100);
  for (const double p : {0.1, 0.5, 0.9}) {
    CAPTURE(p);
    Tape<double> tape;
    const V a = tape.variable(ones);
    V y = dropout(a, p);
    const Mat v = y.value();
    const long dropped = (v.array() == 0.0).count();
    CHECK(std::abs(static_cast<double>(dropped) / 10000.0 - p) < 0.03);
    const double scale = 1.0 / (1.0 - p);
    CHECK(((v.array() == 0.0) || (v.array() == scale)).all());
    // The reverse applies the same mask and scale.
    V loss = sum(y);
    tape.backward(loss);
    CHECK(same_bits(tape.grad(a), v));
  }
}

TEST_CASE("dropout: the mask is a function of (seed, step, op)") {
  const Mat ones = Mat::Ones(16, 16);
  auto mask = [&](Tape<double>& tape) {
    const V a = tape.constant(ones);
    V y = dropout(a, 0.5);
    return Mat(y.value());
  };
  Tape<double> tape;
  tape.set_seed(42);
  const Mat m0 = mask(tape);                    // step 0, op 0
  const Mat m1 = mask(tape);                    // step 0, op 1
  CHECK(tape.rng_counter() == 2);
  CHECK_FALSE(same_bits(m0, m1));
  tape.reset();                                 // step 1, op 0
  CHECK(tape.step() == 1);
  CHECK(tape.rng_counter() == 0);
  const Mat s1 = mask(tape);
  CHECK_FALSE(same_bits(m0, s1));
  tape.reset();
  tape.set_step(0);                             // back to step 0, op 0: the same mask
  CHECK(same_bits(mask(tape), m0));
  tape.set_rng_counter(1);                      // step 0, op 1
  CHECK(same_bits(mask(tape), m1));

  Tape<double> other;                           // another tape with the same seed agrees
  other.set_seed(42);
  CHECK(same_bits(mask(other), m0));
  Tape<double> third;                           // a different seed does not
  third.set_seed(43);
  CHECK_FALSE(same_bits(mask(third), m0));

  // A broadcast (non-dense) expression draws the same mask as the dense one.
  Tape<double> dense, strided;
  dense.set_seed(42);
  strided.set_seed(42);
  const V d = dense.constant(ones);
  V yd = dropout(d, 0.5);
  const V sd = strided.constant(ones);
  const V bias = strided.constant(Mat::Zero(16, 1));
  V ys = dropout(sd, 0.5) + bias;
  CHECK(same_bits(yd.value(), ys.value()));
  CHECK(same_bits(yd.value(), m0));
}

// ------------------------------------------------------------------ parameters

namespace {

using param_program = std::function<V(Tape<double>&, std::vector<Parameter<double>>&)>;

/// Builds parameters from `inits`, runs f once on a tape and back-propagates, then compares
/// every p.grad() against finite differences of f's value.
void expect_param_grad(const param_program& f, const std::vector<Mat>& inits, double tol = 1e-6) {
  auto make = [](const std::vector<Mat>& xs) {
    std::vector<Parameter<double>> ps;
    ps.reserve(xs.size());
    for (const auto& x : xs) ps.emplace_back(x);
    return ps;
  };
  std::vector<Parameter<double>> ps = make(inits);
  {
    Tape<double> tape;
    V loss = f(tape, ps);
    REQUIRE(loss.dims() == shape{1, 1});
    tape.backward(loss);
  }
  const auto numeric = numeric_grad(
      [&](const std::vector<Mat>& xs) {
        std::vector<Parameter<double>> qs = make(xs);
        Tape<double> tape;
        return f(tape, qs).item();
      },
      inits);
  for (std::size_t k = 0; k < inits.size(); ++k) expect_close(ps[k].grad(), numeric[k], tol, "gradient of parameter " + std::to_string(k));
}

}  // namespace

TEST_CASE("parameters: elementwise ops and products accumulate into p.grad()") {
  std::uint64_t seed = 1600;
  for (const shape s : test_shapes(16)) {
    CAPTURE(s);
    const int r = s.rows, c = s.cols;
    const Mat x = random_in(s, ++seed), w = random_in(s, ++seed, 0.5, 1.5);
    const Mat p = random_in(s, ++seed), col = random_in({r, 1}, ++seed), row = random_in({1, c}, ++seed);
    // The same parameter twice in one expression.
    expect_param_grad([&](Tape<double>& t, std::vector<Parameter<double>>& ps) -> V {
      return sum((ps[0] * t.constant(x) + ps[0]) * t.constant(w));
    }, {p});
    // Broadcast parameters (a row scale and a column bias) with a Var operand.
    expect_param_grad([&](Tape<double>& t, std::vector<Parameter<double>>& ps) -> V {
      return sum(tanh(t.constant(x) * ps[0] + ps[1]) * t.constant(w));
    }, {row, col});
    // Products with a parameter on either side, transposed or not, and on both sides.
    const Mat W = random_in({3, r}, ++seed), wy = random_in({3, c}, ++seed, 0.5, 1.5);
    expect_param_grad([&](Tape<double>& t, std::vector<Parameter<double>>& ps) -> V {
      return sum((matmul(ps[0], t.constant(x)) + ps[1]) * t.constant(wy));
    }, {W, random_in({3, 1}, ++seed)});
    expect_param_grad([&](Tape<double>& t, std::vector<Parameter<double>>& ps) -> V {
      return sum(matmul(transpose(ps[0]), t.constant(wy)) * t.constant(x));
    }, {W});
    expect_param_grad([&](Tape<double>& t, std::vector<Parameter<double>>& ps) -> V {
      return sum(matmul(t.constant(random_in({c, 3}, 5)), transpose(ps[0])) * t.constant(random_in({c, r}, 3)));
    }, {random_in({r, 3}, ++seed)});
    expect_param_grad([&](Tape<double>& t, std::vector<Parameter<double>>& ps) -> V {
      return sum(matmul(t.param(ps[0]), transpose(ps[0])) * t.constant(random_in({r, r}, 4)));
    }, {p});
    // A parameter brought onto the tape as a Var: its gradient still lands in p.grad().
    expect_param_grad([&](Tape<double>& t, std::vector<Parameter<double>>& ps) -> V {
      const V pv = t.param(ps[0]);
      return sum(softmax(matmul(pv, t.constant(x))) * t.constant(wy)) + mean(square(pv));
    }, {W});
    // Gain and bias of a normalisation as parameters.
    expect_param_grad([&](Tape<double>& t, std::vector<Parameter<double>>& ps) -> V {
      return sum(layer_norm(t.constant(x), ps[0], ps[1]) * t.constant(w)) + sum(rms_norm(t.constant(x), ps[0]) * t.constant(w));
    }, {random_in({r, 1}, ++seed, 0.5, 1.5), col});
  }
}

TEST_CASE("parameters: gradients accumulate over steps until zero_grad()") {
  const Mat x = random_matrix(4, 3, 1), Wm = random_matrix(2, 4, 2), bm = random_matrix(2, 1, 3);
  Parameter<double> W(Wm), b(bm);
  auto step = [&] {
    Tape<double> tape;
    V loss = mean(square(matmul(W, tape.constant(x)) + b));
    tape.backward(loss);
  };
  step();
  const Mat gW = W.grad(), gb = b.grad();
  CHECK(gW.norm() > 0);
  step();
  CHECK(close_rel(W.grad(), 2.0 * gW, 1e-14));
  CHECK(close_rel(b.grad(), 2.0 * gb, 1e-14));
  W.zero_grad();
  b.zero_grad();
  CHECK(W.grad().isZero(0.0));
  step();
  CHECK(close_rel(W.grad(), gW, 1e-14));
  CHECK(close_rel(b.grad(), gb, 1e-14));
}

TEST_CASE("matmul: a frozen parameter or a constant operand gets no gradient GEMM") {
  const Mat Wm = random_matrix(4, 3, 1), xm = random_matrix(3, 5, 2), wm = random_matrix(4, 5, 3, 0.5, 1.5);
  const Mat wt = random_matrix(3, 5, 4, 0.5, 1.5);

  SUBCASE("trainable parameter times a variable: two GEMMs in reverse") {
    Parameter<double> W(Wm);
    Tape<double> tape;
    const V x = tape.variable(xm);
    V y = matmul(W, x);
    CHECK(tape.counters().gemms == 1);
    V loss = sum(y * tape.constant(wm));
    tape.backward(loss);
    CHECK(tape.counters().gemms == 3);
    CHECK(close_rel(W.grad(), wm * xm.transpose(), 1e-14));
    CHECK(close_rel(tape.grad(x), Wm.transpose() * wm, 1e-14));
  }
  SUBCASE("frozen parameter times a variable: one GEMM in reverse, none for the parameter") {
    Parameter<double> W(Wm, /*frozen=*/true);
    CHECK(W.frozen());
    CHECK(W.grad_data() == nullptr);
    Tape<double> tape;
    const V x = tape.variable(xm);
    V y = matmul(W, x);
    CHECK(tape.counters().gemms == 1);
    V loss = sum(y * tape.constant(wm));
    tape.backward(loss);
    CHECK(tape.counters().gemms == 2);
    CHECK(close_rel(tape.grad(x), Wm.transpose() * wm, 1e-14));
    CHECK_THROWS_WITH_AS(W.grad(), doctest::Contains("grad: parameter 4x3 is frozen"), tape_error);
  }
  SUBCASE("frozen parameter on the right, transposed, through tape.param") {
    Parameter<double> W(Wm, /*frozen=*/true);
    Tape<double> tape;
    const V x = tape.variable(wt.transpose());  // 5x3
    V y = matmul(x, transpose(W));               // 5x4
    V z = matmul(tape.param(W), transpose(x));   // 4x5
    CHECK(tape.counters().gemms == 2);
    V loss = sum(y * tape.constant(wm.transpose())) + sum(z * tape.constant(wm));
    tape.backward(loss);
    CHECK(tape.counters().gemms == 4);
    CHECK(close_rel(tape.grad(x), 2.0 * wm.transpose() * Wm, 1e-14));
    CHECK_THROWS_AS(W.grad(), tape_error);
  }
  SUBCASE("trainable parameter times a constant: one GEMM in reverse, for the parameter") {
    Parameter<double> W(Wm);
    Tape<double> tape;
    V y = matmul(W, tape.constant(xm));
    V loss = sum(y * tape.constant(wm));
    tape.backward(loss);
    CHECK(tape.counters().gemms == 2);
    CHECK(close_rel(W.grad(), wm * xm.transpose(), 1e-14));
  }
  SUBCASE("constant times a variable: one GEMM in reverse") {
    Tape<double> tape;
    const V x = tape.variable(xm);
    V y = matmul(tape.constant(Wm), x);
    V loss = sum(y * tape.constant(wm));
    tape.backward(loss);
    CHECK(tape.counters().gemms == 2);
    CHECK(close_rel(tape.grad(x), Wm.transpose() * wm, 1e-14));
  }
  SUBCASE("frozen parameter times a constant: no entry at all") {
    Parameter<double> W(Wm, true);
    Tape<double> tape;
    const std::size_t entries = tape.entry_count();
    V y = matmul(W, tape.constant(xm));
    CHECK(tape.entry_count() == entries);
    CHECK_FALSE(y.requires_grad());
    CHECK(close_rel(Mat(y.value()), Wm * xm, 1e-14));
    CHECK(tape.counters().gemms == 1);
  }
  SUBCASE("unfreezing gives a zeroed gradient and the second GEMM back") {
    Parameter<double> W(Wm, true);
    W.set_frozen(false);
    CHECK(W.grad().isZero(0.0));
    Tape<double> tape;
    const V x = tape.variable(xm);
    V loss = sum(matmul(W, x) * tape.constant(wm));
    tape.backward(loss);
    CHECK(tape.counters().gemms == 3);
    CHECK(close_rel(W.grad(), wm * xm.transpose(), 1e-14));
    W.set_frozen(true);
    CHECK_THROWS_AS(W.grad(), tape_error);
  }
}

// ------------------------------------------------------------------ float

namespace {

/// One program that uses every op, for a float and a double tape.
template <class T>
Var<T> every_op(Tape<T>& tape, const std::vector<Var<T>>& v, const std::vector<int>& labels) {
  const Var<T>& x = v[0];  // 4x3
  const Var<T>& w = v[1];  // 4x4
  const Var<T>& g = v[2];  // 4x1
  Var<T> e = relu(x + g) * sigmoid(x) - tanh(x) / (square(x) + 1.0) + gelu(x) * silu(x) - 2.0 * exp(-x) + -x;
  Var<T> p = log(square(x) + 1.0) + sqrt(square(x) + 1.0) + pow(square(x) + 1.0, 1.5);
  Var<T> y = matmul(w, e) + matmul(transpose(w), p) + matmul(w, transpose(Var<T>(transpose(x))));
  Var<T> ln = layer_norm(y, g, g * 0.5);
  Var<T> rn = rms_norm(ln, g);
  Var<T> cat = concat_rows({slice_rows(rn, 0, 2), slice_rows(softmax(rn), 2, 2)});
  Var<T> z0 = dropout(cat, 0.25) + log_softmax(cat);
  Var<T> z = concat_cols({slice_cols(z0, 1, 2), slice_cols(gather_cols(z0, {2, 0, 2}), 1, 1)});
  Var<T> t = transpose(z);
  return sum(t) * 0.1 + mean(z) + mse(z, tape.constant(Eigen::Matrix<T, -1, -1>::Zero(4, 3))) + cross_entropy(z, labels);
}

}  // namespace

TEST_CASE("float: every op runs on a float tape and agrees with double") {
  const Mat x = random_matrix(4, 3, 1), w = random_matrix(4, 4, 2), g = random_matrix(4, 1, 3, 0.5, 1.5);
  const std::vector<int> labels = {0, 3, 1};
  Tape<double> td;
  const std::vector<Var<double>> vd = {td.variable(x), td.variable(w), td.variable(g)};
  Var<double> ld = every_op(td, vd, labels);
  td.backward(ld);
  Tape<float> tf;
  const std::vector<Var<float>> vf = {tf.variable(x), tf.variable(w), tf.variable(g)};
  Var<float> lf = every_op(tf, vf, labels);
  tf.backward(lf);
  CHECK(std::isfinite(ld.item()));
  CHECK(std::abs(static_cast<double>(lf.item()) - ld.item()) <= 1e-4 * std::max(1.0, std::abs(ld.item())));
  for (std::size_t k = 0; k < vd.size(); ++k) {
    CAPTURE(k);
    const Mat gd = td.grad(vd[k]);
    CHECK(gd.norm() > 0);
    CHECK(close_rel(tf.grad(vf[k]).cast<double>(), gd, 1e-3));
  }
  // The whole program in double against finite differences too.
  expect_grad([labels](Tape<double>& t, Vs v) -> V { return every_op(t, std::vector<V>(v.begin(), v.end()), labels); }, {x, w, g});
}
