// The CUDA backend against the CPU backend: every op's value and gradient on the same inputs
// (float within 1e-5, double within 1e-12, relative to the tensor's largest entry), every
// checkpoint policy bitwise equal to CUDA `none`, repeated runs bitwise equal (no atomics),
// dropout's masks equal to the CPU's, optimizer steps within 1e-5 of them, no cudaMalloc in a training loop's
// steady state, and CUDA errors as ckpt::cuda_error. Without a CUDA device the binary reports itself skipped
// (exit code 77, which CTest shows as skipped), never passed.
#include <ckpt/cuda.hpp>

#define DOCTEST_CONFIG_IMPLEMENT
#include "support/backend_checks.hpp"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <span>
#include <string>
#include <thread>
#include <vector>

using namespace ckpt;
using ckpt::backend::cpu;
using ckpt::backend::cuda;
using ckpt::test::expect_near;
using ckpt::test::Mat;
using ckpt::test::positive;
using ckpt::test::random_matrix;
using ckpt::test::run_on;
using ckpt::test::same_bits;

constexpr int R = ckpt::test::cuda_rows, C = ckpt::test::cuda_cols;

// Every op against the CPU backend: tests/cuda/test_cuda_float.cu and test_cuda_double.cu,
// translation units of their own so that a many-core machine compiles them side by side.

TEST_CASE("float sums over long dimensions stay within 1e-6 of double on CUDA (runs, warp trees and grids in double)") {
  ckpt::test::check_long_sums<cuda>(1 << 22);
}

