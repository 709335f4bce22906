// The CUDA backend against the CPU backend: every op's value and gradient on the same inputs
// (float within 1e-5, double within 1e-12, relative to the tensor's largest entry), every
// checkpoint policy bitwise equal to CUDA `none`, repeated runs bitwise equal (no atomics),
// dropout's masks equal to the CPU's, no cudaMalloc in a training loop's steady state, and
// CUDA errors as ckpt::cuda_error. Without a CUDA device the binary reports itself skipped
// (exit code 77, which CTest shows as skipped), never passed.
#include <ckpt/cuda.hpp>

#define DOCTEST_CONFIG_IMPLEMENT
#include "support/gradcheck.hpp"

#include <cstdio>
#include <functional>
#include <span>
#include <vector>

using namespace ckpt;
using ckpt::backend::cpu;
using ckpt::backend::cuda;
using ckpt::test::Mat;
using ckpt::test::random_matrix;
using ckpt::test::same_bits;

namespace {

template <class T>
constexpr double tolerance = std::is_same_v<T, float> ? 1e-5 : 1e-12;

/// Max |a - b| <= tol * max(1e-30, max |b|): relative to the tensor's largest entry.
void expect_near(const Mat& a, const Mat& b, double tol, const std::string& what) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  if (a.size() == 0) return;
  const double scale = std::max(b.cwiseAbs().maxCoeff(), 1e-30);
  const double err = (a - b).cwiseAbs().maxCoeff();
  INFO(what, ": max |cuda - cpu| = ", err, ", max |cpu| = ", scale);
  CHECK(err <= tol * scale);
}

template <class T, class B>
using Vars = std::vector<Var<T, B>>;

/// One run of `program` on backend B: the output's value and the gradient of every input
/// of sum(output * weights), as double host matrices.
template <class T, class B, class Program>
std::vector<Mat> run(const Program& program, const std::vector<Mat>& inputs, std::uint64_t seed) {
  Tape<T, B> tape;
  tape.set_seed(seed);
  Vars<T, B> vars;
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

/// The program on CUDA against the same program on the CPU, value and every gradient.
template <class T, class Program>
void expect_same_as_cpu(const char* name, const Program& program, const std::vector<Mat>& inputs, std::uint64_t seed = 11) {
  INFO("op: ", name);
  const auto on_cpu = run<T, cpu>(program, inputs, seed);
  const auto on_gpu = run<T, cuda>(program, inputs, seed);
  expect_near(on_gpu[0], on_cpu[0], tolerance<T>, "value");
  for (std::size_t k = 1; k < on_cpu.size(); ++k) expect_near(on_gpu[k], on_cpu[k], tolerance<T>, "gradient of input " + std::to_string(k - 1));
}

Mat positive(int r, int c, std::uint64_t seed) { return random_matrix(r, c, seed, 0.5, 2.0); }

}  // namespace

// Shapes are odd and larger than a block, so that kernels cross block and warp boundaries.
constexpr int R = 37, C = 301;

TEST_CASE_TEMPLATE("elementwise expressions: one fused kernel each way, broadcasting operands included", T, float, double) {
  const Mat a = random_matrix(R, C, 1), b = random_matrix(R, C, 2), col = random_matrix(R, 1, 3), row = random_matrix(1, C, 4),
            one = random_matrix(1, 1, 5), pos = positive(R, C, 6);
  auto unary = [&](const char* n, auto f) { expect_same_as_cpu<T>(n, [f](auto&, auto in) { return eval(f(in[0])); }, {a}); };
  unary("relu", [](const auto& x) { return relu(x); });
  unary("gelu", [](const auto& x) { return gelu(x); });
  unary("silu", [](const auto& x) { return silu(x); });
  unary("sigmoid", [](const auto& x) { return sigmoid(x); });
  unary("tanh", [](const auto& x) { return tanh(x); });
  unary("exp", [](const auto& x) { return exp(x); });
  unary("square", [](const auto& x) { return square(x); });
  unary("neg", [](const auto& x) { return -x; });
  unary("scalar ops", [](const auto& x) { return 2.0 * x - 1.5 + x / 3.0; });
  expect_same_as_cpu<T>("log", [](auto&, auto in) { return eval(log(in[0])); }, {pos});
  expect_same_as_cpu<T>("sqrt", [](auto&, auto in) { return eval(sqrt(in[0])); }, {pos});
  expect_same_as_cpu<T>("pow", [](auto&, auto in) { return eval(pow(in[0], 1.7)); }, {pos});
  expect_same_as_cpu<T>("x * sigmoid(x) + b", [](auto&, auto in) { return eval(in[0] * sigmoid(in[0]) + in[1]); }, {a, b});
  expect_same_as_cpu<T>("a / b", [](auto&, auto in) { return eval(in[0] / in[1]); }, {a, pos});
  // Broadcast operands: their reverse sums over the broadcast dimension, one writer per element.
  expect_same_as_cpu<T>("relu(a + column)", [](auto&, auto in) { return eval(relu(in[0] + in[1])); }, {a, col});
  expect_same_as_cpu<T>("a * row - column", [](auto&, auto in) { return eval(in[0] * in[1] - in[2]); }, {a, row, col});
  expect_same_as_cpu<T>("one * a + column * row", [](auto&, auto in) { return eval(in[0] * in[1] + in[2] * in[3]); }, {one, a, col, row});
  expect_same_as_cpu<T>("tanh(column + column) (the same Var twice)", [](auto&, auto in) { return eval(tanh(in[1] + in[1]) * in[0]); }, {a, col});
  expect_same_as_cpu<T>("six leaves (checked loop)",
                        [](auto&, auto in) { return eval(in[0] * in[1] + in[2] * in[3] + in[4] * in[5] + in[0]); }, {a, b, col, row, a, one});
}

