// Backend-generic op checks: every op's value and the gradients of all its inputs on backend B
// against the same program on a reference backend (the CPU), on the same inputs. The CUDA suite
// (tests/cuda/test_cuda_float.cu, test_cuda_double.cu) runs them against backend::cuda; the ops suite runs them against a
// CPU backend whose loops run out of order, as a concurrent backend's may
// (tests/ops/test_concurrent.cpp), so that the concurrent code paths run in CI too.
#pragma once
#include "support/gradcheck.hpp"

#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace ckpt::test {

/// The CUDA suite's shapes: odd and larger than a block, so that kernels cross block and warp
/// boundaries.
inline constexpr int cuda_rows = 37, cuda_cols = 301;

template <class T>
constexpr double backend_tolerance = std::is_same_v<T, float> ? 1e-5 : 1e-12;

/// Max |a - b| <= tol * max(1e-30, max |b|): relative to the tensor's largest entry.
inline void expect_near(const Mat& a, const Mat& b, double tol, const std::string& what) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  if (a.size() == 0) return;
  const double scale = std::max(b.cwiseAbs().maxCoeff(), 1e-30);
  const double err = (a - b).cwiseAbs().maxCoeff();
  INFO(what, ": max |backend - reference| = ", err, ", max |reference| = ", scale);
  CHECK(err <= tol * scale);
}

/// One run of `program` on backend B: the output's value and the gradient of every input
/// of sum(output * weights), as double host matrices.
template <class T, class B, class Program>
std::vector<Mat> run_on(const Program& program, const std::vector<Mat>& inputs, std::uint64_t seed) {
  Tape<T, B> tape;
  tape.set_seed(seed);
  std::vector<Var<T, B>> vars;
  for (const auto& x : inputs) vars.push_back(tape.variable(x));
  Var<T, B> out = program(tape, std::span<const Var<T, B>>(vars));
  const Mat weights = random_matrix(out.rows(), out.cols(), seed + 1, 0.5, 1.5);
  Var<T, B> loss = sum(out * tape.constant(weights));
  std::vector<Mat> result{out.to_host().template cast<double>()};
  tape.retain(out);
  tape.backward(loss);
  for (const auto& v : vars) result.push_back(tape.grad(v).template cast<double>());
  return result;
}

/// The program on B against the same program on Ref, value and every gradient.
template <class T, class Ref, class B, class Program>
void expect_same_as(const char* name, const Program& program, const std::vector<Mat>& inputs, std::uint64_t seed = 11) {
  INFO("op: ", std::string(name));
  const auto want = run_on<T, Ref>(program, inputs, seed);
  const auto got = run_on<T, B>(program, inputs, seed);
  expect_near(got[0], want[0], backend_tolerance<T>, "value");
  for (std::size_t k = 1; k < want.size(); ++k) expect_near(got[k], want[k], backend_tolerance<T>, "gradient of input " + std::to_string(k - 1));
}

inline Mat positive(int r, int c, std::uint64_t seed) { return random_matrix(r, c, seed, 0.5, 2.0); }

/// Elementwise expressions, broadcasting operands included (their reverse sums a broadcast
/// operand's shares through the backend's reductions). R x C should cross block boundaries.
template <class T, class Ref, class B>
void check_elementwise_ops(int R, int C) {
  const Mat a = random_matrix(R, C, 1), b = random_matrix(R, C, 2), col = random_matrix(R, 1, 3), row = random_matrix(1, C, 4),
            one = random_matrix(1, 1, 5), pos = positive(R, C, 6);
  auto same = [](const char* n, auto f, const std::vector<Mat>& in) { expect_same_as<T, Ref, B>(n, f, in); };
  auto unary = [&](const char* n, auto f) { same(n, [f](auto&, auto in) { return eval(f(in[0])); }, {a}); };
  unary("relu", [](const auto& x) { return relu(x); });
  unary("gelu", [](const auto& x) { return gelu(x); });
  unary("gelu_erf", [](const auto& x) { return gelu_erf(x); });
  unary("silu", [](const auto& x) { return silu(x); });
  unary("sigmoid", [](const auto& x) { return sigmoid(x); });
  unary("tanh", [](const auto& x) { return tanh(x); });
  unary("exp", [](const auto& x) { return exp(x); });
  unary("square", [](const auto& x) { return square(x); });
  unary("neg", [](const auto& x) { return -x; });
  unary("scalar ops", [](const auto& x) { return 2.0 * x - 1.5 + x / 3.0; });
  same("log", [](auto&, auto in) { return eval(log(in[0])); }, {pos});
  same("sqrt", [](auto&, auto in) { return eval(sqrt(in[0])); }, {pos});
  same("pow", [](auto&, auto in) { return eval(pow(in[0], 1.7)); }, {pos});
  same("x * sigmoid(x) + b", [](auto&, auto in) { return eval(in[0] * sigmoid(in[0]) + in[1]); }, {a, b});
  same("a / b", [](auto&, auto in) { return eval(in[0] / in[1]); }, {a, pos});
  same("relu(a + column)", [](auto&, auto in) { return eval(relu(in[0] + in[1])); }, {a, col});
  same("a * row - column", [](auto&, auto in) { return eval(in[0] * in[1] - in[2]); }, {a, row, col});
  same("one * a + column * row", [](auto&, auto in) { return eval(in[0] * in[1] + in[2] * in[3]); }, {one, a, col, row});
  same("tanh(column + column) * a (one Var twice)", [](auto&, auto in) { return eval(tanh(in[1] + in[1]) * in[0]); }, {a, col});
  same("six leaves (checked loop)", [](auto&, auto in) { return eval(in[0] * in[1] + in[2] * in[3] + in[4] * in[5] + in[0]); },
       {a, b, col, row, a, one});
  same("sum of a broadcast expression", [](auto&, auto in) { return eval(sum(in[0] * in[1] + in[2])); }, {a, col, row});
}

