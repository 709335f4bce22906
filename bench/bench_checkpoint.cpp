// bench_checkpoint: what checkpointing costs. One MLP training step (forward + backward) per
// policy, against `none`; the loop form with binomial<16> over 10,000 steps of an ODE-like
// step. Before timing, each policy's gradients are checked bit for bit against `none`.
//
// Counters: peak_bytes (the tape's peak), step_evals (calls of the step function per step),
// gemms (matrix products per step, forward and reverse) and flop_ratio (GEMM FLOPs against
// `none`: all products of the MLP have the same size, so this is the theoretical time ratio
// when products dominate).
#include <ckpt/ckpt.hpp>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

using namespace ckpt;
using Mat = Eigen::MatrixXf;

namespace {

struct mlp {
  int layers, width, batch;
  std::vector<Parameter<float>> W, b;
  Mat x;
  mlp(int l, int w, int n) : layers(l), width(w), batch(n) {
    std::srand(1);
    for (int i = 0; i < l; ++i) {
      W.emplace_back(Mat(Mat::Random(w, w) * (1.0f / std::sqrt(float(w)))));
      b.emplace_back(Mat(Mat::Random(w, 1) * 0.1f));
    }
    x = Mat::Random(w, n);
  }
  void zero_grad() {
    for (auto& p : W) p.zero_grad();
    for (auto& p : b) p.zero_grad();
  }
};

struct step_stats {
  std::size_t peak = 0, calls = 0, gemms = 0;
};

template <Policy P>
step_stats mlp_step(mlp& m, Tape<float>& tape) {
  tape.reset();
  m.zero_grad();
  step_stats s;
  Var<float> x = tape.constant(m.x);
  Var<float> h = sequential<P>(
      static_cast<std::size_t>(m.layers),
      [&m, &s](std::size_t i, const Var<float>& v) -> Var<float> {
        ++s.calls;
        return relu(matmul(m.W[i], v) + m.b[i]);
      },
      x);
  Var<float> loss = mean(square(h));
  tape.backward(loss);
  s.peak = tape.peak_bytes();
  s.gemms = tape.counters().gemms;
  return s;
}

std::vector<Mat> grads(mlp& m) {
  std::vector<Mat> g;
  for (auto& p : m.W) g.push_back(p.grad());
  for (auto& p : m.b) g.push_back(p.grad());
  return g;
}

template <Policy P>
void check_against_none(mlp& m) {
  Tape<float> t0, t1;
  const step_stats none = mlp_step<policy::none>(m, t0);
  (void)none;
  const auto g0 = grads(m);
  mlp_step<P>(m, t1);
  const auto g1 = grads(m);
  for (std::size_t i = 0; i < g0.size(); ++i)
    if (std::memcmp(g0[i].data(), g1[i].data(), sizeof(float) * g0[i].size()) != 0) {
      std::fprintf(stderr, "bench_checkpoint: gradient %zu differs from policy::none\n", i);
      std::abort();
    }
}

template <Policy P>
void bm_mlp(benchmark::State& state, int layers, int width, int batch) {
  mlp m(layers, width, batch);
  check_against_none<P>(m);
  Tape<float> none_tape;
  const std::size_t none_gemms = mlp_step<policy::none>(m, none_tape).gemms;
  Tape<float> tape;
  step_stats s = mlp_step<P>(m, tape);  // warm the pool
  for (auto _ : state) s = mlp_step<P>(m, tape);
  state.counters["peak_bytes"] = static_cast<double>(s.peak);
  state.counters["step_evals"] = static_cast<double>(s.calls);
  state.counters["gemms"] = static_cast<double>(s.gemms);
  state.counters["flop_ratio"] = static_cast<double>(s.gemms) / static_cast<double>(none_gemms);
}

// ------------------------------------------------------------------ the loop form

struct ode {
  int n, dim;
  Parameter<float> W;
  Mat x0;
  ode(int steps, int d) : n(steps), dim(d), W(Mat(Mat::Random(d, d) * (1.0f / std::sqrt(float(d))))), x0(Mat::Random(d, 1)) {}
};

template <Policy P>
step_stats ode_step(ode& o, Tape<float>& tape) {
  tape.reset();
  o.W.zero_grad();
  step_stats s;
  Var<float> x = tape.variable(o.x0);
  Var<float> y = sequential<P>(
      static_cast<std::size_t>(o.n),
      [&o, &s](std::size_t, const Var<float>& v) -> Var<float> {
        ++s.calls;
        return v + 0.01f * tanh(matmul(o.W, v));
      },
      x);
  Var<float> loss = sum(square(y));
  tape.backward(loss);
  s.peak = tape.peak_bytes();
  s.gemms = tape.counters().gemms;
  return s;
}

template <Policy P>
void bm_ode(benchmark::State& state, int steps, int dim) {
  ode o(steps, dim);
  {
    Tape<float> t0, t1;
    ode_step<policy::none>(o, t0);
    const Mat g0 = o.W.grad();
    ode_step<P>(o, t1);
    if (std::memcmp(g0.data(), o.W.grad().data(), sizeof(float) * g0.size()) != 0) {
      std::fprintf(stderr, "bench_checkpoint: ode gradient differs from policy::none\n");
      std::abort();
    }
  }
  Tape<float> tape;
  step_stats s = ode_step<P>(o, tape);
  for (auto _ : state) s = ode_step<P>(o, tape);
  state.counters["peak_bytes"] = static_cast<double>(s.peak);
  state.counters["step_evals"] = static_cast<double>(s.calls);
}

template <Policy P>
void add_mlp(const char* name, int l, int w, int n) {
  const std::string full = std::string(name) + "/" + std::to_string(l) + "/" + std::to_string(w) + "/" + std::to_string(n);
  benchmark::RegisterBenchmark(full.c_str(), [=](benchmark::State& st) { bm_mlp<P>(st, l, w, n); })->Unit(benchmark::kMillisecond);
}

const bool registered = [] {
  const int sizes[][3] = {{64, 256, 64}, {256, 128, 32}};
  for (const auto& s : sizes) {
    add_mlp<policy::none>("none", s[0], s[1], s[2]);
    add_mlp<policy::every<4>>("every4", s[0], s[1], s[2]);
    add_mlp<policy::sqrt_n>("sqrt_n", s[0], s[1], s[2]);
    add_mlp<policy::binomial<4>>("binomial4", s[0], s[1], s[2]);
    add_mlp<policy::selective<save::matmul>>("selective_matmul", s[0], s[1], s[2]);
  }
  benchmark::RegisterBenchmark("ode_none/10000/16", [](benchmark::State& st) { bm_ode<policy::none>(st, 10000, 16); })
      ->Unit(benchmark::kMillisecond);
  benchmark::RegisterBenchmark("ode_binomial16/10000/16", [](benchmark::State& st) { bm_ode<policy::binomial<16>>(st, 10000, 16); })
      ->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace

BENCHMARK_MAIN();