TEST_CASE_TEMPLATE("products, reductions, row-wise ops, losses and layout", T, float, double) {
  const Mat a = random_matrix(R, C, 1), w = random_matrix(23, R, 2), wt = random_matrix(R, 23, 3), g = positive(R, 1, 4),
            bias = random_matrix(R, 1, 5);
  expect_same_as_cpu<T>("matmul", [](auto&, auto in) { return matmul(in[0], in[1]); }, {w, a});
  expect_same_as_cpu<T>("matmul(transpose(W), x)", [](auto&, auto in) { return matmul(transpose(in[0]), in[1]); }, {wt, a});
  expect_same_as_cpu<T>("matmul(x, transpose(y))", [](auto&, auto in) { return matmul(in[0], transpose(in[1])); }, {a, a});
  expect_same_as_cpu<T>("relu(W x + b)", [](auto&, auto in) { return eval(relu(matmul(in[0], in[1]) + in[2])); },
                        {w, a, random_matrix(23, 1, 6)});
  expect_same_as_cpu<T>("sum", [](auto&, auto in) { return eval(sum(in[0])); }, {a});
  expect_same_as_cpu<T>("mean of a broadcast expression", [](auto&, auto in) { return eval(mean(in[0] * in[1])); }, {a, bias});
  expect_same_as_cpu<T>("mse", [](auto&, auto in) { return eval(mse(in[0], in[1])); }, {a, random_matrix(R, C, 7)});
  expect_same_as_cpu<T>("softmax", [](auto&, auto in) { return softmax(in[0]); }, {a});
  expect_same_as_cpu<T>("log_softmax", [](auto&, auto in) { return log_softmax(in[0]); }, {a});
  expect_same_as_cpu<T>("layer_norm", [](auto&, auto in) { return layer_norm(in[0], in[1], in[2]); }, {a, g, bias});
  expect_same_as_cpu<T>("rms_norm", [](auto&, auto in) { return rms_norm(in[0], in[1]); }, {a, g});
  std::vector<int> labels(C);
  for (int j = 0; j < C; ++j) labels[static_cast<std::size_t>(j)] = (j * 7) % R;
  expect_same_as_cpu<T>("cross_entropy", [&labels](auto&, auto in) { return cross_entropy(in[0], labels); }, {a});
  expect_same_as_cpu<T>("transpose", [](auto&, auto in) { return eval(transpose(in[0])); }, {a});
  expect_same_as_cpu<T>("slice_rows", [](auto&, auto in) { return slice_rows(in[0], 5, 20); }, {a});
  expect_same_as_cpu<T>("slice_cols", [](auto&, auto in) { return slice_cols(in[0], 17, 100); }, {a});
  expect_same_as_cpu<T>("concat_rows", [](auto&, auto in) { return concat_rows({in[0], in[1], in[0]}); }, {a, random_matrix(4, C, 8)});
  expect_same_as_cpu<T>("concat_cols", [](auto&, auto in) { return concat_cols({in[0], in[1]}); }, {a, random_matrix(R, 9, 9)});
}

TEST_CASE("dropout draws the CPU's masks on CUDA (same seed, step and op)") {
  const Mat a = positive(R, C, 1);
  auto program = [](auto&, auto in) { return eval(dropout(in[0], 0.4) + dropout(in[0] * 2.0, 0.25)); };
  const auto on_cpu = run<float, cpu>(program, {a}, 5);
  const auto on_gpu = run<float, cuda>(program, {a}, 5);
  CHECK(same_bits(on_gpu[0], on_cpu[0]));  // x * scale or 0: one rounding each, the same on both
  CHECK(same_bits(on_gpu[1], on_cpu[1]));
}