/// Products, reductions, row-wise ops, losses and layout.
template <class T, class Ref, class B>
void check_other_ops(int R, int C) {
  const Mat a = random_matrix(R, C, 1), w = random_matrix(23, R, 2), wt = random_matrix(R, 23, 3), g = positive(R, 1, 4),
            bias = random_matrix(R, 1, 5);
  auto same = [](const char* n, auto f, const std::vector<Mat>& in) { expect_same_as<T, Ref, B>(n, f, in); };
  same("matmul", [](auto&, auto in) { return matmul(in[0], in[1]); }, {w, a});
  same("matmul(transpose(W), x)", [](auto&, auto in) { return matmul(transpose(in[0]), in[1]); }, {wt, a});
  same("matmul(x, transpose(y))", [](auto&, auto in) { return matmul(in[0], transpose(in[1])); }, {a, a});
  same("relu(W x + b)", [](auto&, auto in) { return eval(relu(matmul(in[0], in[1]) + in[2])); }, {w, a, random_matrix(23, 1, 6)});
  same("sum", [](auto&, auto in) { return eval(sum(in[0])); }, {a});
  same("mean of a broadcast expression", [](auto&, auto in) { return eval(mean(in[0] * in[1])); }, {a, bias});
  same("mse", [](auto&, auto in) { return eval(mse(in[0], in[1])); }, {a, random_matrix(R, C, 7)});
  same("softmax", [](auto&, auto in) { return softmax(in[0]); }, {a});
  same("log_softmax", [](auto&, auto in) { return log_softmax(in[0]); }, {a});
  same("layer_norm", [](auto&, auto in) { return layer_norm(in[0], in[1], in[2]); }, {a, g, bias});
  same("rms_norm", [](auto&, auto in) { return rms_norm(in[0], in[1]); }, {a, g});
  std::vector<int> labels(static_cast<std::size_t>(C));
  for (int j = 0; j < C; ++j) labels[static_cast<std::size_t>(j)] = (j * 7) % R;
  same("cross_entropy", [&labels](auto&, auto in) { return cross_entropy(in[0], labels); }, {a});
  same("transpose", [](auto&, auto in) { return eval(transpose(in[0])); }, {a});
  same("slice_rows", [](auto&, auto in) { return slice_rows(in[0], 5, 20); }, {a});
  same("slice_cols", [](auto&, auto in) { return slice_cols(in[0], 17, 100); }, {a});
  same("concat_rows", [](auto&, auto in) { return concat_rows({in[0], in[1], in[0]}); }, {a, random_matrix(4, C, 8)});
  same("concat_cols", [](auto&, auto in) { return concat_cols({in[0], in[1]}); }, {a, random_matrix(R, 9, 9)});
  std::vector<int> ids(static_cast<std::size_t>(C + 13));  // repeats, and columns never taken
  for (std::size_t j = 0; j < ids.size(); ++j) ids[j] = static_cast<int>((j * j) % static_cast<std::size_t>(C - 3));
  same("gather_cols", [&ids](auto&, auto in) { return gather_cols(in[0], ids); }, {a});
  const Mat q = random_matrix(12, 60, 10), k = random_matrix(12, 60, 11), v = random_matrix(6, 60, 12);  // 3 heads, 6 sequences of 10
  same("attention", [](auto&, auto in) { return attention(in[0], in[1], in[2], 3, 10); }, {q, k, v});
  same("causal attention", [](auto&, auto in) { return attention(in[0], in[1], in[2], 3, 10, true); }, {q, k, v});
  // Sequences longer than a warp (each lane takes several rows of a column), heads of v wider
  // than those of q and k.
  const Mat ql = random_matrix(8, 90, 13), kl = random_matrix(8, 90, 14), vl = random_matrix(12, 90, 15);  // 2 heads, 2 sequences of 45
  same("causal attention over 45 tokens", [](auto&, auto in) { return attention(in[0], in[1], in[2], 2, 45, true); }, {ql, kl, vl});
  // Grouped-query attention: 6 query heads of 2 rows, 2 key/value heads (v's of 3 rows).
  const Mat qg = random_matrix(12, 60, 16), kg = random_matrix(4, 60, 17), vg = random_matrix(6, 60, 18);
  same("grouped-query attention", [](auto&, auto in) { return attention(in[0], in[1], in[2], 6, 10, true); }, {qg, kg, vg});
}