TEST_CASE("dropout draws the CPU's masks on CUDA (same seed, step and op)") {
  const Mat a = positive(R, C, 1);
  auto program = [](auto&, auto in) { return eval(dropout(in[0], 0.4) + dropout(in[0] * 2.0, 0.25)); };
  const auto on_cpu = run_on<float, cpu>(program, {a}, 5);
  const auto on_gpu = run_on<float, cuda>(program, {a}, 5);
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

TEST_CASE("optimizers: Adam and SGD steps on CUDA match the CPU's; embedding lookups too") {
  const std::vector<int> tokens = {5, 1, 5, 0, 9, 5, 2};
  auto train = [&](auto backend_tag) {
    using B = decltype(backend_tag);
    nn::Embedding<float, B> emb(random_matrix(16, 10, 1).cast<float>());
    nn::Linear<float, B> l(16, 8, 2);
    optim::Adam<float, B> adam({&emb.weight(), &l.weight()}, {.lr = 0.01, .weight_decay = 0.1});
    optim::SGD<float, B> sgd({&l.bias()}, {.lr = 0.05, .momentum = 0.9});
    for (int k = 0; k < 3; ++k) {
      Tape<float, B> t;
      t.backward(mean(square(tanh(l(emb(t, tokens))))));
      adam.step();
      sgd.step();
      adam.zero_grad();
      sgd.zero_grad();
    }
    return std::vector<Mat>{emb.weight().to_host().template cast<double>(), l.weight().to_host().template cast<double>(),
                            l.bias().to_host().template cast<double>()};
  };
  const auto c = train(cpu{}), g = train(cuda{});
  for (std::size_t k = 0; k < c.size(); ++k) expect_near(g[k], c[k], 1e-5, "parameter " + std::to_string(k));
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

TEST_CASE("offload with several megabyte boundaries in flight: none's gradients bit for bit, host memory counted and given back") {
  // 16 layers in segments of 2: 7 checkpointed segments, so 6 boundaries between two of them,
  // 512 x 1024 floats (2 MiB) each, go out and come back, copies overlapping compute.
  const auto plain = mlp_grads<policy::every<2>>(16, 512, 1024);
  const auto moved = mlp_grads<policy::offload<policy::every<2>>>(16, 512, 1024);
  REQUIRE(plain.size() == moved.size());
  for (std::size_t k = 0; k < plain.size(); ++k) CHECK(same_bits(moved[k], plain[k]));
  std::vector<nn::Linear<float, cuda>> net;
  for (int l = 0; l < 16; ++l) net.emplace_back(512, 512, 100 + static_cast<std::uint64_t>(l));
  Tape<float, cuda> t;
  auto x = t.variable(random_matrix(512, 1024, 1).cast<float>());
  auto y = sequential<policy::offload<policy::every<2>>>(
      net.size(), [&net](std::size_t i, const Var<float, cuda>& h) -> Var<float, cuda> { return h + tanh(net[i](h)); }, x);
  const std::size_t boundary = sizeof(float) * 512 * 1024;
  CHECK(t.memory().host_bytes > 0);
  CHECK(t.memory().host_bytes <= 6 * boundary);
  t.backward(mean(square(y)));
  CHECK(t.memory().host_peak_bytes == 6 * boundary);  // pinned buffers are taken as copies start
  CHECK(t.memory().host_bytes == 0);
}

TEST_CASE("a training loop's steady state calls no cudaMalloc") {
  nn::Linear<float, cuda> l1(64, 128, 1), l2(128, 10, 2);
  optim::Adam<float, cuda> adam({&l1.weight(), &l1.bias(), &l2.weight(), &l2.bias()});  // its moments: allocated in the first step
  Tape<float, cuda> t;
  const Eigen::MatrixXf x = random_matrix(64, 50, 3).cast<float>();
  std::vector<int> labels(50, 3);
  auto step = [&] {
    t.reset();
    auto xv = t.constant(x);
    auto h = checkpoint([&](const Var<float, cuda>& v) { return Var<float, cuda>(relu(l1(v))); }, xv);
    t.backward(cross_entropy(l2(h), labels));
    adam.step();
    adam.zero_grad();
    // A loop that logs its loss waits here; without it the host may run a step ahead, and an
    // upload may find the previous step's staging buffer still being copied (and add one).
    cuda::synchronize();
  };
  auto& staging = cuda::context().staging();
  const std::size_t limit = staging.limit();
  staging.set_limit(0);  // frees what earlier tests staged
  staging.set_limit(limit);
  step();
  step();
  const std::size_t after_two = cuda::counters().device_allocations;
  const std::size_t staged = cuda::counters().staged_uploads;
  for (int i = 0; i < 5; ++i) step();
  CHECK(cuda::counters().device_allocations == after_two);
  // x and the labels each step, without waiting, through two staging buffers at most (one if
  // x's copy is done by the time the labels come) reused step after step.
  CHECK(cuda::counters().staged_uploads == staged + 10);
  CHECK(staging.held_bytes() <= 2 * staging.granule);
}

/// Keeps the stream busy for about `cycles` clock cycles.
__global__ void spin(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

/// Whether the compute stream still has queued work (clearing "not ready" from the last error).
bool stream_busy() {
  const cudaError_t r = cudaStreamQuery(cuda::stream());
  (void)cudaGetLastError();
  return r == cudaErrorNotReady;
}

TEST_CASE("an upload's host buffer may be reused as soon as from_host returns, pageable or pinned, and the host does not wait") {
  const long n = 1 << 22;
  float* dev = static_cast<float*>(cuda::allocate(sizeof(float) * n));
  std::vector<float> pageable(static_cast<std::size_t>(n)), back(static_cast<std::size_t>(n));
  float* pinned = static_cast<float*>(cuda::host_allocate(sizeof(float) * n));
  cuda::from_host(dev, pageable.data(), n);  // the staging buffer exists before the timed part
  cuda::synchronize();
  for (float* host : {pageable.data(), pinned}) {
    for (long i = 0; i < n; ++i) host[i] = static_cast<float>(i % 1000);
    spin<<<1, 1, 0, cuda::stream()>>>(100'000'000LL);  // about 50 ms queued before the upload
    const std::size_t staged = cuda::counters().staged_uploads;
    cuda::from_host(dev, host, n);
    CHECK(stream_busy());  // from_host returned with the spin still running
    CHECK(cuda::counters().staged_uploads == staged + 1);
    std::fill(host, host + n, -1.f);  // the caller reuses its buffer at once
    cuda::to_host(back.data(), dev, n);
    long wrong = 0;
    for (long i = 0; i < n; ++i) wrong += back[static_cast<std::size_t>(i)] != static_cast<float>(i % 1000);
    CHECK(wrong == 0);
  }
  cuda::host_deallocate(pinned);
  cuda::deallocate(dev, sizeof(float) * n);
}

TEST_CASE("upload staging stays within its limit: a run of uploads past it waits for the stream, a larger upload waits for its copy") {
  auto& c = cuda::context();
  const std::size_t limit = c.staging().limit();
  c.staging().set_limit(0);  // frees what earlier tests staged
  CHECK(c.staging().held_bytes() == 0);
  c.staging().set_limit(std::size_t(8) << 20);
  const long n = 1 << 20;  // 4 MiB of floats: two fit in the limit, a third does not
  float* dev = static_cast<float*>(cuda::allocate(sizeof(float) * 3 * n));
  std::vector<float> host(static_cast<std::size_t>(3 * n)), back(static_cast<std::size_t>(3 * n));
  auto value = [](long i) { return static_cast<float>(i % 1013); };
  spin<<<1, 1, 0, cuda::stream()>>>(100'000'000LL);  // so that the first upload is still queued at the second
  cuda::from_host(dev, host.data(), n);               // two staging buffers exist before the timed part
  cuda::from_host(dev + n, host.data(), n);
  cuda::synchronize();
  CHECK(c.staging().held_bytes() == std::size_t(8) << 20);
  const std::size_t pinned = cuda::counters().host_allocations;
  cudaEvent_t spun = nullptr;
  REQUIRE(cudaEventCreateWithFlags(&spun, cudaEventDisableTiming) == cudaSuccess);
  spin<<<1, 1, 0, cuda::stream()>>>(100'000'000LL);
  REQUIRE(cudaEventRecord(spun, cuda::stream()) == cudaSuccess);
  for (long k = 0; k < 3; ++k) {
    for (long i = 0; i < n; ++i) host[static_cast<std::size_t>(i)] = value(k * n + i);
    cuda::from_host(dev + k * n, host.data(), n);  // one host buffer, reused for each upload
    CHECK(c.staging().held_bytes() <= c.staging().limit());
    const cudaError_t spin_state = cudaEventQuery(spun);
    (void)cudaGetLastError();
    // The first two returned with the spin still running; the third waited for it (for the
    // stream) to free a buffer, and its own copy may still be queued.
    CHECK((spin_state == cudaErrorNotReady) == (k < 2));
  }
  cudaEventDestroy(spun);
  CHECK(cuda::counters().host_allocations == pinned);  // and reused one
  cuda::to_host(back.data(), dev, 3 * n);
  long wrong = 0;
  for (long i = 0; i < 3 * n; ++i) wrong += back[static_cast<std::size_t>(i)] != value(i);
  CHECK(wrong == 0);

  for (long i = 0; i < 3 * n; ++i) host[static_cast<std::size_t>(i)] = value(i + 7);
  spin<<<1, 1, 0, cuda::stream()>>>(100'000'000LL);
  const std::size_t waited = cuda::counters().waited_uploads;
  cuda::from_host(dev, host.data(), 3 * n);  // 12 MiB: more than the limit
  CHECK(cuda::counters().waited_uploads == waited + 1);
  CHECK_FALSE(stream_busy());
  cuda::to_host(back.data(), dev, 3 * n);
  wrong = 0;
  for (long i = 0; i < 3 * n; ++i) wrong += back[static_cast<std::size_t>(i)] != value(i + 7);
  CHECK(wrong == 0);
  c.staging().set_limit(limit);
  cuda::deallocate(dev, sizeof(float) * 3 * n);
}

TEST_CASE("another host thread gets cuda_thread_error until it adopts the backend; a tape's work then goes on there") {
  (void)cuda::context();  // this thread holds it, also when this test runs alone
  bool threw = false;
  std::string what, other_error;
  std::thread intruder([&] {
    try {
      Tape<float, cuda> t;
      (void)t.variable(Eigen::MatrixXf::Ones(3, 4));
    } catch (const cuda_thread_error& e) {
      threw = true;
      what = e.what();
    } catch (const std::exception& e) {  // escaping a std::thread would end the whole run
      other_error = e.what();
    }
  });
  intruder.join();
  CHECK(threw);
  CHECK(other_error == "");
  CHECK(what.find("adopt_this_thread") != std::string::npos);

  // Handed over: a tape built here is used by a worker that adopts the backend, then back.
  Tape<float, cuda> t;
  auto x = t.variable(Eigen::MatrixXf::Constant(3, 4, 2.f));
  auto loss = sum(square(x));
  Eigen::MatrixXf grad;
  std::thread worker([&] {
    try {
      CHECK_THROWS_AS(t.backward(loss), cuda_thread_error);  // refused before any work ...
      cuda::adopt_this_thread();
      t.backward(loss);  // ... so it can be made again once adopted
      grad = t.grad(x);
    } catch (const std::exception& e) {
      other_error = e.what();
    }
  });
  worker.join();
  CHECK(other_error == "");
  CHECK_THROWS_AS((void)t.grad(x), cuda_thread_error);  // the worker holds it now
  cuda::adopt_this_thread();
  CHECK(grad.isApprox(Eigen::MatrixXf::Constant(3, 4, 4.f)));
  CHECK(t.grad(x).isApprox(grad));
}

TEST_CASE("CUDA failures are ckpt::cuda_error naming the call; mismatched shapes are named as on the CPU") {
  CHECK_THROWS_WITH_AS(cuda::allocate(std::size_t(1) << 60), doctest::Contains("cudaMalloc"), cuda_error);
  Tape<float, cuda> t;
  auto a = t.variable(Eigen::MatrixXf::Ones(3, 4)), b = t.variable(Eigen::MatrixXf::Ones(5, 4));
  CHECK_THROWS_WITH_AS(matmul(a, b), doctest::Contains("matmul: inner dimensions differ"), shape_error);
  CHECK_THROWS_WITH_AS(t.backward(a), doctest::Contains("backward: the loss must be 1x1"), shape_error);
}

int main(int argc, char** argv) {
  if (const std::string why = cuda::unavailable_reason(); !why.empty()) {
    std::printf("test_cuda: no CUDA device here (%s); every CUDA test skipped (not passed)\n", why.c_str());
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