TEST_CASE("nn layers: Linear and LoRALinear on CUDA match the CPU") {
  const Eigen::MatrixXf W = random_matrix(48, 40, 1).cast<float>(), bias = random_matrix(48, 1, 2).cast<float>();
  const Mat x = random_matrix(40, 67, 3);
  auto lora_run = [&](auto backend_tag) {
    using B = decltype(backend_tag);
    nn::LoRALinear<float, B> layer(W, bias, 4, 8.0, 7);
    layer.B_matrix().assign(random_matrix(48, 4, 9).cast<float>());  // a trained adapter, not the zero start
    Tape<float, B> t;
    auto xv = t.variable(x);
    Var<float, B> loss = sum(tanh(layer(xv)));
    t.backward(loss);
    return std::vector<Mat>{layer.A().grad_to_host().template cast<double>(), layer.B_matrix().grad_to_host().template cast<double>(),
                            t.grad(xv).template cast<double>(), Mat::Constant(1, 1, loss.item())};
  };
  const auto c = lora_run(cpu{}), g = lora_run(cuda{});
  for (std::size_t k = 0; k < c.size(); ++k) expect_near(g[k], c[k], 1e-5, "LoRA result " + std::to_string(k));
}

namespace {

/// A residual MLP of L layers under policy P on CUDA: the input's and every weight's gradient.
template <class P>
std::vector<Eigen::MatrixXf> mlp_grads(int layers, int width, int batch) {
  std::vector<nn::Linear<float, cuda>> net;
  for (int l = 0; l < layers; ++l) net.emplace_back(width, width, 100 + static_cast<std::uint64_t>(l));
  Tape<float, cuda> t;
  auto x = t.variable(random_matrix(width, batch, 1).cast<float>());
  auto y = sequential<P>(static_cast<std::size_t>(layers),
                         [&net](std::size_t i, const Var<float, cuda>& h) -> Var<float, cuda> { return h + tanh(net[i](h)); }, x);
  t.backward(mean(square(y)));
  std::vector<Eigen::MatrixXf> grads{t.grad(x)};
  for (auto& l : net) grads.push_back(l.weight().grad_to_host());
  return grads;
}

template <class P>
void expect_policy_bitwise(const char* name) {
  INFO("policy: ", name);
  const auto plain = mlp_grads<policy::none>(9, 64, 33);
  const auto other = mlp_grads<P>(9, 64, 33);
  REQUIRE(plain.size() == other.size());
  for (std::size_t k = 0; k < plain.size(); ++k) CHECK(same_bits(other[k], plain[k]));
}

}  // namespace

TEST_CASE("every checkpoint policy gives CUDA none's gradients bit for bit; repeated runs repeat their bits") {
  expect_policy_bitwise<policy::none>("none, run twice");
  expect_policy_bitwise<policy::every<2>>("every<2>");
  expect_policy_bitwise<policy::sqrt_n>("sqrt_n");
  expect_policy_bitwise<policy::binomial<2>>("binomial<2>");
  expect_policy_bitwise<policy::selective<save::matmul>>("selective<matmul>");
  expect_policy_bitwise<policy::offload<>>("offload<sqrt_n>");
}

TEST_CASE("a training loop's steady state calls no cudaMalloc") {
  nn::Linear<float, cuda> l1(64, 128, 1), l2(128, 10, 2);
  Tape<float, cuda> t;
  const Eigen::MatrixXf x = random_matrix(64, 50, 3).cast<float>();
  std::vector<int> labels(50, 3);
  auto step = [&] {
    t.reset();
    auto xv = t.constant(x);
    auto h = checkpoint([&](const Var<float, cuda>& v) { return Var<float, cuda>(relu(l1(v))); }, xv);
    t.backward(cross_entropy(l2(h), labels));
  };
  step();
  step();
  const std::size_t after_two = cuda::counters().device_allocations;
  for (int i = 0; i < 5; ++i) step();
  CHECK(cuda::counters().device_allocations == after_two);
}

TEST_CASE("CUDA failures are ckpt::cuda_error naming the call; mismatched shapes are named as on the CPU") {
  CHECK_THROWS_WITH_AS(cuda::allocate(std::size_t(1) << 60), doctest::Contains("cudaMalloc"), cuda_error);
  Tape<float, cuda> t;
  auto a = t.variable(Eigen::MatrixXf::Ones(3, 4)), b = t.variable(Eigen::MatrixXf::Ones(5, 4));
  CHECK_THROWS_WITH_AS(matmul(a, b), doctest::Contains("matmul: inner dimensions differ"), shape_error);
  CHECK_THROWS_WITH_AS(t.backward(a), doctest::Contains("backward: the loss must be 1x1"), shape_error);
}

int main(int argc, char** argv) {
  if (!cuda::available()) {
    std::puts("test_cuda: no CUDA device here; every CUDA test skipped (not passed)");
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