/// Sums over long dimensions in float on backend B against the same program in double on the
/// CPU: a 1x1, a rows x 1 and a 1 x cols operand's gradient, softmax, log-softmax, the norms
/// and cross-entropy over long columns, a norm's gain and bias over a long batch, the gradient
/// of a column gathered by a long batch. Each sums
/// `length` / 4 to `length` terms per result and must stay within 1e-6 of the double result
/// (16 float ulps). Added one by one in float (before 2026-12-03), every case failed at
/// `length` = 2^18 by 2x to 20x, except two that are here for their code paths (the 1x1
/// operand against a column reaches sum_2d; cross-entropy's gradient is largest where the
/// drift does not show).
template <class B>
void check_long_sums(int length) {
  const int n = length / 4;
  auto same = [](const char* name, auto f, const std::vector<Mat>& in, double tol = 1e-6) {
    INFO("op: ", std::string(name));
    const auto want = run_on<double, backend::cpu>(f, in, 11);
    const auto got = run_on<float, B>(f, in, 11);
    expect_near(got[0], want[0], tol, "value");
    for (std::size_t k = 1; k < want.size(); ++k) expect_near(got[k], want[k], tol, "gradient of input " + std::to_string(k - 1));
  };
  const Mat wide = positive(4, n, 1), tall = positive(n, 4, 2);
  same("1x1 operand", [](auto&, auto in) { return eval(in[0] * in[1]); }, {positive(1, 1, 3), positive(1024, length / 1024, 4)});
  same("bias over the batch", [](auto&, auto in) { return eval(relu(in[0] + in[1])); }, {wide, positive(4, 1, 5)});
  same("1 x cols operand", [](auto&, auto in) { return eval(in[0] * in[1]); }, {tall, positive(1, 4, 6)});
  same("1x1 operand against a column", [](auto&, auto in) { return eval(in[0] * in[1]); }, {positive(1, 1, 14), positive(length, 1, 15)});
  same("softmax over long columns", [](auto&, auto in) { return softmax(in[0]); }, {random_matrix(n, 4, 7, -3, 3)});
  // Its reverse reads exp(y) from the stored float y = log p, about -log(n): y's last bit alone
  // is |y| ulps of exp(y), whatever the sums do. Summed in float, it was 11x further off.
  same("log_softmax over long columns", [](auto&, auto in) { return log_softmax(in[0]); }, {random_matrix(n, 4, 16, -3, 3)}, 5e-6);
  same("cross_entropy over long columns", [n](auto&, auto in) { return cross_entropy(in[0], std::vector<int>{0, n / 3, n / 2, n - 1}); },
       {random_matrix(n, 4, 17, -3, 3)});
  same("rms_norm over long columns", [](auto&, auto in) { return rms_norm(in[0], in[1]); }, {random_matrix(n, 4, 18), positive(n, 1, 19)});
  same("layer_norm over long columns", [](auto&, auto in) { return layer_norm(in[0], in[1], in[2]); },
       {random_matrix(n, 4, 8), positive(n, 1, 9), random_matrix(n, 1, 10)});
  same("gather_cols, one column taken by a long batch", [length](auto&, auto in) { return gather_cols(in[0], std::vector<int>(length, 1)); },
       {positive(4, 3, 20)});
  same("layer_norm gain and bias over the batch", [](auto&, auto in) { return layer_norm(in[0], in[1], in[2]); },
       {random_matrix(32, length / 32, 11), positive(32, 1, 12), random_matrix(32, 1, 13)});  // 32 rows: well conditioned
}

}  // namespace ckpt::test
